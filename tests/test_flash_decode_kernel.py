"""The flash-decoding kernels, Triton (``llama_fast.kernels.flash_decode``) and CUDA
(the cuda backend's decode, on a GPU with the extension built), against a float64
reference written here: GQA/MQA/MHA, head dims, Sq 1 and 4, cache lengths from 0 to Smax,
explicit and chosen split counts (more splits than key blocks included), NaN beyond the
valid length, strided caches, and the launch heuristics (shapes only, never lengths).

On the CPU the kernels run under the Triton interpreter (slow: small shapes); on a GPU the
same tests run compiled. The general flash_decode op tests live in test_attention.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import llama_fast
from _helpers import DEVICE, ON_GPU, assert_close
from llama_fast import backends

pytestmark = pytest.mark.skipif(backends.device_reason("triton", DEVICE) is not None,
                                reason=f"triton cannot run here: {backends.device_reason('triton', DEVICE)}")

F64 = torch.float64


def _fd():
    from llama_fast.kernels import flash_decode  # imports triton: after conftest set the interpreter up

    return flash_decode


def _decoder(impl: str):
    """The decode of one backend, through the dispatcher (so shapes outside the cuda kernel's
    tile take the routing rule to triton, as a user's call does)."""
    if impl == "triton":
        return _fd().decode

    def decode(*args):
        with llama_fast.backend(impl):
            return backends.run("decode", args[0].device, *args)

    return decode


_CUDA_WHY = backends.device_reason("cuda", DEVICE)
# Every correctness test runs each implementation; the CUDA one needs a GPU and the extension.
each_impl = pytest.mark.parametrize("impl", ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    _CUDA_WHY is not None, reason=f"the cuda backend cannot run here: {_CUDA_WHY}"))])


# ---------------------------------------------------------------------------------------
# the float64 reference


def reference(q, k_cache, v_cache, seqlens, scale):
    """q (B, Sq, Hq, D), caches (B, Smax, Hkv, D): the new tokens are the last Sq of the
    L = clamp(seqlens[b], 0, Smax) valid entries; token t (position L - Sq + t) sees keys
    j <= L - Sq + t. Rows that see no key output 0. float64 throughout."""
    batch, q_len, q_heads, _ = q.shape
    smax, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(q.shape, dtype=F64)
    for b in range(batch):
        length = min(max(int(seqlens[b]), 0), smax)
        k = k_cache[b, :length].to(F64).cpu().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = v_cache[b, :length].to(F64).cpu().repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[b].to(F64).cpu(), k) * scale
        visible = torch.arange(length)[None, :] <= (length - q_len + torch.arange(q_len))[:, None]
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row of -inf gives NaN: it sees nothing
        out[b] = torch.einsum("hqk,khd->qhd", p, v)
    return out


# ---------------------------------------------------------------------------------------
# inputs


