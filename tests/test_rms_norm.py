"""rms_norm and add_rms_norm, every backend, against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_fast
from llama_fast import backends
from _helpers import BACKENDS, DEVICE, DTYPES, assert_close, f64, randn, row_strided

EPS = 1e-5


def reference(x, weight, eps=EPS, residual=None):
    """float64 RMSNorm (and the residual add), differentiable for the gradients."""
    h = x if residual is None else x + residual
    return weight * (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)), h


def check_rms_norm(backend, x, weight, residual=None, eps=EPS, dtype=None):
    """Forward and backward (x, residual and weight gradients) against float64."""
    dtype = dtype or x.dtype
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    if residual is not None:
        residual = residual.detach().requires_grad_()
    with llama_fast.backend(backend):
        if residual is None:
            y, h = llama_fast.rms_norm(x, weight, eps), None
        else:
            y, h = llama_fast.add_rms_norm(x, residual, weight, eps)
    assert y.dtype == torch.promote_types(x.dtype, weight.dtype)
    x64, w64 = f64(x, True), f64(weight, True)
    r64 = f64(residual, True) if residual is not None else None
    y64, h64 = reference(x64, w64, eps, r64)
    assert_close(y, y64, dtype, "y")
    dy = torch.randn_like(y)
    loss, loss64 = (y * dy).sum(), (y64 * f64(dy)).sum()
    if h is not None:
        assert_close(h, h64, dtype, "h")
        dh = torch.randn_like(h)  # the residual stream's own gradient flows through h
        loss, loss64 = loss + (h * dh).sum(), loss64 + (h64 * f64(dh)).sum()
    loss.backward()
    loss64.backward()
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w: it cancels (entirely, for one
    # element per row), so its error is relative to the size of the terms, not of dx.
    rstd64 = torch.rsqrt(h64.detach().square().mean(-1, keepdim=True) + eps)
    dx_scale = (f64(dy) * w64.detach() * rstd64).abs().max().item() if dy.numel() else 0.0
    assert_close(x.grad, x64.grad, dtype, "dx", scale=dx_scale)
    assert_close(weight.grad, w64.grad, dtype, "dweight")
    if residual is not None:
        # The residual's gradient is x's (h = x + residual): the same cancellation, the same scale.
        assert_close(residual.grad, r64.grad, dtype, "dresidual", scale=max(dx_scale, r64.grad.abs().max().item()))
    assert x.grad.dtype == x.dtype and weight.grad.dtype == weight.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_add", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("shape", [(1, 1), (3,), (2, 3, 37), (5, 1000), (1, 7, 64), (9, 3)])
def test_matches_float64(backend, dtype, fused_add, shape):
    residual = randn(shape, dtype) if fused_add else None
    check_rms_norm(backend, randn(shape, dtype), randn(shape[-1:], dtype), residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [4096, 5120, 14336] + ([8192, 28672] if DEVICE.type == "cuda" else []))
def test_llama_hidden_sizes(backend, hidden):
    """The hidden sizes of the Llama-3 family (non powers of two included); few rows on CPU."""
    rows = 64 if DEVICE.type == "cuda" else 3
    check_rms_norm(backend, randn((rows, hidden), torch.bfloat16), randn((hidden,), torch.bfloat16),
                   randn((rows, hidden), torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_weight_promotes(backend, dtype):
    """A float32 weight (mixed-precision training) gives a float32 output, as LlamaRMSNorm does."""
    check_rms_norm(backend, randn((4, 33), dtype), randn((33,), torch.float32), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_padded", "transposed", "strided_last_dim"])
@pytest.mark.parametrize("fused_add", [False, True])
def test_non_contiguous(backend, layout, fused_add):
    shape = (3, 5, 24)
    make = {
        "row_padded": lambda: row_strided(shape, torch.float32),
        "transposed": lambda: randn((5, 3, 24), torch.float32).transpose(0, 1),
        "strided_last_dim": lambda: randn(shape, torch.float32, strided=True),
    }[layout]
    x = make()
    assert not x.is_contiguous()
    check_rms_norm(backend, x, randn((24,), torch.float32), make() if fused_add else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_weight_gradient_reduction(backend):
    """Enough rows that the backward splits them across programs; the partial weight
    gradients must add up to the full one."""
    check_rms_norm(backend, randn((333, 40), torch.float32), randn((40,), torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, rows", [(2048, 21), (4096, 9), (1000, 37), (300, 70)])
def test_several_tiles_per_backward_program(dtype, hidden, rows):
    """The Triton backward walks several row tiles per program (CPU: 4 programs), with the
    software prefetch (hidden 513-2048: the next tile loaded before this one's
    reductions, the last program's run ragged) and without it (4096), both variants."""
    assert _rms_kernels().bwd_launch_config(hidden)["PREFETCH"] == (512 < hidden <= 2048)
    for fused_add in (False, True):
        residual = randn((rows, hidden), dtype) if fused_add else None
        check_rms_norm("triton", randn((rows, hidden), dtype), randn((hidden,), dtype), residual)


def test_more_backward_programs_than_a_dw_reduction_step(monkeypatch):
    """As on a GPU with many SMs: one tile per program (the prefetch finds no next tile),
    70 partial rows, more than the dW reduction sums per step (DW_BLOCK_P = 64)."""
    kernels = _rms_kernels()
    monkeypatch.setattr(kernels, "persistent_programs", lambda device, work_items, per_sm: work_items)
    assert 70 > kernels.DW_BLOCK_P and kernels.launch_config(2048)["BLOCK_M"] == 2
    check_rms_norm("triton", randn((140, 2000), torch.float32), randn((2000,), torch.float32),
                   randn((140, 2000), torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("programs, n", [(1, 1), (3, 33), (130, 77), (64, 32)])
def test_dw_partials_reduce_in_triton(dtype, programs, n):
    """_rms_norm_dw_kernel: the column sums of float32 partials (odd widths, one partial
    row, several reduction steps) in the weight's dtype, into a NaN-poisoned output, equal
    to float64 up to one rounding to the dtype, and bit-for-bit repeatable."""
    partial = torch.randn(programs, n, device=DEVICE)
    got = _rms_kernels().reduce_dw_partials(partial, dtype)
    assert got.dtype == dtype and got.shape == (n,)
    assert_close(got, f64(partial).sum(0), dtype, "dw", scale=f64(partial).abs().sum(0).max().item())
    assert torch.equal(got, _rms_kernels().reduce_dw_partials(partial, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_is_deterministic(backend):
    x = randn((97, 48), torch.float32, ).requires_grad_()
    w = randn((48,), torch.float32).requires_grad_()
    dy = torch.randn(97, 48, device=DEVICE)
    grads = []
    for _ in range(2):
        with llama_fast.backend(backend):
            (dw,) = torch.autograd.grad(llama_fast.rms_norm(x, w), w, dy)
        grads.append(dw)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps(backend):
    x = randn((4, 16), torch.float32) * 1e-3  # small values make eps matter
    check_rms_norm(backend, x, randn((16,), torch.float32), eps=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x = randn((0, 16), torch.float32).requires_grad_()
    w = randn((16,), torch.float32).requires_grad_()
    with llama_fast.backend(backend):
        y = llama_fast.rms_norm(x, w)
        y.sum().backward()
    assert y.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hugging_face_rounding(backend):
    """bf16 output equals LlamaRMSNorm's formula (float32 stats, cast, then weight) to 1 ulp
    (2 under the Triton interpreter, which truncates at both casts instead of rounding)."""
    x, w = randn((6, 256), torch.bfloat16), randn((256,), torch.bfloat16)
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    with llama_fast.backend(backend):
        y = llama_fast.rms_norm(x, w)
    ulps = 2 if backend == "triton" and backends.triton_interpreter_on() else 1
    ulp = expected.float().abs() * 2.0**-7
    assert bool(((y.float() - expected.float()).abs() <= ulps * ulp + 1e-6).all())


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    hidden=st.integers(1, 300),
    fused_add=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_random_shapes(lead, hidden, fused_add, backend):
    shape = tuple(lead) + (hidden,)
    residual = randn(shape, torch.float32) if fused_add else None
    check_rms_norm(backend, randn(shape, torch.float32), randn((hidden,), torch.float32), residual)


def _rms_kernels():
    from llama_fast.kernels import rms_norm  # imports triton: after conftest set the interpreter up

    return rms_norm


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


BAD_INPUTS = [
    # (description, call, exception, message pattern)
    ("x float64", lambda: llama_fast.rms_norm(_t(2, 4, dtype=torch.float64), _t(4)), TypeError, "x must be float32"),
    ("x integer", lambda: llama_fast.rms_norm(torch.ones(2, 4, dtype=torch.int32, device=DEVICE), _t(4)), TypeError, "x must be"),
    ("x not a tensor", lambda: llama_fast.rms_norm([1.0, 2.0], _t(2)), TypeError, "x must be a torch.Tensor"),
    ("weight wrong size", lambda: llama_fast.rms_norm(_t(2, 4), _t(5)), ValueError, "weight must have x.shape"),
    ("weight 2-d", lambda: llama_fast.rms_norm(_t(2, 4), _t(1, 4)), ValueError, "weight must have 1 dimensions"),
    ("weight dtype mix", lambda: llama_fast.rms_norm(_t(2, 4, dtype=torch.float16), _t(4, dtype=torch.bfloat16)), TypeError, "weight must have x's dtype"),
    ("weight half with float x", lambda: llama_fast.rms_norm(_t(2, 4), _t(4, dtype=torch.float16)), TypeError, "weight must have x's dtype"),
    ("x scalar", lambda: llama_fast.rms_norm(_t(), _t(1)), ValueError, "at least 1 dimension"),
    ("hidden 0", lambda: llama_fast.rms_norm(_t(2, 0), _t(0)), ValueError, "normalised size"),
    ("hidden too large", lambda: llama_fast.rms_norm(_t(1, 65537), _t(65537)), ValueError, "must be in 1..65536"),
    ("negative eps", lambda: llama_fast.rms_norm(_t(2, 4), _t(4), -1.0), ValueError, "eps must be"),
    ("nan eps", lambda: llama_fast.rms_norm(_t(2, 4), _t(4), float("nan")), ValueError, "eps must be"),
    ("residual shape", lambda: llama_fast.add_rms_norm(_t(2, 4), _t(3, 4), _t(4)), ValueError, "x and residual must have the same shape"),
    ("residual dtype", lambda: llama_fast.add_rms_norm(_t(2, 4), _t(2, 4, dtype=torch.bfloat16), _t(4)), TypeError, "x and residual must have the same dtype"),
]


@pytest.mark.parametrize("call,exc,pattern", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs a CPU tensor")
def test_cuda_backend_refuses_cpu_tensors(monkeypatch, installed_cuda):  # the CPU emulator would accept them
    with llama_fast.backend("cuda"), pytest.raises(llama_fast.BackendUnavailableError, match="cuda"):
        llama_fast.rms_norm(_t(2, 4), _t(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix with a CPU tensor")
def test_device_mix():
    with pytest.raises(ValueError, match="same device"):
        llama_fast.rms_norm(_t(2, 4), torch.randn(4))
