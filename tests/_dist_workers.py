"""What tests/test_distributed.py runs in its process groups, and the single-process runs it
compares them with. Its own module, importing little at the top: each spawned process
imports it afresh.

Everything here uses the "torch" backend (LLAMA_FAST_BACKEND=torch in the workers,
``llama_fast.backend("torch")`` in the single-process runs): the PyTorch reference of the
llama_fast ops, still called through the custom ops and the patched modules. The Triton
kernels would run on the CPU only under the Triton interpreter, far too slowly for a
training loop in several processes; the one exception is ``vocab_parallel_op_worker``,
which also runs its tiny cases on the triton backend under the interpreter.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEQ = 16
VOCAB = 256
LR = 3e-3  # AdamW's learning rate: the size of one step's update of a weight


def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)


def build(kind: str, *, meta: bool = False, patched: bool = True, seed: int = 0):
    """The model of ``kind`` ("ref", or "ref+loss" trained through its loss entry point:
    llama_fast.model.Transformer tiny; "hf": transformers' LlamaForCausalLM, tiny), with the weights ``seed`` gives, patched or not. ``meta``: built
    on the meta device and left there (the caller shards, to_empty's and init_weights)."""
    import llama_fast
    from llama_fast.model import ModelArgs, Transformer

    if kind in ("ref", "ref+loss"):
        if meta:
            with torch.device("meta"):
                model = Transformer(ModelArgs.from_name("tiny"))
        else:
            model = Transformer(ModelArgs.from_name("tiny"))
            model.init_weights(seed=seed)
    elif kind == "hf":
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config())
    else:
        raise ValueError(f"kind must be 'ref', 'ref+loss' or 'hf', got {kind!r}")
    if patched:
        llama_fast.patch(model)
    return model


def loss_of(kind: str, model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, SEQ + 1) token batch ("ref+loss": the model's
    own loss entry point, the fused cross-entropy once patched, on the gathered lm_head)."""
    if kind == "ref+loss":
        return model(batch[:, :-1], targets=batch[:, 1:])
    if kind == "hf":
        logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def data(steps: int, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, batch, SEQ + 1), generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor: a DTensor gathered, a plain tensor as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_params(model) -> dict:
    return {n: full(p) for n, p in model.named_parameters()}


def full_grads(model) -> dict:
    return {n: full(p.grad) for n, p in model.named_parameters()}


def adamw_steps(model, batches, loss_fn, *, world: int = 1, backward=torch.Tensor.backward) -> list[float]:
    """AdamW (LR, weight decay 0.1) over ``batches``: per step ``loss_fn(tokens)``, its
    ``backward``, a step. Returns the losses; with ``world`` > 1, each step's mean over the
    ranks (every rank's loss is the mean over its share of the batch)."""
    import torch.distributed as dist

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for tokens in batches:
        loss = loss_fn(tokens)
        backward(loss)
        opt.step()
        opt.zero_grad()
        if world > 1:
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        else:
            losses.append(loss.item())
    return losses


def train_single(kind: str, steps: int, batch: int, *, checkpointing: bool = False, patched: bool = True,
                 mixed_shares: int = 0):
    """The single-process run: (losses, {name: parameter}) after ``steps`` AdamW steps.

    ``mixed_shares`` n > 0 reproduces FSDP2's mixed precision (bfloat16 compute, float32
    parameters and gradient reduction) on n ranks: each step, a bfloat16 copy of the float32
    parameters runs forward and backward on each of the n shares of the batch in turn, and
    the mean of the n bfloat16 gradients, taken in float32, is the float32 parameters'."""
    import llama_fast

    with llama_fast.backend("torch"):
        return _train_single(kind, steps, batch, checkpointing, patched, mixed_shares)


def _train_single(kind, steps, batch, checkpointing, patched, mixed_shares):
    import copy

    from llama_fast import parallel

    model = build(kind, patched=patched)
    if checkpointing:
        parallel.checkpoint_blocks(model)
    low = None
    if mixed_shares:
        # Parameters only, as FSDP2 casts: buffers (HF's inv_freq) keep their dtype.
        low = copy.deepcopy(model)
        for p in low.parameters():
            p.data = p.data.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for tokens in data(steps, batch):
        if low is None:
            loss = loss_of(kind, model, tokens)
            loss.backward()
            losses.append(loss.item())
        else:
            with torch.no_grad():
                for lp, p in zip(low.parameters(), model.parameters()):
                    lp.copy_(p)
            share, total = batch // mixed_shares, 0.0
            for r in range(mixed_shares):
                loss = loss_of(kind, low, tokens[r * share:(r + 1) * share])
                loss.backward()
                total += loss.item()
                for lp, p in zip(low.parameters(), model.parameters()):
                    g = lp.grad.float() / mixed_shares
                    p.grad = g if p.grad is None else p.grad + g
                    lp.grad = None
            losses.append(total / mixed_shares)
        opt.step()
        opt.zero_grad()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@contextlib.contextmanager
def rank_session(rank: int, world: int, init_file: str, out: str):
    """One rank's gloo process group around the body, the torch backend in force; a failing
    rank saves its traceback to ``out.err<rank>``. The ranks leave together: a rank tearing
    gloo down while another still talks to it aborts."""
    import torch.distributed as dist

    os.environ["LLAMA_FAST_BACKEND"] = "torch"
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        yield
        dist.barrier()
    except BaseException:
        Path(out + f".err{rank}").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where gloo's threads sometimes meet a
    # C++ destructor at exit ("terminate called without an active exception", SIGABRT)
    # after the work and its results are complete.
    os._exit(0)


def data_parallel_worker(rank: int, world: int, init_file: str, out: str, kind: str, steps: int, batch: int,
                         wrap: str, mixed: bool, meta: bool, checkpointing: bool) -> None:
    """One rank of a data-parallel run (``wrap`` "fsdp": llama_fast.parallel.shard_model,
    FSDP2; "ddp": DistributedDataParallel; "fsdp+tp": tensor_parallel inside pairs of ranks
    and FSDP2 across the pairs, a (world/2) x 2 mesh) over the global batch of ``train_single``, each
    rank taking its contiguous share of every step's batch. Rank 0 saves the mean losses and
    the full parameters to ``out``; a failing rank saves its traceback to ``out.err<rank>``."""
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh

        from llama_fast import parallel

        mesh = init_device_mesh("cpu", (world,))
        dp_rank, dp_size = rank, world
        graphs = []
        model = build(kind, meta=meta)
        if checkpointing:
            parallel.checkpoint_blocks(model)
        if wrap == "fsdp+tp":
            # 2-D: tensor (and sequence) parallel inside pairs of ranks, FSDP2 across them.
            mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
            dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
            parallel.tensor_parallel(model, mesh["tp"])
            parallel.shard_model(model, mesh["dp"], param_dtype=torch.bfloat16 if mixed else None)
        elif wrap in ("fsdp", "fsdp+compile"):
            if wrap == "fsdp+compile":
                # fullgraph: a graph break inside a block raises. aot_eager: the graphs
                # dynamo and AOTAutograd make, run without inductor's C++ build; the
                # graphs' llama_fast ops are recorded for the test.
                from torch._dynamo.backends.debugging import aot_eager

                def recording(gm, example_inputs):
                    graphs.append(sorted({str(n.target) for n in gm.graph.nodes
                                          if n.op == "call_function" and "llama_fast" in str(n.target)}))
                    return aot_eager(gm, example_inputs)

                parallel.compile_blocks(model, backend=recording, fullgraph=True)
            parallel.shard_model(model, mesh, param_dtype=torch.bfloat16 if mixed else None)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        if meta:
            model.to_empty(device="cpu")
            model.init_weights(seed=0)
        share = batch // dp_size
        losses = adamw_steps(model, data(steps, batch),
                             lambda tokens: loss_of(kind, model, tokens[dp_rank * share:(dp_rank + 1) * share]),
                             world=world)
        if wrap == "ddp":
            model = model.module
        params = full_params(model)
        if rank == 0:
            torch.save({"losses": losses, "params": params, "graphs": graphs}, out)


def tensor_parallel_worker(rank: int, world: int, init_file: str, out: str, sequence_parallel: bool) -> None:
    """One rank of llama_fast.parallel.tensor_parallel on the patched reference model: rank 0
    saves the logits, the full gradients of one backward, the collectives the forward ran
    (CommDebugMode), and what the custom ops return on DTensors sharded by the rules."""
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.debug import CommDebugMode

        import llama_fast
        from llama_fast import parallel

        mesh = init_device_mesh("cpu", (world,))
        model = build("ref")
        parallel.tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
        tokens = data(1, 2)[0]
        with CommDebugMode() as comm:
            logits = model(tokens[:, :-1])
        counts = {str(op): n for op, n in comm.get_comm_counts().items()}
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads = full_grads(model)

        # The ops on DTensors with the placements the rules allow: the outputs' placements,
        # and no collective.
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 8, h, 16, generator=g) for h in (4, 2, 2))
        cos, sin = llama_fast.rope_cos_sin(torch.arange(8), 16)
        gate, up = torch.randn(2, 8, 12, generator=g), torch.randn(2, 8, 12, generator=g)
        heads = [distribute_tensor(t, mesh, [Shard(2)]) for t in (q, k, v)]
        rep = [distribute_tensor(t, mesh, [Replicate()]) for t in (cos, sin)]
        gate_up = [distribute_tensor(t, mesh, [Shard(2)]) for t in (gate, up)]
        op_comm = {}
        with CommDebugMode() as c:
            attn = llama_fast.flash_attn(*heads)
        op_comm["flash_attn"] = c.get_total_counts()
        with CommDebugMode() as c:
            rq, rk = llama_fast.apply_rope(heads[0], heads[1], *rep, interleaved=True)
        op_comm["apply_rope"] = c.get_total_counts()
        with CommDebugMode() as c:
            sw = llama_fast.swiglu(*gate_up)
        op_comm["swiglu"] = c.get_total_counts()
        ops = {"attn": (attn.placements, attn.full_tensor()), "rope": (rq.placements, rq.full_tensor()),
               "swiglu": (sw.placements, sw.full_tensor()), "op_comm": op_comm}
        if rank == 0:
            torch.save({"logits": logits.detach(), "grads": grads, "counts": counts,
                        "ops": ops, "inputs": (q, k, v, cos, sin, gate, up)}, out)


