"""RMSNorm and residual-add + RMSNorm: custom ops, fake impls, autograd, validation."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llama_fast.backends import run
from llama_fast.op_names import describe

from ._autograd import register_autograd
from ._checks import check_same, check_tensor

__all__ = ["rms_norm", "add_rms_norm"]  # the public ops of this file (llama_fast.ops re-exports them)

describe("rms_norm_fwd", ("rms_norm", "add_rms_norm"), "forward")
describe("rms_norm_bwd", ("rms_norm", "add_rms_norm"), "backward")

MAX_NORM_SIZE = 65536  # one row of RMSNorm lives in registers; see kernels/rms_norm.py


def _check_norm_args(x: Tensor, weight: Tensor, eps: float) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, dims=(1,))
    check_same("device", ("x", "weight"), (x.device, weight.device))
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (the normalised one), got a scalar")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have x.shape[-1]={x.shape[-1]} elements, got {weight.shape[0]}")
    if not 0 < x.shape[-1] <= MAX_NORM_SIZE:
        raise ValueError(f"x.shape[-1] (the normalised size) must be in 1..{MAX_NORM_SIZE}, got {x.shape[-1]}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must have x's dtype ({x.dtype}) or float32, got {weight.dtype}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


@torch.library.custom_op("llama_fast::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return run("rms_norm_fwd", x.device, x, None, weight, eps)[0]


@torch.library.custom_op("llama_fast::add_rms_norm", mutates_args=())
def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return run("rms_norm_fwd", x.device, x, residual, weight, eps)


@torch.library.custom_op("llama_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward(
    dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    return run("rms_norm_bwd", h.device, dy, dh, h, weight, eps)


def _norm_out(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@_rms_norm.register_fake
def _(x, weight, eps):
    return _norm_out(x, weight)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return _norm_out(x, weight), x.new_empty(x.shape)


@_rms_norm_backward.register_fake
def _(dy, dh, h, weight, eps):
    return h.new_empty(h.shape), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_backward(dy, None, x, weight, ctx.eps)
    return dx, dw, None


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _add_rms_norm_grad(ctx, dy, dh):
    h, weight = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h, dtype=torch.promote_types(h.dtype, weight.dtype))
    dx, dw = _rms_norm_backward(dy, dh, h, weight, ctx.eps)
    return dx, dx, dw, None


register_autograd(_rms_norm, _rms_norm_grad, _rms_norm_setup)
register_autograd(_add_rms_norm, _add_rms_norm_grad, _add_rms_norm_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dimension: ``weight * (x / sqrt(mean(x^2) + eps))``.

    Computes in float32; the normalised value is rounded to x's dtype before the weight
    multiplies it, as Hugging Face's LlamaRMSNorm does. ``weight`` has x's dtype or float32;
    the result has the promoted dtype of the two.
    """
    _check_norm_args(x, weight, eps)
    return _rms_norm(x, weight, float(eps))


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``h = x + residual`` (rounded to their dtype) and ``y = rms_norm(h, weight, eps)``.

    Returns ``(y, h)``: a decoder block feeds y to the next sublayer and h to the next
    residual add, so the sum is read once instead of being written and read back.
    """
    _check_norm_args(x, weight, eps)
    check_tensor("residual", residual)
    check_same("shape", ("x", "residual"), (tuple(x.shape), tuple(residual.shape)))
    check_same("dtype", ("x", "residual"), (x.dtype, residual.dtype))
    check_same("device", ("x", "residual"), (x.device, residual.device))
    return _add_rms_norm(x, residual, weight, float(eps))


