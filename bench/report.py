"""The report of bench/gpu_check.py: gpu_check.json, gpu_check.md and the progress log.

``new_report`` starts the JSON document; ``write_outputs`` sorts its rows and rewrites the
JSON and the markdown tables (memory-bound ops, attention, decode); ``Log`` writes the
progress lines to stdout and gpu_check.log.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from bench.attention_cases import ALL_PROVIDERS
from bench.cases import CASES, DTYPE_NAME


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
    key = (row["op"], row["pass"], row["shape"])
    base = next((r for r in rows if (r["op"], r["pass"], r["shape"], r["provider"]) == (*key, provider)), None)
    if base is None or base["ms"] is None or row["ms"] is None or row["ms"] <= 0:
        return "—"
    return f"{base['ms'] / row['ms']:.2f}×"


def _step_summary(name: str, step: dict) -> str:
    text = f"{name} {step['status']}"
    if step.get("passed") is not None or step.get("failed") is not None:
        text += f", {step.get('passed')} passed, {step.get('failed')} failed"
    if step.get("seconds") is not None:
        text += f" ({step['seconds']:.0f} s)"
    return text


def markdown(report: dict) -> str:
    ceil, steps, bench = report["ceilings"], report["steps"], report["steps"].get("bench", {})
    lines = [
        "# llama_fast GPU check",
        "",
        f"- device: {report['device']} · torch {report['torch']} · triton {report['triton']} · commit {report['commit'] or 'unknown'}",
        f"- ceilings: copy {_fmt(ceil['copy_gbps'], '.0f')} GB/s · bf16 matmul {_fmt(ceil['bf16_tflops'], '.0f')} TFLOP/s",
        f"- llama_fast backend: {bench.get('llama_fast_backend')} · dtype {DTYPE_NAME}"
        f" · timing: {bench.get('timing')}",
        "- steps: " + " · ".join(_step_summary(name, step) for name, step in steps.items()),
        "",
        "| op | pass | shape | provider | ms | GB/s | % of copy | vs eager | vs torch.compile | peak MiB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = report["rows"]
    case_ops = {case["op"] for case in CASES}
    for r in (r for r in rows if r["op"] in case_ops):
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} "
            f"| {_fmt(r['gbps'], '.0f')} | {_fmt(pct, '.1f')} | {_speedup(rows, r, 'eager')} "
            f"| {_speedup(rows, r, 'torch.compile')} | {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    lines += [
        "",
        "## Attention (flash_attn)",
        "",
        "TFLOP/s: forward 4·B·Hq·Sq·Sk·D (halved when causal), backward 2.5× forward; "
        "% of the bf16 matmul ceiling.",
        "",
        "| pass | shape | provider | ms | TFLOP/s | % of matmul | vs sdpa_flash | vs sdpa_cudnn | peak MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in rows if r["op"] == "attention"):
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['pass']} | {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} | {_fmt(r['tflops'], '.0f')} "
            f"| {_fmt(pct, '.1f')} | {_speedup(rows, r, 'sdpa_flash')} | {_speedup(rows, r, 'sdpa_cudnn')} "
            f"| {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    lines += [
        "",
        "## Decode (flash_decode)",
        "",
        "GB/s: K and V read once (2·B·L·Hkv·D·2 bytes) plus q and out; % of the copy ceiling.",
        "",
        "| shape | provider | ms | GB/s | % of copy | vs sdpa | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in rows if r["op"] == "decode"):
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} | {_fmt(r['gbps'], '.0f')} "
            f"| {_fmt(pct, '.1f')} | {_speedup(rows, r, 'sdpa')} | {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _row_order(rows: list[dict]) -> Callable[[dict], tuple]:
    """Sort key: op, then shape in the order shapes first appear (attention and decode run
    a grid of shapes; the memory-bound ops have one each), then pass, then provider."""
    ops = [case["op"] for case in CASES] + ["attention", "decode"]
    first_seen: dict = {}
    for i, r in enumerate(rows):
        first_seen.setdefault((r["op"], r["shape"]), i)

    def key(row: dict) -> tuple:
        return (ops.index(row["op"]), first_seen[(row["op"], row["shape"])], ("fwd", "bwd").index(row["pass"]),
                ALL_PROVIDERS.index(row["provider"]))

    return key


def write_outputs(out_dir: Path, report: dict) -> str:
    report["rows"].sort(key=_row_order(report["rows"]))
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "gpu_check.md").write_text(table)
    return table


class Log:
    """Progress lines to stdout and to gpu_check.log (stdout may be cut to its tail)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
