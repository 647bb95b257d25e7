"""Drop-in ``torch.nn`` modules and helpers on top of the llama_fast ops.

Each module has the parameter names and shapes of the module it replaces, so state dicts,
optimisers and weight tying are unaffected, and a ``from_module`` classmethod that builds
one around an existing module's Parameters (the same objects: nothing is copied).

    RMSNorm(hidden_size, eps)        weight; forward = llama_fast.rms_norm
    SwiGLUMLP(hidden, intermediate)  gate_proj, up_proj, down_proj (or Meta's w1, w3, w2):
                                     forward = down(swiglu(gate(x), up(x)))
    apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
                                     Hugging Face's signature and layouts, on llama_fast.apply_rope

For the reference model (``llama_fast.model``, Meta's names):

    MetaRotary()                     forward(q, k, cos, sin) = apply_rope(..., interleaved=True)
    MetaAttention                    wq, wk, wv, wo, rotary, kv_cache; flash_attn / flash_decode /
                                     flash_attn_varlen, SDPA for what they cannot serve
    MetaTransformerBlock             attention, feed_forward, attention_norm, ffn_norm; the
                                     residual add and ffn_norm in one add_rms_norm

Inputs the ops do not take (float64, a norm weight in a third dtype) run the eager formula
of the module replaced instead of raising: a drop-in never fails where the original works.
"""
from __future__ import annotations

import collections
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_fast.ops import SUPPORTED_DTYPES, apply_rope, rms_norm, swiglu

__all__ = [
    "ATTENTION_CALLS",
    "MetaAttention",
    "MetaRotary",
    "MetaTransformerBlock",
    "RMSNorm",
    "SwiGLUMLP",
    "apply_rotary_pos_emb",
    "rotary_half_tables",
    "share_into",
]


