"""What tests/test_hf_distributed.py runs in its process groups: Hugging Face's own
distributed engines around a patched Llama. Its own module, importing little at the top:
each spawned process imports it afresh.

* ``hf_tensor_parallel_worker``: ``from_pretrained(..., tp_plan="auto")`` (transformers'
  tensor parallelism, its Llama plan) of a tiny checkpoint, patched before loading
  (``llama_fast.patch_transformers()``) or after (``llama_fast.patch(model)``);
* ``accelerate_fsdp2_worker``: accelerate's ``Accelerator`` with a
  ``FullyShardedDataParallelPlugin(fsdp_version=2)`` preparing a patched tiny Llama and its
  optimiser, then training a few steps (accelerate picks FSDP only on accelerators; on
  CPUs the worker sets that state itself, see there).

As in tests/_dist_workers.py, every rank runs the "torch" backend (the PyTorch reference of
the llama_fast ops, through the custom ops and the patched modules) inside ``rank_session``
(a gloo group, tracebacks saved, ``os._exit`` after the group is destroyed).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from _dist_workers import LR, SEQ, VOCAB, adamw_steps, data, full, full_params, hf_config, rank_session  # noqa: F401 (SEQ, VOCAB: for the tests)

__all__ = ["accelerate_fsdp2_worker", "hf_tensor_parallel_worker", "save_tiny_checkpoint", "tp_reference",
           "train_hf_single"]


def save_tiny_checkpoint(folder: str, seed: int = 0) -> None:
    """A tiny LlamaForCausalLM (tests/_dist_workers.hf_config) with seeded weights, saved
    with ``save_pretrained``: what ``from_pretrained`` loads in every rank."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(hf_config()).save_pretrained(folder)


def _gathered(t):
    """A gradient as a list of every rank's piece: [the full tensor] for a DTensor (and in
    one process); each rank's local tensor for the plain local shards older transformers
    keep (the test joins them along the dimension they split)."""
    import torch.distributed as dist

    if hasattr(t, "full_tensor") or not dist.is_initialized():
        return [full(t)]
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, t.detach().contiguous())
    return pieces


def _tp_run(model, tokens):
    """Eval logits under no_grad (transformers' local-tensor inference path), then logits
    and parameter gradients of a training-mode forward with labels (its DTensor path)."""
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=tokens[:, :-1]).logits.detach().clone()
    model.train()
    out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
    out.loss.backward()
    grads = {n: _gathered(p.grad) for n, p in model.named_parameters()}
    train_logits = None if out.logits is None else out.logits.detach().clone()
    return eval_logits, train_logits, out.loss.detach().clone(), grads


def _training_step_collectives(model, tokens) -> dict:
    """The collectives one more training-mode forward and backward with labels runs (after
    ``_tp_run``, whose gradients are recorded already): {op name: count}, as torch's
    ``CommDebugMode`` counts them (DTensor's redistributions and direct c10d calls alike)."""
    from torch.distributed.tensor.debug import CommDebugMode

    model.train()
    with CommDebugMode() as comm:
        model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()
    return {str(op): n for op, n in comm.get_comm_counts().items()}


