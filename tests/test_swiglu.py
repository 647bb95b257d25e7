"""swiglu and swiglu_fused, every backend, against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_fast
from _helpers import BACKENDS, DEVICE, DTYPES, assert_close, f64, randn, row_strided


def reference(gate, up):
    """float64 silu(gate) * up, differentiable for the gradients."""
    return gate * torch.sigmoid(gate) * up


def make(shape, dtype, layout):
    """A tensor of ``shape`` in one of the layouts callers pass."""
    if layout == "contiguous":
        return randn(shape, dtype)
    if layout == "row_padded":  # a slice of a wider tensor
        return row_strided(shape, dtype)
    if layout == "strided_last":
        return randn(shape, dtype, strided=True)
    if layout == "transposed":  # leading dims that do not merge into one row stride
        return randn((shape[1], shape[0]) + tuple(shape[2:]), dtype).transpose(0, 1)
    raise ValueError(layout)


def check_op(backend, op, reference_fn, inputs, dtype=None):
    """``op(*inputs)`` forward and backward (every input's gradient, with a random upstream
    gradient) against ``reference_fn`` evaluated in float64."""
    dtype = dtype or inputs[0].dtype
    leaves = [t.detach().requires_grad_() for t in inputs]
    with llama_fast.backend(backend):
        y = op(*leaves)
    leaves64 = [f64(t, True) for t in leaves]
    y64 = reference_fn(*leaves64)
    assert y.dtype == leaves[0].dtype
    assert_close(y, y64, dtype, "y")
    dy = torch.randn_like(y)
    with llama_fast.backend(backend):
        y.backward(dy)
    y64.backward(f64(dy))
    for i, (leaf, leaf64) in enumerate(zip(leaves, leaves64)):
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, leaf64.grad, dtype, f"gradient of input {i}")


def check_swiglu(backend, gate, up, dtype=None):
    check_op(backend, llama_fast.swiglu, reference, (gate, up), dtype)


def check_swiglu_fused(backend, gate_up, dtype=None):
    """The gradient is one tensor of gate_up's shape (both halves, no concatenation)."""
    check_op(backend, llama_fast.swiglu_fused, lambda gu: reference(*gu.chunk(2, dim=-1)), (gate_up,), dtype)


# (shape, gate's layout, up's layout): 1-d to 4-d, hidden sizes 1, 3, 37, 1000 and one
# wider than a block (1100), every layout.
SWIGLU_CASES = [
    ((1,), "contiguous", "contiguous"),
    ((3,), "strided_last", "contiguous"),
    ((37,), "contiguous", "row_padded"),
    ((1000,), "row_padded", "row_padded"),
    ((1, 1), "contiguous", "contiguous"),
    ((5, 37), "row_padded", "strided_last"),
    ((4, 3), "strided_last", "strided_last"),
    ((6, 1), "strided_last", "row_padded"),
    ((3, 1100), "contiguous", "row_padded"),
    ((2, 3, 37), "transposed", "contiguous"),
    ((3, 2, 5), "transposed", "transposed"),
    ((2, 1, 3, 5), "contiguous", "contiguous"),
    ((3, 2, 2, 7), "row_padded", "transposed"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,gate_layout,up_layout", SWIGLU_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{g}-{u}" for s, g, u in SWIGLU_CASES])
def test_swiglu_matches_float64(backend, dtype, shape, gate_layout, up_layout):
    check_swiglu(backend, make(shape, dtype, gate_layout), make(shape, dtype, up_layout))


