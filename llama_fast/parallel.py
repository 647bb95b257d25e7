"""The patched models inside PyTorch's own distributed engine: FSDP2 sharding, activation
checkpointing and per-block compilation, applied per decoder block as torchtitan does.

    model = Transformer(args)            # or under torch.device("meta"), see init_weights
    llama_fast.patch(model)
    checkpoint_blocks(model)             # optional: recompute each block in backward
    shard_model(model, mesh, param_dtype=torch.bfloat16)   # fully_shard per block + root
    model.to_empty(device=...); model.init_weights(seed=0) # when built on the meta device

Works on ``llama_fast.model.Transformer`` (patched or not) and on Hugging Face's
``LlamaForCausalLM`` / ``LlamaModel`` (patched or not). llama_fast adds no parallelism of
its own: these are thin, checked calls of ``torch.distributed.fsdp.fully_shard`` and
``torch.utils.checkpoint``; the llama_fast ops run on each rank's local tensors.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["checkpoint_blocks", "compile_blocks", "decoder_blocks", "shard_model"]


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
