"""The patched models inside PyTorch's own distributed engine: FSDP2 sharding, tensor and
sequence parallelism through DTensor, activation checkpointing and per-block compilation,
applied per decoder block as torchtitan does.

    model = Transformer(args)            # or under torch.device("meta"), see init_weights
    llama_fast.patch(model)
    checkpoint_blocks(model)             # optional: recompute each block in backward
    shard_model(model, mesh, param_dtype=torch.bfloat16)   # fully_shard per block + root
    model.to_empty(device=...); model.init_weights(seed=0) # when built on the meta device

    # 2-D: tensor + sequence parallel inside rows of a mesh, FSDP2 across them
    mesh = init_device_mesh("cuda", (dp, tp), mesh_dim_names=("dp", "tp"))
    tensor_parallel(model, mesh["tp"]); shard_model(model, mesh["dp"])

Works on ``llama_fast.model.Transformer`` (patched or not) and on Hugging Face's
``LlamaForCausalLM`` / ``LlamaModel`` (patched or not). llama_fast adds no parallelism of
its own: these are thin, checked calls of ``torch.distributed.fsdp.fully_shard``,
``torch.distributed.tensor.parallel`` and ``torch.utils.checkpoint``; the llama_fast ops run
on each rank's local tensors, or on DTensors by the sharding rules registered here
(``register_sharding_rules``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

import llama_fast.ops  # noqa: F401  (registers the custom ops the sharding rules name)

__all__ = ["checkpoint_blocks", "compile_blocks", "decoder_blocks", "register_sharding_rules", "shard_model",
           "tensor_parallel"]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a reference ``Transformer`` (``model.layers``) or of a Hugging
    Face Llama (``model.model.layers`` of a ``LlamaForCausalLM``, ``model.layers`` of a
    ``LlamaModel``). Raises TypeError for a model with neither."""
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise TypeError(f"model ({type(model).__name__}) must have its decoder blocks in a non-empty nn.ModuleList "
                    "at .layers (llama_fast.model.Transformer, transformers' LlamaModel) or .model.layers "
                    "(LlamaForCausalLM)")


