#!/usr/bin/env python
"""One command for a GPU session: install llama_fast, run the tests, benchmark, report.

    python bench/gpu_check.py [--out DIR] [--smoke] [--skip-install] [--skip-tests]
                              [--skip-compile] [--commit SHA] [--budget-s S]
    python -m bench.gpu_check ...            (the same, from the repository root)

Steps, each timed and logged; a failing step is recorded and the later steps still run,
and the exit status is 1 if anything failed:

1. install    ``python -m pip install --no-build-isolation --no-deps -e .`` -> install.log
2. tests      ``python -m pytest tests -q`` on the GPU (no TRITON_INTERPRET), killed
              after --tests-timeout seconds -> tests.log; passed/failed counts recorded
3. ceilings   a 1 GiB device-to-device copy (read + write bytes) -> copy_gbps, and a bf16
              8192^3 matmul -> bf16_tflops
4. bench      every op/pass of ``CASES`` at Llama-3-8B shapes in bf16, for the providers
              llama_fast (auto backend: triton on a GPU), eager (PyTorch written as Hugging
              Face's Llama modules are) and torch.compile of the same eager functions

Results go to --out, else $OUT, else bench/results/<gpu-name>-<date>/: gpu_check.json,
gpu_check.md (a table), gpu_check.log (this script's progress) and the two step logs. The
JSON and markdown are rewritten after every step and every row, so a run killed by an
outer time limit still leaves what it measured; --budget-s (from the script's start) makes
the benchmark skip what it has no time for instead.

How things are timed
--------------------
* Forward: the op called on inputs that do not require grad (no autograd graph recorded).
* Backward: for each input set the forward is run once, outside the timed region, on
  inputs that require grad, and an upstream gradient is drawn once per output. The timed
  call is ``torch.autograd.grad(outputs, inputs, upstream, retain_graph=True)``: the
  backward alone, exactly what autograd runs for that op, with no fwd+bwd minus fwd
  subtraction (whose noise would be as large as a fast backward).
* On CUDA: a pair of CUDA events around every call, the median over --reps calls after
  --warmup calls (which also absorb Triton's JIT and torch.compile's compilation). Before
  each timed call the GPU spins for about half a millisecond (``torch.cuda._sleep``), so
  the host has queued the whole call before the GPU reaches the start event: the events
  measure GPU time, not Python dispatch. We do not flush L2 by writing a big buffer (the
  dirty lines it leaves would be written back during the timed call); instead inputs rotate
  among N_SETS sets, each set larger than the 50 MB L2 at full size, so no call finds its
  inputs left in L2 by the call before.
* On the CPU (``--smoke``): ``time.perf_counter`` around each call, the same median.

GB/s is the minimum traffic of the op (each input read once, each output written once,
the formula beside each case) divided by the time: the same bytes for every provider, so it
is throughput, comparable with the copy ceiling measured in the same run. Peak memory is
what one call allocates above what was live before it (outputs and temporaries), in MiB.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import site
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


# ---------------------------------------------------------------------------------------
# shapes and settings


@dataclass(frozen=True)
class Shapes:
    tokens: int
    hidden: int
    inter: int
    q_heads: int
    kv_heads: int
    head_dim: int


LLAMA3_8B = Shapes(tokens=8192, hidden=4096, inter=14336, q_heads=32, kv_heads=8, head_dim=128)
# RoPE runs one program per token, and the interpreter runs programs one by one: few tokens.
SMOKE = Shapes(tokens=32, hidden=256, inter=512, q_heads=4, kv_heads=2, head_dim=16)

DTYPE = torch.bfloat16
DTYPE_NAME = "bfloat16"
EPS = 1e-5
ROPE_THETA = 500000.0


@dataclass(frozen=True)
class Settings:
    shapes: Shapes
    n_sets: int  # input sets rotated between timed calls
    warmup: int
    reps: int
    compile: bool  # run the torch.compile provider


GPU_SETTINGS = dict(shapes=LLAMA3_8B, n_sets=3, warmup=10, reps=100)
SMOKE_SETTINGS = dict(shapes=SMOKE, n_sets=2, warmup=1, reps=2)  # the interpreter is slow: few calls

COPY_BYTES = 2**30  # the copy ceiling's buffer: far larger than L2
MATMUL_N = 8192  # the matmul ceiling: bf16 (N, N) @ (N, N)
HEAD_START_CYCLES = 1_000_000  # ~0.5 ms of GPU spin before each timed call (see the docstring)
BENCH_RESERVE_S = 150  # the test run is cut short to leave the benchmark this much of --budget-s
ROW_RESERVE_S = 15  # a benchmark row is not started with less time left than this
COMPILE_RESERVE_S = 45  # nor a torch.compile row (its first call compiles)


# ---------------------------------------------------------------------------------------
# the eager baselines, written as Hugging Face's Llama modules compute them


def hf_rms_norm(x, weight, eps=EPS):
    """LlamaRMSNorm: float32 statistics, normalised value cast back before the weight."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def hf_add_rms_norm(x, residual, weight, eps=EPS):
    """The unfused residual add of a decoder layer followed by its RMSNorm: (y, h)."""
    h = x + residual
    return hf_rms_norm(h, weight, eps), h


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_apply_rope(q, k, cos, sin):
    """apply_rotary_pos_emb with cos/sin (S, D) in the inputs' dtype, as LlamaRotaryEmbedding
    returns them; q/k are (B, S, H, D), so the tables broadcast over the head axis."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def hf_swiglu(gate, up):
    """LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), given the two projections."""
    return F.silu(gate) * up


def hf_swiglu_fused(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------
# inputs


def _randn(*shape, device):
    return torch.randn(*shape, dtype=DTYPE, device=device)


def norm_inputs(s: Shapes, device) -> dict:
    return {"x": _randn(s.tokens, s.hidden, device=device), "weight": 1 + 0.1 * _randn(s.hidden, device=device)}


def add_norm_inputs(s: Shapes, device) -> dict:
    return dict(norm_inputs(s, device), residual=_randn(s.tokens, s.hidden, device=device))


def rope_inputs(s: Shapes, device) -> dict:
    """q and k, and the tables in both forms: float32 (S, D/2) for llama_fast (what
    ``rope_cos_sin`` returns) and (S, D) in the inputs' dtype for the Hugging Face code."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim)
    angles = torch.arange(s.tokens, device=device, dtype=torch.float32)[:, None] * inv_freq
    full = torch.cat((angles, angles), dim=-1)
    return {
        "q": _randn(1, s.tokens, s.q_heads, s.head_dim, device=device),
        "k": _randn(1, s.tokens, s.kv_heads, s.head_dim, device=device),
        "cos_half": angles.cos(),
        "sin_half": angles.sin(),
        "cos": full.cos().to(DTYPE),
        "sin": full.sin().to(DTYPE),
    }


