"""The public ops: input validation, torch.library custom ops, fake impls and autograd.

Each public function validates its arguments once (``ValueError``/``TypeError`` naming the
argument and the rule), then calls a ``torch.ops.llama_fast`` custom op. The custom op asks
the registry (``llama_fast.backends``) which backend serves the tensors' device, so the
same code runs the Triton kernels, the CUDA extension or the PyTorch reference. Custom ops
are opaque to ``torch.compile``: with their fake impls it compiles callers with no graph
break, and the backend is chosen at run time.

Backward passes are custom ops too, so compiled training graphs keep the fused kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llama_fast import _alloc
from llama_fast.backends import dispatch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NORM_SIZE = 65536  # one row of RMSNorm lives in registers; see kernels/rms_norm.py


# ---------------------------------------------------------------------------------------
# validation helpers


def _check_tensor(name: str, t, *, dims: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")


def _check_same(kind: str, names: tuple[str, ...], values: tuple) -> None:
    if any(v != values[0] for v in values[1:]):
        listed = ", ".join(f"{n}={v}" for n, v in zip(names, values))
        raise (TypeError if kind == "dtype" else ValueError)(f"{' and '.join(names)} must have the same {kind}: {listed}")


def _check_norm_args(x: Tensor, weight: Tensor, eps: float) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight, dims=(1,))
    _check_same("device", ("x", "weight"), (x.device, weight.device))
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


# ---------------------------------------------------------------------------------------
# RMSNorm and residual-add + RMSNorm


@torch.library.custom_op("llama_fast::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return dispatch("rms_norm_fwd", x.device)(x, None, weight, eps)[0]


@torch.library.custom_op("llama_fast::add_rms_norm", mutates_args=())
def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return dispatch("rms_norm_fwd", x.device)(x, residual, weight, eps)


@torch.library.custom_op("llama_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward(
    dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    return dispatch("rms_norm_bwd", h.device)(dy, dh, h, weight, eps)


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


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
_add_rms_norm.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


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
    _check_tensor("residual", residual)
    _check_same("shape", ("x", "residual"), (tuple(x.shape), tuple(residual.shape)))
    _check_same("dtype", ("x", "residual"), (x.dtype, residual.dtype))
    _check_same("device", ("x", "residual"), (x.device, residual.device))
    return _add_rms_norm(x, residual, weight, float(eps))


# ---------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(head_dim: int, theta: float = 500000.0, scaling: dict | None = None, device=None) -> Tensor:
    """The float32 inverse frequencies of Llama 3 (``scaling=None``) or Llama 3.1.

    ``scaling`` takes Hugging Face's ``rope_scaling`` keys: ``factor``, ``low_freq_factor``,
    ``high_freq_factor`` and ``original_max_position_embeddings``. Long wavelengths are
    divided by ``factor``, short ones kept, and the band between blended smoothly.
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise ValueError(f"scaling is missing {missing}; Llama 3.1 scaling needs {list(needed)}")
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    if not (factor > 0 and 0 < low < high and old_len > 0):
        raise ValueError(f"scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor, and a positive original length; got {dict(scaling)}")
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > old_len / low
    short_wave = wavelen < old_len / high
    scaled = torch.where(long_wave, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    return torch.where(~long_wave & ~short_wave, blended, scaled)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float = 500000.0, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, float32, of shape ``positions.shape + (head_dim // 2,)``."""
    if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must be an integer tensor, got {getattr(positions, 'dtype', type(positions).__name__)}")
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


@torch.library.custom_op("llama_fast::rope", mutates_args=())
def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> tuple[Tensor, Tensor]:
    return dispatch("rope_fwd", q.device)(q, k, cos, sin, interleaved, inverse)


@_rope.register_fake
def _(q, k, cos, sin, interleaved, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    # The transpose of a rotation is the rotation by minus the angle.
    dq_in, dk_in = _rope(dq, dk, cos, sin, ctx.interleaved, not ctx.inverse)
    return dq_in, dk_in, None, None, None, None


_rope.register_autograd(_rope_grad, setup_context=_rope_setup)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q (B, S, Hq, D) and k (B, S, Hkv, D), any strides.

    cos and sin are (S, D/2) or (B, S, D/2) (``rope_cos_sin``). ``interleaved=False``
    rotates the pairs (i, i + D/2) as Hugging Face's ``rotate_half``; ``interleaved=True``
    the pairs (2i, 2i + 1) as Meta's reference. Outputs keep q's and k's strides; cos and
    sin receive no gradient.
    """
    _check_tensor("q", q, dims=(4,))
    _check_tensor("k", k, dims=(4,))
    _check_tensor("cos", cos, dims=(2, 3))
    _check_tensor("sin", sin, dims=(2, 3))
    _check_same("dtype", ("q", "k"), (q.dtype, k.dtype))
    _check_same("device", ("q", "k", "cos", "sin"), (q.device, k.device, cos.device, sin.device))
    b, s, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise ValueError(f"k must be (B, S, Hkv, D) with q's B, S and D; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"q's heads ({hq}) must be a multiple of k's heads ({k.shape[2]})")
    if d % 2:
        raise ValueError(f"the head dim (q.shape[3]) must be even, got {d}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    allowed = ((s, d // 2), (b, s, d // 2))
    if tuple(cos.shape) not in allowed:
        raise ValueError(f"cos and sin must be (S, D/2)={allowed[0]} or (B, S, D/2)={allowed[1]}, got {tuple(cos.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin must not require grad: apply_rope gives them no gradient (detach them)")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    return _rope(q, k, cos, sin, interleaved, False)


# ---------------------------------------------------------------------------------------
# SwiGLU


@torch.library.custom_op("llama_fast::swiglu", mutates_args=())
def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return dispatch("swiglu_fwd", gate.device)(gate, up)


@torch.library.custom_op("llama_fast::swiglu_backward", mutates_args=())
def _swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dgate, dup = _alloc.empty(gate.shape, gate.dtype, gate.device), _alloc.empty(up.shape, up.dtype, up.device)
    dispatch("swiglu_bwd", gate.device)(dy, gate, up, dgate, dup)
    return dgate, dup


@torch.library.custom_op("llama_fast::swiglu_fused", mutates_args=())
def _swiglu_fused(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return dispatch("swiglu_fwd", gate_up.device)(gate, up)


@torch.library.custom_op("llama_fast::swiglu_fused_backward", mutates_args=())
def _swiglu_fused_backward(dy: Tensor, gate_up: Tensor) -> Tensor:
    # Both halves of the gradient land in one buffer: no concatenation afterwards.
    dgate_up = _alloc.empty(gate_up.shape, gate_up.dtype, gate_up.device)
    gate, up = gate_up.chunk(2, dim=-1)
    dgate, dup = dgate_up.chunk(2, dim=-1)
    dispatch("swiglu_bwd", gate_up.device)(dy, gate, up, dgate, dup)
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


_swiglu.register_autograd(_swiglu_grad, setup_context=_save_inputs)
_swiglu_fused.register_autograd(_swiglu_fused_grad, setup_context=_save_inputs)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, silu computed in float32 and rounded to the dtype first (as eager)."""
    _check_tensor("gate", gate)
    _check_tensor("up", up)
    _check_same("shape", ("gate", "up"), (tuple(gate.shape), tuple(up.shape)))
    _check_same("dtype", ("gate", "up"), (gate.dtype, up.dtype))
    _check_same("device", ("gate", "up"), (gate.device, up.device))
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least 1 dimension, got scalars")
    return _swiglu(gate, up)


def swiglu_fused(gate_up: Tensor) -> Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` for a fused gate/up projection of width 2I."""
    _check_tensor("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate then up), got shape {tuple(gate_up.shape)}")
    return _swiglu_fused(gate_up)
