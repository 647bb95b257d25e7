"""The Triton attention kernels' TMA path (USE_TMA: Q/K/V/O/dO/dQ/dK/dV tiles through
(batch, row, head, dim) tensor descriptors), forced on under the interpreter: the same
results as the pointer path, bit for bit, and as the float64 reference (forward and
backward, causal and not, GQA, odd lengths, a padded head dim, TMA-legal non-contiguous
inputs); TMA-illegal tensors fall back to pointers. That the descriptors become TMA copies
on sm_90/sm_100 is tests/test_compile_sm90.py's job; which launches pick TMA is here."""
from __future__ import annotations

import pytest
import torch

from llama_fast import reference
from llama_fast.kernels import _common
from llama_fast.kernels import flash_attn as fa
from _helpers import DEVICE, ON_GPU, assert_close, f64, row_strided
from test_attention import assert_close_terms, cancellation_terms, check_attn, make_layout

BF16, F16 = torch.bfloat16, torch.float16
KIB = 1024
HOPPER = _common.DeviceLimits(90, 227 * KIB, 132)


@pytest.fixture
def descriptors(monkeypatch):
    """Records the box of every tensor descriptor the launchers build."""
    boxes = []
    real = fa.TensorDescriptor

    def recording(base, shape, strides, block_shape, *args):
        boxes.append(list(block_shape))
        return real(base, shape, strides, block_shape, *args)

    monkeypatch.setattr(fa, "TensorDescriptor", recording)
    return boxes


def _run(mode, q, k, v, do, causal, scale, monkeypatch):
    monkeypatch.setattr(fa, "tma_mode", mode)
    out, lse = fa.attn_fwd(q, k, v, causal, scale)
    return (out, lse, *fa.attn_bwd(do, q, k, v, out, lse, causal, scale))


@pytest.mark.skipif(ON_GPU, reason="forces the descriptor path on the interpreter; a GPU runs its own class's path")
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("b, sq, sk, hq, hkv, d", [
    (2, 37, 45, 4, 2, 64),  # GQA 2, ragged ends in both lengths
    (1, 45, 37, 4, 1, 40),  # more queries than keys (causal rows that see nothing), head dim padded to 64
    (1, 1, 1, 1, 1, 128),   # sizes of 1
])
def test_tma_path_matches_pointer_path_and_float64(monkeypatch, descriptors, dtype, causal, b, sq, sk, hq, hkv, d):
    torch.manual_seed(sq * 1000 + sk + d)
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(b, sk, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2))
    do = torch.randn_like(q)
    scale = d ** -0.5
    pointers = _run("off", q, k, v, do, causal, scale, monkeypatch)
    assert descriptors == []
    tma = _run("on", q, k, v, do, causal, scale, monkeypatch)
    block_d = fa._block_d(d)
    fwd, (dkdv, dq) = fa.forward_config(d, dtype), fa.backward_configs(d, dtype)
    assert descriptors == (  # fwd: q, k, v, out; dK/dV: q, k, v, dO, dK, dV; dQ: q, k, v, dO, dQ
        [[1, r, 1, block_d] for r in (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["BLOCK_N"], fwd["BLOCK_M"])]
        + [[1, r, 1, block_d] for r in [dkdv["BLOCK_M"]] + [dkdv["BLOCK_N"]] * 2 + [dkdv["BLOCK_M"]] + [dkdv["BLOCK_N"]] * 2]
        + [[1, r, 1, block_d] for r in [dq["BLOCK_M"]] + [dq["BLOCK_N"]] * 2 + [dq["BLOCK_M"]] * 2])
    for name, a, p in zip(("out", "lse", "dq", "dk", "dv"), tma, pointers):
        assert torch.equal(a, p), f"{name}: the TMA path differs from the pointer path"
    ref_out, ref_lse = reference.attn_fwd(f64(q), f64(k), f64(v), causal, scale)
    assert_close(tma[0], ref_out, dtype, "out")
    seen = ref_lse > float("-inf")
    assert torch.equal(tma[1] > float("-inf"), seen)
    assert_close(tma[1][seen], ref_lse[seen], torch.float32, "lse")
    ref_dq, ref_dk, ref_dv = reference.attn_bwd(f64(do), f64(q), f64(k), f64(v), ref_out, ref_lse, causal, scale)
    terms_q, terms_k = cancellation_terms(q, k, v, do, causal, scale)  # dq, dk cancel: see test_attention
    assert_close_terms(tma[2], ref_dq, dtype, "dq", terms_q)
    assert_close_terms(tma[3], ref_dk, dtype, "dk", terms_k)
    assert_close(tma[4], ref_dv, dtype, "dv")


@pytest.mark.skipif(ON_GPU, reason="forces the descriptor path on the interpreter")
@pytest.mark.parametrize("layout", ["hf_transposed", "fused_qkv"])
def test_tma_takes_legal_non_contiguous_views(monkeypatch, descriptors, layout):
    """(B, H, S, D) tensors seen as (B, S, H, D) and slices of a fused projection keep
    16-byte aligned strides: the descriptors address them as they are, through the public
    op (forward and the three gradients against float64, outputs poisoned)."""
    monkeypatch.setattr(fa, "tma_mode", "on")
    q, k, v = make_layout(layout, 2, 21, 4, 2, 32, BF16)
    assert not q.is_contiguous() and all(fa.tma_strides(t) is not None for t in (q, k, v))
    check_attn("triton", q, k, v, causal=True, dout=torch.randn(2, 4, 21, 32, dtype=BF16, device=DEVICE).transpose(1, 2))
    assert len(descriptors) == 4 + 6 + 5