def _which_heads_fuse(model) -> dict:
    """Whether the patched forward fuses the loss of heads made as transformers makes its
    tensor-parallel lm_head, sharing the sharded lm_head's weight, under other styles or
    with one more hook: {case: fused}. Empty when the lm_head is whole."""
    import sys

    from llama_fast.hf_causal_lm import _head_kind

    vocab, weight = model.config.vocab_size, model.lm_head.weight

    def head():
        h = torch.nn.Linear(weight.shape[1], vocab, bias=False)
        h.weight = weight  # the same Parameter
        return h

    cases = {}
    if hasattr(weight, "device_mesh"):  # 5.25: styles install a forward on the instance
        styles = sys.modules["transformers.distributed.tensor_parallel"].ALL_PARALLEL_STYLES
        for name in ("colwise_gather_output", "colwise", "packed_colwise", "colwise_gather_output + a hook"):
            h = head()
            styles[name.removesuffix(" + a hook")].install_forward(h, weight.device_mesh)
            if name.endswith("hook"):
                h.register_forward_hook(lambda module, args, output: output)
            cases[name] = _head_kind(h, vocab) is not None
    elif weight.shape[0] < vocab:  # 5.10: styles register hooks
        colwise = sys.modules["transformers.integrations.tensor_parallel"].ColwiseParallel
        for name in ("gather_output", "no gather_output", "gather_output + a hook"):
            h = head()
            colwise(gather_output=not name.startswith("no")).prepare_module_tp(h, model._device_mesh)
            if name.endswith("hook"):
                h.register_forward_hook(lambda module, args, output: output)
            cases[name] = _head_kind(h, vocab) is not None
    return cases


def _generate(model, tokens):
    """Greedy decoding of 4 tokens after the first 8 of each row (a KV cache: prefill, then
    one query at a time)."""
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=tokens[:, :8], max_new_tokens=4, do_sample=False, min_new_tokens=4,
                              pad_token_id=0)


def tp_reference(folder: str):
    """The unsharded, unpatched model's ``_tp_run`` and ``_generate`` on the same batch: what
    the ranks must give."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return _tp_run(model, data(1, 2)[0]), _generate(model, data(1, 2)[0])


def hf_tensor_parallel_worker(rank: int, world: int, init_file: str, out: str, folder: str, when: str) -> None:
    """One rank of ``from_pretrained(folder, tp_plan="auto")``, patched ``when`` = "before"
    (``patch_transformers()`` first) or "after" (``patch(model)`` on the sharded model); or,
    ``when`` = "lm_head plan", patched first and loaded with an explicit ``tp_plan``: the
    model's base plan and ``"lm_head": "colwise_gather_output"`` (the auto plan's entry,
    which transformers 5.10 leaves out of its auto plan).
    Rank 0 saves ``_tp_run``'s and ``_generate``'s results, the attention and loss paths taken, llama_fast's
    warnings during ``_tp_run``, what the patch replaced, and the kinds of tensor the patched modules were given."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    with rank_session(rank, world, init_file, out):
        from transformers import AutoModelForCausalLM

        import llama_fast
        from llama_fast.attention_router import ATTENTION_CALLS
        from llama_fast.hf_causal_lm import LOSS_CALLS

        if when in ("before", "lm_head plan"):
            llama_fast.patch_transformers()
        plan = "auto"
        if when == "lm_head plan":
            plan = {f"model.{k}": v for k, v in hf_config().base_model_tp_plan.items()}
            plan["lm_head"] = "colwise_gather_output"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, tp_plan=plan)
        report = llama_fast.patch(model) if when == "after" else None

        # What HF's tensor parallelism hands the patched modules: record the tensor types
        # of the first block's norm and MLP inputs and the attention projections' outputs.
        seen = {}

        def record(name):
            def hook(module, args, output):
                seen.setdefault(name, (type(args[0]).__name__, tuple(args[0].shape),
                                       type(output).__name__, tuple(output.shape)))
            return hook

        block = model.model.layers[0]
        handles = [block.input_layernorm.register_forward_hook(record("input_layernorm")),
                   block.mlp.register_forward_hook(record("mlp")),
                   block.self_attn.q_proj.register_forward_hook(record("q_proj")),
                   block.self_attn.k_proj.register_forward_hook(record("k_proj"))]
        ATTENTION_CALLS.clear()
        LOSS_CALLS.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eval_logits, train_logits, loss, grads = _tp_run(model, data(1, 2)[0])
        ours = [str(w.message) for w in caught if str(w.message).startswith("llama_fast")]
        for h in handles:
            h.remove()
        attention, loss_calls = dict(ATTENTION_CALLS), dict(LOSS_CALLS)
        train_collectives = _training_step_collectives(model, data(1, 2)[0])
        ATTENTION_CALLS.clear()
        generated = _generate(model, data(1, 2)[0])
        decode_attention = dict(ATTENTION_CALLS)
        # Per parameter: its type, placements (DTensor) and this rank's local shape.
        params = {n: (type(p).__name__, [str(pl) for pl in getattr(p, "placements", ())],
                      tuple((p.to_local() if hasattr(p, "to_local") else p).shape))
                  for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"eval_logits": eval_logits, "train_logits": train_logits, "loss": loss, "grads": grads,
                        "attention": attention, "loss_calls": loss_calls, "warnings": ours,
                        "train_collectives": train_collectives, "heads_fused": _which_heads_fuse(model),
                        "generated": generated, "decode_attention": decode_attention,
                        "attn_implementation": model.config._attn_implementation, "seen": seen,
                        "params": params, "mlp_type": type(block.mlp).__name__,
                        "norm_type": type(block.input_layernorm).__name__,
                        "report": None if report is None else str(report)}, out)


