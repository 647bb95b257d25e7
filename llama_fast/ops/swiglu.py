"""SwiGLU, plain and with a fused gate/up projection: custom ops, autograd, validation."""
from __future__ import annotations

import torch
from torch import Tensor

from llama_fast import _alloc
from llama_fast.backends import run
from llama_fast.op_names import describe

from ._autograd import register_autograd
from ._checks import check_same, check_tensor

__all__ = ["swiglu", "swiglu_fused"]  # the public ops of this file (llama_fast.ops re-exports them)

describe("swiglu_fwd", ("swiglu", "swiglu_fused"), "forward")
describe("swiglu_bwd", ("swiglu", "swiglu_fused"), "backward")


@torch.library.custom_op("llama_fast::swiglu", mutates_args=())
def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return run("swiglu_fwd", gate.device, gate, up)


@torch.library.custom_op("llama_fast::swiglu_backward", mutates_args=())
def _swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dgate, dup = _alloc.empty(gate.shape, gate.dtype, gate.device), _alloc.empty(up.shape, up.dtype, up.device)
    run("swiglu_bwd", gate.device, dy, gate, up, dgate, dup)
    return dgate, dup


@torch.library.custom_op("llama_fast::swiglu_fused", mutates_args=())
def _swiglu_fused(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return run("swiglu_fwd", gate_up.device, gate, up)


@torch.library.custom_op("llama_fast::swiglu_fused_backward", mutates_args=())
def _swiglu_fused_backward(dy: Tensor, gate_up: Tensor) -> Tensor:
    # Both halves of the gradient land in one buffer: no concatenation afterwards.
    dgate_up = _alloc.empty(gate_up.shape, gate_up.dtype, gate_up.device)
    gate, up = gate_up.chunk(2, dim=-1)
    dgate, dup = dgate_up.chunk(2, dim=-1)
    run("swiglu_bwd", gate_up.device, dy, gate, up, dgate, dup)
    return dgate_up


@_swiglu.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@_swiglu_backward.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@_swiglu_fused.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


@_swiglu_fused_backward.register_fake
def _(dy, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dy):
    return _swiglu_backward(dy, *ctx.saved_tensors)


def _swiglu_fused_grad(ctx, dy):
    return _swiglu_fused_backward(dy, *ctx.saved_tensors)


register_autograd(_swiglu, _swiglu_grad, _save_inputs)
register_autograd(_swiglu_fused, _swiglu_fused_grad, _save_inputs)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, silu computed in float32 and rounded to the dtype first (as eager)."""
    check_tensor("gate", gate)
    check_tensor("up", up)
    check_same("shape", ("gate", "up"), (tuple(gate.shape), tuple(up.shape)))
    check_same("dtype", ("gate", "up"), (gate.dtype, up.dtype))
    check_same("device", ("gate", "up"), (gate.device, up.device))
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least 1 dimension, got scalars")
    return _swiglu(gate, up)


def swiglu_fused(gate_up: Tensor) -> Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` for a fused gate/up projection of width 2I."""
    check_tensor("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate then up), got shape {tuple(gate_up.shape)}")
    return _swiglu_fused(gate_up)