def share_into(target: nn.Module, source: nn.Module) -> None:
    """Make ``target``'s direct Parameters, buffers and children that ``source`` has under
    the same names *be* ``source``'s (the same objects), and copy its training flag.

    Used both ways: to build a replacement around an original module, and when the original
    is restored, to hand it the Parameters as they are now (``load_state_dict(assign=True)``
    or ``to_empty`` may have replaced the objects in the meantime).
    """
    for name, param in source._parameters.items():
        if name in target._parameters:
            target._parameters[name] = param
    for name, buf in source._buffers.items():
        if name in target._buffers:
            target._buffers[name] = buf
    for name, child in source._modules.items():
        if name in target._modules:
            target._modules[name] = child
        elif name in target.__dict__ and target.__dict__[name] is None:
            # An optional child slot left as a plain None attribute (the reference model's
            # ``kv_cache`` before ``setup_cache``): the child made since goes there.
            del target.__dict__[name]
            target._modules[name] = child
    target.training = source.training


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2) + eps)``.

    Same parameter (``weight``, shape (hidden_size,)) and the same rounding as Hugging Face's
    ``LlamaRMSNorm`` (normalised value rounded to x's dtype before the weight multiplies it)
    and Meta's ``RMSNorm``. ``variance_epsilon`` is an alias of ``eps`` (HF's name).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = float(eps)

    @property
    def variance_epsilon(self) -> float:
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float) -> None:
        self.eps = float(value)

    @classmethod
    def from_module(cls, module: nn.Module) -> "RMSNorm":
        """An RMSNorm sharing ``module.weight``; eps from ``variance_epsilon`` (HF) or ``eps`` (Meta)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        if eps is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            raise TypeError(f"{type(module).__name__} is not an RMSNorm with a 1-d weight and an eps")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = weight
        new.eps = float(eps)
        new.training = module.training
        return new

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype in SUPPORTED_DTYPES and w.dtype in (x.dtype, torch.float32) and x.shape[-1] == w.shape[0]:
            return rms_norm(x, w, self.eps)
        # What LlamaRMSNorm computes, for inputs the op does not take.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def _is_silu(fn) -> bool:
    """nn.SiLU (or transformers' SiLUActivation), decided from the type; else a parameterless
    callable that computes exactly F.silu, probed on a fixed float32 CPU tensor."""
    if isinstance(fn, nn.SiLU) or fn is F.silu or type(fn).__name__ == "SiLUActivation":
        return True
    if not callable(fn) or (isinstance(fn, nn.Module) and (any(True for _ in fn.parameters())
                                                          or any(True for _ in fn.buffers()))):
        return False
    # An explicit CPU device: under ``with torch.device("meta")`` (how FSDP2 and big-model
    # loading build models) a default-device probe would be a meta tensor with no values.
    t = torch.linspace(-8.0, 8.0, 33, device="cpu")
    try:
        with torch.no_grad():
            out = fn(t)
    except Exception:  # noqa: BLE001 - anything that cannot run on it is not SiLU for us
        return False
    return isinstance(out, Tensor) and out.shape == t.shape and torch.equal(out, F.silu(t))


HF_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
META_MLP_NAMES = ("w1", "w3", "w2")  # gate, up, down in Meta's FeedForward


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the three projections as plain ``nn.Linear``.

    ``names`` are the attribute names of (gate, up, down): Hugging Face's by default,
    ``META_MLP_NAMES`` for Meta's FeedForward (w1, w3, w2), so the state dict keys are those
    of the module replaced.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, *,
                 names: tuple[str, str, str] = HF_MLP_NAMES, device=None, dtype=None) -> None:
        super().__init__()
        self._names = tuple(names)
        gate, up, down = self._names
        kw = dict(bias=bias, device=device, dtype=dtype)
        setattr(self, gate, nn.Linear(hidden_size, intermediate_size, **kw))
        setattr(self, up, nn.Linear(hidden_size, intermediate_size, **kw))
        setattr(self, down, nn.Linear(intermediate_size, hidden_size, **kw))

    @classmethod
    def from_module(cls, module: nn.Module, names: tuple[str, str, str] = HF_MLP_NAMES,
                    act: str | None = "act_fn") -> "SwiGLUMLP":
        """A SwiGLUMLP around ``module``'s own projection modules (shared, not copied).

        ``act`` names the module's activation attribute, which must be SiLU (HF's ``act_fn``);
        None when the module applies SiLU in its forward (Meta's FeedForward).
        """
        if act is not None and not _is_silu(getattr(module, act, None)):
            raise TypeError(f"its activation {act}={type(getattr(module, act, None)).__name__} is not SiLU")
        projections = [getattr(module, n, None) for n in names]
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise TypeError(f"{type(module).__name__} does not have nn.Linear projections {names}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._names = tuple(names)
        # In the module's own order, so parameters() and state_dict() keep their order.
        for n in sorted(names, key=list(module._modules).index):
            setattr(new, n, getattr(module, n))
        new.training = module.training
        return new

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        g, u = gate(x), up(x)
        if g.dtype in SUPPORTED_DTYPES and g.dtype == u.dtype:
            return down(swiglu(g, u))
        return down(F.silu(g) * u)

    def extra_repr(self) -> str:
        return f"names={self._names}"


def rotary_half_tables(cos: Tensor, sin: Tensor, head_dim: int, batch: int) -> tuple[Tensor, Tensor] | None:
    """Hugging Face's (B, S, D) or (S, D) cos/sin tables, whose two halves are equal, as the
    (S, D/2) or (B, S, D/2) half tables ``apply_rope`` takes; None if their shape does not fit."""
    if cos.shape != sin.shape or cos.shape[-1] != head_dim or head_dim % 2 or cos.dim() not in (2, 3):
        return None
    half = head_dim // 2
    c, s = cos[..., :half].detach(), sin[..., :half].detach()
    if c.dim() == 3 and c.shape[0] != batch:
        if c.shape[0] != 1:
            return None
        c, s = c[0], s[0]  # one table for the whole batch
    return c, s


def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
                         *, fallback=None) -> tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` (rotate-half convention) on ``llama_fast.apply_rope``.

    q (B, Hq, S, D) and k (B, Hkv, S, D) with ``unsqueeze_dim=1`` (HF's layout; they go in as
    transposed views, no copy), or (B, S, H, D) with ``unsqueeze_dim=2``. cos and sin are HF's
    tables, (B, S, D) or (S, D), whose halves must be equal (``cat((freqs, freqs))``, as every
    HF RoPE class builds them): only the first half is read. Results keep the input layout.

    Inputs the op does not take (other dtypes, partial rotary, odd shapes) go to ``fallback``
    (called with the same arguments) when given, else raise ValueError.
    """
    ok = unsqueeze_dim in (1, 2, -3) and q.dim() == 4 and k.dim() == 4
    heads_first = unsqueeze_dim in (1, -3)
    tables = None
    if ok:
        tables = rotary_half_tables(cos, sin, q.shape[-1], q.shape[0])
        ok = (tables is not None and q.dtype == k.dtype and q.dtype in SUPPORTED_DTYPES
              and cos.dtype in SUPPORTED_DTYPES and q.device == k.device == cos.device
              and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1]
              and k.shape[2 if heads_first else 1] == q.shape[2 if heads_first else 1]
              and q.shape[1 if heads_first else 2] % max(1, k.shape[1 if heads_first else 2]) == 0)
    if not ok:
        if fallback is not None:
            return fallback(q, k, cos, sin, unsqueeze_dim)
        raise ValueError(f"apply_rotary_pos_emb: unsupported inputs q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, "
                         f"cos {tuple(cos.shape)}, unsqueeze_dim={unsqueeze_dim}")
    c, s = tables
    if heads_first:
        q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), c, s)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return apply_rope(q, k, c, s)


