"""Train the reference Llama 3 (llama_fast.model) with the llama_fast patch, in one process
or under torchrun:

    python -m llama_fast.train --model tiny --steps 100                      # one process
    torchrun --nproc-per-node 8 -m llama_fast.train --model llama-3-8b --fsdp --tp 2 --bf16 \\
        --checkpointing --data tokens.bin --batch-size 64 --seq-len 4096 --save-dir ckpt
    llama-fast train ...                                                    # the same

The process group is nccl on GPUs, gloo on CPUs. Data parallel: DDP by default, FSDP2
(fully_shard per block and at the root, llama_fast.parallel.shard_model) with --fsdp.
--tp K: tensor + sequence parallel (llama_fast.parallel.tensor_parallel) inside groups of K
consecutive ranks, FSDP2 across the groups (2-D; --fsdp needed when there are several).
--bf16 is bfloat16 mixed precision (float32 parameters and optimiser state): FSDP2's
MixedPrecisionPolicy with --fsdp, torch.autocast otherwise. --checkpointing recomputes each
block in the backward; --compile compiles each block (torch.compile, inductor) and, after
the first step, logs how many graphs dynamo made and its graph breaks with their reasons
(a break inside a block splits its graph; none is expected). The model is built on the meta device
and initialised with Transformer.init_weights(--seed) after sharding, or loaded from
--checkpoint (a Meta or Hugging Face folder, llama_fast.load_checkpoint).

Data: --data FILE is a flat binary file of token ids (uint16, or uint32 for vocabularies of
65536 and more, --data-dtype); without it, synthetic sequences a model can learn (each a
run start, start + stride, ... modulo the vocabulary). Every step reads the global batch
its step number and --seed choose, each rank its contiguous share: a resumed run reads what
the uninterrupted run would have.

Every --log-every steps rank 0 logs the loss (mean over the global batch), tokens/s (all
ranks) and the peak memory (GPU: allocated by torch; CPU: the process's peak RSS), on a
progress bar when stdout is a terminal; --metrics FILE appends them as JSON lines.
--save-dir DIR saves a distributed checkpoint (torch.distributed.checkpoint: model,
optimiser, schedule and step; each rank writes its own shards) every --save-every steps
and at the end, to DIR/step-N; --resume continues from the newest one there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from llama_fast import parallel
from llama_fast.backends import backend
from llama_fast.checkpoint import load_checkpoint
from llama_fast.model import CONFIGS, ModelArgs, Transformer
from llama_fast.patching import patch

__all__ = ["build_parser", "main"]

DESCRIPTION = __doc__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama_fast.train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="tiny", help=f"a named config: {', '.join(sorted(CONFIGS))} (default tiny)")
    src.add_argument("--checkpoint", help="a Meta or Hugging Face checkpoint folder to start from")
    p.add_argument("--data", help="a binary file of token ids (default: synthetic sequences)")
    p.add_argument("--data-dtype", choices=("uint16", "uint32"), help="the token file's integer type "
                   "(default: uint16 below a 65536-token vocabulary, else uint32)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps to reach (a resumed run counts its own)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, all ranks together")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW's learning rate after the warm-up")
    p.add_argument("--warmup", type=int, default=10, help="steps of linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--seed", type=int, default=0, help="the initial weights' and the data's seed")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block and at the root) instead of DDP")
    p.add_argument("--tp", type=int, default=1, help="tensor + sequence parallel over groups of this many ranks "
                   "(with --fsdp across the groups; without it, over all ranks)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile each block; logs the graphs and graph breaks")
    p.add_argument("--no-patch", action="store_true", help="train the unpatched model (for comparison)")
    p.add_argument("--backend", default=None, choices=("auto", "torch", "triton", "cuda"),
                   help="the llama_fast backend (default: LLAMA_FAST_BACKEND, else auto)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--metrics", help="append each logged step to this file as a JSON line (rank 0)")
    p.add_argument("--save-dir", help="save distributed checkpoints to DIR/step-N")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --save-dir")
    return p


def _usage_error(args) -> str | None:
    for name in ("steps", "batch_size", "seq_len", "log_every", "tp"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    for name in ("warmup", "save_every"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}"
    if not args.lr > 0:
        return f"--lr must be positive, got {args.lr}"
    if args.model and args.model.lower() not in CONFIGS and not args.checkpoint:
        return f"--model {args.model!r} is not a known config; known: {', '.join(sorted(CONFIGS))}"
    if args.resume and not args.save_dir:
        return "--resume needs --save-dir (where the checkpoints are)"
    if args.data and not Path(args.data).is_file():
        return f"--data {args.data}: no such file"
    return None


# ---------------------------------------------------------------------------------------
# Data


class Batches:
    """The global batch of step s, (batch, seq_len + 1) int64, the same on every rank and
    in every run with the same seed."""

    def __init__(self, path: str | None, vocab_size: int, seq_len: int, batch: int, seed: int, dtype: str | None):
        import numpy as np

        self.vocab_size, self.seq_len, self.batch, self.seed = vocab_size, seq_len, batch, seed
        self.tokens = None
        if path is not None:
            dtype = dtype or ("uint16" if vocab_size <= 65536 else "uint32")
            self.tokens = np.memmap(path, dtype=dtype, mode="r")
            if len(self.tokens) < seq_len + 1:
                raise ValueError(f"--data {path} holds {len(self.tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = self.seq_len + 1
        if self.tokens is None:
            start = torch.randint(0, self.vocab_size, (self.batch, 1), generator=g)
            stride = torch.randint(1, 8, (self.batch, 1), generator=g)
            return (start + stride * torch.arange(n)) % self.vocab_size
        offsets = torch.randint(0, len(self.tokens) - n + 1, (self.batch,), generator=g).tolist()
        rows = [torch.from_numpy(self.tokens[o:o + n].astype("int64")) for o in offsets]
        batch = torch.stack(rows)
        if int(batch.max()) >= self.vocab_size:
            raise ValueError(f"--data holds token id {int(batch.max())}, not below the vocabulary size {self.vocab_size}")
        return batch


# ---------------------------------------------------------------------------------------
# Set-up


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 or "RANK" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _build_model(args, device: torch.device, world: int):
    if args.checkpoint:
        # On the device before any sharding: fully_shard and the TP plan shard what they find.
        model = load_checkpoint(args.checkpoint, device=device, dtype=torch.float32)
        from_meta = False
    else:
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_name(args.model))
        from_meta = True
    if not args.no_patch:
        patch(model)
    if args.checkpointing:
        parallel.checkpoint_blocks(model)
    dp_mesh = None
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        if args.tp > 1:
            # Ranks r*tp .. r*tp + tp - 1 form a tensor-parallel group; FSDP2 runs across groups.
            mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
            parallel.tensor_parallel(model, mesh["tp"])
            dp_mesh = mesh["dp"]
        else:
            dp_mesh = init_device_mesh(device.type, (world,))
    if args.compile:
        parallel.compile_blocks(model)
    if args.fsdp:
        parallel.shard_model(model, dp_mesh, param_dtype=torch.bfloat16 if args.bf16 else None)
    if from_meta:
        model.to_empty(device=device)
        model.init_weights(seed=args.seed)
    wrapped = model
    if dist.is_initialized() and not args.fsdp and args.tp == 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, wrapped


def _compile_summary() -> tuple[int, dict[str, int]]:
    """(graphs dynamo compiled, {graph break reason: count}) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for d in save_dir.glob("step-*") if save_dir.is_dir() else ():
        if d.name[5:].isdigit() and (d / ".metadata").is_file():  # written last: a complete save
            found.append((int(d.name[5:]), d))
    return sorted(found)


