"""Rotary position embedding: Llama 3 / 3.1 tables and the apply_rope custom op."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from llama_fast.backends import run
from llama_fast.op_names import describe

from ._autograd import register_autograd
from ._checks import check_same, check_tensor

__all__ = ["rope_cos_sin", "rope_inv_freq", "apply_rope"]  # the public ops of this file (llama_fast.ops re-exports them)

describe("rope_fwd", "apply_rope")  # the backward of a rotation is the inverse rotation: one kernel


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
    return run("rope_fwd", q.device, q, k, cos, sin, interleaved, inverse)


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


register_autograd(_rope, _rope_grad, _rope_setup)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q (B, S, Hq, D) and k (B, S, Hkv, D), any strides.

    cos and sin are (S, D/2) or (B, S, D/2) (``rope_cos_sin``). ``interleaved=False``
    rotates the pairs (i, i + D/2) as Hugging Face's ``rotate_half``; ``interleaved=True``
    the pairs (2i, 2i + 1) as Meta's reference. Outputs keep q's and k's strides; cos and
    sin receive no gradient.
    """
    check_tensor("q", q, dims=(4,))
    check_tensor("k", k, dims=(4,))
    check_tensor("cos", cos, dims=(2, 3))
    check_tensor("sin", sin, dims=(2, 3))
    check_same("dtype", ("q", "k"), (q.dtype, k.dtype))
    check_same("device", ("q", "k", "cos", "sin"), (q.device, k.device, cos.device, sin.device))
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


