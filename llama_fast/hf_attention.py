"""The Hugging Face attention adapter: the attention function and the mask function that
``llama_fast.patch`` registers under the name "llama_fast" (``ATTN_IMPLEMENTATION``) for
transformers' Llama models (the ``attention`` row of ``llama_fast.patching.RULES``).

    hf_attention_forward   registered with transformers' ``AttentionInterface``
    hf_attention_mask      registered with transformers' ``AttentionMaskInterface``

``patch`` registers both (``register``) and switches the model's attention implementation;
``unpatch`` switches it back (see ``llama_fast.patching``). The kernel each call runs is
chosen by ``llama_fast.attention_router`` (shared with the reference model's fused
attention), which counts it in ``ATTENTION_CALLS``. transformers is imported only when
these functions run (it is an optional dependency).

Hugging Face extension points used (no copies of transformers' forward functions)
---------------------------------------------------------------------------------
* ``AttentionInterface.register("llama_fast", hf_attention_forward)`` and
  ``model.set_attn_implementation("llama_fast")``: LlamaAttention looks its attention function
  up by ``config._attn_implementation`` on every call.
* ``AttentionMaskInterface.register("llama_fast", hf_attention_mask)``: without a mask
  function registered under the same name, ``create_causal_mask`` returns None for a custom
  implementation and padded batches would be silently wrong. Ours returns None when there is
  no padding; the 2-D (B, Sk) boolean padding mask when there is; (B, S) int32 segment ids
  for packed sequences (position_ids restarting within a row, no mask, no cache: it builds
  ``sdpa_mask``'s 4-D mask and reads the segments off it when it is block-diagonal causal;
  a single segment per row, which is what ``torch.compile``'s tracing of that detection
  yields, is None again); and for anything else (sliding windows, or/and mask functions,
  bidirectional masks, static caches, whose queries are not the last keys) the 4-D mask of
  ``sdpa_mask``, on which the attention function falls back to SDPA.

Attention function (``hf_attention_forward``): q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) come in
as HF lays them out and go to the ops as transposed views; GQA is native (no repeat_kv).

* no mask: ``flash_attn`` (causal is bottom-right aligned, so keys longer than queries, a KV
  cache after a prefix, are right); a few queries over a longer cache without grad (decoding)
  use ``flash_decode`` with every cache entry valid.
* a mask means causal attention restricted by it (as in SDPA, where a given mask overrides
  ``is_causal``).
* 2-D padding mask: the valid tokens are gathered (``nonzero``, one host sync, as HF's FA2
  path does) and run through ``flash_attn_varlen``; within a sequence the valid queries are
  the last valid keys, so bottom-right causal over the gathered tokens is exactly "key j <=
  query i and j not padding", for left, right or any padding and with a cache (generate()
  with left padding). Padded query rows come out as zeros.
* segment ids (packed sequences): ``flash_attn_varlen`` over the rows as they are, one
  sequence per (row, segment), no gather.
* 4-D or custom masks, sliding windows, softcap, dtypes or head dims the ops do not take:
  SDPA (transformers' own ``sdpa`` attention function), counted in ``ATTENTION_CALLS``
  and warned about once per reason.
* dropout > 0 (training with ``attention_dropout``) raises: the kernels have no dropout.

Under ``torch.compile`` the layers trace into one graph on the no-padding path; the mask
function breaks the graph once per forward when transformers hands it its traced
packed-sequence check (data-dependent tests on the mask, as in HF's own FA2 path), and the
padded and packed paths break the graph in every layer (``nonzero`` and the host-side
lengths ``flash_attn_varlen`` takes). Static caches (``cache_implementation="static"``) go
to SDPA: their mask covers the whole preallocated cache and queries are not the last keys.
"""
from __future__ import annotations

import sys
import warnings

import torch

from llama_fast import attention_router as router
from llama_fast.attention_router import ATTENTION_CALLS

__all__ = ["ATTN_IMPLEMENTATION", "hf_attention_forward", "hf_attention_mask", "register"]

ATTN_IMPLEMENTATION = "llama_fast"  # the name both functions are registered under


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf_attention_mask)


def hf_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """The mask function registered with ``AttentionMaskInterface`` (see the module docstring).

    Returns what ``hf_attention_forward`` serves: None (causal, no padding); a (B, kv_length)
    bool padding mask (causal within the valid tokens); a (B, S) int32 tensor of segment ids
    (packed sequences: causal within each run of equal ids); or else ``sdpa_mask``'s 4-D mask,
    which the attention function hands to SDPA.
    """
    from transformers import masking_utils

    ints = all(isinstance(n, int) for n in (q_offset, kv_offset, kv_length, q_length))
    plain = (
        mask_function is masking_utils.causal_mask_function and ints
        and kv_offset == 0 and q_offset + q_length == kv_length
        and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                                        and tuple(attention_mask.shape) == (batch_size, kv_length)))
    )
    if plain:
        if attention_mask is None:
            return None
        mask = attention_mask.to(torch.bool)
        return None if bool(mask.all()) else mask
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    mask = masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                   kv_offset=kv_offset, mask_function=mask_function or masking_utils.causal_mask_function,
                                   attention_mask=attention_mask, **kwargs)
    if ints and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        segments = _causal_segments(mask)
        if segments is not None:
            # One segment per row is plain causal: what packed-sequence detection gives when
            # torch.compile traces it (it cannot look at the position_ids).
            return None if bool((segments[:, -1] == 0).all()) else segments
    return mask