def swiglu_inputs(s: Shapes, device) -> dict:
    return {"gate": _randn(s.tokens, s.inter, device=device), "up": _randn(s.tokens, s.inter, device=device)}


def swiglu_fused_inputs(s: Shapes, device) -> dict:
    return {"gate_up": _randn(s.tokens, 2 * s.inter, device=device)}


# ---------------------------------------------------------------------------------------
# the benchmark cases: one entry per op
#
#   inputs      builds one input set (a dict of tensors)
#   grad        the inputs that receive gradients in the backward pass
#   llama_fast  (name of the llama_fast function, the input names it takes, in order)
#   eager       (the eager function, the input names it takes); torch.compile compiles it
#   bytes       pass -> minimum bytes moved, from the shapes and e = bytes per element of
#               the bf16 tensors (the llama_fast rope tables are float32: 4 bytes)

T_H = lambda s: s.tokens * s.hidden  # noqa: E731  elements of one (tokens, hidden) tensor
T_I = lambda s: s.tokens * s.inter  # noqa: E731  elements of one (tokens, inter) tensor
QK = lambda s: s.tokens * (s.q_heads + s.kv_heads) * s.head_dim  # noqa: E731  q and k elements
TABLES = lambda s: 2 * s.tokens * (s.head_dim // 2) * 4  # noqa: E731  cos + sin, float32 (S, D/2)

CASES = [
    {
        "op": "rms_norm",
        "shape": lambda s: f"x({s.tokens},{s.hidden})",
        "inputs": norm_inputs,
        "grad": ("x", "weight"),
        "llama_fast": ("rms_norm", ("x", "weight")),
        "eager": (hf_rms_norm, ("x", "weight")),
        "bytes": {
            "fwd": lambda s, e: (2 * T_H(s) + s.hidden) * e,  # read x, weight; write y
            "bwd": lambda s, e: (3 * T_H(s) + 2 * s.hidden) * e,  # read dy, x, weight; write dx, dweight
        },
    },
    {
        "op": "add_rms_norm",
        "shape": lambda s: f"x,residual({s.tokens},{s.hidden})",
        "inputs": add_norm_inputs,
        "grad": ("x", "residual", "weight"),
        "llama_fast": ("add_rms_norm", ("x", "residual", "weight")),
        "eager": (hf_add_rms_norm, ("x", "residual", "weight")),
        "bytes": {
            "fwd": lambda s, e: (4 * T_H(s) + s.hidden) * e,  # read x, residual, weight; write y, h
            # read dy, dh, h, weight; write dx (= d residual, one tensor) and dweight
            "bwd": lambda s, e: (4 * T_H(s) + 2 * s.hidden) * e,
        },
    },
    {
        "op": "apply_rope",
        "shape": lambda s: f"q(1,{s.tokens},{s.q_heads},{s.head_dim}) k(1,{s.tokens},{s.kv_heads},{s.head_dim})",
        "inputs": rope_inputs,
        "grad": ("q", "k"),
        "llama_fast": ("apply_rope", ("q", "k", "cos_half", "sin_half")),
        "eager": (hf_apply_rope, ("q", "k", "cos", "sin")),
        "bytes": {
            "fwd": lambda s, e: 2 * QK(s) * e + TABLES(s),  # read q, k, cos, sin; write q_out, k_out
            "bwd": lambda s, e: 2 * QK(s) * e + TABLES(s),  # read dq_out, dk_out, cos, sin; write dq, dk
        },
    },
    {
        "op": "swiglu",
        "shape": lambda s: f"gate,up({s.tokens},{s.inter})",
        "inputs": swiglu_inputs,
        "grad": ("gate", "up"),
        "llama_fast": ("swiglu", ("gate", "up")),
        "eager": (hf_swiglu, ("gate", "up")),
        "bytes": {
            "fwd": lambda s, e: 3 * T_I(s) * e,  # read gate, up; write y
            "bwd": lambda s, e: 5 * T_I(s) * e,  # read dy, gate, up; write dgate, dup
        },
    },
    {
        "op": "swiglu_fused",
        "shape": lambda s: f"gate_up({s.tokens},{2 * s.inter})",
        "inputs": swiglu_fused_inputs,
        "grad": ("gate_up",),
        "llama_fast": ("swiglu_fused", ("gate_up",)),
        "eager": (hf_swiglu_fused, ("gate_up",)),
        "bytes": {
            "fwd": lambda s, e: 3 * T_I(s) * e,  # read gate_up (2I wide); write y (I wide)
        },
    },
]

PROVIDERS = ("llama_fast", "eager", "torch.compile")


# ---------------------------------------------------------------------------------------
# timing and memory: device-agnostic entry points, one implementation per device type


def _spin(cycles: int) -> None:
    # torch.cuda._sleep is private but long-standing; without it the host merely has no head start.
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(cycles)


def _time_cuda(calls: list[Callable], warmup: int, reps: int) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        _spin(HEAD_START_CYCLES)  # the host queues the call while the GPU spins
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _time_wall(calls: list[Callable], warmup: int, reps: int) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_ms(calls: list[Callable], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of one call, rotating through ``calls`` (one per input set)."""
    timer = _time_cuda if device.type == "cuda" else _time_wall
    return timer(calls, warmup, reps)


def peak_mem_mb(call: Callable, device: torch.device) -> float | None:
    """MiB one call allocates above what was live before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / MiB


# ---------------------------------------------------------------------------------------
# the report


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
    base = next((r for r in rows if (r["op"], r["pass"], r["provider"]) == (row["op"], row["pass"], provider)), None)
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
    for r in report["rows"]:
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} "
            f"| {_fmt(r['gbps'], '.0f')} | {_fmt(pct, '.1f')} | {_speedup(report['rows'], r, 'eager')} "
            f"| {_speedup(report['rows'], r, 'torch.compile')} | {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _row_order(row: dict) -> tuple:
    ops = [case["op"] for case in CASES]
    return ops.index(row["op"]), ("fwd", "bwd").index(row["pass"]), PROVIDERS.index(row["provider"])


def write_outputs(out_dir: Path, report: dict) -> str:
    report["rows"].sort(key=_row_order)
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


# ---------------------------------------------------------------------------------------
# steps 1 and 2: install and tests (child processes)


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> tuple[int | None, bool]:
    """Run ``cmd`` in the repository root, output to ``log_path``; (return code, timed out)."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # A session of its own, so a timeout ends the whole group (pytest's compile workers too).
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout_s)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[gpu_check] killed after {timeout_s:.0f} s\n")
            return None, True


def _activate_editable_install() -> None:
    """pip ran in a child process: the import hook of the editable install is a .pth file
    this interpreter read at start-up, before it existed. Read llama_fast's .pth files now."""
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    for sitedir in filter(os.path.isdir, dirs):
        for pth in sorted(Path(sitedir).glob("__editable__*llama_fast*.pth")):
            site.addpackage(sitedir, pth.name, None)
    importlib.invalidate_caches()


def step_install(out_dir: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    code, timed_out = run_logged(cmd, out_dir / "install.log", timeout_s)
    if code == 0:
        _activate_editable_install()
    return {"status": "ok" if code == 0 else ("timeout" if timed_out else "failed"), "returncode": code,
            "log": "install.log"}


PYTEST_WORDS = {"passed": "passed", "failed": "failed", "error": "errors", "errors": "errors",
                "skipped": "skipped", "xfailed": "xfailed", "xpassed": "xpassed", "deselected": "deselected"}
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")


def parse_pytest(text: str) -> dict:
    """Counts from pytest's summary line ("3 failed, 120 passed, 2 skipped in 80.1s"); with
    no summary (the run was killed) counts from the progress characters printed so far."""
    counts = dict.fromkeys(sorted(set(PYTEST_WORDS.values())), 0)
    for line in reversed(text.splitlines()):
        stripped = line.strip("= \t")
        if re.search(r"\bin \d+(\.\d+)?s\b", stripped) and (_COUNT.search(stripped) or "no tests ran" in stripped):
            for n, word in _COUNT.findall(stripped):
                counts[PYTEST_WORDS[word]] += int(n)
            return dict(counts, summary=stripped)
    progress = "".join(m.group(1) for m in map(_PROGRESS.match, text.splitlines()) if m)
    for char, key in {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}.items():
        counts[key] = progress.count(char)
    return dict(counts, summary=None)


def step_tests(out_dir: Path, timeout_s: float, on_gpu: bool) -> dict:
    env = dict(os.environ)
    if on_gpu:
        env.pop("TRITON_INTERPRET", None)  # the kernels must run compiled on the GPU
    # Every failure is worth seeing from a scarce GPU session, so no -x; pytest-xdist (on
    # the GPU image) spreads Triton's JIT compiles over the cores.
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "--maxfail=25", "-p", "no:cacheprovider"]
    if on_gpu and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    code, timed_out = run_logged(cmd, out_dir / "tests.log", timeout_s, env)
    counts = parse_pytest((out_dir / "tests.log").read_text(errors="replace"))
    status = "ok" if code == 0 else ("timeout" if timed_out else "failed")
    return {"status": status, "returncode": code, "timeout_s": timeout_s, "log": "tests.log", **counts}


# ---------------------------------------------------------------------------------------
# step 3: ceilings


def step_ceilings(report: dict, device: torch.device, warmup: int, reps: int) -> dict:
    src = torch.empty(COPY_BYTES // 2, dtype=DTYPE, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms([lambda: dst.copy_(src)], device, warmup, reps)
    report["ceilings"]["copy_gbps"] = round(2 * COPY_BYTES / (copy_ms * 1e6), 1)  # read + write
    del src, dst
    a = _randn(MATMUL_N, MATMUL_N, device=device)
    b = _randn(MATMUL_N, MATMUL_N, device=device)
    mm_ms = time_ms([lambda: a @ b], device, warmup, reps)
    report["ceilings"]["bf16_tflops"] = round(2 * MATMUL_N**3 / (mm_ms * 1e9), 1)
    return {"status": "ok", "copy_ms": round(copy_ms, 5), "matmul_ms": round(mm_ms, 5),
            "copy_bytes": COPY_BYTES, "matmul_n": MATMUL_N}


# ---------------------------------------------------------------------------------------
# step 4: benchmarks


@functools.lru_cache(maxsize=None)
def import_llama_fast():
    """llama_fast as installed; if it is not (the install step failed), straight from this
    working tree, where setup.py's mapping of ``kernels/`` to ``llama_fast.kernels`` is
    redone by adding the repository root to the package's search path."""
    try:
        importlib.import_module("llama_fast.kernels")
    except ImportError:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        package = importlib.import_module("llama_fast")
        if str(REPO) not in package.__path__:
            package.__path__.append(str(REPO))  # llama_fast.kernels -> REPO/kernels
        importlib.import_module("llama_fast.kernels")
    return importlib.import_module("llama_fast")


def provider_fn(case: dict, provider: str, compiled: dict) -> tuple[Callable, tuple[str, ...]]:
    """The function that provider runs for ``case`` and the names of the inputs it takes."""
    if provider == "llama_fast":
        name, args = case["llama_fast"]
        return getattr(import_llama_fast(), name), args
    fn, args = case["eager"]
    if provider == "torch.compile":
        if fn not in compiled:  # one compiled wrapper per function, shared by fwd and bwd
            compiled[fn] = torch.compile(fn)
        fn = compiled[fn]
    return fn, args


def _sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (interpreter timings are tiny in GB/s)."""
    return float(f"{value:.{digits}g}")


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def make_call(fn: Callable, args: tuple[str, ...], inputs: dict, pass_: str, grad: tuple[str, ...]) -> Callable:
    """A no-argument callable running one pass of ``fn`` on one input set."""
    if pass_ == "fwd":
        tensors = [inputs[name] for name in args]
        return lambda: fn(*tensors)
    leaves = {name: t.detach().requires_grad_(name in grad) for name, t in inputs.items()}
    outputs = _as_tuple(fn(*[leaves[name] for name in args]))  # forward once, outside the timing
    upstream = tuple(torch.randn_like(o) for o in outputs)  # a fixed upstream gradient
    wrt = tuple(leaves[name] for name in grad)
    return lambda: torch.autograd.grad(outputs, wrt, upstream, retain_graph=True)


def empty_row(case: dict, pass_: str, provider: str, s: Shapes) -> dict:
    """A row with every field; the measurements stay null where a row failed or was skipped."""
    return {"op": case["op"], "shape": case["shape"](s), "dtype": DTYPE_NAME, "pass": pass_, "provider": provider,
            "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None, "peak_mem_mb": None}


def bench_row(case: dict, pass_: str, provider: str, cfg: Settings, device, ceilings: dict, compiled: dict) -> dict:
    s = cfg.shapes
    fn, args = provider_fn(case, provider, compiled)
    input_sets = [case["inputs"](s, device) for _ in range(cfg.n_sets)]
    calls = [make_call(fn, args, inputs, pass_, case["grad"]) for inputs in input_sets]
    ms = time_ms(calls, device, cfg.warmup, cfg.reps)
    peak = peak_mem_mb(calls[0], device)
    gbps = case["bytes"][pass_](s, DTYPE.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = empty_row(case, pass_, provider, s)
    row.update(
        ms=_sig(ms),
        gbps=_sig(gbps),
        # tflops stays null: these ops are memory-bound, their few flops say nothing.
        fraction_of_ceiling=_sig(gbps / copy) if copy else None,
        peak_mem_mb=None if peak is None else _sig(peak),
    )
    return row


def llama_fast_backend(device: torch.device) -> str:
    backends = import_llama_fast().backends
    name = backends.pick("rms_norm_fwd", device)
    return f"{name} (interpreter)" if name == "triton" and device.type == "cpu" else name


def step_bench(report, cfg: Settings, device, deadline: float, log: Log, save: Callable) -> dict:
    info = {"status": "ok", "shapes": asdict(cfg.shapes), "timing": _timing_note(cfg, device), "errors": [],
            "skipped": []}
    try:
        info["llama_fast_backend"] = llama_fast_backend(device)
    except Exception as exc:
        info["llama_fast_backend"] = None
        info["errors"].append({"what": "import llama_fast", "error": f"{type(exc).__name__}: {exc}"})
    providers = [p for p in PROVIDERS if p != "torch.compile" or cfg.compile]
    # llama_fast and eager first for every case, torch.compile after: if time runs short,
    # the slow-to-compile rows are the ones skipped.
    order = [(case, pass_, provider) for group in (providers[:2], providers[2:])
             for case in CASES for pass_ in case["bytes"] for provider in group]
    compiled: dict = {}
    for case, pass_, provider in order:
        what = f"{case['op']} {pass_} {provider}"
        reserve = COMPILE_RESERVE_S if provider == "torch.compile" else ROW_RESERVE_S
        if time.monotonic() > deadline - reserve:
            info["skipped"].append(what)
            report["rows"].append(empty_row(case, pass_, provider, cfg.shapes))
            log(f"skip {what}: out of time")
            continue
        start = time.monotonic()
        try:
            row = bench_row(case, pass_, provider, cfg, device, report["ceilings"], compiled)
            log(f"{what}: {row['ms']:.4f} ms, {row['gbps']:.0f} GB/s ({time.monotonic() - start:.1f} s)")
        except Exception as exc:
            row = empty_row(case, pass_, provider, cfg.shapes)
            info["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            log(f"{what}: FAILED {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        report["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand back this row's cached blocks (eager's float32 temporaries are large)
        save()
    if info["errors"] or info["skipped"]:
        info["status"] = "failed"
    return info


def _timing_note(cfg: Settings, device: torch.device) -> str:
    clock = "CUDA events, GPU head start" if device.type == "cuda" else "wall clock"
    return (f"{clock}; median of {cfg.reps} after {cfg.warmup} warm-up; {cfg.n_sets} input sets rotated; "
            "bwd = autograd.grad of a recorded forward (retain_graph)")


# ---------------------------------------------------------------------------------------
# driver


def resolve_commit(given: str | None) -> str | None:
    if given:
        return given
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LLAMA_FAST_COMMIT") or None


def default_out_dir(device_name: str) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    return REPO / "bench" / "results" / f"{slug}-{datetime.date.today().isoformat()}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (default: $OUT, else bench/results/<gpu>-<date>/)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, no install/tests/ceilings/torch.compile: a CPU check of this script")
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--commit", help="commit to report (default: git rev-parse HEAD, else $LLAMA_FAST_COMMIT)")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall time for everything; late rows are skipped")
    p.add_argument("--tests-timeout", type=float, default=240.0, help="seconds before the test run is killed")
    p.add_argument("--install-timeout", type=float, default=180.0)
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    return p.parse_args(argv)


def run_step(report: dict, name: str, body: Callable[[], dict], log: Log, save: Callable) -> None:
    """Run one step; its outcome (or the exception) and its time go into report["steps"]."""
    log(f"== {name}")
    start = time.monotonic()
    try:
        result = body()
    except Exception as exc:
        log(traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    report["steps"][name] = {**result, "seconds": round(time.monotonic() - start, 1)}
    log(f"== {name}: {result['status']}")
    save()


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        # Before anything imports triton: on a GPU the kernels run compiled, never interpreted.
        os.environ.pop("TRITON_INTERPRET", None)
    device = torch.device("cuda" if on_gpu else "cpu")
    settings = dict(SMOKE_SETTINGS if args.smoke else GPU_SETTINGS)
    settings.update({k: v for k, v in (("warmup", args.warmup), ("reps", args.reps)) if v is not None})
    cfg = Settings(**settings, compile=not (args.smoke or args.skip_compile))

    report = new_report(device, resolve_commit(args.commit))
    out_dir = args.out or default_out_dir(report["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu_check.log")
    log(f"gpu_check: {report['device']}, torch {report['torch']}, triton {report['triton']}, out {out_dir}")

    def save() -> str:
        return write_outputs(out_dir, report)

    def remaining() -> float:
        return args.budget_s - (time.monotonic() - start)

    def skipped(why: str) -> Callable[[], dict]:
        return lambda: {"status": "skipped", "why": why}

    # (step, why it is skipped or None, what it runs)
    steps = [
        ("install", "--smoke or --skip-install" if args.smoke or args.skip_install else None,
         lambda: step_install(out_dir, max(10.0, min(args.install_timeout, remaining())))),
        # The test run is cut short if it would eat into the benchmark's share of the budget.
        ("tests", "--smoke or --skip-tests" if args.smoke or args.skip_tests else None,
         lambda: step_tests(out_dir, max(10.0, min(args.tests_timeout, remaining() - BENCH_RESERVE_S)), on_gpu)),
        ("ceilings", "--smoke or no GPU" if args.smoke or not on_gpu else None,
         lambda: step_ceilings(report, device, cfg.warmup, max(10, cfg.reps // 2))),
        ("bench", None, lambda: step_bench(report, cfg, device, start + args.budget_s, log, save)),
    ]
    for name, why_skipped, body in steps:
        run_step(report, name, skipped(why_skipped) if why_skipped else body, log, save)

    table = save()
    failed = [name for name, step in report["steps"].items() if step["status"] not in ("ok", "skipped")]
    log(f"done in {time.monotonic() - start:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    print("\n" + table, end="", flush=True)  # the table last: a cut-off stdout keeps its tail
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
