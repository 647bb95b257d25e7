"""Attention: flash_attn (training and prefill), flash_attn_varlen (packed sequences) and
flash_decode (KV-cache decoding), as custom ops with fake impls and autograd.

Layout (B, S, H, D) with any strides; GQA/MQA by Hq a multiple of Hkv, never by repeating
K/V. Causal masks are aligned bottom-right when Sq != Sk: query i sees keys
j <= i + Sk - Sq, as FlashAttention does, which is what prefill after a cached prefix
needs. A query that sees no key gets a zero output and a log-sum-exp of -inf.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from llama_fast.backends import run
from llama_fast.op_names import describe

from ._autograd import register_autograd
from ._checks import check_same, check_tensor

__all__ = ["flash_attn", "flash_attn_varlen", "flash_decode"]  # the public ops of this file (llama_fast.ops re-exports them)

describe("attn_fwd", "flash_attn", "forward")
describe("attn_bwd", "flash_attn", "backward")
describe("attn_varlen_fwd", "flash_attn_varlen", "forward")
describe("attn_varlen_bwd", "flash_attn_varlen", "backward")
describe("decode", "flash_decode")  # inference only: no backward

MAX_HEAD_DIM = 256


def _check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dims: int, names=("q", "k", "v")) -> None:
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, dims=(dims,))
    check_same("dtype", names, (q.dtype, k.dtype, v.dtype))
    check_same("device", names, (q.device, k.device, v.device))
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} and {names[2]} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{names[0]} and {names[1]} must have the same head dim, got {d} and {k.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{names[0]}'s heads ({hq}) must be a multiple of {names[1]}'s heads ({hkv})")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _host_checks_allowed() -> bool:
    """Checks that read device memory synchronise; skip them where that is not allowed."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------------------
# flash_attn


@torch.library.custom_op("llama_fast::flash_attn", mutates_args=())
def _flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return run("attn_fwd", q.device, q, k, v, causal, scale)


@torch.library.custom_op("llama_fast::flash_attn_backward", mutates_args=())
def _flash_attn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return run("attn_bwd", q.device, dout, q, k, v, out, lse, causal, scale)


@_flash_attn.register_fake
def _(q, k, v, causal, scale):
    b, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=torch.float32)


@_flash_attn_backward.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _attn_grad(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


register_autograd(_flash_attn, _attn_grad, _attn_setup)


def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, softmax_scale: float | None = None,
               return_lse: bool = False):
    """Scaled dot-product attention, q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D).

    Returns out (B, Sq, Hq, D), and with ``return_lse`` also the log-sum-exp of the scaled
    scores, (B, Hq, Sq) float32 (it carries no gradient). Default scale 1/sqrt(D).
    """
    _check_qkv(q, k, v, 4)
    if (k.shape[0], k.shape[-1]) != (q.shape[0], q.shape[-1]):
        raise ValueError(f"k must be (B, Sk, Hkv, D) with q's B and D; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    _check_bool("causal", causal)
    out, lse = _flash_attn(q, k, v, causal, _check_scale(softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# flash_attn_varlen


@torch.library.custom_op("llama_fast::flash_attn_varlen", mutates_args=())
def _flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                       causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return run("attn_varlen_fwd", q.device, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


@torch.library.custom_op("llama_fast::flash_attn_varlen_backward", mutates_args=())
def _flash_attn_varlen_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor,
    max_q: int, max_k: int, causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return run("attn_varlen_bwd", q.device, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)


@_flash_attn_varlen.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@_flash_attn_varlen_backward.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale)
    ctx.mark_non_differentiable(lse)


def _varlen_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


register_autograd(_flash_attn_varlen, _varlen_grad, _varlen_setup)


def _check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int, device) -> None:
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise TypeError(f"{name} must be a 1-d int32 tensor of batch + 1 >= 2 offsets, got "
                            f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got {cu_q.shape[0]} and {cu_k.shape[0]}")
    for name, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not _host_checks_allowed():
        return
    # One synchronisation buys the guarantee that the kernels stay inside the tensors.
    both = torch.stack((cu_q, cu_k)).tolist()
    for name, offsets, total, longest in (("cu_seqlens_q", both[0], total_q, max_q), ("cu_seqlens_k", both[1], total_k, max_k)):
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or min(lengths) < 0 or offsets[-1] != total:
            raise ValueError(f"{name} must rise from 0 to the packed length {total}, got {offsets}")
        if max(lengths) > longest:
            raise ValueError(f"max_seqlen_{name[-1]} ({longest}) is less than the longest sequence ({max(lengths)})")


def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                      softmax_scale: float | None = None) -> Tensor:
    """Attention over packed sequences: q (Tq, Hq, D), k and v (Tk, Hkv, D); sequence i is
    rows cu_seqlens[i]:cu_seqlens[i + 1] (int32, shape (batch + 1,)). No attention across
    sequences; causal masks are bottom-right aligned per sequence."""
    _check_qkv(q, k, v, 3)
    _check_bool("causal", causal)
    _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, q.device)
    scale = _check_scale(softmax_scale, q.shape[-1])
    return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)[0]


