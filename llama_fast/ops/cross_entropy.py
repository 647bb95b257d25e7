"""Fused linear cross-entropy: custom ops, fake impls, autograd, validation.

The forward computes the gradients too, chunk by chunk, while each chunk's logits are at
hand (see ``llama_fast.reference.linear_cross_entropy``): for "mean" and "sum" the upstream
gradient is one scalar, so the backward only multiplies the saved gradients by it, in
place (so the graph can be backwarded once: ``retain_graph=True`` and a second backward
raise). For
"none" every token has its own upstream gradient, unknown during the forward: the forward
computes the losses only and the backward runs the chunked pass again, scaling each
token's row of d loss / d logits by its upstream gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llama_fast.backends import run
from llama_fast.op_names import describe
from llama_fast.reference import GRAD_ACCUMULATIONS

from ._autograd import register_autograd
from ._checks import check_class_indices, check_same, check_tensor
from ._cross_entropy_vocab_parallel import is_dtensor, is_vocab_sharded, vocab_parallel_cross_entropy

__all__ = ["fused_linear_cross_entropy"]  # the public ops of this file (llama_fast.ops re-exports them)

describe("linear_cross_entropy", "fused_linear_cross_entropy")  # the gradients come from the forward

REDUCTIONS = ("mean", "sum", "none")
OP = "linear_cross_entropy"


@torch.library.custom_op("llama_fast::linear_cross_entropy", mutates_args=())
def _linear_ce(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
    label_smoothing: float, reduction: str, chunk_size: int, grads: list[bool], grad_accumulation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_class_indices(target, weight.shape[0], ignore_index)
    loss, gh, gw, gb = run(OP, hidden.device, hidden, weight, target, bias, ignore_index, label_smoothing, reduction,
                           chunk_size, tuple(grads), None, grad_accumulation)
    return loss.to(hidden.dtype), gh, gw, gb


@torch.library.custom_op("llama_fast::linear_cross_entropy_backward", mutates_args=())
def _linear_ce_backward(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
    label_smoothing: float, chunk_size: int, grads: list[bool], grad_accumulation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _, gh, gw, gb = run(OP, hidden.device, hidden, weight, target, bias, ignore_index, label_smoothing, "none",
                        chunk_size, tuple(grads), grad_loss.to(torch.float32), grad_accumulation)
    return gh, gw, gb


def _grad_shapes(hidden, weight, bias, grads):
    """Empty gradients shaped as the implementations return them ((0,) when not asked for)."""
    want_h, want_w, want_b = grads
    return (hidden.new_empty(hidden.shape if want_h else (0,)),
            weight.new_empty(weight.shape if want_w else (0,)),
            bias.new_empty(bias.shape) if want_b and bias is not None else hidden.new_empty(0))


@_linear_ce.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, grads, grad_accumulation):
    loss = hidden.new_empty(target.shape if reduction == "none" else ())
    return (loss, *_grad_shapes(hidden, weight, bias, grads))


@_linear_ce_backward.register_fake
def _(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, chunk_size, grads, grad_accumulation):
    return _grad_shapes(hidden, weight, bias, grads)


def _setup(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, grads, grad_accumulation = inputs
    ctx.reduction = reduction
    ctx.args = (ignore_index, label_smoothing, chunk_size, grad_accumulation)
    ctx.has_bias = bias is not None
    if reduction == "none":  # the backward recomputes: it needs the inputs
        ctx.save_for_backward(hidden, weight, target, bias)
    else:  # the gradients are ready: the backward scales them
        ctx.grads = tuple(grads)
        ctx.save_for_backward(*output[1:])


def _grad(ctx, grad_loss, *_unused):
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3])
        if not any(want):
            return (None,) * 10
        ignore_index, label_smoothing, chunk_size, grad_accumulation = ctx.args
        gh, gw, gb = _linear_ce_backward(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing,
                                         chunk_size, list(want), grad_accumulation)
    else:
        gh, gw, gb = ctx.saved_tensors
        want = ctx.grads
        # The saved gradients are for an upstream gradient of 1 (the usual case: no rounding).
        # Scaled in place: a copy would add a weight's worth of memory at the peak. A second
        # backward through the same graph (retain_graph=True) therefore raises autograd's
        # "modified by an inplace operation" error instead of returning scaled-twice values.
        gh, gw, gb = (g.mul_(grad_loss.to(g.dtype)) for g in (gh, gw, gb))
    gh, gw, gb = (g if w else None for g, w in zip((gh, gw, gb), want))
    return gh, gw, None, gb if ctx.has_bias else None, None, None, None, None, None, None


register_autograd(_linear_ce, _grad, _setup)


def _check_args(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_size,
                grad_accumulation) -> None:
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, dims=(2,))
    if hidden.dim() == 0:
        raise ValueError("hidden must have at least 1 dimension (..., H), got a scalar")
    h = hidden.shape[-1]
    if weight.shape[1] != h:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {h}, got shape {tuple(weight.shape)}")
    if h == 0 or weight.shape[0] == 0:
        raise ValueError(f"hidden size and vocabulary must be at least 1, got H={h}, V={weight.shape[0]}")
    check_same("dtype", ("hidden", "weight"), (hidden.dtype, weight.dtype))
    check_same("device", ("hidden", "weight"), (hidden.device, weight.device))
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (class indices), got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target must have hidden's shape without its last dimension, {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    check_same("device", ("hidden", "target"), (hidden.device, target.device))
    if bias is not None:
        check_tensor("bias", bias, dims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have V = weight.shape[0] = {weight.shape[0]} elements, got {bias.shape[0]}")
        check_same("dtype", ("hidden", "bias"), (hidden.dtype, bias.dtype))
        check_same("device", ("hidden", "bias"), (hidden.device, bias.device))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and not isinstance(label_smoothing, bool)
            and math.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if grad_accumulation not in GRAD_ACCUMULATIONS:
        raise ValueError(f"grad_accumulation must be one of {GRAD_ACCUMULATIONS}, got {grad_accumulation!r}")


def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, chunk_size: Optional[int] = None,
    grad_accumulation: str = "auto",
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(), ...)``
    without the (tokens x V) logits.

    ``hidden`` (..., H); ``weight`` (V, H) as ``nn.Linear`` stores it (an lm_head, or the
    embedding it is tied to); ``bias`` (V,); ``target`` int64 of hidden's shape without H.
    Same semantics as PyTorch: "mean" averages over the tokens whose target is not
    ``ignore_index`` (NaN when there are none), "sum" adds, "none" returns the per-token
    losses in ``target``'s shape (0 for ignored tokens); ``label_smoothing`` as
    ``F.cross_entropy`` defines it. The loss has hidden's dtype; logits come out of the
    matmul with float32 accumulation, the softmax and loss are float32, and the gradients of
    hidden, weight and bias have their own dtypes.

    Memory. The N tokens are processed C = ``chunk_size`` at a time, by default
    ``C = min(N, max(1024, next_pow2(ceil(N * H / V))))`` (``reference.linear_ce_chunk_rows``:
    a chunk of logits about the size of hidden, but at least 1024 rows so the matmuls stay
    efficient). Beyond the inputs and the gradients it returns, the op holds

    * ``C * V * e`` bytes: one chunk of logits, overwritten by its gradient (e = 2 for
      bf16/fp16, 4 for float32); the torch backend adds ``C * V * 4`` for 16-bit inputs
      (its float32 softmax);
    * for a 16-bit weight and more than ``WEIGHT_DTYPE_MAX_CHUNKS`` = 8 chunks (N > 8 C)
      with ``grad_accumulation="auto"`` (the default), or N > C with ``"float32"``: the
      float32 sum of the weight gradient, ``V * H * 4`` bytes, rounded to the weight's dtype
      once at the end (on the CPU also a ``V * H * 4`` temporary per chunk: no
      float32-output matmul there). Up to 8 chunks with "auto", or with
      ``grad_accumulation="weight_dtype"``, the weight gradient is summed in the gradient
      it returns, in the weight's dtype: each chunk's product is computed in float32 and
      added with one rounding, so the error grows with the chunk count (measured against
      float64 in bf16, relative to the float32 sum's: 1.37x at 4 chunks, 1.75x at 8, 2.33x
      at 16, 4.4x at 64; ``llama_fast.reference.weight_grad_accumulator``);
    * for a 16-bit bias and N > C: its float32 sum, ``V * 4`` bytes.

    The unfused code holds ``N * V`` logits, their float32 copy, log-softmax and gradient.

    With gradients enabled the forward computes them as it goes and the backward scales
    them by the upstream gradient, in place: a graph through this op can be backwarded
    once (``retain_graph=True`` and a second backward raise). For "none" the backward
    recomputes the chunks instead, each token's gradient scaled by its upstream gradient.
    A target outside [0, V) (other than ``ignore_index``) raises on the CPU and gives a NaN
    loss on a GPU (a check there would stall the stream).

    Tensor parallel: a ``weight`` that is a DTensor sharded on the vocabulary (placements
    ``(Shard(0),)`` on a 1-D mesh, as ``llama_fast.parallel.tensor_parallel`` shards the
    output head) computes the loss with no gather of the weight or of the logits: each rank
    works on its vocabulary shard and the ranks all-reduce per-token statistics
    (``llama_fast.ops._cross_entropy_vocab_parallel``). ``hidden``, ``target`` may then be
    DTensors on the same mesh (a sequence-sharded hidden is gathered) or plain tensors
    equal on every rank, ``bias`` sharded as the weight; the loss is a plain tensor, equal
    on every rank; the weight's gradient is its shard, the hidden's a DTensor partial sum
    reduced by DTensor. Under torch.compile that path is a graph break (it runs eagerly).
    """
    _check_args(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, chunk_size, grad_accumulation)
    if is_dtensor(weight):
        if not is_vocab_sharded(weight):
            raise ValueError("weight: a DTensor weight must be sharded on the vocabulary, placements (Shard(0),) on a "
                             f"1-D mesh (tensor parallel), got {tuple(weight.placements)} on a "
                             f"{weight.device_mesh.ndim}-D mesh")
        return vocab_parallel_cross_entropy(hidden, weight, target, bias, int(ignore_index), reduction,
                                            float(label_smoothing), int(chunk_size or 0), grad_accumulation)
    for name, t in (("hidden", hidden), ("target", target), ("bias", bias)):
        if is_dtensor(t):
            raise ValueError(f"{name} is a DTensor but weight is not: with tensor parallelism the weight is the "
                             "vocabulary-sharded DTensor (Shard(0)); otherwise pass local tensors")
    h = hidden.shape[-1]
    rows = hidden.reshape(-1, h)
    grad_on = torch.is_grad_enabled() and reduction != "none"
    grads = [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad]
    loss, *_ = _linear_ce(rows, weight, target.reshape(-1), bias, int(ignore_index), float(label_smoothing),
                          reduction, int(chunk_size or 0), grads, grad_accumulation)
    return loss.view(target.shape) if reduction == "none" else loss
