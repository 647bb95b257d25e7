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

Everything else runs Hugging Face's forward unchanged: eval mode, no labels (so
``generate`` and evaluation see the same logits as before), and, with a warning once, a
loss function other than ``ForCausalLMLoss`` or an lm_head that is not a plain
``nn.Linear`` (a quantised or LoRA-wrapped head). An lm_head that is its own FSDP2 unit
(``fully_shard(model.lm_head)``) is fused too: the loss runs as an FSDP forward method of
the head, so FSDP gathers its weight first (``llama_fast.nn.fused_head_kind``). ``LOSS_CALLS`` counts which way each
call went.

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
    if fused_head_kind(head) is None:
        return (f"an lm_head that is not a plain nn.Linear ({type(head).__name__}, or hooks on it other than those of "
                "its own FSDP2 unit)")
    if head.out_features != model.config.vocab_size:
        return f"an lm_head of {head.out_features} outputs for config.vocab_size {model.config.vocab_size}"
    return None


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
    loss = head_cross_entropy(rows, self.get_output_embeddings(), target, ignore_index=ignore_index, reduction=reduction)
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
