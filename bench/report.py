"""The report of the suite (``llama-fast bench``) and of scripts/gpu_check.py: the JSON,
the markdown, the log.

``new_report`` starts the JSON document (``resolve_commit`` names the commit measured,
``default_out_dir`` where results go); ``write_outputs`` sorts its rows and rewrites the
JSON and the markdown tables (memory-bound ops, attention, decode, training step,
inference; a section only where there are rows); ``Log`` writes the progress lines to a
stream and a log file.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from llama_fast.bench.cases import CASES, DTYPE_NAME
from llama_fast.bench.end_to_end import PATCHED, TRAIN_PROVIDERS
from llama_fast.bench.providers import ATTN_PROVIDERS, MEMORY_PROVIDERS, STATIC

ALL_PROVIDERS = tuple(dict.fromkeys(MEMORY_PROVIDERS + ATTN_PROVIDERS + TRAIN_PROVIDERS))


def new_report(device: torch.device, commit: str | None) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "commit": commit,
        "ceilings": {"copy_gbps": None, "bf16_tflops": None},
        "rows": [],
        "steps": {},
    }


def resolve_commit(given: str | None) -> str | None:
    """``given``, else the checkout's HEAD (when this package runs from a git checkout), else
    $LLAMA_FAST_COMMIT: the commit whose code was measured."""
    if given:
        return given
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LLAMA_FAST_COMMIT") or None


def default_out_dir(device_name: str, root: Path | None = None) -> Path:
    """$OUT, else ``root`` (default: ./bench/results, the checkout's results folder when run
    from the repository root) / <gpu>-<date>."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    return (root or Path("bench") / "results") / f"{slug}-{datetime.date.today().isoformat()}"


def _dist_version(dist: str) -> str | None:
    # Read from the metadata: importing triton here would fix TRITON_INTERPRET too early.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, ".2g" if spec == ".0f" and abs(value) < 10 else spec)  # keep tiny (CPU) values readable


def _speedup(rows: list[dict], row: dict, provider: str) -> str:
    key = (row["op"], row["pass"], row["shape"], row["dtype"])
    base = next((r for r in rows if (r["op"], r["pass"], r["shape"], r["dtype"], r["provider"]) == (*key, provider)), None)
    if base is None or base["ms"] is None or row["ms"] is None or row["ms"] <= 0:
        return "—"
    return f"{base['ms'] / row['ms']:.2f}×"


def _step_summary(name: str, step: dict) -> str:
    text = f"{name} {step['status']}"
    if step.get("passed") is not None or step.get("failed") is not None:
        text += f", {step.get('passed')} passed, {step.get('failed')} failed"
        text += f", {step['errors']} errors" if step.get("errors") else ""
    if step.get("seconds") is not None:
        text += f" ({step['seconds']:.0f} s)"
    return text


def _pct(row: dict) -> float | None:
    return None if row["fraction_of_ceiling"] is None else 100 * row["fraction_of_ceiling"]


def _tokens_per_s(row: dict) -> float | None:
    """From the end-to-end shape label "<model> B<batch>xS<seq>": a decode step makes one
    token per row, a training step or a prefill processes batch x seq."""
    match = _E2E_SHAPE.search(row["shape"])
    if not match or row["ms"] is None or row["ms"] <= 0:
        return None
    batch, seq = int(match.group(1)), int(match.group(2))
    per_call = batch if row["pass"].startswith("decode") else batch * seq
    return per_call / row["ms"] * 1e3


_E2E_SHAPE = re.compile(r"B(\d+)xS(\d+)")


