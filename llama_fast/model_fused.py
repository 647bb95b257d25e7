"""The reference Llama 3's modules on the llama_fast ops: what ``llama_fast.patch`` swaps into
``llama_fast.model.Transformer`` (the ``llama_fast_reference`` rows of
``llama_fast.patching.RULES``), beside the modules they replace and with Meta's names.

    MetaRotary            Rotary on apply_rope(..., interleaved=True)
    MetaAttention         wq, wk, wv, wo, rotary, kv_cache; the kernel chosen by
                          llama_fast.attention_router from the positions; SDPA for the rest
    MetaTransformerBlock  attention, feed_forward, attention_norm, ffn_norm; the residual add
                          and ffn_norm in one add_rms_norm
    FusedCrossEntropyHead CrossEntropyHead on fused_linear_cross_entropy (llama_fast.nn's
                          head_cross_entropy): the loss without the (tokens x vocab) logits

Each has a ``from_module`` that builds it around an original's Parameters and children
(shared, not copied). Inputs the ops do not take run the replaced module's formula.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_fast import attention_router as router
from llama_fast import model
from llama_fast.nn import RMSNorm, head_cross_entropy
from llama_fast.ops import SUPPORTED_DTYPES, add_rms_norm, apply_rope

__all__ = ["META_CALLS_PREFIX", "FusedCrossEntropyHead", "MetaAttention", "MetaRotary", "MetaTransformerBlock"]

# Keys of llama_fast.attention_router.ATTENTION_CALLS for MetaAttention start with this.
META_CALLS_PREFIX = "meta: "


class MetaRotary(nn.Module):
    """``llama_fast.model.Rotary`` on ``apply_rope(..., interleaved=True)``: q (B, S, Hq, D),
    k (B, S, Hkv, D), cos/sin (B, S, D/2) or (S, D/2) float32; no parameters. Inputs the op
    does not take (float64, odd shapes) run the reference formula."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "MetaRotary":
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise TypeError(f"{type(module).__name__} has parameters or buffers: not the parameterless Rotary")
        new = cls()
        new.training = module.training
        return new

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ok = (q.dim() == 4 and k.dim() == 4 and q.dtype == k.dtype and q.dtype in SUPPORTED_DTYPES
              and cos.dtype in SUPPORTED_DTYPES and cos.shape == sin.shape and q.shape[-1] % 2 == 0
              and q.device == k.device == cos.device
              and tuple(cos.shape) in ((q.shape[1], q.shape[-1] // 2), (q.shape[0], q.shape[1], q.shape[-1] // 2)))
        if not ok:
            return model.Rotary.forward(self, q, k, cos, sin)
        return apply_rope(q, k, cos.detach(), sin.detach(), interleaved=True)


_POS_MEMO: list = [None, -1, None, None]  # weakref to the last positions tensor, its _version, its summary, _storage_key


def _storage_key(pos: Tensor) -> tuple:
    return (pos.device, pos.untyped_storage().data_ptr(), pos.storage_offset(), tuple(pos.shape), pos.stride())


def _capturing(pos: Tensor) -> bool:
    return pos.is_cuda and torch.cuda.is_current_stream_capturing()


def _positions_summary(pos: Tensor) -> tuple[bool, bool, bool, int]:
    """(B, S) positions -> (layout_ok, no_pads, same_last, last of row 0), in one host sync.

    layout_ok: in every row the pad tokens (negative positions) come first and the others
    are consecutive, which is what the kernels' bottom-right causal alignment needs (and
    what ``generate`` and the training forward produce). Every layer of a forward gets the
    same positions tensor: the summary is remembered for it (and its version counter)."""
    ref, version, summary, storage = _POS_MEMO
    if ref is not None and ref() is pos and version == pos._version:
        return summary
    if _capturing(pos):
        # A CUDA graph cannot sync. A captured decode step reads its positions from a static
        # buffer (the model makes a new view of it each step) that the warm-up step, which
        # any capture needs first, already summarised; the layout (which rows have pads)
        # does not change between steps, and the kernels read the values on the device.
        if storage == _storage_key(pos):
            return summary
        raise RuntimeError("llama_fast: capturing a CUDA graph of a patched attention step needs one un-captured "
                           "warm-up step with the same positions tensor first (its layout is checked on the host)")
    valid = pos >= 0
    monotone = (valid[:, 1:] >= valid[:, :-1]).all()
    consecutive = ((pos[:, 1:] - pos[:, :-1] == 1) | ~valid[:, :-1]).all()
    last = pos[:, -1]
    flags = torch.stack([(monotone & consecutive).long(), valid.all().long(), (last == last[0]).all().long(), last[0]])
    layout_ok, no_pads, same_last, last0 = flags.tolist()
    summary = (bool(layout_ok), bool(no_pads), bool(same_last), int(last0))
    _POS_MEMO[:] = [weakref.ref(pos), pos._version, summary, _storage_key(pos)]
    return summary


class MetaAttention(nn.Module):
    """``llama_fast.model.Attention`` on the llama_fast attention ops, with the same
    parameters (wq, wk, wv, wo), ``rotary`` child, ``kv_cache`` and forward contract.

    The kernel is chosen by ``llama_fast.attention_router`` from what the positions say
    (``ATTENTION_CALLS`` counts the paths, keys "meta: ..."):

    * mask None, no cache (the training forward): ``flash_attn``, causal. No host sync, so
      ``torch.compile(fullgraph=True)`` traces it.
    * a mask (positions given): the mask is the one ``Transformer.forward`` derives from
      the positions, so the positions decide. When in every row pads come first and the
      other positions are consecutive (the training layout, ``generate``'s left-padded
      prompts and every decoding step), with one host sync per forward:
        - no cache: no pads -> ``flash_attn``; pads -> ``flash_attn_varlen`` on the valid tokens;
        - cache, no pads, at most ``DECODE_MAX_QUERIES`` queries, no grad -> ``flash_decode``
          with ``cache_seqlens = last position + 1`` (rows of different lengths included);
        - cache, no pads, all rows at the same position -> ``flash_attn`` over cache slots
          [0, last + 1) (bottom-right causal);
        - otherwise -> ``flash_attn_varlen``: each row's valid queries over its slots [0, last + 1).
    * anything else (other position layouts, dtypes or head dims the ops do not take, a
      cache without a mask) runs the reference's SDPA formula with the given mask, counted
      and warned about once per reason: never a silently different result.
    """

    @classmethod
    def from_module(cls, module: nn.Module) -> "MetaAttention":
        names = ("wq", "wk", "wv", "wo")
        if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            raise TypeError(f"{type(module).__name__} does not have nn.Linear projections {names}")
        if any(getattr(module, n).bias is not None for n in names):
            raise TypeError("projections with a bias are not Llama 3's")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_heads, new.n_kv_heads, new.head_dim = module.n_heads, module.n_kv_heads, module.head_dim
        for n in names:
            setattr(new, n, getattr(module, n))
        new.rotary = module.rotary
        new.kv_cache = module.kv_cache  # a module (registered) or None (a plain attribute, as in the original)
        new.training = module.training
        return new

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = self.rotary(q, k, cos, sin)
        cache = self.kv_cache
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
        out = self._attend(q, k, v, input_pos, mask, cache is not None)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos, mask, cached: bool) -> Tensor:
        reason = router.unserved(q, k, v)
        if reason is None:
            if mask is None:
                if not cached:
                    return router.attend(q, k, v, prefix=META_CALLS_PREFIX)
                reason = "a KV cache without a mask (Transformer.forward always passes one)"
            elif input_pos is None:
                reason = "a mask without input_pos"
        if reason is None:
            b, sq = q.shape[:2]
            pos = input_pos if tuple(input_pos.shape) == (b, sq) else input_pos.expand(b, sq)
            layout_ok, no_pads, same_last, last0 = _positions_summary(pos)
            if not layout_ok:
                reason = "positions that are not (pads, then consecutive positions) in every row"
        if reason is not None:
            return router.fallback(reason, lambda: self._sdpa(q, k, v, mask), prefix=META_CALLS_PREFIX,
                                   who="llama_fast MetaAttention")
        meta = META_CALLS_PREFIX
        if not cached:
            if no_pads:
                return router.attend(q, k, v, prefix=meta)
            valid = pos >= 0
            return router.attend(q, k, v, q_valid=valid, k_valid=valid, prefix=meta)
        # The cache holds the token at position p in slot p of its row: row b's keys are slots
        # [0, its last position + 1).
        if no_pads and sq <= router.DECODE_MAX_QUERIES and not router.needs_grad(q, k, v):
            return router.attend(q, k, v, cache_seqlens=(pos[:, -1] + 1).to(torch.int32), prefix=meta)
        if no_pads and same_last:
            n = last0 + 1
            return router.attend(q, k[:, :n], v[:, :n], prefix=meta, label=" (cache)")
        slots = torch.arange(k.shape[1], device=k.device)[None]
        return router.attend(q, k, v, q_valid=pos >= 0, k_valid=slots <= pos[:, -1:], prefix=meta, label=" (cache)")

    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
        """The reference's formula (llama_fast.model.Attention), (B, S, H, D) in and out."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"


def _norm_params(norm: nn.Module):
    """(weight, eps) of an RMSNorm add_rms_norm can stand in for, else None."""
    if type(norm) not in (RMSNorm, model.RMSNorm) or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    return norm.weight, norm.eps


class MetaTransformerBlock(nn.Module):
    """``llama_fast.model.TransformerBlock`` sharing its four children, with the residual
    add after attention and ``ffn_norm`` fused into one ``add_rms_norm``:
    ``y, h = add_rms_norm(attn_out, x, ffn_norm.weight)``; ``h + feed_forward(y)``. Falls
    back to the two steps when ffn_norm is not an RMSNorm or the op does not take the inputs."""

    _CHILDREN = ("attention", "feed_forward", "attention_norm", "ffn_norm")

    @classmethod
    def from_module(cls, module: nn.Module) -> "MetaTransformerBlock":
        if not all(isinstance(getattr(module, n, None), nn.Module) for n in cls._CHILDREN):
            raise TypeError(f"{type(module).__name__} does not have the children {cls._CHILDREN}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for n in cls._CHILDREN:
            setattr(new, n, getattr(module, n))
        new.training = module.training
        return new

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        params = _norm_params(self.ffn_norm)
        if (params is not None and x.dtype in SUPPORTED_DTYPES and a.dtype == x.dtype
                and params[0].dtype in (x.dtype, torch.float32) and params[0].shape == x.shape[-1:]):
            y, h = add_rms_norm(a, x, params[0], params[1])
        else:
            h = x + a
            y = self.ffn_norm(h)
        return h + self.feed_forward(y)


class FusedCrossEntropyHead(nn.Module):
    """``llama_fast.model.CrossEntropyHead`` on ``fused_linear_cross_entropy``: the same mean
    cross-entropy of ``output(h)`` against ``targets`` (float32), computed chunk by chunk
    without the (tokens x vocab) logits. The gradients of h and of the head's weight (tied
    to the embeddings or not) are made during the forward, so the graph through it can be
    backwarded once. Heads other than a plain nn.Linear and float64 run the reference formula
    (``llama_fast.nn.head_cross_entropy``)."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedCrossEntropyHead":
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise TypeError(f"{type(module).__name__} has parameters or buffers: not the parameterless CrossEntropyHead")
        new = cls(module.ignore_index)
        new.training = module.training
        return new

    def forward(self, h: Tensor, output: nn.Module, targets: Tensor) -> Tensor:
        return head_cross_entropy(h, output, targets, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
