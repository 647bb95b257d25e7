"""Drop-in ``torch.nn`` modules and helpers on top of the llama_fast ops.

Each module has the parameter names and shapes of the module it replaces, so state dicts,
optimisers and weight tying are unaffected, and a ``from_module`` classmethod that builds
one around an existing module's Parameters (the same objects: nothing is copied).

    RMSNorm(hidden_size, eps)        weight; forward = llama_fast.rms_norm
    SwiGLUMLP(hidden, intermediate)  gate_proj, up_proj, down_proj (or Meta's w1, w3, w2):
                                     forward = down(swiglu(gate(x), up(x)))
    apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
                                     Hugging Face's signature and layouts, on llama_fast.apply_rope
    head_cross_entropy(hidden, head, target, ...)
                                     cross_entropy(head(hidden).float(), target) on
                                     llama_fast.fused_linear_cross_entropy: no logits

The reference model's own fused modules (Meta's names) are ``llama_fast.model_fused``,
beside the model they patch.

Inputs the ops do not take (float64, a norm weight in a third dtype) run the eager formula
of the module replaced instead of raising: a drop-in never fails where the original works.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_fast.ops import SUPPORTED_DTYPES, apply_rope, fused_linear_cross_entropy, rms_norm, swiglu
from llama_fast.ops.cross_entropy import is_vocab_sharded

__all__ = [
    "RMSNorm",
    "SwiGLUMLP",
    "apply_rotary_pos_emb",
    "fused_head_kind",
    "head_cross_entropy",
    "is_plain_linear",
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


def is_plain_linear(head: nn.Module) -> bool:
    """An nn.Linear whose forward is F.linear(x, weight, bias): not a subclass (quantised,
    LoRA-wrapped), no hooks, no instance-level forward."""
    return (type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)
            and "forward" not in head.__dict__)


def fused_head_kind(head: nn.Module) -> str | None:
    """How ``head_cross_entropy`` fuses ``head`` with the loss, or None when it cannot (the
    unfused ``head(hidden)`` then runs):

    * "linear": a plain nn.Linear (``is_plain_linear``), or an nn.Linear whose weight is
      vocabulary-sharded (a DTensor, Shard(0) on a 1-D mesh: tensor_parallel's output head;
      its hooks only move layouts, which the vocabulary-parallel loss does itself);
    * "fsdp": an nn.Linear that is its own FSDP2 unit (``fully_shard(lm_head)``), with no
      hooks but FSDP's: the loss runs as a registered FSDP forward method
      (``register_fsdp_forward_method``), so FSDP gathers the weight before it, frees it
      after, and reduce-scatters its gradient, as around the head's own forward.
    """
    if is_plain_linear(head):
        return "linear"
    if type(head) is nn.Linear and "forward" not in head.__dict__ and is_vocab_sharded(head.weight):
        return "linear"
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if (fsdp_module is not None and isinstance(head, fsdp_module) and isinstance(head, nn.Linear)
            and type(head).forward is nn.Linear.forward and "forward" not in head.__dict__
            and hasattr(head, "_get_fsdp_state")):
        state = head._get_fsdp_state()
        hooks = [*head._forward_pre_hooks.values(), *head._forward_hooks.values()]
        if all(getattr(hook, "__self__", None) is state for hook in hooks):
            return "fsdp"
    return None


_FSDP_LOSS_METHOD = "llama_fast_cross_entropy"


def _fsdp_head_loss(head: nn.Module):
    """The head's loss method, registered with FSDP on first use (the user shards after
    patching, so it cannot be registered earlier)."""
    method = head.__dict__.get(_FSDP_LOSS_METHOD)
    if method is None:
        from torch.distributed.fsdp import register_fsdp_forward_method

        setattr(head, _FSDP_LOSS_METHOD, functools.partial(_head_loss, head=head))
        register_fsdp_forward_method(head, _FSDP_LOSS_METHOD)
        method = head.__dict__[_FSDP_LOSS_METHOD]
    return method


def head_cross_entropy(hidden: Tensor, head: nn.Module, target: Tensor, *, ignore_index: int = -100,
                       reduction: str = "mean", kind: str | None = None, weight: Tensor | None = None) -> Tensor:
    """``F.cross_entropy(head(hidden).float().flatten(0, -2), target.flatten(), ...)``: the loss
    of an output head (an ``nn.Linear``, its weight possibly tied to the embeddings) on
    ``llama_fast.fused_linear_cross_entropy``, which never materialises the logits.

    hidden (..., H); target of hidden's shape without H, int64. The loss is float32 (float64
    for float64 inputs) as the unfused formula's is; the op computes it in float32 and
    rounds it to hidden's dtype first. Under ``torch.autocast`` hidden, weight and bias are
    cast to the autocast dtype, as ``F.linear`` would cast them (custom ops are not
    autocast-aware). Heads ``fused_head_kind`` does not fuse (a quantised or LoRA-wrapped
    head, hooks), and dtypes the op does not take (float64), run the unfused formula. A
    head that is its own FSDP2 unit is gathered by FSDP around the loss; a
    vocabulary-sharded head (tensor parallel) gives the vocabulary-parallel loss.

    ``kind``: how to fuse, when the caller has recognised the head itself (a framework's
    tensor-parallel head, whose own forward only moves layouts: "linear" then fuses its
    weight and bias as they are); None asks ``fused_head_kind``. ``weight``: what the fused
    loss takes for ``head.weight`` (None: ``head.weight`` itself), for a head whose weight
    is a local shard that the framework's hooks treat as a shard of the whole weight: the
    caller hands that DTensor (``DTensor.from_local``), whose gradient reaches the local
    shard. The unfused formula still calls ``head(hidden)``.
    """
    if kind not in (None, "linear", "fsdp"):
        raise ValueError(f"kind must be None, 'linear' or 'fsdp', got {kind!r}")
    kind = kind or fused_head_kind(head)
    if kind == "fsdp":
        if weight is not None:
            raise ValueError("weight must be None for a head that is its own FSDP2 unit (FSDP gathers head.weight)")
        return _fsdp_head_loss(head)(hidden, target, ignore_index=ignore_index, reduction=reduction)
    return _head_loss(hidden, target, ignore_index=ignore_index, reduction=reduction, head=head, fused=kind is not None,
                      weight=weight)


def _head_loss(hidden: Tensor, target: Tensor, *, ignore_index: int, reduction: str, head: nn.Module,
               fused: bool = True, weight: Tensor | None = None) -> Tensor:
    weight = getattr(head, "weight", None) if weight is None else weight
    bias = getattr(head, "bias", None)
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if fused and autocast:
        dtype = torch.get_autocast_dtype(device_type)
        if hidden.dtype in SUPPORTED_DTYPES and weight.dtype in SUPPORTED_DTYPES and dtype in SUPPORTED_DTYPES:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
    if (not fused or hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype
            or (bias is not None and bias.dtype != hidden.dtype)):
        logits = head(hidden)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index, reduction=reduction)
        return loss.view(target.shape) if reduction == "none" else loss
    # Autocast off inside: the op's own torch matmuls keep their float32 accumulation.
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                                          reduction=reduction)
    return loss.float()