def _table(title: str, note: str, header: list[str], rows: list[dict], cells: Callable[[dict], list[str]]) -> list[str]:
    if not rows:
        return []
    align = ["---" if h in ("op", "pass", "shape", "dtype", "provider") else "---:" for h in header]
    lines = ["", f"## {title}", "", note, "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(cells(r)) + " |" for r in rows]


def markdown(report: dict) -> str:
    ceil, steps, bench = report["ceilings"], report["steps"], report["steps"].get("bench", {})
    rows = report["rows"]
    dtypes = sorted({r["dtype"] for r in rows}) or [DTYPE_NAME]
    lines = [
        "# llama_fast benchmarks",
        "",
        f"- device: {report['device']} · torch {report['torch']} · triton {report['triton']} · commit {report['commit'] or 'unknown'}",
        f"- ceilings: copy {_fmt(ceil['copy_gbps'], '.0f')} GB/s · bf16 matmul {_fmt(ceil['bf16_tflops'], '.0f')} TFLOP/s",
        f"- llama_fast auto backend: {bench.get('llama_fast_backend')} · dtypes {', '.join(dtypes)}"
        f" · timing: {bench.get('timing')}",
        "- steps: " + " · ".join(_step_summary(name, step) for name, step in steps.items()),
    ]
    unavailable = [u for u in bench.get("unavailable", []) if u["what"] in ALL_PROVIDERS]
    if unavailable:
        lines.append("- unavailable here (null rows): " + "; ".join(f"{u['what']}: {u['why']}" for u in unavailable))
    case_ops = {case["op"] for case in CASES if "flops" not in case}
    peak = lambda r: _fmt(r["peak_mem_mb"], ".1f")  # noqa: E731
    lines += _table(
        "Memory-bound ops", "GB/s: the minimum bytes of the pass (bench/cases.py) over the time; % of the copy ceiling.",
        ["op", "pass", "shape", "dtype", "provider", "ms", "GB/s", "% of copy", "vs eager", "vs torch.compile",
         "vs liger", "peak MiB"],
        [r for r in rows if r["op"] in case_ops],
        lambda r: [r["op"], r["pass"], r["shape"], r["dtype"], r["provider"], _fmt(r["ms"], ".4f"), _fmt(r["gbps"], ".0f"),
                   _fmt(_pct(r), ".1f"), _speedup(rows, r, "eager"), _speedup(rows, r, "torch.compile"),
                   _speedup(rows, r, "liger"), peak(r)])

    def matmul_table(title: str, note: str, op: str, versus: tuple[str, str, str]) -> list[str]:
        """A table of a matmul-bound op: TFLOP/s, % of the matmul ceiling, speed-ups over ``versus``."""
        return _table(
            title, note, ["pass", "shape", "dtype", "provider", "ms", "TFLOP/s", "% of matmul",
                          *(f"vs {v}" for v in versus), "peak MiB"],
            [r for r in rows if r["op"] == op],
            lambda r: [r["pass"], r["shape"], r["dtype"], r["provider"], _fmt(r["ms"], ".4f"), _fmt(r["tflops"], ".0f"),
                       _fmt(_pct(r), ".1f"), *(_speedup(rows, r, v) for v in versus), peak(r)])

    lines += matmul_table(
        "Fused linear cross-entropy", "TFLOP/s: the lm_head's matmuls (2·N·H·V forward, 6·N·H·V forward + backward) "
        "over the time; % of the bf16 matmul ceiling. Peak MiB: allocated above the inputs, gradients included.",
        "cross_entropy", ("eager", "torch.compile", "liger"))
    lines += matmul_table(
        "Attention (flash_attn)",
        "TFLOP/s: forward 4·B·Hq·Sq·Sk·D (halved when causal), backward 2.5×, fwd+bwd 3.5× forward; "
        "% of the bf16 matmul ceiling. triton: the autotuned launch configurations on a GPU; triton_static: "
        "the static ones.", "attention", ("sdpa_flash", "sdpa_cudnn", "flash-attn", STATIC))
    lines += _table(
        "Decode (flash_decode)", "GB/s: K and V read once (2·B·L·Hkv·D·2 bytes) plus q and out; % of the copy ceiling.",
        ["shape", "dtype", "provider", "ms", "GB/s", "% of copy", "vs sdpa", "vs flash-attn", f"vs {STATIC}", "peak MiB"],
        [r for r in rows if r["op"] == "decode"],
        lambda r: [r["shape"], r["dtype"], r["provider"], _fmt(r["ms"], ".4f"), _fmt(r["gbps"], ".0f"), _fmt(_pct(r), ".1f"),
                   _speedup(rows, r, "sdpa"), _speedup(rows, r, "flash-attn"), _speedup(rows, r, STATIC), peak(r)])
    lines += _table(
        "Training step (end to end)",
        "Forward, loss, backward, AdamW, bf16 (bench/end_to_end.py). TFLOP/s: 6 × matmul parameters × tokens plus "
        "attention; % of the matmul ceiling (model FLOPs utilisation). Peak MiB: weights and optimizer state included.",
        ["shape", "provider", "ms / step", "tokens/s", "TFLOP/s", "% of matmul", "vs hf_eager", "peak MiB"],
        [r for r in rows if r["op"] == "train"],
        lambda r: [r["shape"], r["provider"], _fmt(r["ms"], ".1f"), _fmt(_tokens_per_s(r), ".0f"), _fmt(r["tflops"], ".0f"),
                   _fmt(_pct(r), ".1f"), _speedup(rows, r, "hf_eager"), peak(r)])
    lines += _table(
        "Inference (end to end, reference model)",
        "prefill: the prompt's forward (TFLOP/s, % of matmul); decode: one step for the batch (decode_graph: replayed "
        "from a CUDA graph), GB/s = weights + K/V cache read / time, % of copy.",
        ["pass", "shape", "provider", "ms", "tokens/s", "TFLOP/s", "GB/s", "% of ceiling", "vs ref_eager", "peak MiB"],
        [r for r in rows if r["op"] == "infer"],
        lambda r: [r["pass"], r["shape"], r["provider"], _fmt(r["ms"], ".3f"), _fmt(_tokens_per_s(r), ".0f"),
                   _fmt(r["tflops"], ".0f"), _fmt(r["gbps"], ".0f"), _fmt(_pct(r), ".1f"), _speedup(rows, r, "ref_eager"),
                   peak(r)])
    return "\n".join(lines) + "\n"


OURS = ("triton", STATIC, "cuda") + tuple(PATCHED)


def summary(report: dict) -> str:
    """A few lines to read last: the steps, the ceilings, what was unavailable or failed,
    and per measured case llama_fast's time against the fastest other provider."""
    ceil, steps, bench = report["ceilings"], report["steps"], report["steps"].get("bench", {})
    lines = ["== summary",
             f"device {report['device']} · copy {_fmt(ceil['copy_gbps'], '.0f')} GB/s · "
             f"bf16 matmul {_fmt(ceil['bf16_tflops'], '.0f')} TFLOP/s",
             "steps: " + " · ".join(_step_summary(name, step) for name, step in steps.items())]
    unavailable = [u["what"] for u in bench.get("unavailable", []) if u["what"] in ALL_PROVIDERS]
    if unavailable:
        lines.append("unavailable providers: " + ", ".join(unavailable))
    for key in ("errors", "skipped"):
        if bench.get(key):
            lines.append(f"{key}: {len(bench[key])} (first: {bench[key][0]})")
    lines += autotune_lines(bench.get("autotune", []), report["rows"])
    for (op, pass_, shape, dtype), ours, best in compare_cases(report["rows"]):
        text = " · ".join(f"{r['provider']} {r['ms']:.4g} ms" + (f" ({100 * r['fraction_of_ceiling']:.0f}%)"
                          if r["fraction_of_ceiling"] is not None else "") for r in ours)
        if best:
            text += f" | fastest other {best['provider']} {best['ms']:.4g} ms: " + ", ".join(
                f"{r['provider']} {best['ms'] / r['ms']:.2f}x" for r in ours)
        lines.append(f"{op} {pass_} {shape} {dtype}: {text}")
    lines += cuda_against_triton(report["rows"])
    return "\n".join(lines) + "\n"


def _config(cfg: dict | None) -> str:
    if not cfg:
        return "?"
    return f"M{cfg.get('BLOCK_M')} N{cfg.get('BLOCK_N')} w{cfg.get('num_warps')} s{cfg.get('num_stages')}"


def autotune_lines(history: list[dict], rows: list[dict]) -> list[str]:
    """The autotuner in this run: per key it resolved, the configuration chosen against the
    static default, with the candidates' times when it tuned (else: from the cache); then per
    op the cases where both triton (tuned) and triton_static were timed."""
    lines = []
    for r in history:
        chosen, default = _config(r["config"]), _config(r.get("default"))
        if r["source"] == "tuned":
            ms = r.get("ms", {})
            gain = f", {ms[default] / ms[chosen]:.2f}x the default" if ms.get(default) and ms.get(chosen) else ""
            how = f"{len(ms)} timed, {len(r.get('dropped', {}))} dropped, {r.get('seconds', 0):.1f} s{gain}"
        else:
            how = "from the cache"
        lines.append(f"autotune {r['key']}: {chosen} (default {default}; {how})")
    times: dict = {}
    for r in rows:
        if r["provider"] in ("triton", STATIC) and r["ms"]:
            times.setdefault(r["op"], {}).setdefault((r["pass"], r["shape"], r["dtype"]), {})[r["provider"]] = r["ms"]
    for op, cases in times.items():
        ratios = [t[STATIC] / t["triton"] for t in cases.values() if len(t) == 2]
        if ratios:
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            lines.append(f"triton (tuned) vs {STATIC}, {op}: tuned faster in {sum(x > 1 for x in ratios)}/{len(ratios)} "
                         f"cases, geomean {geomean:.2f}x")
    return lines


def compare_cases(rows: list[dict]) -> list[tuple[tuple, list[dict], dict | None]]:
    """Per measured case (op, pass, shape, dtype) with a timed llama_fast row: (the case,
    llama_fast's timed rows, the fastest other provider's row or None)."""
    cases: dict = {}
    for r in rows:
        cases.setdefault((r["op"], r["pass"], r["shape"], r["dtype"]), []).append(r)
    compared = []
    for case, case_rows in cases.items():
        timed = [r for r in case_rows if r["ms"]]
        ours = [r for r in timed if r["provider"] in OURS]
        others = sorted((r for r in timed if r["provider"] not in OURS), key=lambda r: r["ms"])
        if ours:
            compared.append((case, ours, others[0] if others else None))
    return compared


def cuda_against_triton(rows: list[dict]) -> list[str]:
    """Per op, the cases where both llama_fast backends were timed: how often cuda was the
    faster and the geometric mean of triton ms / cuda ms (> 1: cuda faster). What decides
    an op's entry in llama_fast.backends.AUTO_ORDER_CUDA, together with the cuda tests."""
    times: dict = {}
    for r in rows:
        if r["provider"] in ("triton", "cuda") and r["ms"]:
            times.setdefault(r["op"], {}).setdefault((r["pass"], r["shape"], r["dtype"]), {})[r["provider"]] = r["ms"]
    lines = []
    for op, cases in times.items():
        ratios = [t["triton"] / t["cuda"] for t in cases.values() if len(t) == 2]
        if ratios:
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            lines.append(f"cuda vs triton, {op}: cuda faster in {sum(x > 1 for x in ratios)}/{len(ratios)} cases, "
                         f"geomean {geomean:.2f}x")
    return lines


OPS_ORDER = [case["op"] for case in CASES] + ["attention", "decode", "train", "infer"]
PASS_ORDER = ["fwd", "bwd", "fwd+bwd", "fwd+bwd+adamw", "prefill", "decode", "decode_graph"]


def _row_order(rows: list[dict]) -> Callable[[dict], tuple]:
    """Sort key: op, dtype, then shape in the order shapes first appear (the grid's order),
    then pass, then provider."""
    first_seen: dict = {}
    for i, r in enumerate(rows):
        first_seen.setdefault((r["op"], r["shape"]), i)

    def key(row: dict) -> tuple:
        provider = ALL_PROVIDERS.index(row["provider"]) if row["provider"] in ALL_PROVIDERS else len(ALL_PROVIDERS)
        return (OPS_ORDER.index(row["op"]), row["dtype"] != "bfloat16", row["dtype"],
                first_seen[(row["op"], row["shape"])], PASS_ORDER.index(row["pass"]), provider, row["provider"])

    return key


def write_outputs(out_dir: Path, report: dict, stem: str = "gpu_check") -> str:
    """Rewrite <stem>.json and <stem>.md in ``out_dir``; returns the markdown."""
    report["rows"].sort(key=_row_order(report["rows"]))
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / f"{stem}.md").write_text(table)
    return table


class Log:
    """Progress lines to ``echo`` (stdout; the suite uses stderr) and to a log file."""

    def __init__(self, path: Path, echo=None):
        self.file = open(path, "a", buffering=1)
        self.start = time.monotonic()
        self.echo = echo

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {message}"
        print(line, flush=True, file=self.echo or sys.stdout)
        self.file.write(line + "\n")