# (gate_up's shape, layout): the last dim is 2I for I in 1, 3, 37, 1000, 1100.
FUSED_CASES = [
    ((2,), "contiguous"),
    ((6,), "strided_last"),
    ((1, 74), "contiguous"),
    ((3, 2000), "row_padded"),
    ((2, 2200), "contiguous"),
    ((4, 6), "strided_last"),
    ((2, 3, 74), "transposed"),
    ((3, 2, 6), "row_padded"),
    ((2, 1, 3, 2), "contiguous"),
    ((2, 3, 2, 10), "transposed"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", FUSED_CASES, ids=[f"{'x'.join(map(str, s))}-{l}" for s, l in FUSED_CASES])
def test_swiglu_fused_matches_float64(backend, dtype, shape, layout):
    check_swiglu_fused(backend, make(shape, dtype, layout))


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    hidden=st.integers(1, 80),
    layout=st.sampled_from(["contiguous", "row_padded", "strided_last", "transposed"]),
    fused=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_random_shapes(lead, hidden, layout, fused, backend):
    if layout == "transposed" and len(lead) < 1:
        layout = "contiguous"
    shape = tuple(lead) + (2 * hidden if fused else hidden,)
    if fused:
        check_swiglu_fused(backend, make(shape, torch.float32, layout))
    else:
        check_swiglu(backend, make(shape, torch.float32, layout), make(shape, torch.float32, "contiguous"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
@pytest.mark.parametrize("fused", [False, True], ids=["swiglu", "swiglu_fused"])
def test_empty(backend, shape, fused):
    if fused:
        gate_up = randn(shape[:-1] + (2 * shape[-1],), torch.float32).requires_grad_()
        inputs = (gate_up,)
    else:
        inputs = (randn(shape, torch.float32).requires_grad_(), randn(shape, torch.float32).requires_grad_())
    with llama_fast.backend(backend):
        y = (llama_fast.swiglu_fused if fused else llama_fast.swiglu)(*inputs)
        y.sum().backward()
    assert y.shape == shape
    assert all(t.grad.shape == t.shape for t in inputs)


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


BAD_INPUTS = [
    # (description, call, exception, message pattern)
    ("gate float64", lambda: llama_fast.swiglu(_t(2, 4, dtype=torch.float64), _t(2, 4)), TypeError,
     r"gate must be float32, float16 or bfloat16, got torch\.float64"),
    ("up integer", lambda: llama_fast.swiglu(_t(2, 4), torch.ones(2, 4, dtype=torch.int32, device=DEVICE)), TypeError,
     r"up must be float32, float16 or bfloat16, got torch\.int32"),
    ("gate fp16, up bf16", lambda: llama_fast.swiglu(_t(2, 4, dtype=torch.float16), _t(2, 4, dtype=torch.bfloat16)), TypeError,
     "gate and up must have the same dtype"),
    ("gate vs up shape", lambda: llama_fast.swiglu(_t(2, 4), _t(2, 5)), ValueError, r"gate and up must have the same shape: gate=\(2, 4\), up=\(2, 5\)"),
    ("gate vs up leading dims", lambda: llama_fast.swiglu(_t(3, 4), _t(4)), ValueError, "gate and up must have the same shape"),
    ("0-d gate and up", lambda: llama_fast.swiglu(_t(), _t()), ValueError, "gate and up must have at least 1 dimension"),
    ("gate not a tensor", lambda: llama_fast.swiglu([1.0, 2.0], _t(2)), TypeError, "gate must be a torch.Tensor, got list"),
    ("up not a tensor", lambda: llama_fast.swiglu(_t(2), 3.0), TypeError, "up must be a torch.Tensor, got float"),
    ("fused odd last dim", lambda: llama_fast.swiglu_fused(_t(2, 5)), ValueError, r"gate_up's last dimension must be even .*\(2, 5\)"),
    ("fused 0-d", lambda: llama_fast.swiglu_fused(_t()), ValueError, "gate_up's last dimension must be even"),
    ("fused float64", lambda: llama_fast.swiglu_fused(_t(2, 4, dtype=torch.float64)), TypeError, "gate_up must be float32"),
    ("fused not a tensor", lambda: llama_fast.swiglu_fused((1.0, 2.0)), TypeError, "gate_up must be a torch.Tensor, got tuple"),
]


@pytest.mark.parametrize("call,exc,pattern", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


CPU_CALLS = {
    "swiglu": lambda: llama_fast.swiglu(torch.randn(2, 4), torch.randn(2, 4)),
    "swiglu_fused": lambda: llama_fast.swiglu_fused(torch.randn(2, 8)),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the CPU as test device")
@pytest.mark.parametrize("op", CPU_CALLS)
def test_cuda_backend_refuses_cpu_tensors(op, monkeypatch, installed_cuda):  # the CPU emulator would accept them
    with llama_fast.backend("cuda"), pytest.raises(llama_fast.BackendUnavailableError, match="cuda"):
        CPU_CALLS[op]()


@pytest.mark.parametrize("op", CPU_CALLS)
def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with llama_fast.backend("triton"), pytest.raises(llama_fast.BackendUnavailableError, match="TRITON_INTERPRET"):
        CPU_CALLS[op]()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix with a CPU tensor")
def test_device_mix():
    with pytest.raises(ValueError, match="same device"):
        llama_fast.swiglu(_t(2, 4), torch.randn(2, 4))
