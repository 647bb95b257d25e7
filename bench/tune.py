#!/usr/bin/env python
"""Try launch configurations of the Triton attention kernels: ``python -m bench.tune``.

    python -m bench.tune [--head-dims 64,128] [--roles fwd,dkdv,dq] [--seqlen 4096]
                         [--out FILE.json] [--budget-s S] [--compile-only ARCH] [--smoke]

The block sizes, warps and stages of ``kernels/flash_attn.py`` (``forward_config``,
``backward_configs``) were chosen without a GPU. This tool puts each candidate of
``CANDIDATES`` in place of the current configuration of one kernel (``fwd``: the forward,
``dkdv`` and ``dq``: the two backward kernels), runs bf16 causal attention at a Llama-3
training shape (batch 2 x 4096 tokens, 32 query / 8 key-value heads: GQA as in 8B), checks
the result against the current configuration's (a candidate that computes something else
is reported, never timed) and times it (CUDA events, median; the forward for ``fwd``, the
whole backward for ``dkdv`` and ``dq``). It prints one table per (kernel, head dim) with
each candidate's time against the current one's and writes them as JSON; changing
``forward_config``/``backward_configs`` to a winner is a decision for whoever reads them.

--compile-only 90 (or 80) needs no GPU: it compiles every candidate for that architecture
(as llama_fast.compile_check does) and reports shared memory, registers and spills, so
that candidates that cannot launch or spill heavily are dropped before GPU time is spent.
--smoke runs the correctness part at tiny shapes (on a CPU under TRITON_INTERPRET=1): every
candidate must compute what the current configuration computes.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: sys.path[0] is bench/, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

# (role, head dim) -> candidate configurations as (BLOCK_M, BLOCK_N, num_warps, num_stages);
# BLOCK_M counts queries, BLOCK_N keys. The current configuration is always measured
# first, as the baseline. Pruned with --compile-only 90: no candidate spills heavily there.
CANDIDATE_TABLE: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 64): [(128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)],
    ("fwd", 128): [(128, 128, 8, 2), (128, 64, 8, 2), (128, 32, 4, 4), (64, 64, 4, 3)],
    ("dkdv", 64): [(64, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 2), (32, 64, 8, 2)],
    ("dkdv", 128): [(16, 64, 8, 2), (32, 64, 8, 1), (16, 128, 8, 2), (32, 32, 4, 2), (32, 128, 8, 2)],
    ("dq", 64): [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
    ("dq", 128): [(64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
}
CANDIDATES: dict[tuple[str, int], list[dict]] = {
    key: [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in table]
    for key, table in CANDIDATE_TABLE.items()
}
ROLES = ("fwd", "dkdv", "dq")
KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}


def _flash_attn_module():
    from llama_fast.kernels import flash_attn

    return flash_attn


def current_config(role: str, head_dim: int) -> dict:
    fa = _flash_attn_module()
    if role == "fwd":
        return fa.forward_config(head_dim, torch.bfloat16)
    dkdv, dq = fa.backward_configs(head_dim, torch.bfloat16)
    return dkdv if role == "dkdv" else dq


@contextlib.contextmanager
def override(role: str, cfg: dict):
    """The launchers use ``cfg`` for kernel ``role`` (they look the config functions up at
    every call); the other kernels keep theirs."""
    fa = _flash_attn_module()
    saved = fa.forward_config, fa.backward_configs

    def forward_config(head_dim, dtype=torch.bfloat16):
        return dict(cfg) if role == "fwd" and dtype != torch.float32 else saved[0](head_dim, dtype)

    def backward_configs(head_dim, dtype=torch.bfloat16):
        dkdv, dq = saved[1](head_dim, dtype)
        if dtype == torch.float32:
            return dkdv, dq
        return (dict(cfg), dq) if role == "dkdv" else (dkdv, dict(cfg)) if role == "dq" else (dkdv, dq)

    fa.forward_config, fa.backward_configs = forward_config, backward_configs
    try:
        yield
    finally:
        fa.forward_config, fa.backward_configs = saved


def _label(cfg: dict) -> str:
    return f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg.get('num_stages', 3)}"


# ---------------------------------------------------------------------------------------
# on a GPU (or the interpreter): correctness against the current configuration, then time


def _inputs(batch, seqlen, q_heads, kv_heads, head_dim, device):
    g = torch.Generator(device="cpu").manual_seed(head_dim * 1000 + seqlen)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    q, k, v = randn(batch, seqlen, q_heads, head_dim), randn(batch, seqlen, kv_heads, head_dim), \
        randn(batch, seqlen, kv_heads, head_dim)
    return q, k, v, randn(batch, seqlen, q_heads, head_dim)


def _run(role, q, k, v, do):
    """The pass ``role`` is timed by: (callable, what it returns to compare)."""
    import llama_fast

    if role == "fwd":
        def call():
            with torch.no_grad(), llama_fast.backend("triton"):
                return (llama_fast.flash_attn(q, k, v, causal=True),)
        return call
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    with llama_fast.backend("triton"):
        out = llama_fast.flash_attn(qg, kg, vg, causal=True)

    def call():
        with llama_fast.backend("triton"):
            return torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)
    return call


def _mismatch(got, want) -> str | None:
    for name, g, w in zip(("out/dq", "dk", "dv"), got, want):
        if not torch.isfinite(g).all():
            return f"{name}: not finite"
        err = (g.float() - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-6)
        if err > 2e-2:  # bf16 results of different summation orders
            return f"{name}: max error {err:.3g} of the largest value"
    return None


def tune(head_dims, roles, shape, device, warmup, reps, deadline, log) -> list[dict]:
    from bench.timing import time_ms

    results = []
    for head_dim in head_dims:
        q, k, v, do = _inputs(*shape, head_dim, device)
        for role in roles:
            baseline = current_config(role, head_dim)
            want = _run(role, q, k, v, do)()
            for cfg in [baseline] + [c for c in CANDIDATES.get((role, head_dim), []) if c != baseline]:
                row = {"role": role, "head_dim": head_dim, "config": cfg, "label": _label(cfg),
                       "current": cfg == baseline, "ms": None, "vs_current": None, "error": None}
                results.append(row)
                if time.monotonic() > deadline:
                    row["error"] = "skipped: out of time"
                    continue
                try:
                    with override(role, cfg):
                        call = _run(role, q, k, v, do)
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


def compile_candidates(arch: int, head_dims, roles, log) -> list[dict]:
    """Each candidate compiled as llama_fast.compile_check compiles a launch (bf16, causal,
    fixed length); shared memory, registers and spills per candidate."""
    import llama_fast.compile_check as cc

    fa = _flash_attn_module()
    rows = []
    with cc.fresh_compiles():
        _compile_each(cc, fa, arch, head_dims, roles, rows, log)
    return rows


def _compile_each(cc, fa, arch, head_dims, roles, rows, log) -> None:
    for head_dim in head_dims:
        for role in roles:
            baseline = current_config(role, head_dim)
            for cfg in [baseline] + [c for c in CANDIDATES.get((role, head_dim), []) if c != baseline]:
                with override(role, cfg):
                    configs = [cc.unpack_config(c) for c in fa.compile_configs()]
                fn, signature, constexprs, options, hints = next(
                    c for c in configs if c[0].__name__ == KERNELS[role] and c[2]["HEAD_DIM"] == head_dim
                    and c[2].get("CAUSAL") and not c[2]["IS_VARLEN"] and c[1]["Q"] == "*bf16")
                r = cc.compile_config(fn, signature, constexprs, options, hints, arch)
                rows.append(dict(role=role, head_dim=head_dim, config=cfg, label=_label(cfg), current=cfg == baseline,
                                 **{k: r[k] for k in ("shared", "registers", "spill_stores", "spill_loads",
                                                      "tensor_cores", "error")}))
                log(f"{role} D={head_dim} {rows[-1]['label']}: " + (r["error"] or (
                    f"smem {r['shared']} regs {r['registers']} spills {r['spill_stores']}/{r['spill_loads']} "
                    f"{r['tensor_cores']}")))


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
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--out", type=Path, help="JSON file; the markdown beside it (.md)")
    p.add_argument("--budget-s", type=float, default=240.0, help="candidates left when it runs out are skipped")
    p.add_argument("--compile-only", type=int, metavar="ARCH", help="compile for this arch (80, 90); no GPU needed")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: the correctness part, on any device")
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
        rows = compile_candidates(args.compile_only, head_dims, roles, log)
        header = f"# Attention candidates compiled for sm_{args.compile_only} (bf16, causal)"
        failed = any(r["error"] for r in rows)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # smoke: past two 128-row blocks and a partial one, so full and masked blocks both run
        shape = (1, 272, 2, 1) if args.smoke else (2, args.seqlen, 32, 8)
        rows = tune(head_dims, roles, shape, device, warmup=3, reps=10, deadline=start + args.budget_s, log=log)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        header = (f"# Attention candidates on {name} (bf16, causal, batch {shape[0]}, {shape[1]} tokens, "
                  f"{shape[2]}/{shape[3]} heads; torch {torch.__version__})")
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
