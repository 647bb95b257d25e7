"""Hugging Face's ``LlamaForCausalLM`` with its loss head on ``fused_linear_cross_entropy``:
the forward ``llama_fast.patch`` gives the patched instances (the ``cross_entropy`` row of
``llama_fast.patching.RULES``, ``how="forward"``).

In training mode with ``labels``, ``causal_lm_forward`` returns Hugging Face's loss,
``ForCausalLMLoss``: the labels shifted left by one (or the ``shift_labels`` given), tokens
labelled ``ignore_index`` (-100) left out, the mean over the others, or their sum over
``num_items_in_batch`` (gradient accumulation), with ``logits_to_keep`` choosing the
positions as in HF's forward. It computes it from the base model's hidden states and the
lm_head's weight (tied to the embeddings or not, bias if any) chunk by chunk, and returns
``logits=None``: no logits were made. With ``return_dict=False`` the tuple therefore has
no logits entry (``ModelOutput.to_tuple`` leaves out the Nones).

The lm_heads it fuses: a plain ``nn.Linear``; one that is its own FSDP2 unit
(``fully_shard(model.lm_head)``: the loss runs as an FSDP forward method of the head, so
FSDP gathers its weight first; ``llama_fast.nn.fused_head_kind``); and the one
transformers' tensor parallelism makes of ``tp_plan="auto"`` in 5.25 (its Llama plan's
``"lm_head": "colwise_gather_output"``: the weight a DTensor sharded on the vocabulary, the
forward replaced by transformers' ``tp_forward``; ``_is_hf_vocab_parallel_head``) and the
one 5.10 makes of that entry in an explicit ``tp_plan`` (its auto plan leaves the lm_head
whole: a plain Parameter of the rank's rows with two hooks; ``_hf_local_vocab_shard_mesh``),
whose loss is the vocabulary-parallel one of ``fused_linear_cross_entropy``: each rank's
shard of the weight, neither the weight nor the logits gathered.

Everything else runs Hugging Face's forward unchanged: eval mode, no labels (so
``generate`` and evaluation see the same logits as before), and, with a warning once, a
loss function other than ``ForCausalLMLoss`` or an lm_head it does not fuse (a quantised
or LoRA-wrapped head, hooks, a forward set on the instance, another tensor-parallel
style): the warning names the head's class, its weight's placements, the forward and
hooks it saw. ``LOSS_CALLS`` counts which way each call went.

transformers has no extension point for the head, so this re-states the few lines of
``LlamaForCausalLM.forward`` after its base model (checked against transformers 5.10.4 and
5.25 by tests/test_patch_hf.py); the base model is called with every argument as HF's
forward calls it. Nothing here imports transformers at import time.
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch
import torch.nn.functional as F

from llama_fast.call_counts import CallCounts
from llama_fast.nn import fused_head_kind, head_cross_entropy
from llama_fast.ops.cross_entropy import is_dtensor, is_vocab_sharded

__all__ = ["LOSS_CALLS", "causal_lm_forward"]

LOSS_CALLS = CallCounts()  # "fused" | "transformers: <why>" -> calls
_WARNED: set[str] = set()
_QUIET = ("eval mode", "no labels")  # the ordinary reasons to run HF's forward: no warning
_NAMES: dict = {}  # HF's forward -> the names of its positional parameters


def _named_arguments(fallback, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name (positional ones named as HF's forward names them), or
    None when they do not bind (HF's forward then raises its own error)."""
    names = _NAMES.get(fallback)
    if names is None:
        # inspect.signature follows the decorators' __wrapped__ to HF's own forward.
        params = inspect.signature(fallback).parameters.values()
        names = _NAMES[fallback] = tuple(p.name for p in params
                                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[1:]  # not self
    if len(args) > len(names) or any(n in kwargs for n in names[:len(args)]):
        return None
    return {**dict(zip(names, args)), **kwargs}


def _unserved(model, named: dict | None) -> str | None:
    if not model.training:
        return "eval mode"
    if named is None:
        return "arguments that do not bind to the forward's"
    if named.get("labels") is None:
        return "no labels"
    from transformers.loss.loss_utils import ForCausalLMLoss

    if model.loss_function is not ForCausalLMLoss:
        return f"a loss function other than ForCausalLMLoss ({getattr(model.loss_function, '__name__', '?')})"
    head = model.get_output_embeddings()
    if _head_kind(head, model.config.vocab_size) is None:
        return f"an lm_head the fused loss does not take ({_head_description(head)})"
    if head.out_features != model.config.vocab_size and _hf_local_vocab_shard_mesh(head, model.config.vocab_size) is None:
        return f"an lm_head of {head.out_features} outputs for config.vocab_size {model.config.vocab_size}"
    return None


def _head_kind(head, vocab: int) -> str | None:
    """``fused_head_kind``, or "linear" for transformers' tensor-parallel lm_heads
    (``_is_hf_vocab_parallel_head``, ``_hf_local_vocab_shard_mesh``): their weight goes to
    the vocabulary-parallel loss."""
    kind = fused_head_kind(head)
    if kind is None and (_is_hf_vocab_parallel_head(head) or _hf_local_vocab_shard_mesh(head, vocab) is not None):
        kind = "linear"
    return kind


def _closure(fn, module, qualname: str) -> dict | None:
    """The variables ``fn`` closes over, by name, when it is the function ``qualname`` of
    ``module`` (a module object, or None); else None."""
    if (module is None or getattr(fn, "__module__", None) != module.__name__
            or getattr(fn, "__qualname__", None) != qualname):
        return None
    try:
        return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    except ValueError:  # an empty cell: not the function we know
        return None


def _hf_local_vocab_shard_mesh(head, vocab: int):
    """The 1-D mesh of an lm_head that transformers 5.10 shards by a ``tp_plan`` entry
    ``"lm_head": "colwise_gather_output"`` (its auto plan leaves the lm_head whole; a plan
    passed explicitly shards it), else None. Such a head is an ``nn.Linear`` whose weight
    is this rank's rows of the whole (``vocab``, H) weight, a plain Parameter split as
    ``Shard(0)`` splits (torch.chunk; ``out_features`` says the local rows), with exactly the two hooks
    ``distribute_module`` registers for ``ColwiseParallel(gather_output=True)``: before,
    ``_prepare_input_fn`` (identity, the input's gradient all-reduced), after,
    ``_prepare_output_fn`` (the logits all-gathered). Those only move layouts, as the
    vocabulary-parallel loss does on the DTensor view of the shard (``_sharded_view``)."""
    pre, post = list(head._forward_pre_hooks.values()), list(head._forward_hooks.values())
    if (type(head) is not torch.nn.Linear or "forward" in head.__dict__ or len(pre) != 1 or len(post) != 1
            or head.bias is not None or is_dtensor(head.weight)):
        return None
    tp = sys.modules.get("transformers.integrations.tensor_parallel")
    style_class = getattr(tp, "ColwiseParallel", None)
    before = _closure(pre[0], tp, "distribute_module.<locals>.<lambda>")
    after = _closure(post[0], tp, "distribute_module.<locals>.<lambda>")
    if style_class is None or before is None or after is None:
        return None
    input_fn, output_fn, mesh = before.get("input_fn"), after.get("output_fn"), before.get("device_mesh")
    style = getattr(input_fn, "__self__", None)
    if not (type(style) is style_class and getattr(style, "gather_output", False) is True
            and getattr(input_fn, "__func__", None) is style_class._prepare_input_fn
            and getattr(output_fn, "__self__", None) is style
            and getattr(output_fn, "__func__", None) is style_class._prepare_output_fn
            and after.get("device_mesh") is mesh and getattr(mesh, "ndim", None) == 1):
        return None
    k, rank = mesh.size(), mesh.get_local_rank()
    per = -(-vocab // k)
    rows = max(0, min(vocab, (rank + 1) * per) - min(vocab, rank * per))
    return mesh if tuple(head.weight.shape) == (rows, head.in_features) else None


def _sharded_view(local, vocab: int, mesh):
    """The local rows of a (vocab, H) weight as the DTensor they are a shard of (Shard(0) on
    ``mesh``), no copy: its gradient is the local shard's."""
    from torch.distributed.tensor import DTensor, Shard

    shape = (vocab, local.shape[1])
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=(shape[1], 1))


def _is_hf_vocab_parallel_head(head) -> bool:
    """The lm_head transformers' tensor parallelism (5.25) makes of its Llama plan's entry
    ``"lm_head": "colwise_gather_output"``: an ``nn.Linear`` whose weight (and bias, if any)
    is a DTensor sharded on the vocabulary (Shard(0), a 1-D mesh) and whose forward is the
    ``tp_forward`` that ``TensorParallelLayer.install_forward`` sets on the instance, with
    ``ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())`` around the
    head's own ``nn.Linear.forward`` on that mesh: replicated hidden states in, this rank's
    vocabulary shard of the logits, gathered into the whole logits out. That forward only
    moves layouts, as the vocabulary-parallel loss does itself (replicated hidden states,
    their gradient all-reduced; the weight's gradient its local shard, Shard(0)), so the
    loss of the gathered logits is the loss of the head's sharded weight. Recognised from
    the closure's own objects, so another style, another wrapped forward, a quantised
    head (``_hf_quantized_needs_local_tp``) or any hook leaves it unfused."""
    forward = head.__dict__.get("forward")
    if (type(head) is not torch.nn.Linear or forward is None or head._forward_hooks or head._forward_pre_hooks
            or getattr(head, "_hf_quantized_needs_local_tp", False) or not is_vocab_sharded(head.weight)):
        return False
    tp = sys.modules.get("transformers.distributed.tensor_parallel")
    cells = _closure(forward, tp, "TensorParallelLayer.install_forward.<locals>.tp_forward")
    if cells is None:
        return False
    from torch.distributed.tensor import Replicate

    style, original, mesh = cells.get("self"), cells.get("original_forward"), head.weight.device_mesh
    bias = head.bias
    return (type(style) is getattr(tp, "ColwiseParallel", None)
            and style.input_layouts == Replicate() and style.output_layouts == Replicate()
            and cells.get("module") is head and cells.get("mesh") == mesh
            and getattr(original, "__self__", None) is head
            and getattr(original, "__func__", None) is torch.nn.Linear.forward
            and (bias is None or (is_vocab_sharded(bias) and bias.device_mesh == mesh)))


def _head_description(head) -> str:
    """What an lm_head the fused loss does not take is: its class, its weight's kind and,
    where it has them, an instance-level forward and hooks, by name."""
    weight = getattr(head, "weight", None)
    parts = [type(head).__name__]
    if is_dtensor(weight):
        parts.append(f"weight a DTensor {tuple(str(p) for p in weight.placements)} on a "
                     f"{weight.device_mesh.ndim}-D mesh")
    elif weight is None:
        parts.append("no weight")
    forward = head.__dict__.get("forward")
    if forward is not None:
        parts.append(f"its forward replaced by {_callable_name(forward)}")
    for what, hooks in (("forward pre-hooks", head._forward_pre_hooks), ("forward hooks", head._forward_hooks)):
        if hooks:
            parts.append(f"{what} {', '.join(_callable_name(h) for h in hooks.values())}")
    if len(parts) == 1 and type(head) is not torch.nn.Linear:
        parts.append("not a plain nn.Linear")
    return ", ".join(parts)


def _callable_name(fn) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def causal_lm_forward(self, *args, fallback, **kwargs):
    """``LlamaForCausalLM.forward`` for a patched instance: the fused loss in training mode
    with labels (``logits=None``), ``fallback`` (HF's forward) for everything else."""
    named = _named_arguments(fallback, args, kwargs) if self.training else None
    why = _unserved(self, named)
    if why is not None:
        LOSS_CALLS.add(f"transformers: {why}")
        if why not in _QUIET and why not in _WARNED:
            _WARNED.add(why)
            warnings.warn(f"llama_fast: the loss of {type(self).__name__} runs Hugging Face's forward (with logits) "
                          f"for {why}", stacklevel=2)
        return fallback(self, *args, **kwargs)
    LOSS_CALLS.add("fused")
    return _fused_loss_forward(self, **named)


def _fused_loss_forward(self, *, labels, logits_to_keep=0, return_dict=None, **kwargs):
    # What transformers' can_return_tuple does around HF's forward.
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    # From here on, HF's forward with its last lines (lm_head, loss_function) fused.
    outputs = self.model(**kwargs)
    hidden = _keep(self, outputs.last_hidden_state, logits_to_keep)
    # ForCausalLMLoss: its keyword arguments come from the forward's **kwargs.
    ignore_index = kwargs.get("ignore_index", -100)
    num_items_in_batch = kwargs.get("num_items_in_batch")
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if target.shape[0] != rows.shape[0]:
        raise ValueError(f"labels: {target.shape[0]} labels after the shift for {rows.shape[0]} positions of "
                         f"hidden states (logits_to_keep={logits_to_keep!r}); they must be as many")
    reduction = "mean" if num_items_in_batch is None else "sum"
    head = self.get_output_embeddings()
    vocab = self.config.vocab_size
    mesh = _hf_local_vocab_shard_mesh(head, vocab)
    weight = None if mesh is None else _sharded_view(head.weight, vocab, mesh)
    loss = head_cross_entropy(rows, head, target, ignore_index=ignore_index, reduction=reduction,
                              kind=_head_kind(head, vocab), weight=weight)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    # The base model's cache (past_key_values, or cache since 5.24), hidden states and
    # attentions, under the names CausalLMOutputWithPast gives them in the same version.
    passed = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    out = _modeling_module(self).CausalLMOutputWithPast(loss=loss, logits=None, **passed)
    return out if return_dict else out.to_tuple()


def _keep(model, hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions HF's forward hands the lm_head: its module's ``slice_logits_to_keep``
    where it has one (5.25 has, with boolean masks too; 5.10 does not), else the
    slice older versions write inline."""
    slicer = getattr(_modeling_module(model), "slice_logits_to_keep", None)
    if slicer is not None:
        return slicer(hidden, logits_to_keep)
    indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, indices, :]


def _modeling_module(model):
    """The transformers module that defines the model's class (modeling_llama): the class
    itself, or its base when FSDP2's fully_shard has swapped in a subclass of its own
    (``FSDPLlamaForCausalLM``, defined in torch's FSDP module)."""
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        if hasattr(module, "CausalLMOutputWithPast"):
            return module
    raise TypeError(f"{type(model).__name__}: no transformers modeling module among its classes")
