"""The one attention router of the drop-in modules (``llama_fast.model_fused.MetaAttention``)
and the Hugging Face adapter (``llama_fast.hf_attention``): which kernel serves a call.

Callers translate their conventions (Meta's positions, Hugging Face's masks) into what
``attend`` takes, (B, S, H, D) tensors (views are fine) and at most one of:

    nothing                causal (bottom-right aligned when Sk > Sq) over all keys
    q_valid, k_valid       (B, Sq) / (B, Sk) bool padding masks: only valid tokens attend
                           and are attended to; padded query rows come out as zeros
    segments               (B, S) int32 ids: packed sequences, causal within each run
    cache_seqlens          (B,) int32: the keys are a KV cache with this many valid slots per
                           row, the queries its last ones

and ``attend`` picks:

    flash_decode           a few queries (<= DECODE_MAX_QUERIES) over a longer cache, no grad
    flash_attn             otherwise, without padding or segments
    flash_attn_varlen      padding (the valid tokens gathered) or segments (no gather)

What the kernels cannot serve (``unserved``: dtypes, head dims, head counts) goes to the
caller's fallback through ``fallback``, which counts it and warns once per reason. Every
path taken is counted in ``ATTENTION_CALLS`` (keys start with the caller's ``prefix``), so
tests see which one served a call.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from llama_fast.call_counts import CallCounts
from llama_fast.ops import MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_attn, flash_decode
from llama_fast.ops.attention import packed_attention, padded_attention

__all__ = ["ATTENTION_CALLS", "DECODE_MAX_QUERIES", "attend", "fallback", "needs_grad", "unserved"]

DECODE_MAX_QUERIES = 16  # up to this many new tokens over a longer cache (no grad) use flash_decode
ATTENTION_CALLS = CallCounts()  # "<prefix><path>" -> calls
_WARNED: set[str] = set()  # fallback reasons already warned about (once each)


def unserved(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the kernels cannot take these (B, S, H, D) tensors, or None."""
    if not (q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES):
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d or not 1 <= d <= MAX_HEAD_DIM:
        return f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} (must be equal, at most {MAX_HEAD_DIM})"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads for {k.shape[2]} key heads"
    return None


def fallback(reason: str, run: Callable[[], object], *, prefix: str = "", who: str = "llama_fast attention"):
    """Run the caller's fallback for ``reason``: counted, and warned about once per reason."""
    ATTENTION_CALLS.add(f"{prefix}sdpa: {reason}")
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"{who} falls back to SDPA: {reason}", stacklevel=3)
    return run()


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
           q_valid: Tensor | None = None, k_valid: Tensor | None = None, segments: Tensor | None = None,
           cache_seqlens: Tensor | None = None, prefix: str = "", label: str = "") -> Tensor:
    """Attention of (B, Sq, Hq, D) queries over (B, Sk, Hkv, D) keys/values on the kernel the
    inputs call for (see the module docstring); returns (B, Sq, Hq, D). The caller has
    checked ``unserved``. ``label`` is added to the counted path (e.g. " (cache)")."""
    b, sq = q.shape[:2]
    sk = k.shape[1]
    if segments is not None:
        ATTENTION_CALLS.add(f"{prefix}flash_attn_varlen (packed){label}")
        row = torch.arange(b, device=segments.device, dtype=torch.int64)[:, None] * segments.shape[1]
        _, lengths = torch.unique_consecutive((row + segments).reshape(-1), return_counts=True)
        return packed_attention(q, k, v, lengths, softmax_scale=scale)
    if q_valid is not None:
        ATTENTION_CALLS.add(f"{prefix}flash_attn_varlen{label}")
        return padded_attention(q, k, v, q_valid, k_valid, softmax_scale=scale)
    if causal and sq < sk and sq <= DECODE_MAX_QUERIES and not needs_grad(q, k, v):
        ATTENTION_CALLS.add(f"{prefix}flash_decode{label}")
        if cache_seqlens is None:
            cache_seqlens = torch.full((b,), sk, dtype=torch.int32, device=q.device)
        return flash_decode(q, k, v, cache_seqlens, softmax_scale=scale)
    ATTENTION_CALLS.add(f"{prefix}flash_attn{label}")
    return flash_attn(q, k, v, causal=causal, softmax_scale=scale)