def _offsets(lengths: Tensor) -> Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def packed_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, *, softmax_scale: float | None = None) -> Tensor:
    """Causal attention of (B, S, H, D) rows holding back-to-back sequences (packing):
    ``lengths`` (number of sequences,) int lists them in order across the flattened rows.
    The offsets are built here, so they need no check: one synchronisation (the longest)."""
    b, s, hq, d = q.shape
    longest = int(lengths.max())
    cu = _offsets(lengths)
    rows = lambda t: t.reshape(b * s, t.shape[2], d)  # noqa: E731
    scale = _check_scale(softmax_scale, d)
    return _flash_attn_varlen(rows(q), rows(k), rows(v), cu, cu, longest, longest, True, scale)[0].view(b, s, hq, d)


def padded_attention(q: Tensor, k: Tensor, v: Tensor, q_valid: Tensor, k_valid: Tensor, *,
                     softmax_scale: float | None = None) -> Tensor:
    """Causal attention of padded (B, Sq, Hq, D) queries over (B, Sk, Hkv, D) keys on their
    valid tokens only (bool masks (B, Sq) and (B, Sk)): the valid tokens are gathered into
    flash_attn_varlen's packed layout; within a row the valid queries are the last valid keys
    (bottom-right causal). Padded query rows come out as zeros. The offsets are built here,
    so they need no check: one synchronisation (the longest sequences)."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    q_idx = q_valid.reshape(-1).nonzero().squeeze(1)
    k_idx = k_valid.reshape(-1).nonzero().squeeze(1)
    q_len = q_valid.sum(1, dtype=torch.int32)
    k_len = k_valid.sum(1, dtype=torch.int32)
    max_q, max_k = (int(n) for n in torch.stack([q_len.max(), k_len.max()]).tolist())
    qv = q.reshape(b * sq, hq, d).index_select(0, q_idx)
    kv = [t.reshape(b * sk, t.shape[2], d).index_select(0, k_idx) for t in (k, v)]
    scale = _check_scale(softmax_scale, d)
    out = _flash_attn_varlen(qv, kv[0], kv[1], _offsets(q_len), _offsets(k_len), max_q, max_k, True, scale)[0]
    return out.new_zeros(b * sq, hq, d).index_copy(0, q_idx, out).view(b, sq, hq, d)


# ---------------------------------------------------------------------------------------
# flash_decode


@torch.library.custom_op("llama_fast::flash_decode", mutates_args=())
def _flash_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float,
                  num_splits: int) -> Tensor:
    return run("decode", q.device, q, k_cache, v_cache, cache_seqlens, scale, num_splits)


@_flash_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, num_splits):
    return q.new_empty(q.shape)


def flash_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                 softmax_scale: float | None = None, num_splits: int | None = None) -> Tensor:
    """Attention of a few new tokens over a KV cache (inference only, no gradient).

    q (B, Sq, Hq, D), caches (B, Smax, Hkv, D), cache_seqlens int32 (B,): the valid entries
    of each cache, which already include the Sq new tokens; those are the last Sq valid
    positions and attend causally. ``num_splits`` (None: chosen from the shape) splits the
    cache length across programs. No host synchronisation: it can be captured in a CUDA
    graph (lengths are clamped to [0, Smax] on the device, not checked on the host).
    """
    _check_qkv(q, k_cache, v_cache, 4, names=("q", "k_cache", "v_cache"))
    if (k_cache.shape[0], k_cache.shape[-1]) != (q.shape[0], q.shape[-1]):
        raise ValueError(f"k_cache must be (B, Smax, Hkv, D) with q's B and D; got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (q.shape[0],):
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape (B,)=({q.shape[0]},), got "
                        f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} {tuple(getattr(cache_seqlens, 'shape', ()))}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if q.requires_grad or k_cache.requires_grad or v_cache.requires_grad:
        if torch.is_grad_enabled():
            raise ValueError("flash_decode is inference only: call it under torch.no_grad() or on tensors without grad")
    return _flash_decode(q, k_cache, v_cache, cache_seqlens, _check_scale(softmax_scale, q.shape[-1]), num_splits or 0)