def _causal_segments(mask):
    """If the 4-D bool mask (B, 1, S, S) is block-diagonal causal (packed sequences: each
    query sees the keys from the start of its run up to itself), its (B, S) int32 segment
    ids (0, 1, ... along each row); else None."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    m = mask[:, 0]
    s = m.shape[-1]
    if m.shape[-2] != s or s == 0:
        return None
    ar = torch.arange(s, device=m.device)
    start = m.to(torch.uint8).argmax(-1)  # first visible key of each query
    expected = (ar >= start[..., None]) & (ar <= ar[:, None])
    new = start == ar  # query i starts a segment
    prev = torch.nn.functional.pad(start, (1, 0))[:, :-1]
    if not (torch.equal(m, expected) and bool((new | (start == prev)).all())):
        return None
    return (new.cumsum(-1, dtype=torch.int32) - 1).to(torch.int32)


def _sdpa(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return router.fallback(reason, lambda: sdpa(module, query, key, value, attention_mask, dropout=dropout,
                                                scaling=scaling, is_causal=is_causal, **kwargs))


def _unserved(query, key, value, attention_mask, is_causal, kwargs) -> str | None:
    """Why the kernels cannot serve this call as transformers makes it, or None."""
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        return "a 4-D or custom attention mask (sliding window, bidirectional, user-made, or a static cache)"
    for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported by the llama_fast kernels"
    if attention_mask is None and is_causal and query.shape[2] > key.shape[2]:
        return "more queries than keys under a causal mask"
    return router.unserved(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))


def _additive_mask(attention_mask, query, key, is_causal):
    """The float (B, 1, Sq, Sk) mask transformers' eager attention adds to the scores, from
    what ``hf_attention_mask`` made: None (causal, bottom-right aligned), a (B, Sk) bool
    padding mask, (B, S) int32 segment ids, or a 4-D bool mask."""
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    device = query.device
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    causal = (j <= i) if is_causal or attention_mask is not None else torch.ones(sq, sk, dtype=torch.bool, device=device)
    allowed = causal[None, None].expand(b, 1, sq, sk)
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool:
                return attention_mask  # already additive
            allowed = attention_mask
        elif attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask[:, None, None, :]
        else:  # segment ids
            allowed = allowed & (attention_mask[:, None, :, None] == attention_mask[:, None, None, :])
    zero = torch.zeros((), dtype=query.dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(query.dtype).min)


def _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """``output_attentions=True``: the fused kernels never form the attention weights, so such
    calls run the model's own eager attention, which returns them (as transformers does)."""
    ATTENTION_CALLS.add("eager: output_attentions")
    if "output_attentions" not in router._WARNED:
        router._WARNED.add("output_attentions")
        warnings.warn("llama_fast attention runs transformers' eager attention for output_attentions=True "
                      "(the fused kernels do not form the attention weights)", stacklevel=3)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    mask = _additive_mask(attention_mask, query, key, is_causal)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def hf_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """The attention function registered with ``AttentionInterface`` as "llama_fast"
    (see the module docstring). Returns ((B, Sq, Hq, D), None): no attention weights, but
    for ``output_attentions=True``, which runs the eager attention and returns them."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("output_attentions", getattr(getattr(module, "config", None), "output_attentions", False)):
        return _eager_with_weights(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if dropout:
        raise ValueError(f"llama_fast attention has no dropout (got dropout={dropout}): set "
                         "config.attention_dropout = 0.0, or train with another attention implementation")
    reason = _unserved(query, key, value, attention_mask, is_causal, kwargs)
    if reason is not None:
        return _sdpa(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    b, sq = q.shape[:2]
    sk = k.shape[1]
    if attention_mask is None:
        return router.attend(q, k, v, causal=is_causal, scale=scaling), None
    # As hf_attention_mask makes them: a mask means causal, whatever is_causal says.
    if attention_mask.dtype == torch.bool and tuple(attention_mask.shape) == (b, sk):
        return router.attend(q, k, v, scale=scaling, q_valid=attention_mask[:, sk - sq:], k_valid=attention_mask), None
    if attention_mask.dtype == torch.int32 and tuple(attention_mask.shape) == (b, sq) and sq == sk:
        return router.attend(q, k, v, scale=scaling, segments=attention_mask), None
    raise ValueError(f"llama_fast attention: a 2-D mask must be the bool (batch, keys)=({b}, {sk}) padding mask or "
                     f"the int32 (batch, queries) segment ids of hf_attention_mask, got {attention_mask.dtype} "
                     f"{tuple(attention_mask.shape)}")
