"""Backend "torch": the PyTorch implementations, on any device.

They compute in float32 and round at the same points as the modules they replace (Hugging
Face's LlamaRMSNorm, the unfused residual add, silu(gate) * up), so every backend agrees
with them to within one rounding of the output dtype. Signatures are the registry's: the
Triton launchers in ``llama_fast.kernels`` take and return the same things.
"""
from __future__ import annotations

import torch

from llama_fast import _alloc

F32 = torch.float32


def _rms_stats(h: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    hf = h.to(F32)
    rstd = torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)
    return hf * rstd, rstd


def rms_norm_fwd(x, residual, weight, eps):
    """y = rms_norm(x [+ residual]); returns (y, h) where h = x + residual (None without one).

    The sum is rounded to x.dtype before normalising, as the unfused sequence does; the
    normalised value is rounded to the input dtype before the weight multiplies it
    (LlamaRMSNorm); y has the promoted dtype of input and weight.
    """
    h = x if residual is None else x + residual
    xhat, _ = _rms_stats(h, eps)
    out_dtype = torch.promote_types(h.dtype, weight.dtype)
    y = (xhat.to(h.dtype).to(F32) * weight.to(F32)).to(out_dtype)
    return y, (None if residual is None else h)


def rms_norm_bwd(dy, dh, h, weight, eps):
    """Gradients of y = rms_norm(h) * weight: (dh_total, dweight); dh_total includes ``dh``."""
    n = h.shape[-1]
    xhat, rstd = _rms_stats(h, eps)
    g = dy.to(F32) * weight.to(F32)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(F32)
    xhat_rounded = xhat.to(h.dtype).to(F32)
    dw = (dy.to(F32) * xhat_rounded).reshape(-1, n).sum(0)
    return dx.to(h.dtype), dw.to(weight.dtype)


def rope_fwd(q, k, cos, sin, interleaved, inverse):
    """Rotate q (B, S, Hq, D) and k (B, S, Hkv, D) by cos/sin ((S, D/2) or (B, S, D/2)).

    ``inverse`` rotates by -angle (the backward pass). Outputs keep the inputs' strides.
    """
    c = cos.to(F32)
    s = sin.to(F32)
    if c.dim() == 2:
        c, s = c[None], s[None]
    c, s = c[:, :, None, :], s[:, :, None, :]
    if inverse:
        s = -s

    def rotate(x):
        xf = x.to(F32)
        if interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
        return _alloc.empty_like(x).copy_(rotated)

    return rotate(q), rotate(k)


def _silu_parts(gate):
    gf = gate.to(F32)
    sig = torch.sigmoid(gf)
    return gf, sig, gf * sig


def swiglu_fwd(gate, up):
    """silu(gate) * up, with silu(gate) rounded to the input dtype first (as in eager)."""
    _, _, silu = _silu_parts(gate)
    out = silu.to(gate.dtype).to(F32) * up.to(F32)
    return out.to(gate.dtype).contiguous()


def swiglu_bwd(dy, gate, up, dgate, dup):
    """Write d(gate) and d(up) of silu(gate) * up into ``dgate`` and ``dup``."""
    gf, sig, silu = _silu_parts(gate)
    dyf = dy.to(F32)
    dup.copy_(dyf * silu.to(gate.dtype).to(F32))
    dgate.copy_(dyf * up.to(F32) * sig * (1.0 + gf * (1.0 - sig)))
