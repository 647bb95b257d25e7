"""The fused linear cross-entropy with a vocabulary-sharded weight (tensor parallel).

``fused_linear_cross_entropy`` comes here when ``weight`` is a DTensor sharded on the
vocabulary, placements ``(Shard(0),)`` on a 1-D mesh: what ``llama_fast.parallel.
tensor_parallel`` makes of the output head (column-parallel, as torchtitan's loss
parallelism). Each rank holds V/K rows of the weight and never sees the others' rows nor
the (tokens x V) logits:

* every rank takes every token's hidden state (a sequence-sharded DTensor is gathered, as
  the column-parallel head gathers its input) and, chunk by chunk, computes its shard's
  logits, their per-token max, all-reduced with MAX; then the sum of exp(z - max), the
  target's logit (0 on the ranks whose shard does not hold the target) and, with label
  smoothing, the sum of the logits, stacked into one all-reduce with SUM. That is the
  numerically stable log-sum-exp over the whole vocabulary; the loss follows from it on
  every rank alike;
* still within the chunk, each rank turns its shard of the logits into their gradient,
  ``softmax - eps / V - (1 - eps) * onehot(target)``, and accumulates its shard's weight
  (and bias) gradient and its partial gradient of the hidden states: the sum over the
  vocabulary shards of ``d logits_shard @ W_shard``. That partial sum is handed back to
  DTensor as ``Partial`` (``to_local(grad_placements=[Partial()])``), so the hidden states'
  gradient is all-reduced, or reduce-scattered for a sequence-sharded input, by DTensor's
  own redistribution; the weight's gradient is its local shard, Shard(0), with no
  collective.

Per chunk of C tokens that is two all-reduces, of C and 3 x C float32 values; nothing of
size V or V x H moves between ranks.

Why an explicit path and not a DTensor sharding strategy (``register_sharding`` like the
other ops, llama_fast.parallel): a strategy maps input placements to output placements and
then runs the same local op on every rank's shards. The loss is not a placement of local
results: the log-sum-exp needs the max and the sum over every shard *in the middle* of
each chunk (before any gradient can be formed), and the target's logit needs to know which
vocabulary rows the local shard holds (its offset), which the local op is never told. Split
into several ops (a Partial("max") op, then a sum op) it would compute each chunk's logits
twice and still lack the offset. So the op takes the DTensors, runs its chunks on the local
tensors and calls the mesh's process group itself.

The chunked loop is the backend's op "linear_cross_entropy_vocab_shard"
(``reference.linear_cross_entropy_vocab_shard``, dispatched as every op): per chunk a
statistics step reads the shard's logits once (local max, sum of exp relative to it, the
target's logit, the sum of the logits), the ranks combine the statistics (MAX, then the
sums rescaled to the global max, SUM), and a gradient step turns the logits into their
gradient in place given the global log-sum-exp. On the triton backend both steps are
Triton kernels (kernels/cross_entropy.py); on the torch backend, PyTorch.

torch.compile: the op is one clean graph break (``torch.compiler.disable``): a compiled
step compiles the code around it and runs the loss eagerly (collectives in an
autograd.Function, the targets checked on the host), so ``fullgraph=True`` refuses it.
Tracing it with functional collectives inside a custom op is not done.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from llama_fast.backends import run
from llama_fast.op_names import describe
from llama_fast.reference import F32

from ._checks import check_class_indices

OP = "linear_cross_entropy_vocab_shard"
describe(OP, "fused_linear_cross_entropy", "vocabulary-parallel")


def dtensor_class():
    """DTensor's class once ``torch.distributed.tensor`` has been imported, else None (no
    tensor can be a DTensor before): the single-device path pays no import for the check."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def is_vocab_sharded(weight) -> bool:
    """A DTensor weight (V, H) sharded on the vocabulary over a 1-D mesh: this path's input."""
    if not is_dtensor(weight):
        return False
    from torch.distributed.tensor import Shard

    return weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)


def _shard_offset(vocab: int, local_rows: int, mesh) -> int:
    """The first vocabulary row of this rank's shard: DTensor's Shard(0) splits as
    ``torch.chunk`` does, ceil(V / K) rows per rank, the last ones shorter or empty."""
    k, rank = mesh.size(), mesh.get_local_rank()
    per = -(-vocab // k)
    offset = min(vocab, rank * per)
    if local_rows != min(vocab, offset + per) - offset:
        expected = min(vocab, offset + per) - offset
        raise ValueError(f"weight: rank {rank}'s shard has {local_rows} rows, not the {expected} "
                         f"of an even Shard(0) split of {vocab} rows over {k} ranks")
    return offset


def vocab_parallel_cross_entropy(*args) -> Tensor:
    """``eager_vocab_parallel_cross_entropy`` outside torch.compile's tracing: one clean
    graph break. The loss runs eagerly inside a compiled step (the code before and after it
    compiled, its gradients flowing back into the compiled graph): its chunks issue c10d
    all-reduces from inside an autograd.Function and check the targets on the host, which
    dynamo would otherwise split into many graph breaks. The wrapper is made on first use:
    ``torch.compiler.disable`` imports dynamo, which imports triton, and ``import llama_fast``
    must not (TRITON_INTERPRET stays settable after it)."""
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(eager_vocab_parallel_cross_entropy, reason=EAGER_REASON))
    return _EAGER[0](*args)