# ---------------------------------------------------------------------------------------
# accelerate's FSDP2


def _hf_loss(model, tokens):
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def train_hf_single(steps: int, batch: int, patched: bool):
    """One process, no wrapper: (losses, {name: parameter}) after ``steps`` AdamW steps of
    the tiny Llama (seed 0) on ``data(steps, batch)``, the "torch" backend."""
    import llama_fast
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config())
    if patched:
        llama_fast.patch(model)
    with llama_fast.backend("torch"):
        losses = adamw_steps(model, data(steps, batch), lambda tokens: _hf_loss(model, tokens))
    return losses, full_params(model)


def accelerate_fsdp2_worker(rank: int, world: int, init_file: str, out: str, steps: int, batch: int) -> None:
    """One rank of accelerate's FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``,
    auto-wrapping transformers' decoder layers) around the patched tiny Llama, its AdamW
    prepared by the Accelerator, each rank on its contiguous share of the global batch.
    Rank 0 saves the mean losses, the full parameters, the wrapping accelerate did and the
    attention paths taken."""
    # What torchrun would set: accelerate reads the CPU ranks' layout from them (the gloo
    # group itself is rank_session's, which accelerate finds initialised and keeps).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    with rank_session(rank, world, init_file, out):
        import torch.distributed as dist
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from transformers import LlamaForCausalLM

        import llama_fast
        from llama_fast.attention_router import ATTENTION_CALLS

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                reshard_after_forward=True)
        accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
        # accelerate (1.16) turns FSDP on only for accelerator process groups (MULTI_GPU,
        # MULTI_XPU, ...): on CPUs it keeps MULTI_CPU and ignores the plugin, so prepare()
        # would wrap the model in DDP. Record that, then set the state FSDP would have
        # set, so that prepare() runs accelerate's own FSDP2 path (fsdp2_prepare_model:
        # its auto-wrap policy, fully_shard, the optimiser's parameters swapped for the
        # sharded ones) on the gloo group.
        chosen = str(accelerator.distributed_type)
        if accelerator.distributed_type != DistributedType.FSDP:
            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
        is_fsdp2 = accelerator.is_fsdp2
        torch.manual_seed(0)
        model = LlamaForCausalLM(hf_config())
        llama_fast.patch(model)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        model, opt = accelerator.prepare(model, opt)
        from torch.distributed.fsdp import FSDPModule

        sharded = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, FSDPModule)}
        share = batch // world
        losses = []
        ATTENTION_CALLS.clear()
        for tokens in data(steps, batch):
            loss = _hf_loss(model, tokens[rank * share:(rank + 1) * share])
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        params = full_params(model)
        if rank == 0:
            torch.save({"losses": losses, "params": params, "sharded": sharded,
                        "chosen": chosen, "is_fsdp2": is_fsdp2,
                        "attention": dict(ATTENTION_CALLS)}, out)
