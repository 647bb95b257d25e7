"""What tests/test_distributed.py runs in its process groups, and the single-process runs it
compares them with. Its own module, importing little at the top: each spawned process
imports it afresh.

Everything here uses the "torch" backend (LLAMA_FAST_BACKEND=torch in the workers,
``llama_fast.backend("torch")`` in the single-process runs): the PyTorch reference of the
llama_fast ops, still called through the custom ops and the patched modules. The Triton
kernels would run on the CPU only under the Triton interpreter, far too slowly for a
training loop in several processes.
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
    import torch.distributed as dist

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
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        share = batch // dp_size
        losses = []
        for tokens in data(steps, batch):
            loss = loss_of(kind, model, tokens[dp_rank * share:(dp_rank + 1) * share])
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        if wrap == "ddp":
            model = model.module
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                  for n, p in model.named_parameters()}
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
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for n, p in model.named_parameters()}

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
