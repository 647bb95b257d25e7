"""Tensors past 2^31 elements: offsets must be computed in int64 (GPU only: the
interpreter would take hours, and the CPU lacks the memory headroom)."""
from __future__ import annotations

import pytest
import torch

import llama_fast
from _helpers import BACKENDS, DEVICE, assert_close, f64

pytestmark = [
    pytest.mark.skipif(
        DEVICE.type != "cuda" or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
        reason="needs a CUDA GPU with 40 GiB: tensors of more than 2^31 elements",
    ),
    # 8-16 GB each: under pytest-xdist (bench/gpu_check.py runs -n 8 --dist loadgroup) they
    # all go to one worker, one at a time, instead of eight at once past the GPU's memory.
    pytest.mark.xdist_group("large_memory"),
]
BIG = 2**31 + 4096 * 3  # elements; a multiple of 4096
# Each compiled backend (the torch reference would need several copies of the tensors).
each_kernel_backend = pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])


def _tail_rows(t: torch.Tensor, n: int = 4) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])[-n:]


@each_kernel_backend
def test_rms_norm_past_int32(backend):
    x = torch.randn(BIG // 4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(4096, device=DEVICE, dtype=torch.bfloat16)
    with llama_fast.backend(backend):
        y = llama_fast.rms_norm(x, w)
    tail = f64(_tail_rows(x))
    expected = f64(w) * tail * torch.rsqrt(tail.square().mean(-1, keepdim=True) + 1e-5)
    assert_close(_tail_rows(y), expected, torch.bfloat16, "last rows of y")


@each_kernel_backend
def test_swiglu_past_int32(backend):
    gate = torch.randn(BIG // 4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    with llama_fast.backend(backend):
        y = llama_fast.swiglu(gate, up)
    g, u = f64(_tail_rows(gate)), f64(_tail_rows(up))
    assert_close(_tail_rows(y), torch.nn.functional.silu(g) * u, torch.bfloat16, "last rows of y")


@each_kernel_backend
def test_rope_past_int32(backend):
    tokens = BIG // (32 * 128)
    q = torch.randn(1, tokens, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, tokens, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = llama_fast.rope_cos_sin(torch.arange(tokens, device=DEVICE), 128)
    with llama_fast.backend(backend):
        q_out, _ = llama_fast.apply_rope(q, k, cos, sin)
    last = f64(q[0, -2:])
    c, s = f64(cos[-2:, None, :]), f64(sin[-2:, None, :])
    x1, x2 = last[..., :64], last[..., 64:]
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert_close(q_out[0, -2:], expected, torch.bfloat16, "last tokens of q")


@each_kernel_backend
def test_swiglu_one_row_wider_than_a_2d_grid(backend):
    """A 1-D input of 2^31+ elements: one row of 2M column blocks (a 2-D grid stops at 65535)."""
    gate = torch.randn(BIG, device=DEVICE, dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    with llama_fast.backend(backend):
        y = llama_fast.swiglu(gate, up)
    g, u = f64(gate[-5000:]), f64(up[-5000:])
    assert_close(y[-5000:], torch.nn.functional.silu(g) * u, torch.bfloat16, "last elements of y")
