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
              Face's Llama modules are) and torch.compile of the same eager functions;
              then attention: flash_attn forward and backward against SDPA's flash, cuDNN
              and memory-efficient backends and compiled flex_attention, and flash_decode
              against SDPA (see "Attention" in bench/attention_cases.py)

Results go to --out, else $OUT, else bench/results/<gpu-name>-<date>/: gpu_check.json,
gpu_check.md (a table), gpu_check.log (this script's progress) and the two step logs. The
JSON and markdown are rewritten after every step and every row, so a run killed by an
outer time limit still leaves what it measured; --budget-s (from the script's start) makes
the benchmark skip what it has no time for instead.

Modules (all under bench/)
--------------------------
* gpu_check.py        this driver: the four steps, the benchmark's job list and budget, main
* cases.py            shapes, settings and the memory-bound CASES (inputs, eager references,
                      byte formulas)
* attention_cases.py  the attention and decode grids, FLOP/byte formulas, SDPA and
                      flex_attention baselines, repetition plans ("Attention" in its docstring)
* rows.py             one measured row per case, provider and pass
* timing.py           timers, peak memory and the ceilings ("How things are timed" there)
* report.py           gpu_check.json, gpu_check.md and the progress log

Order and budget
----------------
The attention and decode rows run after the memory-bound rows of llama_fast and eager,
and before the torch.compile rows; flex_attention comes last, so rows skipped for lack of
--budget-s are the compiled ones. A baseline that raises for a shape (another library's
kernel) gives a null row and an entry under the bench step's "unavailable" with the
reason, not a failure; a llama_fast error is a failure.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: sys.path[0] is bench/, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import site  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from bench import REPO  # noqa: E402
from bench.attention_cases import (  # noqa: E402, F401  (AttnShape ... decode_plan: tests reach them here)
    ATTN_MIN_REPS, ATTN_PROVIDERS, CUDA_ONLY, DECODE_MAX_CACHE_BYTES, DECODE_PROVIDERS, DECODE_ROTATE_BYTES,
    AttnShape, _flex, attn_empty_row, attn_flops, attn_reps, attn_shapes, decode_bytes, decode_plan, decode_shapes,
)
from bench.cases import CASES, DTYPE, GPU_SETTINGS, PROVIDERS, SMOKE_SETTINGS, Settings, empty_row  # noqa: E402
from bench.report import Log, _fmt, new_report, write_outputs  # noqa: E402
from bench.rows import attn_row, bench_row, decode_row, llama_fast_backend  # noqa: E402
from bench.timing import measure_ceilings  # noqa: E402

BENCH_RESERVE_S = 150  # the test run is cut short to leave the benchmark this much of --budget-s
ROW_RESERVE_S = 15  # a benchmark row is not started with less time left than this
COMPILE_RESERVE_S = 45  # nor a torch.compile row (its first call compiles)


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
    return measure_ceilings(report["ceilings"], device, warmup, reps)


# ---------------------------------------------------------------------------------------
# step 4: benchmarks


def step_bench(report, cfg: Settings, device, deadline: float, log: Log, save: Callable, smoke: bool = False) -> dict:
    info = {"status": "ok", "shapes": asdict(cfg.shapes), "timing": _timing_note(cfg, device), "errors": [],
            "skipped": [], "unavailable": [], "gqa": {}}
    try:
        info["llama_fast_backend"] = llama_fast_backend(device)
    except Exception as exc:
        info["llama_fast_backend"] = None
        info["errors"].append({"what": "import llama_fast", "error": f"{type(exc).__name__}: {exc}"})
    providers = [p for p in PROVIDERS if p != "torch.compile" or cfg.compile]
    ceilings = report["ceilings"]
    compiled: dict = {}

    def note_gqa(what: str) -> Callable[[str, str], None]:
        def note(provider: str, how: str) -> None:
            info["gqa"][what] = how
            if how != "enable_gqa":
                log(f"{what}: GQA by {how}")
        return note

    # Jobs: (what, empty row, reserve, body, baseline). A baseline (another library's
    # kernel) that raises for a shape is "unavailable", not a failure of this check.
    def case_job(case, pass_, provider):
        return (f"{case['op']} {pass_} {provider}", empty_row(case, pass_, provider, cfg.shapes),
                COMPILE_RESERVE_S if provider == "torch.compile" else ROW_RESERVE_S,
                lambda: bench_row(case, pass_, provider, cfg, device, ceilings, compiled), False)

    def attn_job(s, pass_, provider):
        what = f"attention {pass_} {provider} {s.label()}"
        return (what, attn_empty_row("attention", s, pass_, provider),
                COMPILE_RESERVE_S if provider == "flex_attention" else ROW_RESERVE_S,
                lambda: attn_row(s, pass_, provider, cfg, device, ceilings, note_gqa(what)), provider != "llama_fast")

    def decode_job(s, provider):
        what = f"decode fwd {provider} {s.label(decode=True)}"
        return (what, attn_empty_row("decode", s, "fwd", provider), ROW_RESERVE_S,
                lambda: decode_row(s, provider, cfg, device, ceilings, note_gqa(what)), provider != "llama_fast")

    # Order: llama_fast and eager for the memory-bound cases, then attention and decode
    # (no compiler), then torch.compile and flex_attention: if time runs short, the
    # slow-to-compile rows are the ones skipped.
    attn_providers = [p for p in ATTN_PROVIDERS
                      if p != "flex_attention" and (p not in CUDA_ONLY or device.type == "cuda")
                      and (p != "sdpa" or smoke)]
    jobs = [case_job(case, pass_, provider) for case in CASES for pass_ in case["bytes"] for provider in providers[:2]]
    prefill = attn_shapes(smoke)
    jobs += [attn_job(s, pass_, provider) for s in prefill for pass_ in ("fwd", "bwd") for provider in attn_providers]
    for s in decode_shapes(smoke):
        if decode_bytes(s, DTYPE.itemsize) > DECODE_MAX_CACHE_BYTES:
            what = f"decode {s.label(decode=True)}"
            info["unavailable"].append({"what": what, "why": f"cache over {DECODE_MAX_CACHE_BYTES / 1e9:.0f} GB"})
            log(f"skip {what}: K + V cache {decode_bytes(s, DTYPE.itemsize) / 1e9:.0f} GB over the "
                f"{DECODE_MAX_CACHE_BYTES / 1e9:.0f} GB limit")
            continue
        jobs += [decode_job(s, provider) for provider in DECODE_PROVIDERS]
    jobs += [case_job(case, pass_, provider) for case in CASES for pass_ in case["bytes"] for provider in providers[2:]]
    if cfg.compile and device.type == "cuda":
        try:
            _flex()
            jobs += [attn_job(s, pass_, "flex_attention") for s in prefill for pass_ in ("fwd", "bwd")]
        except Exception as exc:
            info["unavailable"].append({"what": "flex_attention", "why": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            log(f"skip flex_attention: unavailable: {type(exc).__name__}: {exc}")
    else:
        log("skip flex_attention: " + ("--smoke or --skip-compile" if not cfg.compile else "no GPU"))

    for what, empty, reserve, body, baseline in jobs:
        if time.monotonic() > deadline - reserve:
            info["skipped"].append(what)
            report["rows"].append(empty)
            log(f"skip {what}: out of time")
            continue
        start = time.monotonic()
        try:
            row = body()
            rate = (f"{row['tflops']:.4g} TFLOP/s" if row["tflops"] is not None else f"{_fmt(row['gbps'], '.0f')} GB/s")
            log(f"{what}: {row['ms']:.4f} ms, {rate} ({time.monotonic() - start:.1f} s)")
        except Exception as exc:
            row = empty
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if baseline:
                info["unavailable"].append({"what": what, "why": reason})
                log(f"{what}: UNAVAILABLE {reason}")
            else:
                info["errors"].append({"what": what, "error": reason})
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
        ("bench", None, lambda: step_bench(report, cfg, device, start + args.budget_s, log, save, args.smoke)),
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
