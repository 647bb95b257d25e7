#!/usr/bin/env python
"""Try launch configurations of the Triton attention kernels: ``python -m llama_fast.bench.tune``.

    python -m llama_fast.bench.tune [--head-dims 64,128] [--roles fwd,dkdv,dq,decode] [--seqlen 4096]
                         [--decode-context 8192] [--out FILE.json] [--budget-s S]
                         [--compile-only ARCH] [--smoke] [--autotuner CLASS]

The block sizes, warps and stages of ``kernels/flash_attn.py`` (``forward_config``,
``backward_configs``) and of ``kernels/flash_decode.py`` (``launch_config``) were chosen
without a GPU. This tool puts each candidate of ``CANDIDATES`` in place of the current
configuration of one kernel (``fwd``: the forward; ``dkdv`` and ``dq``: the two backward
kernels; ``decode``: flash_decode's split kernel), runs it in bf16 at a Llama-3 shape
(attention: causal, batch 2 x 4096 tokens, 32 query / 8 key-value heads, as 8B; decode:
batch 8, one new token over 8192 cached, 32/8 heads), checks the result against the
current configuration's (a candidate that computes something else is reported, never
timed) and times it (CUDA events, median; the forward for ``fwd``, the whole backward for
``dkdv`` and ``dq``, one decode step for ``decode``). It prints one table with each
candidate's time against the current one's and writes it as JSON; changing the
configuration functions to a winner is a decision for whoever reads it.

--compile-only 90 (or 80) needs no GPU: it compiles every candidate for that architecture
(as llama_fast.tools.compile_check does) and reports shared memory, registers and spills, so
that candidates that cannot launch or spill heavily are dropped before GPU time is spent.
--autotuner CLASS (hopper, blackwell, ampere, consumer, or all) puts the run-time autotuner's
candidates for that GPU class (kernels/_autotune.py) in place of CANDIDATES, measured against
the Hopper default as the others: the tests compile the Hopper ones for sm_90 (none spills or
repeats MMA work) and run all of them under the interpreter (all compute what the default does).
--smoke runs the correctness part at tiny shapes (on a CPU under TRITON_INTERPRET=1): every
candidate must compute what the current configuration computes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from llama_fast.kernels import _autotune  # imports no triton

# (role, head dim) -> candidate configurations as (BLOCK_M, BLOCK_N, num_warps, num_stages);
# BLOCK_M counts queries, BLOCK_N keys. The current configuration is always measured
# first, as the baseline. Pruned with --compile-only 90: no candidate spills heavily there.
CANDIDATE_TABLE: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 64): [(128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 4), (64, 64, 4, 3)],  # 128x64x3: the old default
    ("dkdv", 64): [(64, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 2), (32, 64, 8, 2)],
    ("dkdv", 128): [(16, 64, 8, 2), (32, 64, 8, 1), (16, 128, 8, 2), (32, 32, 4, 2), (32, 128, 8, 2)],
    ("dq", 64): [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
    ("dq", 128): [(64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)],  # 64x32x3: the old default
    # flash_decode's split kernel; BLOCK_M stays the launcher's (16 rows: GQA 4 x 1 token)
    ("decode", 64): [(16, 64, 4, 2), (16, 256, 4, 2), (16, 128, 4, 3), (16, 128, 8, 2)],
    ("decode", 128): [(16, 32, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3), (16, 128, 8, 2)],
}
CANDIDATES: dict[tuple[str, int], list[dict]] = {
    key: [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in table]
    for key, table in CANDIDATE_TABLE.items()
}
ROLES = ("fwd", "dkdv", "dq", "decode")
KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel",
           "decode": "_flash_decode_split_kernel"}
DECODE_GROUP = 4  # query heads per KV head in the decode runs (Llama-3 8B: 32 / 8)


def _flash_attn_module():
    from llama_fast.kernels import flash_attn

    return flash_attn


def _flash_decode_module():
    from llama_fast.kernels import flash_decode

    return flash_decode


def current_config(role: str, head_dim: int) -> dict:
    fa = _flash_attn_module()
    if role == "decode":
        cfg = _flash_decode_module().launch_config(DECODE_GROUP, 1, head_dim)
        return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    if role == "fwd":
        return fa.forward_config(head_dim, torch.bfloat16)
    dkdv, dq = fa.backward_configs(head_dim, torch.bfloat16)
    return dkdv if role == "dkdv" else dq


@contextlib.contextmanager
def override(role: str, cfg: dict):
    """The launchers use ``cfg`` for kernel ``role`` (they look the config functions up at
    every call); the other kernels keep theirs. decode: the split kernel's BLOCK_N, warps
    and stages, for the row tile of ``cfg["BLOCK_M"]`` rows only."""
    fa, fd = _flash_attn_module(), _flash_decode_module()
    saved = fa.forward_config, fa.backward_configs, fd.launch_config

    def forward_config(head_dim, dtype=torch.bfloat16, *args, **kwargs):
        return dict(cfg) if role == "fwd" and dtype != torch.float32 else saved[0](head_dim, dtype, *args, **kwargs)

    def backward_configs(head_dim, dtype=torch.bfloat16, *args, **kwargs):
        dkdv, dq = saved[1](head_dim, dtype, *args, **kwargs)
        if dtype == torch.float32:
            return dkdv, dq
        return (dict(cfg), dq) if role == "dkdv" else (dkdv, dict(cfg)) if role == "dq" else (dkdv, dq)

    def launch_config(group, q_len, head_dim, *args, **kwargs):
        current = saved[2](group, q_len, head_dim, *args, **kwargs)
        if role != "decode" or current["BLOCK_M"] != cfg["BLOCK_M"]:
            return current
        return dict(current, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    fa.forward_config, fa.backward_configs, fd.launch_config = forward_config, backward_configs, launch_config
    try:
        yield
    finally:
        fa.forward_config, fa.backward_configs, fd.launch_config = saved


AUTOTUNER_CLASSES = ("hopper", "blackwell", "ampere", "consumer")


def configs_to_try(role: str, head_dim: int, baseline: dict, autotuner: str | None = None) -> list[dict]:
    """The current configuration first, then each candidate that differs from it; with
    ``autotuner`` (a GPU class or "all"), the run-time autotuner's candidates for it
    (kernels/_autotune.py) instead of CANDIDATES."""
    if autotuner:
        classes = AUTOTUNER_CLASSES if autotuner == "all" else (autotuner,)
        found = [dict(baseline, **c) for gpu in classes for c in _autotune.candidates(role, head_dim, torch.bfloat16, gpu)]
    else:
        found = CANDIDATES.get((role, head_dim), [])
    configs = [baseline]
    for c in found:
        if c not in configs:
            configs.append(c)
    return configs


def _label(cfg: dict) -> str:
    return f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg.get('num_stages', 3)}"


# ---------------------------------------------------------------------------------------
# on a GPU (or the interpreter): correctness against the current configuration, then time


def _inputs(role, head_dim, shapes, device) -> dict:
    """Random bf16 inputs of the role's shape: shapes["train"] = (batch, tokens, q heads,
    kv heads) for fwd/dkdv/dq, shapes["decode"] = (batch, cached tokens, q heads, kv heads)."""
    kind = "decode" if role == "decode" else "train"
    batch, seqlen, q_heads, kv_heads = shapes[kind]
    g = torch.Generator(device="cpu").manual_seed(head_dim * 1000 + seqlen)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    if kind == "decode":
        return {"q": randn(batch, 1, q_heads, head_dim), "k": randn(batch, seqlen, kv_heads, head_dim),
                "v": randn(batch, seqlen, kv_heads, head_dim),
                "seqlens": torch.full((batch,), seqlen, dtype=torch.int32, device=device)}
    return {"q": randn(batch, seqlen, q_heads, head_dim), "k": randn(batch, seqlen, kv_heads, head_dim),
            "v": randn(batch, seqlen, kv_heads, head_dim), "do": randn(batch, seqlen, q_heads, head_dim)}


def _run(role, x: dict):
    """The call ``role`` is timed by, returning what is compared: the forward (fwd), the
    whole backward (dkdv, dq: dq, dk, dv) or one decode step (decode)."""
    import llama_fast

    if role in ("fwd", "decode"):
        def call():
            with torch.no_grad(), llama_fast.backend("triton"):
                if role == "fwd":
                    return (llama_fast.flash_attn(x["q"], x["k"], x["v"], causal=True),)
                return (llama_fast.flash_decode(x["q"], x["k"], x["v"], x["seqlens"]),)
        return call
    qg, kg, vg = (x[name].detach().requires_grad_() for name in "qkv")
    with llama_fast.backend("triton"):
        out = llama_fast.flash_attn(qg, kg, vg, causal=True)

    def call():
        with llama_fast.backend("triton"):
            return torch.autograd.grad(out, (qg, kg, vg), x["do"], retain_graph=True)
    return call


def _mismatch(got, want) -> str | None:
    for name, g, w in zip(("out/dq", "dk", "dv"), got, want):
        if not torch.isfinite(g).all():
            return f"{name}: not finite"
        err = (g.float() - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-6)
        if err > 2e-2:  # bf16 results of different summation orders
            return f"{name}: max error {err:.3g} of the largest value"
    return None


def tune(head_dims, roles, shapes, device, warmup, reps, deadline, log, autotuner: str | None = None) -> list[dict]:
    from llama_fast.bench.timing import time_ms

    results = []
    for head_dim in head_dims:
        for role in roles:
            x = _inputs(role, head_dim, shapes, device)
            baseline = current_config(role, head_dim)
            want = _run(role, x)()
            for cfg in configs_to_try(role, head_dim, baseline, autotuner):
                row = {"role": role, "head_dim": head_dim, "config": cfg, "label": _label(cfg),
                       "current": cfg == baseline, "ms": None, "vs_current": None, "error": None}
                results.append(row)
                if time.monotonic() > deadline:
                    row["error"] = "skipped: out of time"
                    continue
                try:
                    with override(role, cfg):
                        call = _run(role, x)
                        row["error"] = _mismatch(call(), want)
                        if row["error"] is None and device.type == "cuda":
                            row["ms"] = time_ms([call], device, warmup, reps)
                except Exception as exc:  # out of shared memory, compile errors: a result
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                base = next(r for r in results if r["role"] == role and r["head_dim"] == head_dim and r["current"])
                if row["ms"] and base["ms"]:
                    row["vs_current"] = base["ms"] / row["ms"]
                log(f"{role} D={head_dim} {row['label']}: " + (row["error"] or (
                    f"{row['ms']:.4f} ms ({row['vs_current']:.2f}x current)" if row["ms"] else "matches")))
    return results


# ---------------------------------------------------------------------------------------
# without a GPU: compile every candidate for one architecture


def compile_candidates(arch: int, head_dims, roles, log, autotuner: str | None = None) -> list[dict]:
    """Each candidate compiled as llama_fast.tools.compile_check compiles a launch (bf16; causal
    fixed-length attention; decode with splits); shared memory, registers and spills."""
    import llama_fast.tools.compile_check as cc

    rows = []
    with cc.fresh_compiles():
        for head_dim in head_dims:
            for role in roles:
                baseline = current_config(role, head_dim)
                for cfg in configs_to_try(role, head_dim, baseline, autotuner):
                    with override(role, cfg):
                        r = cc.compile_config(*_launch_config(cc, role, head_dim), arch)
                    rows.append(dict(role=role, head_dim=head_dim, config=cfg, label=_label(cfg),
                                     current=cfg == baseline, **{k: r[k] for k in (
                                         "shared", "registers", "spill_stores", "spill_loads", "tensor_cores", "work_ratio", "error")}))
                    log(f"{role} D={head_dim} {rows[-1]['label']}: " + (r["error"] or (
                        f"smem {r['shared']} regs {r['registers']} spills {r['spill_stores']}/{r['spill_loads']} "
                        f"{r['tensor_cores']}")))
    return rows


def _launch_config(cc, role: str, head_dim: int) -> tuple:
    """(fn, signature, constexprs, options, hints) of the role's kernel as the module's
    compile_configs() lists it now (under override: with the candidate)."""
    module = _flash_decode_module() if role == "decode" else _flash_attn_module()
    for fn, signature, constexprs, options, hints in map(cc.unpack_config, module.compile_configs()):
        if fn.__name__ != KERNELS[role] or constexprs["HEAD_DIM"] != head_dim or signature["Q"] != "*bf16":
            continue
        if role == "decode" and constexprs["BLOCK_M"] == 16 and not constexprs["WRITE_OUT"]:
            return fn, signature, constexprs, options, hints
        if role != "decode" and constexprs["CAUSAL"] and not constexprs["IS_VARLEN"]:
            return fn, signature, constexprs, options, hints
    raise LookupError(f"no bf16 configuration of {KERNELS[role]} at head dim {head_dim} in compile_configs()")


# ---------------------------------------------------------------------------------------


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    timed = any(r.get("ms") for r in rows)
    if "shared" in (rows[0] if rows else {}):
        lines += ["| kernel | D | config | current | smem | regs | spills st/ld | tensor cores | error |",
                  "|---|---:|---|---|---:|---:|---:|---|---|"]
        lines += [f"| {r['role']} | {r['head_dim']} | {r['label']} | {'yes' if r['current'] else ''} | {r['shared']} | "
                  f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['tensor_cores']} | {r['error'] or ''} |"
                  for r in rows]
    else:
        lines += ["| kernel | D | config | current | ms | vs current | result |", "|---|---:|---|---|---:|---:|---|"]
        lines += [f"| {r['role']} | {r['head_dim']} | {r['label']} | {'yes' if r['current'] else ''} | "
                  f"{'' if r['ms'] is None else format(r['ms'], '.4f')} | "
                  f"{'' if r['vs_current'] is None else format(r['vs_current'], '.2f') + 'x'} | "
                  f"{r['error'] or 'matches the current configuration'} |"
                  for r in rows]
        if timed:
            for role, head_dim in dict.fromkeys((r["role"], r["head_dim"]) for r in rows):
                best = min((r for r in rows if (r["role"], r["head_dim"]) == (role, head_dim) and r["ms"]),
                           key=lambda r: r["ms"], default=None)
                if best and not best["current"]:
                    lines.append(f"\nbest for {role} D={head_dim}: {best['config']} ({best['vs_current']:.2f}x current)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_fast.bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--seqlen", type=int, default=4096, help="tokens of the training-shape runs")
    p.add_argument("--decode-context", type=int, default=8192, help="cached tokens of the decode runs")
    p.add_argument("--out", type=Path, help="JSON file; the markdown beside it (.md)")
    p.add_argument("--budget-s", type=float, default=240.0, help="candidates left when it runs out are skipped")
    p.add_argument("--compile-only", type=int, metavar="ARCH", help="compile for this arch (80, 90); no GPU needed")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: the correctness part, on any device")
    p.add_argument("--autotuner", choices=AUTOTUNER_CLASSES + ("all",), metavar="CLASS",
                   help="the run-time autotuner's candidates for a GPU class (kernels/_autotune.py) or all")
    args = p.parse_args(argv)
    head_dims = [int(d) for d in args.head_dims.split(",")]
    roles = [r for r in args.roles.split(",") if r]
    unknown = set(roles) - set(ROLES)
    if unknown:
        p.error(f"--roles takes {','.join(ROLES)}, got {sorted(unknown)}")
    start = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.compile_only:
        rows = compile_candidates(args.compile_only, head_dims, roles, log, args.autotuner)
        header = f"# Attention candidates compiled for sm_{args.compile_only} (bf16, causal)"
        failed = any(r["error"] for r in rows)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # smoke: past two 128-row blocks and a partial one, so full and masked blocks both
        # run; decode over a few key blocks of every candidate's BLOCK_N, with GQA 4
        if args.smoke:
            shapes = {"train": (1, 272, 2, 1), "decode": (2, 300, DECODE_GROUP, 1)}
        else:
            shapes = {"train": (2, args.seqlen, 32, 8), "decode": (8, args.decode_context, 32, 8)}
        # override() puts each candidate in the static configuration's place: the run-time
        # autotuner (kernels/_autotune.py) must not replace it with its own choice.
        with _autotune.static_configs():
            rows = tune(head_dims, roles, shapes, device, warmup=3, reps=10, deadline=start + args.budget_s, log=log,
                        autotuner=args.autotuner)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        train, dec = shapes["train"], shapes["decode"]
        header = (f"# Attention candidates on {name} (bf16; fwd/dkdv/dq: causal, batch {train[0]} x {train[1]} tokens, "
                  f"{train[2]}/{train[3]} heads; decode: batch {dec[0]} x 1 token over {dec[1]} cached, {dec[2]}/{dec[3]} "
                  f"heads; torch {torch.__version__})")
        failed = any(r["error"] and not r["error"].startswith("skipped") and "OutOfResources" not in r["error"]
                     for r in rows)
    text = markdown(rows, header)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    print(text, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
