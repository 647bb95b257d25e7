#!/usr/bin/env python
"""On a machine with a CUDA GPU: install llama_fast, run the tests, benchmark, report.

    python scripts/gpu_check.py [--out DIR] [--smoke] [--skip-install] [--skip-tests]
                                [--skip-compile] [--commit SHA] [--budget-s S]

Steps, each timed and logged; a failing step is recorded and the later steps still run,
and the exit status is 1 if anything failed:

0. wheels     if the repository root has a .whl/ folder (for a machine without network:
              scripts/fetch_wheels.sh downloads Liger-Kernel there), ``pip install
              --no-index --no-deps --target /tmp/site .whl/*.whl``; /tmp/site then goes on
              sys.path and PYTHONPATH for the later steps
1. install    ``python -m pip install --no-build-isolation --no-deps -e .`` (which builds the
              CUDA extension from csrc/ where nvcc is present) -> install.log; the build's
              ptxas report -> _C.ptxas.txt, its most registers and spill bytes recorded
2. tests      ``python -m pytest tests -q`` on the GPU (no TRITON_INTERPRET), in two
              parts: ``-k "cuda and not emulator"`` first (the cuda backend), then
              ``-k "not cuda"``; killed after --tests-timeout seconds in all ->
              tests-cuda.log, tests-rest.log; passed/failed counts per part and summed
3. ceilings   a 1 GiB device-to-device copy (read + write bytes) -> copy_gbps, and a bf16
              8192^3 matmul -> bf16_tflops
4. bench      the ``headline`` grid of the benchmark suite (``llama_fast.bench.suite``) in
              bf16: every memory-bound op, attention and decode at Llama-3-8B shapes for
              every provider (llama_fast's triton and cuda backends, eager, torch.compile,
              Liger-Kernel, SDPA's backends, FlexAttention, flash-attn where importable),
              and end to end a Llama-3.2-1B training step and prefill + decode. Attention
              and decode run twice for llama_fast's Triton kernels: ``triton`` with the
              launch configurations the autotuner picks in this run (its first call per
              key tunes, into a fresh cache in DIR/autotune/ unless $LLAMA_FAST_CACHE_DIR
              is set) and ``triton_static`` with the static defaults, beside SDPA's flash
              and cuDNN backends; the summary lists each tuned key (chosen against
              default, the candidates timed and dropped, the seconds it took)
5. plots      PNGs of the rows (skipped with a notice without matplotlib)

Steps 0 and 1 need nothing of llama_fast; the benchmark modules are imported after them,
since before the install llama_fast may not be importable at all.

Printed last: the tables, then a short summary (steps, ceilings, and per case llama_fast's
time against the fastest other provider).

Results go to --out, else $OUT, else bench/results/<gpu-name>-<date>/ of this checkout:
gpu_check.json, gpu_check.md (the tables), gpu_check.log (this script's progress), the
step logs and the plots. The JSON and markdown are rewritten after every step and every
row, so a run killed by an outer time limit still leaves what it measured; --budget-s
(from the script's start) makes the benchmark skip what it has no time for instead: the
suite runs the compiled rows last. ``python scripts/bench_readme.py`` then writes the
newest results into README.md.
"""
from __future__ import annotations

import sys
from pathlib import Path
import argparse
import datetime
import importlib
import importlib.util
import os
import re
import signal
import site
import subprocess
import time
import traceback
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent  # the checkout this script installs and tests

# The test run is cut short to leave the benchmark this much of --budget-s: about what the
# headline grid's uncompiled tiers (ops, attention and decode, end to end) need on an H100,
# plus TUNE_RESERVE_S for the autotuner's first calls (compiling and timing up to 4
# configurations per attention kernel at 4 shapes, and per decode shape) and the
# triton_static rows. TUNE_RESERVE_S is an allowance, not a measurement: the report's
# "autotune" records give the seconds a GPU actually spent.
TUNE_RESERVE_S = 60
BENCH_RESERVE_S = 210 + TUNE_RESERVE_S
WHEEL_DIR = ".whl"  # optional wheels for a machine without network (scripts/fetch_wheels.sh)
WHEEL_SITE = Path("/tmp/site")


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


