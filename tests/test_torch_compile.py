"""torch.compile(fullgraph=True) of code that calls every op: no graph break, same result."""
from __future__ import annotations

import torch

import llama_fast
from _helpers import DEVICE, assert_close


def block(x, residual, weight, q, k, cos, sin, gate_up):
    y, h = llama_fast.add_rms_norm(x, residual, weight)
    z = llama_fast.rms_norm(y, weight)
    q_rot, k_rot = llama_fast.apply_rope(q, k, cos, sin)
    gate, up = gate_up.chunk(2, dim=-1)
    mlp = llama_fast.swiglu_fused(gate_up) + llama_fast.swiglu(gate, up)
    return (z * h).sum() + (q_rot.square().sum() + k_rot.sum()) + mlp.square().sum()


def test_fullgraph_compile_forward_and_backward():
    torch._dynamo.reset()
    b, s, hidden, heads, kv_heads, head_dim = 2, 5, 16, 4, 2, 8
    inputs = [
        torch.randn(b, s, hidden, device=DEVICE),
        torch.randn(b, s, hidden, device=DEVICE),
        torch.randn(hidden, device=DEVICE),
        torch.randn(b, heads, s, head_dim, device=DEVICE).transpose(1, 2),  # HF layout, a view
        torch.randn(b, s, kv_heads, head_dim, device=DEVICE),
        *llama_fast.rope_cos_sin(torch.arange(s, device=DEVICE), head_dim),
        torch.randn(b, s, 2 * hidden, device=DEVICE),
    ]
    grads = [0, 1, 2, 3, 4, 7]  # everything but the cos/sin tables
    eager_in = [t.detach().clone().requires_grad_(i in grads) for i, t in enumerate(inputs)]
    compiled_in = [t.detach().clone().requires_grad_(i in grads) for i, t in enumerate(inputs)]

    expected = block(*eager_in)
    expected.backward()
    got = torch.compile(block, fullgraph=True)(*compiled_in)
    got.backward()

    assert_close(got, expected.to(torch.float64), torch.float32, "loss")
    for i in grads:
        assert_close(compiled_in[i].grad, eager_in[i].grad.to(torch.float64), torch.float32, f"grad of input {i}")