def _state(model, optimizer, schedule, step: int):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "schedule": schedule.state_dict(), "step": torch.tensor(step)}


def _save(model, optimizer, schedule, step: int, save_dir: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    path = save_dir / f"step-{step}"
    with warnings.catch_warnings():
        # One process without a process group is a supported case, not worth a warning each save.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer, schedule, step), checkpoint_id=str(path))
    return path


def _load(model, optimizer, schedule, path: Path) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer, schedule, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"])


class _Log:
    """Rank 0's log: a line per logged step, or a progress bar redrawn in place on a terminal."""

    def __init__(self, rank: int, total: int, metrics: str | None):
        self.on = rank == 0
        self.total = total
        self.tty = self.on and sys.stdout.isatty()
        self.metrics = open(metrics, "a") if (metrics and self.on) else None

    def step(self, record: dict) -> None:
        if not self.on:
            return
        text = (f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  "
                f"{record['tokens_per_s']:.0f} tok/s  peak {record['peak_mib']:.0f} MiB")
        if self.tty:
            width = 24
            done = int(width * record["step"] / self.total)
            print(f"\r[{'#' * done}{'.' * (width - done)}] {text}", end="", flush=True)
        else:
            print(text, flush=True)
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def say(self, text: str) -> None:
        if self.on:
            print(("\n" if self.tty else "") + text, flush=True)

    def close(self) -> None:
        if self.tty:
            print()
        if self.metrics:
            self.metrics.close()


# ---------------------------------------------------------------------------------------
# The loop


def train(args) -> int:
    rank, world, device = _setup_distributed()
    try:
        if world % args.tp:
            raise ValueError(f"--tp ({args.tp}) must divide the number of ranks ({world})")
        if args.tp > 1 and world > args.tp and not args.fsdp:
            raise ValueError(f"--tp {args.tp} on {world} ranks needs --fsdp across the tensor-parallel groups "
                             "(DDP does not take tensor-parallel parameters)")
        dp_size, dp_rank = world // args.tp, rank // args.tp
        if args.batch_size % dp_size:
            raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the data-parallel size ({dp_size})")
        if args.tp > 1 and args.seq_len % args.tp:
            raise ValueError(f"--seq-len ({args.seq_len}) must be a multiple of --tp ({args.tp}): sequence parallel "
                             "shards the sequence")
        log = _Log(rank, args.steps, args.metrics)
        model, wrapped = _build_model(args, device, world)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        warmup = args.warmup
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        step = 0
        save_dir = Path(args.save_dir) if args.save_dir else None
        if args.resume:
            found = _checkpoints(save_dir)
            if found:
                step = _load(model, optimizer, schedule, found[-1][1])
                log.say(f"resumed from {found[-1][1]} at step {step}")
            else:
                log.say(f"no checkpoint in {save_dir}: starting at step 0")
        batches = Batches(args.data, model.args.vocab_size, args.seq_len, args.batch_size, args.seed, args.data_dtype)
        share = args.batch_size // dp_size
        # Mixed precision without FSDP: autocast (FSDP2 casts the parameters itself).
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 and not args.fsdp else nullcontext())
        choice = backend(args.backend) if args.backend else nullcontext()
        log.say(f"training {args.checkpoint or args.model} on {world} {device.type} rank(s), "
                f"{'FSDP2' if args.fsdp else 'DDP' if world > 1 and args.tp == 1 else 'one process' if world == 1 else 'no data parallel'}"
                f"{f', tensor parallel {args.tp}' if args.tp > 1 else ''}"
                f"{', bf16' if args.bf16 else ''}{', checkpointing' if args.checkpointing else ''}"
                f"{', compiled blocks' if args.compile else ''}{', unpatched' if args.no_patch else ''}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tick, tokens_since = time.perf_counter(), 0
        start = step
        with choice:
            while step < args.steps:
                tokens = batches(step)[dp_rank * share:(dp_rank + 1) * share].to(device)
                with autocast:
                    # The model's own loss: the fused cross-entropy when patched (no logits
                    # are formed; vocabulary-parallel under --tp), F.cross_entropy if not.
                    loss = wrapped(tokens[:, :-1], targets=tokens[:, 1:])
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_since += args.batch_size * args.seq_len
                if args.compile and step == start + 1:
                    graphs, breaks = _compile_summary()
                    log.say(f"compiled blocks: {graphs} graph(s), {sum(breaks.values())} graph break(s)"
                            + "".join(f"\n  graph break x{n}: {why}" for why, n in breaks.items()))
                if step % args.log_every == 0 or step == args.steps:
                    mean = loss.detach().float().clone()
                    if dist.is_initialized():
                        dist.all_reduce(mean)
                        mean /= world
                    now = time.perf_counter()
                    value = mean.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"the loss is {value} at step {step}")
                    record = {"step": step, "loss": value, "tokens_per_s": tokens_since / (now - tick),
                              "peak_mib": _peak_memory_mib(device), "lr": schedule.get_last_lr()[0]}
                    if args.compile:
                        record["graphs"], breaks = _compile_summary()
                        record["graph_breaks"] = sum(breaks.values())
                    log.step(record)
                    tick, tokens_since = time.perf_counter(), 0
                if save_dir is not None and (step == args.steps or (args.save_every and step % args.save_every == 0)):
                    path = _save(model, optimizer, schedule, step, save_dir)
                    log.say(f"saved {path}")
        log.close()
        if dist.is_initialized():
            # Leave together: gloo aborts a rank whose peer tears the group down under it.
            dist.barrier()
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    error = _usage_error(args)
    if error:
        parser.error(error)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