# ---------------------------------------------------------------------------------------
# The fused cross-entropy inside torch.distributed: a vocabulary-sharded weight (tensor
# parallel) and an lm_head that is its own FSDP2 unit.

# (name, dtype, hidden layout, target a DTensor, bias, reduction, ignored tokens, label smoothing)
VOCAB_PARALLEL_CASES = [
    ("mean", torch.float32, "replicated", False, False, "mean", False, 0.0),
    ("mean-seqshard-bias-ignore", torch.float32, "Shard(1)", True, True, "mean", True, 0.0),
    ("sum-smoothing-ignore", torch.float32, "Shard(1)", False, False, "sum", True, 0.1),
    ("none-smoothing-bias", torch.float32, "replicated", False, True, "none", True, 0.2),
    ("none-seqshard", torch.float32, "Shard(1)", True, False, "none", False, 0.0),
    ("mean-all-ignored", torch.float32, "replicated", False, False, "mean", "all", 0.0),
    ("bf16-mean-smoothing-bias", torch.bfloat16, "Shard(1)", False, True, "mean", True, 0.1),
]
VP_SHAPE = (2, 7, 8)  # (batch, sequence, hidden): 7 tokens shard unevenly over 2 ranks
VP_VOCAB = 37  # shards of 19 and 18 rows
VP_CHUNK = 4  # 14 tokens: 4 chunks, the last one short