# ---------------------------------------------------------------------------------------
# The reference model (llama_fast.model): Meta's module and parameter names


def _patching_counter() -> collections.Counter:
    from llama_fast.patching import ATTENTION_CALLS

    return ATTENTION_CALLS


# Keys of llama_fast.patching.ATTENTION_CALLS for MetaAttention start with this.
META_CALLS_PREFIX = "meta: "
_META_WARNED: set[str] = set()


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
            from llama_fast.model import Rotary

            return Rotary.forward(self, q, k, cos, sin)
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


def _varlen_rows(q: Tensor, k: Tensor, v: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """Attention on the valid tokens of each row (see ``llama_fast.ops.attention.padded_attention``)."""
    from llama_fast.ops.attention import padded_attention

    return padded_attention(q, k, v, q_valid, k_valid)


class MetaAttention(nn.Module):
    """``llama_fast.model.Attention`` on the llama_fast attention ops, with the same
    parameters (wq, wk, wv, wo), ``rotary`` child, ``kv_cache`` and forward contract.

    Paths (``llama_fast.patching.ATTENTION_CALLS`` counts them, keys "meta: ..."):

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
        from llama_fast.ops import MAX_HEAD_DIM, flash_attn, flash_decode
        from llama_fast.patching import DECODE_MAX_QUERIES

        calls = _patching_counter()
        reason = None
        if not (q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES):
            reason = f"dtypes q {q.dtype}, k/v {k.dtype}/{v.dtype}"
        elif not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
            reason = f"head dim {q.shape[-1]} (at most {MAX_HEAD_DIM})"
        elif mask is None:
            if not cached:
                calls[META_CALLS_PREFIX + "flash_attn"] += 1
                return flash_attn(q, k, v, causal=True)
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
            return self._sdpa(reason, q, k, v, mask)

        if not cached:
            if no_pads:
                calls[META_CALLS_PREFIX + "flash_attn"] += 1
                return flash_attn(q, k, v, causal=True)
            calls[META_CALLS_PREFIX + "flash_attn_varlen"] += 1
            valid = pos >= 0
            return _varlen_rows(q, k, v, valid, valid)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if no_pads and sq <= DECODE_MAX_QUERIES and not needs_grad:
            calls[META_CALLS_PREFIX + "flash_decode"] += 1
            return flash_decode(q, k, v, (pos[:, -1] + 1).to(torch.int32))
        if no_pads and same_last:
            calls[META_CALLS_PREFIX + "flash_attn (cache)"] += 1
            n = last0 + 1
            return flash_attn(q, k[:, :n], v[:, :n], causal=True)
        calls[META_CALLS_PREFIX + "flash_attn_varlen (cache)"] += 1
        slots = torch.arange(k.shape[1], device=k.device)[None]
        return _varlen_rows(q, k, v, pos >= 0, slots <= pos[:, -1:])

    def _sdpa(self, reason: str, q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
        """The reference's formula (llama_fast.model.Attention), (B, S, H, D) in and out."""
        _patching_counter()[f"{META_CALLS_PREFIX}sdpa: {reason}"] += 1
        if reason not in _META_WARNED:
            _META_WARNED.add(reason)
            warnings.warn(f"llama_fast MetaAttention falls back to SDPA: {reason}", stacklevel=3)
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
    from llama_fast import model as ref

    if type(norm) not in (RMSNorm, ref.RMSNorm) or norm._forward_hooks or norm._forward_pre_hooks:
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
        from llama_fast.ops import add_rms_norm

        a = self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        params = _norm_params(self.ffn_norm)
        if (params is not None and x.dtype in SUPPORTED_DTYPES and a.dtype == x.dtype
                and params[0].dtype in (x.dtype, torch.float32) and params[0].shape == x.shape[-1:]):
            y, h = add_rms_norm(a, x, params[0], params[1])
        else:
            h = x + a
            y = self.ffn_norm(h)
        return h + self.feed_forward(y)