def shard_model(model: nn.Module, mesh=None, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root (embeddings, final norm,
    output), over ``mesh`` (a 1-D DeviceMesh; None: all ranks of the default group).

    ``param_dtype`` (e.g. torch.bfloat16) turns on mixed precision: the blocks compute in
    it while the sharded parameters, which the optimiser steps, stay in their own dtype;
    gradients are reduced in ``reduce_dtype`` (float32 by default). Patch before sharding:
    the patch swaps modules, and fully_shard must see the ones that run. Returns the model.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype is not None and not (isinstance(param_dtype, torch.dtype) and param_dtype.is_floating_point):
        raise TypeError(f"param_dtype must be a floating torch.dtype or None, got {param_dtype!r}")
    reduce_dtype = reduce_dtype if param_dtype else None
    # The blocks do not cast their floating inputs: the hidden state already comes in
    # param_dtype (from the embedding), and the reference model's float32 rotary tables
    # must stay float32 (rounded to bfloat16, far positions would rotate by wrong angles).
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters would be gathered again at once for the backward:
        # keep them (torchtitan's choice).
        fully_shard(block, mesh=mesh, mp_policy=block_policy,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=reshard_after_forward)
    return model


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing per decoder block, non-reentrant: each block keeps only its
    inputs for the backward and reruns its forward (the llama_fast ops included) there.

    A Hugging Face model uses its own switch (``activation_checkpointing_enable``, named
    ``gradient_checkpointing_enable`` before transformers 5.25, with ``use_reentrant=False``). The reference model's blocks get an instance-level forward
    that runs the block's forward under ``torch.utils.checkpoint.checkpoint``: the
    parameter names, the state dict and FSDP's per-block hooks are unchanged (a wrapper
    module would prefix every name). Call it after ``patch`` (which leaves alone modules
    whose forward is overridden on the instance). Idempotent; returns the model.
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from torch.utils.checkpoint import checkpoint

    for block in decoder_blocks(model):
        if getattr(block.__dict__.get("forward"), "__llama_fast_checkpointed__", False):
            continue
        inner = type(block).forward

        @functools.wraps(inner)
        def forward(*args, _block=block, _inner=inner, **kwargs):
            return checkpoint(_inner, _block, *args, use_reentrant=False, **kwargs)

        forward.__llama_fast_checkpointed__ = True
        block.forward = forward
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each decoder block on its own (``nn.Module.compile``, in place, so
    names and FSDP's hooks stay), the torchtitan recipe: every block is the same graph, and
    FSDP's collectives stay outside it. Keyword arguments go to torch.compile."""
    for block in decoder_blocks(model):
        block.compile(**compile_kwargs)
    return model


# ---------------------------------------------------------------------------------------
# DTensor sharding rules of the llama_fast ops


def _ndim(spec) -> int:
    return len(spec.shape) if hasattr(spec, "shape") else spec.ndim


def register_sharding_rules() -> None:
    """Tell DTensor how each llama_fast custom op runs on sharded inputs, so that an op
    called with DTensors runs on the local shards (with no gather) when their placements
    allow, and DTensor redistributes to the nearest allowed placements otherwise:

    * rms_norm, add_rms_norm: sharded on any dimension but the normalised (last) one
      (sequence parallel: Shard(1)), the weight replicated; their backward gives the
      weight's gradient as a Partial sum over the shards;
    * rope: q and k sharded on heads (dim 2) or batch, cos/sin replicated;
    * flash_attn (log-sum-exp on its dim 1), flash_decode: sharded on heads or batch;
      flash_attn_varlen (packed (T, H, D)): sharded on heads;
    * swiglu: gate and up sharded alike on any dimension; swiglu_fused: any but the last
      (the gate and up halves must stay together);
    * every op: all replicated.

    Called by ``tensor_parallel``; idempotent.
    """
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding


    ops = torch.ops.llama_fast
    R, P = Replicate(), Partial()

    @register_sharding(ops.rms_norm.default)
    def _(x, weight, eps):
        return [([R], [R, R, None])] + [([Shard(d)], [Shard(d), R, None]) for d in range(_ndim(x) - 1)]

    @register_sharding(ops.add_rms_norm.default)
    def _(x, residual, weight, eps):
        return [([R, R], [R, R, R, None])] + [
            ([Shard(d), Shard(d)], [Shard(d), Shard(d), R, None]) for d in range(_ndim(x) - 1)]

    @register_sharding(ops.rms_norm_backward.default)
    def _(dy, dh, h, weight, eps):
        def dh_(p):
            return None if dh is None else p
        return [([R, R], [R, dh_(R), R, R, None])] + [
            ([Shard(d), P], [Shard(d), dh_(Shard(d)), Shard(d), R, None]) for d in range(_ndim(h) - 1)]

    @register_sharding(ops.rope.default)
    def _(q, k, cos, sin, interleaved, inverse):
        rules = [([R, R], [R, R, R, R, None, None]), ([Shard(2), Shard(2)], [Shard(2), Shard(2), R, R, None, None])]
        if _ndim(cos) == 3:  # per-row tables: batch shards them too
            rules.append(([Shard(0), Shard(0)], [Shard(0), Shard(0), Shard(0), Shard(0), None, None]))
        return rules

    @register_sharding(ops.flash_attn.default)
    def _(q, k, v, causal, scale):
        return [([R, R], [R, R, R, None, None]),
                ([Shard(2), Shard(1)], [Shard(2), Shard(2), Shard(2), None, None]),
                ([Shard(0), Shard(0)], [Shard(0), Shard(0), Shard(0), None, None])]

    @register_sharding(ops.flash_attn_backward.default)
    def _(dout, q, k, v, out, lse, causal, scale):
        return [([R, R, R], [R, R, R, R, R, R, None, None]),
                ([Shard(2)] * 3, [Shard(2)] * 5 + [Shard(1), None, None]),
                ([Shard(0)] * 3, [Shard(0)] * 6 + [None, None])]

    @register_sharding(ops.flash_attn_varlen.default)
    def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return [([R, R], [R, R, R, R, R, None, None, None, None]),
                ([Shard(1), Shard(0)], [Shard(1), Shard(1), Shard(1), R, R, None, None, None, None])]

    @register_sharding(ops.flash_attn_varlen_backward.default)
    def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        tail = [R, R, None, None, None, None]
        return [([R, R, R], [R] * 6 + tail), ([Shard(1)] * 3, [Shard(1)] * 5 + [Shard(0)] + tail)]

    @register_sharding(ops.flash_decode.default)
    def _(q, k_cache, v_cache, cache_seqlens, *rest):
        tail = [None] * len(rest)
        return [([R], [R, R, R, R] + tail), ([Shard(2)], [Shard(2), Shard(2), Shard(2), R] + tail),
                ([Shard(0)], [Shard(0)] * 4 + tail)]

    @register_sharding(ops.swiglu.default)
    def _(gate, up):
        return [([R], [R, R])] + [([Shard(d)], [Shard(d), Shard(d)]) for d in range(_ndim(gate))]

    @register_sharding(ops.swiglu_backward.default)
    def _(dy, gate, up):
        return [([R, R], [R, R, R])] + [([Shard(d)] * 2, [Shard(d)] * 3) for d in range(_ndim(gate))]

    @register_sharding(ops.swiglu_fused.default)
    def _(gate_up):
        return [([R], [R])] + [([Shard(d)], [Shard(d)]) for d in range(_ndim(gate_up) - 1)]

    @register_sharding(ops.swiglu_fused_backward.default)
    def _(dy, gate_up):
        return [([R], [R, R])] + [([Shard(d)], [Shard(d), Shard(d)]) for d in range(_ndim(gate_up) - 1)]

    _RULES_REGISTERED = True


_RULES_REGISTERED = False


# ---------------------------------------------------------------------------------------
# Tensor + sequence parallel


def tensor_parallel(model: nn.Module, mesh, *, sequence_parallel: bool = True, loss_parallel: bool = False) -> nn.Module:
    """Megatron-style tensor parallelism of a (patched or not) ``llama_fast.model.Transformer``
    over the 1-D ``mesh``, through ``torch.distributed.tensor.parallel`` (torchtitan's Llama
    plan):

    * ``wq``, ``wk``, ``wv``, ``w1``, ``w3``: column-parallel (each rank computes its heads
      and its part of the SwiGLU hidden size, on local tensors); ``wo``, ``w2``: row-parallel;
      the attention modules' ``n_heads`` and ``n_kv_heads`` become the local counts;
    * ``tok_embeddings``: row-parallel (vocabulary-sharded), ``output``: column-parallel
      (its weight vocabulary-sharded, Shard(0)). The patched model's loss,
      ``forward(tokens, targets=...)``, is then vocabulary-parallel: the fused cross-entropy
      takes the sharded weight and never gathers it or the logits (each rank all-reduces
      per-token statistics of its vocabulary shard). The logits of ``forward(tokens)`` are
      gathered (replicated) on every rank, or, with ``loss_parallel``, left sharded on the
      vocabulary (a DTensor sharded on its last dimension) for a loss computed under
      ``torch.distributed.tensor.parallel.loss_parallel()``, as torchtitan does;
    * tied embeddings (``tie_embeddings``): both modules shard the one weight on the
      vocabulary, Shard(0), so they keep sharing it (one Parameter, re-tied after the plan
      distributes it; its gradient sums both uses);
    * ``sequence_parallel``: the residual stream between the projections is a DTensor
      sharded on the sequence (Shard(1)), so the norms (``attention_norm``, ``ffn_norm`` and
      the patched block's fused ``add_rms_norm``, ``norm``) run on 1/K of the tokens with
      replicated weights (``register_sharding_rules``); otherwise it is replicated.

    Needs n_heads, n_kv_heads and the SwiGLU hidden size to be multiples of the mesh size,
    and, with sequence_parallel, a sequence length that is too (else Shard(1) is uneven).
    Patch before: the plan names the modules that run. Not undone by ``unpatch``.
    Returns the model.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    register_sharding_rules()
    if mesh is None or mesh.ndim != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh (the tensor-parallel ranks), got {mesh!r}")
    args = getattr(model, "args", None)
    if args is None or not hasattr(model, "tok_embeddings"):
        raise TypeError(f"model must be a llama_fast.model.Transformer (patched or not), got {type(model).__name__}")
    k = mesh.size()
    for name, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("ffn_dim", args.ffn_dim)):
        if value % k:
            raise ValueError(f"{name} ({value}) must be a multiple of the tensor-parallel size ({k})")
    logits = Shard(-1) if loss_parallel else Replicate()
    if sequence_parallel:
        # The residual stream is a DTensor sharded on the sequence between the projections.
        parallelize_module(model, mesh, {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                              use_local_output=False),
            "norm": SequenceParallel(use_local_output=False),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=logits, use_local_output=not loss_parallel),
        })
    else:
        # The residual stream is a plain tensor, the same on every rank; so are the norms.
        parallelize_module(model, mesh, {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=logits, use_local_output=not loss_parallel),
        })
    if args.tie_embeddings:
        # The plan gave each module its own distributed copy; the output takes the
        # embedding's (the same Shard(0) layout), so the weights stay one Parameter.
        model.output.weight = model.tok_embeddings.weight
    for block in decoder_blocks(model):
        plan = {name: ColwiseParallel() for name in
                ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")}
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(use_local_output=False),
                "ffn_norm": SequenceParallel(use_local_output=False),
                # The attention's inputs are (x, cos, sin, input_pos, mask); only x is sharded,
                # and gathered here: the heads' projections need every token.
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None, None),
                                                use_local_output=True),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            })
        else:
            plan.update({"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()})
        parallelize_module(block, mesh, plan)
        attn = block.attention
        attn.n_heads //= k
        attn.n_kv_heads //= k
    return model