def vocab_parallel_inputs(case):
    """The global inputs of a VOCAB_PARALLEL_CASES case (the same on every rank): hidden,
    weight, bias or None, target, the upstream gradient of the loss."""
    name, dtype, _, _, with_bias, reduction, ignore, _ = case
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    hidden = torch.randn(*VP_SHAPE, generator=g).to(dtype)
    weight = (torch.randn(VP_VOCAB, VP_SHAPE[-1], generator=g) * 0.5).to(dtype)
    bias = torch.randn(VP_VOCAB, generator=g).to(dtype) if with_bias else None
    target = torch.randint(0, VP_VOCAB, VP_SHAPE[:-1], generator=g)
    if ignore == "all":
        target[:] = -100
    elif ignore:
        target[torch.rand(target.shape, generator=g) < 0.3] = -100
    upstream = torch.randn(VP_SHAPE[:-1] if reduction == "none" else (), generator=g)
    return hidden, weight, bias, target, upstream


VP_BACKENDS = ("torch", "triton")  # triton: the Triton kernels under the interpreter (TRITON_INTERPRET=1)


def vocab_parallel_op_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """fused_linear_cross_entropy with the weight (and bias) sharded on the vocabulary over
    the ranks, for every VOCAB_PARALLEL_CASES case on each of VP_BACKENDS: rank 0 saves,
    per backend and case, the loss and the full gradients of hidden, weight and bias, and
    the collectives the forward ran."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.debug import CommDebugMode

        import llama_fast

        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for backend_name in VP_BACKENDS:
            for case in VOCAB_PARALLEL_CASES:
                name, _, layout, target_dt, _, reduction, _, smoothing = case
                hidden, weight, bias, target, upstream = vocab_parallel_inputs(case)
                if layout == "replicated":
                    h = hidden.clone().requires_grad_()
                else:
                    h = distribute_tensor(hidden, mesh, [Shard(1)]).requires_grad_()
                w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
                b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_() if bias is not None else None
                t = distribute_tensor(target, mesh, [Shard(1)]) if target_dt else target
                with llama_fast.backend(backend_name):
                    with CommDebugMode() as comm:
                        loss = llama_fast.fused_linear_cross_entropy(h, w, t, bias=b, reduction=reduction,
                                                                     label_smoothing=smoothing, chunk_size=VP_CHUNK)
                    loss.backward(upstream.to(loss.dtype))
                    with torch.no_grad():  # the same loss, no gradient computed
                        loss_no_grad = llama_fast.fused_linear_cross_entropy(
                            h, w, t, bias=b, reduction=reduction, label_smoothing=smoothing, chunk_size=VP_CHUNK)

                results[backend_name, name] = {
                    "loss": loss.detach(), "loss_no_grad": loss_no_grad, "placements": [tuple(w.grad.placements)],
                    "grad_hidden": full(h.grad), "grad_weight": full(w.grad),
                    "grad_bias": full(b.grad) if b is not None else None,
                    "counts": {str(op): n for op, n in comm.get_comm_counts().items()},
                }
        if rank == 0:
            torch.save(results, out)


def vocab_parallel_compile_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """A training step through the vocabulary-parallel loss under torch.compile and eagerly
    (the torch backend): a replicated projection and rms_norm before the loss, the output
    weight sharded on the vocabulary. Rank 0 saves both runs' losses and full gradients,
    and dynamo's graph count and graph-break reasons for the step."""
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        import llama_fast

        mesh = init_device_mesh("cpu", (world,))
        hidden, weight, _, target, _ = vocab_parallel_inputs(VOCAB_PARALLEL_CASES[2])
        g = torch.Generator().manual_seed(3)
        proj = torch.randn(hidden.shape[-1], hidden.shape[-1], generator=g) * 0.3

        def step(x, proj_w, norm_w, out_w, y):
            h = llama_fast.rms_norm(x @ proj_w, norm_w)
            return llama_fast.fused_linear_cross_entropy(h, out_w, y, label_smoothing=0.1, chunk_size=VP_CHUNK)

        results = {}
        for mode, fn in (("eager", step), ("compiled", torch.compile(step, backend="aot_eager"))):
            p = proj.clone().requires_grad_()
            n = torch.ones(hidden.shape[-1], requires_grad=True)
            w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
            loss = fn(hidden, p, n, w, target)
            loss.backward()
            results[mode] = {"loss": loss.detach(), "grad_proj": p.grad, "grad_norm": n.grad,
                             "grad_weight": full(w.grad)}
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        explained = torch._dynamo.explain(step)(hidden, proj.clone().requires_grad_(),
                                                torch.ones(hidden.shape[-1], requires_grad=True), w, target)
        results["breaks"] = [str(b.reason) for b in explained.break_reasons]
        results["graphs"] = explained.graph_count
        if rank == 0:
            torch.save(results, out)