@pytest.mark.skipif(ON_GPU, reason="forces the descriptor path on the interpreter")
@pytest.mark.parametrize("case", ["padded_rows", "misaligned_base"])
def test_tma_illegal_tensors_fall_back_to_pointers(monkeypatch, descriptors, case):
    """A row stride that is not a multiple of 16 bytes, or a base 2 bytes past an aligned
    one: TMA cannot address them, so every kernel takes the pointer path (no descriptor
    built) and the results still match float64."""
    monkeypatch.setattr(fa, "tma_mode", "on")
    if case == "padded_rows":
        q, k, v = (row_strided((2, 19, h, 32), BF16) for h in (4, 2, 2))  # rows of 35 elements
    else:
        q, k, v = (torch.randn(2 * 19 * h * 32 + 1, dtype=BF16, device=DEVICE)[1:].view(2, 19, h, 32) for h in (4, 2, 2))
    assert fa.tma_strides(q) is None
    check_attn("triton", q, k, v, causal=False)
    assert descriptors == []


def test_tma_strides():
    t = torch.empty(2, 16, 4, 64, dtype=BF16)
    assert fa.tma_strides(t) == [4096, 256, 64, 1]
    assert fa.tma_strides(t.transpose(1, 2).contiguous().transpose(1, 2)) == [4096, 64, 1024, 1]
    # A size-1 dim's stride is never stepped: a legal one replaces whatever torch reports.
    one = torch.empty(1, 16, 1, 64, dtype=BF16).as_strided((1, 16, 1, 64), (3, 64, 5, 1))
    strides = fa.tma_strides(one)
    assert strides[1] == 64 and strides[3] == 1 and all(s * 2 % 16 == 0 and s > 0 for s in strides[:3])
    assert fa.tma_strides(t[:, :, :, :60]) == [4096, 256, 64, 1]  # a narrower head dim: same strides
    assert fa.tma_strides(t[:, :, :, 1:]) is None  # base 2 bytes past alignment
    assert fa.tma_strides(torch.empty(2, 16, 4, 36, dtype=BF16)[..., :35]) is None  # 72-byte head stride
    assert fa.tma_strides(torch.empty(16, 1, 64, dtype=BF16).expand(2, 16, 4, 64)) is None  # stride 0
    assert fa.tma_strides(torch.empty(2, 0, 4, 64, dtype=BF16)) is None
    assert fa.tma_strides(torch.empty(2, 16, 4, 64, dtype=BF16)[..., ::2]) is None  # strided head dim


def test_tma_selection(monkeypatch):
    """auto: fixed-length 16-bit launches at head dims 64 and 128 on sm_90/100 (the
    configurations the compile check proves); never on other classes, varlen, float32 or
    off CUDA; "on" wherever the tensors allow it, "off" never."""
    q = torch.empty(1, 16, 2, 128, dtype=BF16)
    f32 = torch.empty(1, 16, 2, 128, dtype=torch.float32)
    cpu = torch.device("cpu")
    assert not fa._use_tma("fwd", cpu, False, True, q)  # auto, no CUDA device (the interpreter)
    monkeypatch.setattr(fa, "device_limits", lambda device: HOPPER)
    for kernel in ("fwd", "dkdv", "dq"):
        for causal in (True, False):
            assert fa._use_tma(kernel, cpu, False, causal, q) == ((kernel, 128, causal, "hopper") not in fa.TMA_OFF)
    assert fa._use_tma("fwd", cpu, False, True, q)
    assert not fa._use_tma("fwd", cpu, True, True, q)  # varlen
    assert not fa._use_tma("fwd", cpu, False, True, f32)
    assert not fa._use_tma("fwd", cpu, False, True, torch.empty(1, 16, 2, 256, dtype=BF16))
    assert not fa._use_tma("fwd", cpu, False, True, q, row_strided((1, 16, 2, 128), BF16))  # one illegal tensor
    monkeypatch.setattr(fa, "device_limits", lambda device: _common.DeviceLimits(80, 163 * KIB, 108))
    assert not fa._use_tma("fwd", cpu, False, True, q)
    monkeypatch.setattr(fa, "tma_mode", "on")
    assert fa._use_tma("fwd", cpu, False, True, f32) and not fa._use_tma("fwd", cpu, True, True, q)
    monkeypatch.setattr(fa, "tma_mode", "off")
    monkeypatch.setattr(fa, "device_limits", lambda device: HOPPER)
    assert not fa._use_tma("fwd", cpu, False, True, q)
    for gpu in ("hopper", "blackwell"):  # on where the compile check shows TMA no worse
        assert fa.tma_default("dkdv", 64, F16, gpu, True) and not fa.tma_default("dkdv", 64, F16, "ampere", True)
        assert fa.tma_default("fwd", 128, BF16, gpu, True)
    assert not fa.tma_default("fwd", 128, BF16, "blackwell", False)  # its TMA variant spills (TMA_OFF)