EAGER_REASON = "the vocabulary-parallel cross-entropy runs eagerly (process-group collectives per chunk)"
_EAGER: list = []


def eager_vocab_parallel_cross_entropy(hidden, weight, target, bias, ignore_index: int, reduction: str,
                                 label_smoothing: float, chunk_size: int, grad_accumulation: str) -> Tensor:
    """The loss of ``fused_linear_cross_entropy`` for a vocabulary-sharded ``weight``
    (``is_vocab_sharded``); the arguments are already checked against the global shapes.
    ``hidden`` and ``target``: DTensors on the weight's mesh (any placements) or plain
    tensors holding the same values on every rank. ``bias``: None or sharded as the weight.
    Returns a plain tensor, the same on every rank: the scalar loss, or the per-token losses
    of every token in ``target``'s shape."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = weight.device_mesh
    if bias is not None and not (is_dtensor(bias) and bias.device_mesh == mesh
                                 and tuple(bias.placements) == (Shard(0),)):
        raise ValueError("bias must be sharded as the weight is (a DTensor, Shard(0) on the weight's mesh) when the "
                         f"weight is vocabulary-sharded, got {getattr(bias, 'placements', 'a plain tensor')}")
    for name, t in (("hidden", hidden), ("target", target)):
        if is_dtensor(t) and t.device_mesh != mesh:
            raise ValueError(f"{name} must be a DTensor on the weight's mesh or a plain tensor, got a DTensor on "
                             f"{t.device_mesh}")
    if not is_dtensor(hidden):
        hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
    # Every token on every rank; the gradient comes back as a partial sum over the shards.
    rows = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    full_target = target.full_tensor() if is_dtensor(target) else target
    check_class_indices(full_target, weight.shape[0], ignore_index)
    w_local = weight.to_local()
    b_local = bias.to_local() if bias is not None else None
    offset = _shard_offset(weight.shape[0], w_local.shape[0], mesh)
    loss = _VocabParallelCrossEntropy.apply(
        rows.reshape(-1, rows.shape[-1]), w_local, full_target.reshape(-1), b_local,
        (offset, weight.shape[0], mesh.get_group(), ignore_index, label_smoothing, reduction, chunk_size,
         grad_accumulation), torch.is_grad_enabled())
    return loss.view(full_target.shape) if reduction == "none" else loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """As the single-device op: for "mean"/"sum" the forward computes the gradients while
    each chunk's logits are at hand and the backward scales them in place (one backward
    per graph); for "none" the backward runs the chunks again with per-token scales."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, config, grad_enabled):
        reduction = config[5]
        # (grad mode is off inside forward: the caller's is passed in, so no_grad computes no gradient)
        want = tuple(grad_enabled and w for w in
                     (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]))
        ctx.config, ctx.want, ctx.has_bias = config, want, bias is not None
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, target, bias)
            loss, *_ = shard_pass(hidden, weight, target, bias, config, (False, False, False), None)
            return loss.to(hidden.dtype)
        loss, gh, gw, gb = shard_pass(hidden, weight, target, bias, config, want, None)
        ctx.grads = (gh, gw, gb)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.config[5] == "none":
            hidden, weight, target, bias = ctx.saved_tensors
            _, gh, gw, gb = shard_pass(hidden, weight, target, bias, ctx.config, ctx.want, grad_loss.to(F32))
        else:
            # Scaled in place (a copy would add a weight's worth of memory at the peak).
            gh, gw, gb = (g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
            ctx.grads = None
        gh, gw, gb = (g if w else None for g, w in zip((gh, gw, gb), ctx.want))
        return gh, gw, None, gb if ctx.has_bias else None, None, None


def shard_pass(hidden, weight, target, bias, config, grads, row_scale):
    """One chunked pass over this rank's vocabulary shard (the collectives included), on the
    backend the dispatcher picks: ``(loss, grad_hidden (partial), grad_weight_shard,
    grad_bias_shard)`` as ``reference.linear_cross_entropy_vocab_shard`` returns them."""
    offset, vocab, group, ignore_index, label_smoothing, reduction, chunk_size, grad_accumulation = config
    return run(OP, hidden.device, hidden, weight, target, bias, offset, vocab, group, ignore_index, label_smoothing,
               reduction, chunk_size, grads, row_scale, grad_accumulation)