def build_reference_for_loss(tied: bool, seed: int = 0):
    """The patched tiny reference Transformer (``tied``: its output tied to the embeddings,
    as Llama 3.2), trained through its loss entry point ``forward(tokens, targets=...)``."""
    import llama_fast
    from llama_fast.model import ModelArgs, Transformer

    model = Transformer(ModelArgs.from_name("tiny").scaled(tie_embeddings=tied))
    model.init_weights(seed=seed)
    llama_fast.patch(model)
    return model


def train_reference_loss_single(tied: bool, steps: int, batch: int):
    """One process, the torch backend: (losses, {name: parameter}) after ``steps`` AdamW
    steps of ``build_reference_for_loss(tied)`` on ``data(steps, batch)``."""
    import llama_fast

    model = build_reference_for_loss(tied)
    with llama_fast.backend("torch"):
        losses = adamw_steps(model, data(steps, batch), lambda tokens: model(tokens[:, :-1], targets=tokens[:, 1:]))
    return losses, full_params(model)


def tensor_parallel_loss_worker(rank: int, world: int, init_file: str, out: str, tied: bool,
                                sequence_parallel: bool, steps: int, batch: int) -> None:
    """Training steps of the patched reference model under tensor_parallel through its
    loss (the vocabulary-parallel fused cross-entropy), every rank on the whole batch:
    rank 0 saves the losses, the full parameters, the first forward's collectives and
    the output weight's placements."""
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.debug import CommDebugMode

        from llama_fast import parallel

        mesh = init_device_mesh("cpu", (world,))
        model = build_reference_for_loss(tied)
        parallel.tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
        counts = []  # the first step's collectives

        def loss_fn(tokens):
            with CommDebugMode() as comm:
                loss = model(tokens[:, :-1], targets=tokens[:, 1:])
            counts.append({str(op): n for op, n in comm.get_comm_counts().items()})
            return loss

        losses = adamw_steps(model, data(steps, batch), loss_fn)
        counts = counts[0]
        params = full_params(model)
        if rank == 0:
            torch.save({"losses": losses, "params": params, "counts": counts,
                        "output_placements": tuple(model.output.weight.placements),
                        "tied": model.output.weight is model.tok_embeddings.weight}, out)