def step_wheels(out_dir: Path, timeout_s: float) -> dict:
    """Install the carried wheels into WHEEL_SITE and put it on sys.path and PYTHONPATH."""
    wheels = sorted((REPO / WHEEL_DIR).glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(WHEEL_SITE), *map(str, wheels)]
    code, timed_out = run_logged(cmd, out_dir / "wheels.log", timeout_s)
    if code == 0:
        if str(WHEEL_SITE) not in sys.path:
            sys.path.insert(0, str(WHEEL_SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WHEEL_SITE), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
    return {"status": "ok" if code == 0 else ("timeout" if timed_out else "failed"), "returncode": code,
            "wheels": [w.name for w in wheels], "log": "wheels.log"}


def step_install(out_dir: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    code, timed_out = run_logged(cmd, out_dir / "install.log", timeout_s)
    result = {"status": "ok" if code == 0 else ("timeout" if timed_out else "failed"), "returncode": code,
              "log": "install.log"}
    if code == 0:
        _activate_editable_install()
        result.update(ptxas_summary(REPO / "llama_fast" / "_C.ptxas.txt", out_dir))
    return result


def ptxas_summary(report: Path, out_dir: Path) -> dict:
    """The CUDA build's ptxas report (this machine's nvcc), copied to out_dir: its first line
    (build tool, nvcc, archs), the most registers of any kernel and the total spill bytes."""
    if not report.is_file():
        return {"cuda_build": None}
    text = report.read_text()
    (out_dir / report.name).write_text(text)
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
    return {"cuda_build": text.splitlines()[0] if text else None, "cuda_max_registers": max(registers, default=None),
            "cuda_spill_bytes": spills, "ptxas_report": report.name}


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


# The test run in two parts: the cuda backend first (every op test's cuda parameter, the
# extension's own tests, sanitizer and CUDA graphs: what only a GPU can check), then
# the rest, so a run cut short by its timeout has spent its time where it matters most. The
# CPU emulator's own tests (g++ builds of test programs) are CI's, not the GPU's.
TEST_PARTS = (("cuda", "cuda and not emulator"), ("rest", "not cuda"))


def step_tests(out_dir: Path, timeout_s: float, on_gpu: bool) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_FAST_CACHE_DIR", None)  # tests/conftest.py points it at a temporary folder
    if on_gpu:
        env.pop("TRITON_INTERPRET", None)  # the kernels must run compiled on the GPU
    # Every failure is worth seeing from one GPU run, so no -x; pytest-xdist (where
    # installed) spreads Triton's JIT compiles over the cores.
    base = [sys.executable, "-m", "pytest", "tests", "-q", "--maxfail=25", "-p", "no:cacheprovider"]
    if on_gpu and importlib.util.find_spec("xdist") is not None:
        base += ["-n", "8", "--dist", "loadgroup"]  # tests/test_large.py's big tensors: one worker
    deadline = time.monotonic() + timeout_s
    parts, totals = [], dict.fromkeys(sorted(set(PYTEST_WORDS.values())), 0)
    for name, keyword in TEST_PARTS:
        log = f"tests-{name}.log"
        code, timed_out = run_logged([*base, "-k", keyword], out_dir / log, deadline - time.monotonic(), env)
        counts = parse_pytest((out_dir / log).read_text(errors="replace"))
        # pytest exits 5 when -k selects nothing (no test names cuda without the extension)
        status = "ok" if code in (0, 5) else ("timeout" if timed_out else "failed")
        parts.append({"part": name, "keyword": keyword, "status": status, "returncode": code, "log": log, **counts})
        for key in totals:
            totals[key] += counts[key]
    worst = next((p["status"] for p in parts if p["status"] != "ok"), "ok")
    return {"status": worst, "timeout_s": timeout_s, "parts": parts, **totals}


# ---------------------------------------------------------------------------------------
# step 3: ceilings


def step_ceilings(report: dict, device: torch.device, warmup: int, reps: int) -> dict:
    from llama_fast.bench.timing import measure_ceilings

    return measure_ceilings(report["ceilings"], device, warmup, reps)


# ---------------------------------------------------------------------------------------
# steps 4 and 5: benchmarks and plots


def step_bench(report, cfg: Settings, device, deadline: float, log: Log, save: Callable, smoke: bool = False) -> dict:
    """The suite's headline grid (smoke: its smoke grid), bf16, every op, in its tier order."""
    from llama_fast.bench import suite
    from llama_fast.bench.rows import llama_fast_backend

    grid = "smoke" if smoke else "headline"
    info = suite.new_bench_info(cfg, device, grid)
    report["steps"]["bench"] = info  # filled in as the rows come, so every save shows it
    try:
        info["llama_fast_backend"] = llama_fast_backend(device)
    except Exception as exc:
        info["llama_fast_backend"] = None
        info["errors"].append({"what": "import llama_fast", "error": f"{type(exc).__name__}: {exc}"})
    jobs = suite.build_jobs(suite.OPS, grid, [torch.bfloat16], device, cfg, report["ceilings"], info, log)
    suite.run_jobs(jobs, report, info, deadline, log, save)
    return info


def step_plots(report: dict, out_dir: Path) -> dict:
    from llama_fast.bench.plots import write_plots

    pngs = write_plots(report, out_dir, "gpu_check")
    if pngs is None:
        return {"status": "skipped", "why": "matplotlib is not installed"}
    return {"status": "ok", "files": [p.name for p in pngs]}


# ---------------------------------------------------------------------------------------
# driver


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


def timed_step(body: Callable[[], dict], log: Callable[[str], None]) -> dict:
    """Run one step: its outcome (or the exception) and its time."""
    start = time.monotonic()
    try:
        result = body()
    except Exception as exc:
        log(traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {**result, "seconds": round(time.monotonic() - start, 1)}


def run_step(report: dict, name: str, body: Callable[[], dict], log, save: Callable) -> None:
    """Run one step into report["steps"], logged, and save the report."""
    log(f"== {name}")
    report["steps"][name] = timed_step(body, log)
    log(f"== {name}: {report['steps'][name]['status']}")
    save()


def default_out_dir(device_name: str) -> Path:
    """$OUT, else this checkout's bench/results/<gpu>-<date>/."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    return REPO / "bench" / "results" / f"{slug}-{datetime.date.today().isoformat()}"


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        # Before anything imports triton: on a GPU the kernels run compiled, never interpreted.
        os.environ.pop("TRITON_INTERPRET", None)
    device = torch.device("cuda" if on_gpu else "cpu")
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    out_dir = args.out or default_out_dir(device_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The benchmark's autotuner starts from an empty cache, kept with the results (the
    # tests get a cache folder of their own: step_tests).
    os.environ.setdefault("LLAMA_FAST_CACHE_DIR", str(out_dir / "autotune"))

    def remaining() -> float:
        return args.budget_s - (time.monotonic() - start)

    def skipped(why: str) -> Callable[[], dict]:
        return lambda: {"status": "skipped", "why": why}

    # The wheels and the install come first: until the install, llama_fast (and with it the
    # benchmark modules this script reports with) may not be importable at all.
    has_wheels = any((REPO / WHEEL_DIR).glob("*.whl"))
    early = [
        ("wheels", "--smoke" if args.smoke else (None if has_wheels else f"no {WHEEL_DIR}/*.whl"),
         lambda: step_wheels(out_dir, 120.0)),
        ("install", "--smoke or --skip-install" if args.smoke or args.skip_install else None,
         lambda: step_install(out_dir, max(10.0, min(args.install_timeout, remaining())))),
    ]
    early_steps = {}
    for name, why_skipped, body in early:
        early_steps[name] = timed_step(skipped(why_skipped) if why_skipped else body, print)

    from llama_fast.bench.cases import GPU_SETTINGS, SMOKE_SETTINGS, Settings
    from llama_fast.bench.report import Log, new_report, resolve_commit, summary, write_outputs

    settings = dict(SMOKE_SETTINGS if args.smoke else GPU_SETTINGS)
    settings.update({k: v for k, v in (("warmup", args.warmup), ("reps", args.reps)) if v is not None})
    cfg = Settings(**settings, compile=not (args.smoke or args.skip_compile))
    report = new_report(device, resolve_commit(args.commit))
    report["steps"].update(early_steps)
    log = Log(out_dir / "gpu_check.log")
    log(f"gpu_check: {report['device']}, torch {report['torch']}, triton {report['triton']}, out {out_dir}")
    for name, step in early_steps.items():
        log(f"== {name}: {step['status']}")

    def save() -> str:
        return write_outputs(out_dir, report)

    # (step, why it is skipped or None, what it runs)
    steps = [
        # The test run is cut short if it would eat into the benchmark's share of the budget.
        ("tests", "--smoke or --skip-tests" if args.smoke or args.skip_tests else None,
         lambda: step_tests(out_dir, max(10.0, min(args.tests_timeout, remaining() - BENCH_RESERVE_S)), on_gpu)),
        ("ceilings", "--smoke or no GPU" if args.smoke or not on_gpu else None,
         lambda: step_ceilings(report, device, cfg.warmup, max(10, cfg.reps // 2))),
        ("bench", None, lambda: step_bench(report, cfg, device, start + args.budget_s, log, save, args.smoke)),
        ("plots", None, lambda: step_plots(report, out_dir)),
    ]
    for name, why_skipped, body in steps:
        run_step(report, name, skipped(why_skipped) if why_skipped else body, log, save)

    table = save()
    failed = [name for name, step in report["steps"].items() if step["status"] not in ("ok", "skipped")]
    log(f"done in {time.monotonic() - start:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    # The table, then the summary last: a stdout cut to its tail keeps the summary.
    print("\n" + table + "\n" + summary(report), end="", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