def make_inputs(batch, q_len, q_heads, kv_heads, head_dim, smax, lengths, dtype, layout="contiguous"):
    """q and caches with NaN in every cache slot at or past the valid length."""
    q = torch.randn(batch, q_len, q_heads, head_dim, device=DEVICE, dtype=dtype)
    if layout == "contiguous":
        k = torch.randn(batch, smax, kv_heads, head_dim, device=DEVICE, dtype=dtype)
        v = torch.randn(batch, smax, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    elif layout == "heads_first":  # (B, Hkv, Smax, D) storage viewed as (B, Smax, Hkv, D)
        k = torch.randn(batch, kv_heads, smax, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(batch, kv_heads, smax, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
        q = torch.randn(batch, q_heads, q_len, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    elif layout == "sliced":  # a window of a bigger, padded cache, and a padded q
        big = (batch + 1, smax + 5, kv_heads + 1, head_dim + 8)
        k = torch.randn(big, device=DEVICE, dtype=dtype)[1:, 2:-3, 1:, 8:]
        v = torch.randn(big, device=DEVICE, dtype=dtype)[:-1, 3:-2, :-1, :-8]
        q = torch.randn(batch, q_len, q_heads, head_dim + 4, device=DEVICE, dtype=dtype)[..., 2:-2]
    elif layout == "strided_last":  # head dim not contiguous: the launcher copies
        k = torch.randn(batch, smax, kv_heads, head_dim * 2, device=DEVICE, dtype=dtype)[..., ::2]
        v = torch.randn(batch, smax, kv_heads, head_dim * 2, device=DEVICE, dtype=dtype)[..., 1::2]
        q = torch.randn(batch, q_len, q_heads, head_dim * 2, device=DEVICE, dtype=dtype)[..., ::2]
    else:
        raise ValueError(layout)
    for b, length in enumerate(lengths):
        start = min(max(length, 0), smax)
        k[b, start:] = float("nan")
        v[b, start:] = float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q, k, v, seqlens


def run_and_check(impl, q, k, v, seqlens, num_splits, dtype, what, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = _decoder(impl)(q, k, v, seqlens, scale, num_splits)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, reference(q, k, v, seqlens.cpu(), scale), dtype, what)
    return out


# ---------------------------------------------------------------------------------------
# correctness

# (Sq, Hq, Hkv, D, dtype, num_splits): GQA 4 and 8, MQA, MHA; head dims 32/64/96/128;
# splits chosen (0), one (the split kernel writes the output), a few, more than blocks.
CASES = [
    (1, 8, 2, 64, torch.bfloat16, 0),
    (1, 8, 1, 128, torch.float16, 3),
    (1, 16, 2, 128, torch.bfloat16, 1),
    (4, 8, 8, 64, torch.float32, 2),
    (4, 16, 2, 128, torch.bfloat16, 0),
    (4, 4, 1, 32, torch.float16, 7),
    (1, 4, 4, 96, torch.float32, 1),
    (4, 8, 2, 96, torch.bfloat16, 100),
]


@pytest.mark.parametrize("q_len,q_heads,kv_heads,head_dim,dtype,num_splits", CASES,
                         ids=[f"sq{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-{str(c[4])[6:]}-splits{c[5]}" for c in CASES])
@each_impl
def test_matches_reference(impl, q_len, q_heads, kv_heads, head_dim, dtype, num_splits):
    smax = 150  # 2 key blocks of 128 (head dim <= 64) or 3 of 64, the last one partial
    # Full (a partial last block), a single key (fewer than Sq at Sq 4), and a multiple of
    # the block size (at Sq 4 the last whole block is cut by the causal edge).
    lengths = [smax, 1, 128]
    q, k, v, seqlens = make_inputs(3, q_len, q_heads, kv_heads, head_dim, smax, lengths, dtype)
    run_and_check(impl, q, k, v, seqlens, num_splits, dtype, "out")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
@each_impl
def test_split_counts_agree(impl, num_splits):
    """Any number of splits gives the result: uneven shares (4 blocks over 3 splits: 2, 2
    and an empty one), more splits than key blocks (64: clamped to 4), and more splits than
    a short sequence has blocks (empty splits: lse -inf, weight 0)."""
    lengths = [200, 37, 4]  # 4, 1 and 1 blocks of 64 keys (head dim 128)
    q, k, v, seqlens = make_inputs(3, 4, 8, 2, 128, 200, lengths, torch.float32)
    run_and_check(impl, q, k, v, seqlens, num_splits, torch.float32, f"out with {num_splits} splits")


@pytest.mark.parametrize("num_splits", [1, 3])
@each_impl
def test_rows_that_see_no_key_are_zero(impl, num_splits):
    """L = 0 (nothing valid), and L < Sq: the first Sq - L new tokens see no key."""
    q, k, v, seqlens = make_inputs(3, 4, 4, 2, 64, 130, [0, 2, 130], torch.bfloat16)
    out = run_and_check(impl, q, k, v, seqlens, num_splits, torch.bfloat16, "out")
    assert (out[0] == 0).all() and (out[1, :2] == 0).all()
    assert (out[1, 2:] != 0).any()


@each_impl
def test_lengths_are_clamped_on_the_device(impl):
    """Lengths past Smax count as Smax, negative ones as 0 (no host check, no sync)."""
    q, k, v, seqlens = make_inputs(2, 1, 4, 1, 64, 70, [70, 0], torch.float32)
    seqlens = torch.tensor([1000, -5], dtype=torch.int32, device=DEVICE)
    out = _decoder(impl)(q, k, v, seqlens, 0.125, 2)
    assert_close(out, reference(q, k, v, [70, 0], 0.125), torch.float32, "out")


@pytest.mark.parametrize("layout", ["heads_first", "sliced", "strided_last"])
@each_impl
def test_strided_inputs(impl, layout):
    q, k, v, seqlens = make_inputs(2, 4, 8, 2, 64, 140, [140, 50], torch.bfloat16, layout)
    seqlens = torch.stack((seqlens, torch.full_like(seqlens, -7)), dim=1)[:, 0]  # a strided view too
    run_and_check(impl, q, k, v, seqlens, 2, torch.bfloat16, f"out ({layout})", scale=0.3)


def test_public_op_dispatches_to_the_triton_kernel():
    q, k, v, seqlens = make_inputs(2, 1, 8, 2, 64, 100, [100, 9], torch.bfloat16)
    assert backends.get("triton").ops()["decode"] is _fd().decode
    with llama_fast.backend("triton"):
        out = llama_fast.flash_decode(q, k, v, seqlens, num_splits=2)
    assert_close(out, reference(q, k, v, seqlens.cpu(), 1 / 8), torch.bfloat16, "out")


# ---------------------------------------------------------------------------------------
# launch heuristics: shapes only


class _Recorder:
    """Stands in for a kernel: records each launch's grid and scalar arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.launches.append((grid, scalars, shapes, tuple(sorted(kwargs.items()))))
        return launch

    def run(self, *args, grid, warmup, **kwargs):  # what launchers whose config may be tuned call
        assert not warmup, "a warm-up compile outside tuning"
        return self[grid](*args, **kwargs)


def test_launches_depend_on_shapes_not_lengths(monkeypatch):
    """Grids, scratch sizes and every scalar argument are the same whatever the lengths
    (a CUDA graph captured once replays for any lengths), and the lengths are never read
    on the host."""
    fd = _fd()
    split = _Recorder()
    monkeypatch.setattr(fd, "_flash_decode_split_kernel", split)
    q, k, v, _ = make_inputs(1, 1, 8, 1, 64, 1000, [1000], torch.bfloat16)  # one program per split
    for lengths in ([1000], [0], [513]):
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        monkeypatch.setattr(seqlens, "tolist", lambda: pytest.fail("read the lengths on the host"))
        monkeypatch.setattr(seqlens, "item", lambda: pytest.fail("read the lengths on the host"))
        fd.decode(q, k, v, seqlens, 0.125, 0)
    # One launch per call (the combine is fused), the same every time.
    assert len(split.launches) == 3 and len(set(split.launches)) == 1


def test_num_splits_heuristic(monkeypatch):
    fd = _fd()
    cpu = torch.device("cpu")
    # Explicit counts are honoured, clamped to the key blocks of Smax (at least 1).
    assert fd.choose_num_splits(3, cpu, 1, 1000, 64) == 3
    assert fd.choose_num_splits(50, cpu, 1, 1000, 64) == 16
    assert fd.choose_num_splits(5, cpu, 1, 0, 64) == 1
    # Chosen: about 2 programs per SM on a GPU (here a fake one with 132 SMs), a few on the CPU.
    monkeypatch.setattr(fd, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert fd.choose_num_splits(0, gpu, 8, 16384, 64) == 33  # B=1, 8 kv heads: 264 / 8
    assert fd.choose_num_splits(0, gpu, 8, 8192, 64) == 32  # 128 key blocks, >= 4 per split
    assert fd.choose_num_splits(0, gpu, 8, 1024, 64) == 4  # 16 key blocks: 4 splits of 4
    assert fd.choose_num_splits(0, gpu, 8, 100, 64) == 1  # 2 key blocks: no split
    assert fd.choose_num_splits(8, gpu, 8, 1024, 64) == 8  # an explicit count is honoured
    assert fd.choose_num_splits(0, gpu, 512, 8192, 64) == 1  # a big batch fills the GPU alone
    assert 1 <= fd.choose_num_splits(0, cpu, 1, 8192, 64) <= fd.CPU_PROGRAMS


@pytest.mark.parametrize("gpu", ["hopper", "blackwell", "ampere", "consumer"])
def test_launch_config_tiles(gpu):
    fd = _fd()
    for group, q_len, head_dim in [(4, 1, 128), (8, 1, 64), (1, 1, 32), (8, 4, 128), (32, 4, 256), (1, 1, 96)]:
        cfg = fd.launch_config(group, q_len, head_dim, gpu)
        assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16 and cfg["BLOCK_D"] >= max(16, head_dim)  # tl.dot dims
        assert cfg["BLOCK_M"] <= fd.MAX_BLOCK_M and cfg["BLOCK_N"] in (64, 128)
        if group * q_len <= fd.MAX_BLOCK_M:
            assert cfg["BLOCK_M"] >= group * q_len  # the whole group in one tile: the cache is read once
    # The consumer parts' 100 KiB SMs take half the keys per step at head dim 64.
    assert fd.launch_config(4, 1, 64, gpu)["BLOCK_N"] == (64 if gpu == "consumer" else 128)
    assert fd.launch_config(4, 1, 128, gpu)["BLOCK_N"] == 64
    assert fd.launch_config(4, 1, 128) == fd.launch_config(4, 1, 128, "hopper")  # off CUDA: hopper tiles


def test_every_gpu_class_has_its_archs_in_the_compile_configs():
    fd = _fd()
    configs = list(fd.compile_configs())
    assert {a for config in configs for a in config[5]} == {80, 86, 89, 90, 100, 120}
    consumer = [c for c in configs if c[2]["HEAD_DIM"] == 64 and c[2]["BLOCK_N"] == 64]
    assert consumer and all(set(c[5]) == {86, 89, 120} for c in consumer)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the device's own class runs in the tests above")
@pytest.mark.parametrize("gpu", ["ampere", "consumer", "blackwell"])
def test_other_gpu_classes_decode(monkeypatch, gpu):
    """The launcher reads the class from the device (faked here): each class's tiles,
    with splits and without, match the float64 reference (head dims 64 and 128, GQA 4,
    ragged lengths, a context of 1)."""
    from llama_fast.kernels import _common

    fd = _fd()
    limits = {"ampere": _common.DeviceLimits(80, 163 * 1024, 108), "consumer": _common.DeviceLimits(89, 99 * 1024, 58),
              "blackwell": _common.DeviceLimits(100, 227 * 1024, 148)}[gpu]
    monkeypatch.setattr(fd, "device_limits", lambda device: limits)
    for head_dim in (64, 128):
        q, k, v, seqlens = make_inputs(2, 1, 8, 2, head_dim, 150, [150, 1], torch.bfloat16)
        for splits in (1, 3):
            run_and_check("triton", q, k, v, seqlens, splits, torch.bfloat16, f"{gpu} d{head_dim} {splits} splits")


# ---------------------------------------------------------------------------------------
# the fused combine: the last program of each row tile merges the splits


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_fused_combine_short_contexts(batch, num_splits):
    """B 1..4 at short, ragged contexts (1, a length that is not a multiple of the 64-key
    block, one key past a block, a full cache), GQA 4, several split counts (empty splits
    included): one launch, the output right everywhere, the counters left zero."""
    fd = _fd()
    lengths = [1, 97, 65, 200][:batch]
    q, k, v, seqlens = make_inputs(batch, 1, 8, 2, 128, 200, lengths, torch.bfloat16)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    out = fd.decode(q, k, v, seqlens, 1 / math.sqrt(128), num_splits, counters)
    assert_close(out, reference(q, k, v, seqlens.cpu(), 1 / math.sqrt(128)), torch.bfloat16, "out")
    assert not counters.any()


def test_fused_combine_counters_reset_for_the_next_call():
    """Two calls in a row with the same counters (as a CUDA graph replays them, with no
    memset in between): both right, the counters all zero after each, and the second
    output bit-for-bit the first (the merge does not depend on which program ran last)."""
    fd = _fd()
    q, k, v, seqlens = make_inputs(3, 4, 8, 2, 64, 300, [300, 129, 5], torch.float16)
    counters = torch.zeros(3 * 2, dtype=torch.int32, device=DEVICE)  # B x Hkv row tiles, exactly
    outs = []
    for _ in range(2):
        outs.append(fd.decode(q, k, v, seqlens, 0.125, 3, counters))
        assert_close(outs[-1], reference(q, k, v, seqlens.cpu(), 0.125), torch.float16, "out")
        assert not counters.any(), counters
    assert torch.equal(outs[0], outs[1])


def test_default_counters_are_shared_and_stay_zero():
    """Without explicit counters a call uses its device's (and stream's) buffer, grown to
    the largest grid so far, zero after every call."""
    fd = _fd()
    for batch, kv_heads in ((1, 1), (4, 4), (2, 1)):
        q, k, v, seqlens = make_inputs(batch, 1, 4 * kv_heads, kv_heads, 32, 300, [300, 40, 3, 1][:batch], torch.float32)
        run_and_check("triton", q, k, v, seqlens, 4, torch.float32, f"B={batch}, Hkv={kv_heads}")
        counters = fd.split_counters(DEVICE, 1)
        assert counters.numel() >= batch * kv_heads and not counters.any()


@pytest.mark.parametrize("bad", ["short", "int64", "strided"])
def test_bad_counters_are_refused(bad):
    fd = _fd()
    q, k, v, seqlens = make_inputs(2, 1, 4, 2, 32, 90, [90, 40], torch.float32)
    counters = {"short": torch.zeros(3, dtype=torch.int32, device=DEVICE),
                "int64": torch.zeros(8, dtype=torch.int64, device=DEVICE),
                "strided": torch.zeros(16, dtype=torch.int32, device=DEVICE)[::2]}[bad]
    with pytest.raises(ValueError, match="counters must be a contiguous int32 tensor"):
        fd.decode(q, k, v, seqlens, 0.125, 2, counters)


@each_impl
def test_many_rows_take_several_row_blocks(impl):
    """group * Sq above MAX_BLOCK_M (MQA with 32 query heads, Sq 4): several row tiles."""
    q, k, v, seqlens = make_inputs(1, 4, 32, 1, 32, 40, [40], torch.float32)
    assert 32 * 4 > _fd().MAX_BLOCK_M
    run_and_check(impl, q, k, v, seqlens, 2, torch.float32, "out")


# ---------------------------------------------------------------------------------------
# GPU only


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a CUDA GPU with 40 GiB: caches past 2^31 elements")
@pytest.mark.xdist_group("large_memory")  # 12 GB of cache: on test_large.py's worker (gpu_check's --dist loadgroup)
@each_impl
def test_cache_offsets_past_int32(impl):
    """The last batch of the caches starts past element 2^31 (B * Smax * Hkv * D > 2^31)."""
    smax, kv_heads, head_dim, valid = 2**20 + 64, 8, 128, 300  # 2^30 + 2^16 elements per batch
    k = torch.empty(3, smax, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    k[:, :valid].normal_()  # the rest stays uninitialised: it must never be read
    v[:, :valid].normal_()
    q = torch.randn(3, 1, 32, head_dim, device=DEVICE, dtype=torch.bfloat16)
    seqlens = torch.tensor([valid, 5, valid], dtype=torch.int32, device=DEVICE)
    out = _decoder(impl)(q, k, v, seqlens, 1 / math.sqrt(head_dim), 0)
    expected = reference(q, k[:, :valid], v[:, :valid], seqlens.cpu(), 1 / math.sqrt(head_dim))
    assert_close(out, expected, torch.bfloat16, "out")