def hf_loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    """The patched HF model's own training loss (labels: HF shifts them), no logits made."""
    return model(input_ids=tokens, labels=tokens).loss


def train_hf_loss_single(steps: int, batch: int):
    """One process: the patched HF Llama trained through its fused loss (labels)."""
    import llama_fast

    model = build("hf")
    model.train()
    with llama_fast.backend("torch"):
        losses = adamw_steps(model, data(steps, batch), lambda tokens: hf_loss_of(model, tokens))
    return losses, full_params(model)


def hf_fsdp_loss_worker(rank: int, world: int, init_file: str, out: str, layout: str, steps: int,
                        batch: int) -> None:
    """The patched HF Llama under FSDP2 trained through its fused loss (labels), each rank
    on its share of the batch; ``layout`` "lm_head-unit": fully_shard per block, the
    lm_head its own unit, then the root; "blocks+root": llama_fast.parallel.shard_model.
    Rank 0 saves the losses, the full parameters, how the loss calls went
    (hf_causal_lm.LOSS_CALLS) and llama_fast's warnings."""
    import warnings

    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from llama_fast import hf_causal_lm, parallel

        mesh = init_device_mesh("cpu", (world,))
        model = build("hf")
        model.train()
        if layout == "lm_head-unit":
            for block in parallel.decoder_blocks(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            parallel.shard_model(model, mesh)
        share = batch // world
        hf_causal_lm.LOSS_CALLS.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = adamw_steps(model, data(steps, batch),
                                 lambda tokens: hf_loss_of(model, tokens[rank * share:(rank + 1) * share]), world=world)
        params = full_params(model)
        if rank == 0:
            torch.save({"losses": losses, "params": params, "calls": dict(hf_causal_lm.LOSS_CALLS),
                        "warnings": [str(w.message) for w in caught if "llama_fast" in str(w.message)]}, out)


def vocab_parallel_errors_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """The errors of fused_linear_cross_entropy for DTensor layouts it does not take."""
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor

        import llama_fast

        mesh = init_device_mesh("cpu", (world,))
        hidden, weight, _, target, _ = vocab_parallel_inputs(VOCAB_PARALLEL_CASES[0])
        errors = {}
        for name, args in (("replicated_weight", (hidden, distribute_tensor(weight, mesh, [Replicate()]))),
                           ("dtensor_hidden", (distribute_tensor(hidden, mesh, [Replicate()]), weight))):
            try:
                llama_fast.fused_linear_cross_entropy(*args, target)
                errors[name] = "no error"
            except ValueError as e:
                errors[name] = str(e)
        if rank == 0:
            torch.save(errors, out)


def loss_parallel_logits_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """tensor_parallel(loss_parallel=True): forward(tokens) gives vocabulary-sharded logits
    (a DTensor); rank 0 saves their placements, the loss torch computes from them under
    loss_parallel() and the full gradients of its backward."""
    with rank_session(rank, world, init_file, out):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import loss_parallel

        from llama_fast import parallel

        mesh = init_device_mesh("cpu", (world,))
        model = build("ref")
        parallel.tensor_parallel(model, mesh, loss_parallel=True)
        tokens = data(1, 2)[0]
        logits = model(tokens[:, :-1])
        with loss_parallel():
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        grads = full_grads(model)
        if rank == 0:
            torch.save({"placements": tuple(logits.placements), "loss": loss.full_tensor().detach(),
                        "grads": grads}, out)
