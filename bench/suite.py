"""The benchmark suite: ``python -m llama_fast bench`` (or ``python -m llama_fast.bench.suite``).

    python -m llama_fast bench [--ops rms_norm,attention,train,...] [--smoke] [--out FILE]
                               [--dtypes bf16,fp16] [--grid full|headline] [--budget-s S]

Builds one job per (op, shape, dtype, pass, provider) of the chosen grid (bench/grid.py,
bench/end_to_end.py), measures the ceilings first on a GPU (bench/timing.py), runs the
jobs with a progress bar on stderr (a line per job where stderr is not a terminal), and
writes FILE (the JSON), FILE's .md (the tables, also printed at the end) and PNG plots
beside it (bench/plots.py). --out may also name a folder: the files are then named as
bench/gpu_check.py names them (gpu_check.json, gpu_check.md), one results-folder layout
for both commands. Without --out: $OUT/bench.json, else
bench/results/<gpu>-<date>/bench.json.

Ops: rms_norm, add_rms_norm, rope (apply_rope), swiglu, swiglu_fused, cross_entropy (the
fused linear cross-entropy), attention, decode, train, infer. --smoke: tiny shapes, bf16, no torch.compile, no ceilings: a CPU check of the
harness (the Triton kernels under the interpreter) that takes well under a minute.

Order and budget: jobs run in tiers (``TIERS``): the memory-bound ops without a compiler,
then attention and decode, then the end-to-end rows, then everything torch.compile'd,
FlexAttention and the compiled HF model last; with --budget-s, a job is skipped (null row,
listed under "skipped") when too little time is left for it, so what is lost to a short
budget is the slow-to-compile rows. bench/gpu_check.py runs the ``headline`` grid this way.

Failures: a provider that cannot run here (not importable, no GPU, not built) gives null
rows and one "unavailable" entry with the reason; another library's kernel that raises for
one shape gives a null row and an "unavailable" entry for that row; an error in
llama_fast's own code, or in the eager references, is listed under "errors" and makes the
exit status 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llama_fast.bench import end_to_end as e2e
from llama_fast.bench import grid as grids
from llama_fast.bench.attention_cases import DECODE_MAX_CACHE_BYTES, attn_empty_row, decode_bytes
from llama_fast.bench.cases import CASES, DTYPES, GPU_SETTINGS, SMOKE_SETTINGS, Settings, dtype_name, empty_row
from llama_fast.bench.providers import (
    ATTN_PROVIDERS, CUDA_ONLY, DECODE_PROVIDERS, LLAMA_FAST, MEMORY_PROVIDERS, STATIC, import_reason, unavailable_reason,
)
from llama_fast.bench.report import Log, default_out_dir, new_report, resolve_commit, write_outputs
from llama_fast.bench.rows import attn_row, bench_row, decode_row
from llama_fast.bench.timing import measure_ceilings
from llama_fast.kernels import _autotune  # imports no triton

OP_ALIASES = {"rope": "apply_rope"}
MEMORY_OPS = tuple(case["op"] for case in CASES)
OPS = MEMORY_OPS + ("attention", "decode", "train", "infer")
ROW_RESERVE_S = 15  # a job is not started with less time left than this
COMPILE_RESERVE_S = 45  # nor a compiled one (its first call compiles)
E2E_RESERVE_S = 40  # nor an end-to-end one (a model is built)
E2E_COMPILE_RESERVE_S = 150  # nor the compiled HF model
# Providers whose errors are failures of this repository's code (the rest are baselines).
OURS = LLAMA_FAST + (STATIC, "eager", "torch.compile", "ref_eager") + tuple(e2e.PATCHED)
TIERS = ("memory-bound", "attention", "end-to-end", "compiled ops", "flex_attention", "compiled model")


@dataclass
class Job:
    """One timed measurement (one row, or two for inference) and how to report it."""

    what: str  # the progress label: op pass shape dtype provider
    empties: list[dict]  # its rows with null measurements (failed, skipped or unavailable)
    tier: int  # index into TIERS: the run order
    reserve_s: float  # not started with less budget left
    body: Callable[[], list[dict]] | None  # None: the provider cannot run here
    provider: str
    sizes: list[tuple] = field(default_factory=list)  # (op, shape, group, x, x label) for the plots


def canonical_ops(text: str | None) -> tuple[str, ...]:
    if not text:
        return OPS
    ops = tuple(OP_ALIASES.get(op.strip(), op.strip()) for op in text.split(",") if op.strip())
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {', '.join(OPS)} (rope = apply_rope)")
    return ops


def parse_dtypes(text: str) -> list[torch.dtype]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DTYPES))
    if unknown or not names:
        raise ValueError(f"unknown dtypes {unknown or text!r}; known: {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def _short(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# ---------------------------------------------------------------------------------------
# the jobs


@dataclass
class _Context:
    """What every job builder needs: the grid, the device, the settings, where to note things."""

    grid: str
    dtypes: list
    device: torch.device
    cfg: Settings
    ceilings: dict  # filled in by the ceilings step before the jobs run
    info: dict
    log: Callable
    reasons: dict = field(default_factory=dict)  # provider -> why it cannot run here (None: it can)
    compiled: dict = field(default_factory=dict)  # torch.compile wrappers, shared by the rows

    def gated(self, body: Callable, provider: str) -> Callable | None:
        """``body``, or None (null rows) when ``provider`` cannot run here; the reason is
        listed once in info["unavailable"]."""
        if provider not in self.reasons:
            why = self.reasons[provider] = _provider_reason(provider, self.device)
            if why:
                self.info["unavailable"].append({"what": provider, "why": why})
                self.log(f"{provider}: unavailable: {why}")
        return None if self.reasons[provider] else body


def _tier(name: str) -> int:
    return TIERS.index(name)


def build_jobs(ops, grid: str, dtypes, device, cfg: Settings, ceilings: dict, info: dict, log: Callable) -> list[Job]:
    """Every job of ``ops`` on ``grid``, in run order (``TIERS``, then the grid's order)."""
    ctx = _Context(grids.check_grid(grid), list(dtypes), device, cfg, ceilings, info, log)
    jobs = _memory_jobs(ctx, [c for c in CASES if c["op"] in ops])
    if "attention" in ops:
        jobs += _attention_jobs(ctx)
    if "decode" in ops:
        jobs += _decode_jobs(ctx)
    if "train" in ops:
        jobs += _train_jobs(ctx)
    if "infer" in ops:
        jobs += _infer_jobs(ctx)
    jobs.sort(key=lambda job: job.tier)  # stable: within a tier, the order above
    return jobs


def _memory_jobs(ctx: _Context, cases: list[dict]) -> list[Job]:
    """The memory-bound ops: every shape, dtype, pass (fwd, bwd, fwd+bwd) and provider."""
    providers = [p for p in MEMORY_PROVIDERS if p != "torch.compile" or ctx.cfg.compile]
    jobs = []
    for case in cases:
        passes = case.get("passes") or [
            p for p in grids.PASSES if p in case["bytes"] or (p == "fwd+bwd" and "bwd" in case["bytes"])]
        shapes = case["shapes"](ctx.grid) if "shapes" in case else grids.memory_shapes(ctx.grid)
        for s in shapes:
            for dtype in ctx.dtypes:
                for pass_ in passes:
                    for provider in providers:
                        if provider == "liger" and not _liger_has(case["op"]):
                            continue

                        def body(case=case, s=s, dtype=dtype, pass_=pass_, provider=provider):
                            return [bench_row(case, s, dtype, pass_, provider, ctx.cfg, ctx.device, ctx.ceilings,
                                              ctx.compiled)]
                        empty = empty_row(case, pass_, provider, s, dtype)
                        compiled = provider == "torch.compile"
                        size = grids.memory_size(case, s, pass_, dtype.itemsize)
                        jobs.append(Job(f"{case['op']} {pass_} {empty['shape']} {_short(dtype)} {provider}", [empty],
                                        _tier("compiled ops" if compiled else "memory-bound"),
                                        COMPILE_RESERVE_S if compiled else ROW_RESERVE_S,
                                        ctx.gated(body, provider), provider, [(case["op"], empty["shape"], *size)]))
    return jobs


def _attention_jobs(ctx: _Context) -> list[Job]:
    cuda = ctx.device.type == "cuda"
    # SDPA's own choice ("sdpa") is the baseline where the pinned backends are not (a CPU),
    # and in --smoke; FlexAttention needs the compiler.
    providers = [p for p in ATTN_PROVIDERS
                 if (cuda or p not in CUDA_ONLY) and (p != "sdpa" or not cuda or ctx.grid == "smoke")
                 and (p != "flex_attention" or ctx.cfg.compile)]
    note_gqa = _gqa_notes(ctx.info, ctx.log)
    jobs = []
    for s in grids.attention_shapes(ctx.grid):
        for dtype in ctx.dtypes:
            for pass_ in grids.PASSES:
                for provider in providers:
                    def body(s=s, dtype=dtype, pass_=pass_, provider=provider):
                        return [attn_row(s, dtype, pass_, provider, ctx.cfg, ctx.device, ctx.ceilings,
                                         note_gqa(provider))]
                    empty = attn_empty_row("attention", s, pass_, provider, dtype)
                    flex = provider == "flex_attention"
                    jobs.append(Job(f"attention {pass_} {empty['shape']} {_short(dtype)} {provider}", [empty],
                                    _tier("flex_attention" if flex else "attention"),
                                    COMPILE_RESERVE_S if flex else ROW_RESERVE_S, ctx.gated(body, provider), provider,
                                    [("attention", empty["shape"], *grids.attention_size(s))]))
    return jobs


def _decode_jobs(ctx: _Context) -> list[Job]:
    note_gqa = _gqa_notes(ctx.info, ctx.log)
    jobs = []
    for s in grids.decode_shapes(ctx.grid):
        for dtype in ctx.dtypes:
            if decode_bytes(s, dtype.itemsize) > DECODE_MAX_CACHE_BYTES:
                ctx.info["skipped"].append(f"decode {s.label(decode=True)}: cache over "
                                           f"{DECODE_MAX_CACHE_BYTES / 1e9:.0f} GB")
                continue
            for provider in DECODE_PROVIDERS:
                def body(s=s, dtype=dtype, provider=provider):
                    return [decode_row(s, dtype, provider, ctx.cfg, ctx.device, ctx.ceilings, note_gqa(provider))]
                empty = attn_empty_row("decode", s, "fwd", provider, dtype)
                jobs.append(Job(f"decode fwd {empty['shape']} {_short(dtype)} {provider}", [empty],
                                _tier("attention"), ROW_RESERVE_S, ctx.gated(body, provider), provider,
                                [("decode", empty["shape"], *grids.decode_size(s, dtype.itemsize))]))
    return jobs


def _train_jobs(ctx: _Context) -> list[Job]:
    """Training steps of whole bf16 models (bench/end_to_end.py), whatever --dtypes says."""
    warmup, reps = e2e.STEPS[ctx.grid]
    jobs = []
    for s in e2e.train_shapes(ctx.grid):
        for provider in e2e.TRAIN_PROVIDERS:
            compiled = provider == "hf_compile"
            if compiled and not ctx.cfg.compile:
                continue
            steps = warmup + (2 if compiled else 0)  # the first steps compile the forward and the backward

            def body(s=s, provider=provider, steps=steps):
                return [e2e.train_row(s, provider, ctx.device, ctx.ceilings, steps, reps)]
            empty = e2e.empty_train_row(s, provider)
            jobs.append(Job(f"train {empty['pass']} {empty['shape']} bf16 {provider}", [empty],
                            _tier("compiled model" if compiled else "end-to-end"),
                            E2E_COMPILE_RESERVE_S if compiled else E2E_RESERVE_S, ctx.gated(body, provider), provider,
                            [("train", empty["shape"], s.model, s.seqlen, "sequence length")]))
    return jobs


def _infer_jobs(ctx: _Context) -> list[Job]:
    """Prefill and decoding of the reference model, patched and not (bench/end_to_end.py)."""
    warmup, reps = e2e.STEPS[ctx.grid]
    passes = e2e.infer_passes(ctx.device)
    jobs = []
    for s in e2e.infer_shapes(ctx.grid):
        for provider in e2e.INFER_PROVIDERS:
            def body(s=s, provider=provider):
                return e2e.infer_rows(s, provider, ctx.device, ctx.ceilings, warmup, reps, e2e.DECODE_STEPS[ctx.grid],
                                      lambda what, why: _note_unavailable(ctx.info, ctx.log, what, why))
            empties = [e2e.empty_infer_row(s, pass_, provider) for pass_ in passes]
            jobs.append(Job(f"infer {'+'.join(passes)} {empties[0]['shape']} bf16 {provider}", empties,
                            _tier("end-to-end"), E2E_RESERVE_S, ctx.gated(body, provider), provider,
                            [("infer", empties[0]["shape"], f"{s.model} B{s.batch}", s.seqlen, "prompt length")]))
    return jobs


def _liger_has(op: str) -> bool:
    """Whether Liger-Kernel has a functional op for ``op`` (bench/providers.py liger_fn)."""
    return op != "swiglu_fused"


def _provider_reason(provider: str, device) -> str | None:
    if provider.startswith("hf_"):
        why = import_reason("transformers")
        if why:
            return why
        if provider == "hf_liger":
            return unavailable_reason("liger", device) or import_reason("liger_kernel.transformers")
        return None
    if provider == "ref_eager" or provider in e2e.PATCHED:
        return None
    return unavailable_reason(provider, device)


def _gqa_notes(info: dict, log: Callable) -> Callable[[str], Callable[[str, str], None]]:
    """How each SDPA backend got its GQA inputs (enable_gqa, or K/V expanded): info["gqa"]."""
    def for_provider(provider: str) -> Callable[[str, str], None]:
        def note(_provider: str, how: str) -> None:
            if info["gqa"].get(provider) != how:
                info["gqa"][provider] = how
                if how != "enable_gqa":
                    log(f"{provider}: GQA by {how}")
        return note
    return for_provider


def _note_unavailable(info: dict, log: Callable, what: str, why: str) -> None:
    info["unavailable"].append({"what": what, "why": why})
    log(f"{what}: UNAVAILABLE {why}")


# ---------------------------------------------------------------------------------------
# running them


def new_bench_info(cfg: Settings, device, grid: str) -> dict:
    clock = "CUDA events, GPU head start" if device.type == "cuda" else "wall clock"
    return {"status": "ok", "grid": grid,
            "timing": f"{clock}; median of {cfg.reps} after {cfg.warmup} warm-up; {cfg.n_sets} input sets rotated; "
                      "bwd = autograd.grad of a recorded forward (retain_graph); end to end: median step, wall clock",
            "errors": [], "skipped": [], "unavailable": [], "gqa": {},
            # the attention and decode configurations the autotuner resolved (tuned, or read
            # from its cache), with the candidates' times: kernels/_autotune.py history()
            "autotune": []}


def run_jobs(jobs: list[Job], report: dict, info: dict, deadline: float, log: Callable, save: Callable,
             progress: Callable[[int, int, str], None] | None = None) -> None:
    """Run ``jobs`` in order, appending their rows to report["rows"] and their plot sizes
    to report["sizes"]; skip what --budget-s leaves no time for; save after every job."""
    sizes = report.setdefault("sizes", {})
    for i, job in enumerate(jobs):
        for op, shape, group, x, x_label in job.sizes:
            sizes.setdefault(op, {"x_label": x_label, "shapes": {}})["shapes"][shape] = {"group": group, "x": x}
        if progress:
            progress(i + 1, len(jobs), job.what)
        if job.body is None:  # the provider's reason is in info["unavailable"] already
            report["rows"].extend(job.empties)
            continue
        if time.monotonic() > deadline - job.reserve_s:
            info["skipped"].append(job.what)
            report["rows"].extend(job.empties)
            log(f"skip {job.what}: out of time")
            continue
        start = time.monotonic()
        try:
            rows = job.body()
            log(f"{job.what}: " + "; ".join(_rate(r) for r in rows) + f" ({time.monotonic() - start:.1f} s)")
        except Exception as exc:
            rows = job.empties
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            ours = job.provider in OURS and type(exc).__name__ != "BackendUnavailableError"
            if ours:
                info["errors"].append({"what": job.what, "error": reason})
                log(f"{job.what}: FAILED {reason}\n{traceback.format_exc()}")
            else:
                _note_unavailable(info, log, job.what, reason)
        report["rows"].extend(rows)
        info["autotune"] = _autotune.history()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand back this job's cached blocks (eager's float32 temporaries are large)
        save()
    if info["errors"] or [s for s in info["skipped"] if "cache over" not in s]:
        info["status"] = "failed"


def _rate(row: dict) -> str:
    rate = f"{row['tflops']:.4g} TFLOP/s" if row["tflops"] is not None else (
        f"{row['gbps']:.4g} GB/s" if row["gbps"] is not None else "")
    return f"{row['ms']:.4g} ms {rate}".strip()


class Progress:
    """The progress display on ``stream`` (stderr). On a terminal, one bar redrawn in place,
    ``[#########...............]  12/80  41 s  rms_norm fwd ... triton``, which the log lines
    written through ``echo`` scroll above; elsewhere (a log file, CI) one plain line per
    job, ``[ 12/80] rms_norm fwd ... triton  (41 s)``."""

    WIDTH = 24

    def __init__(self, start: float, stream=None):
        self.start, self.stream = start, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = ""  # the bar of the current job on a terminal
        self.drawn = False  # whether the bar is on the last line now

    def __call__(self, i: int, n: int, what: str) -> None:
        elapsed = time.monotonic() - self.start
        if not self.tty:
            print(f"[{i:>{len(str(n))}}/{n}] {what}  ({elapsed:.0f} s)", file=self.stream, flush=True)
            return
        filled = self.WIDTH * (i - 1) // n  # jobs done before this one
        columns = shutil.get_terminal_size().columns
        self.bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {i}/{n}  {elapsed:.0f} s  {what}"[:columns - 1]
        self.stream.write(("\r\033[K" if self.drawn else "") + self.bar)
        self.stream.flush()
        self.drawn = True

    @property
    def echo(self):
        """A stream for the log: its lines go above the bar."""
        progress = self

        class Above:
            def write(self, text: str) -> None:
                if progress.drawn:
                    progress.stream.write("\r\033[K")
                progress.stream.write(text)
                progress.drawn = progress.tty and bool(progress.bar) and text.endswith("\n")
                if progress.drawn:
                    progress.stream.write(progress.bar)

            def flush(self) -> None:
                progress.stream.flush()

        return Above()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.bar, self.drawn = "", False


# ---------------------------------------------------------------------------------------
# the command


def parse_args(argv):
    p = argparse.ArgumentParser(prog="llama-fast bench", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", help=f"comma list of ops (default all): {','.join(OPS)} (rope = apply_rope)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, no torch.compile, no ceilings: a CPU check")
    p.add_argument("--out", type=Path, help="the JSON file (or a folder); .md and PNGs beside it")
    p.add_argument("--dtypes", help="comma list of bf16, fp16 (default bf16,fp16; bf16 with --smoke)")
    p.add_argument("--grid", choices=("full", "headline"), default="full", help="the sweep, or gpu_check's compact set")
    p.add_argument("--budget-s", type=float, default=None, help="wall time; jobs that do not fit are skipped")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile, FlexAttention, hf_compile")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots (they need matplotlib)")
    p.add_argument("--commit", help="commit to report (default: git rev-parse HEAD, else $LLAMA_FAST_COMMIT)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: the grid's setting)")
    p.add_argument("--reps", type=int, help="timed calls per row, the median reported (default: the grid's setting)")
    return p.parse_args(argv)


def output_paths(out: Path | None, device_name: str) -> tuple[Path, str]:
    """(folder, file stem) of the outputs: see the module docstring."""
    if out is None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else default_out_dir(device_name)
        return folder, "bench"
    if out.suffix == ".json":
        return out.parent, out.stem
    return out, "gpu_check"


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        os.environ.pop("TRITON_INTERPRET", None)  # on a GPU the kernels run compiled, never interpreted
    elif not args.smoke:
        print("llama-fast bench: no CUDA GPU here; the sweep needs one (use --smoke for a CPU check of the harness)",
              file=sys.stderr)
        return 2
    else:  # the Triton kernels under the interpreter (nothing has imported triton yet)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if on_gpu else "cpu")
    try:
        ops = canonical_ops(args.ops)
        dtypes = parse_dtypes(args.dtypes or ("bf16" if args.smoke else "bf16,fp16"))
    except ValueError as exc:
        print(f"llama-fast bench: {exc}", file=sys.stderr)
        return 2
    grid = "smoke" if args.smoke else args.grid
    settings = dict(SMOKE_SETTINGS if args.smoke else GPU_SETTINGS)
    settings.update({k: v for k, v in (("warmup", args.warmup), ("reps", args.reps)) if v is not None})
    cfg = Settings(**settings, compile=not (args.smoke or args.skip_compile))

    report = new_report(device, resolve_commit(args.commit))
    folder, stem = output_paths(args.out, report["device"])
    folder.mkdir(parents=True, exist_ok=True)
    progress = Progress(start)
    log = Log(folder / f"{stem}.log", echo=progress.echo)
    log(f"bench: {report['device']}, torch {report['torch']}, triton {report['triton']}, grid {grid}, "
        f"ops {','.join(ops)}, dtypes {','.join(map(dtype_name, dtypes))}, out {folder / stem}.json")

    def save() -> str:
        return write_outputs(folder, report, stem)

    if on_gpu and not args.smoke:
        ceiling_start = time.monotonic()
        try:
            report["steps"]["ceilings"] = measure_ceilings(report["ceilings"], device, cfg.warmup, max(10, cfg.reps // 2))
        except Exception as exc:
            report["steps"]["ceilings"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        report["steps"]["ceilings"]["seconds"] = round(time.monotonic() - ceiling_start, 1)
        log(f"ceilings: copy {report['ceilings']['copy_gbps']} GB/s, bf16 matmul {report['ceilings']['bf16_tflops']} TFLOP/s")
    else:
        report["steps"]["ceilings"] = {"status": "skipped", "why": "--smoke or no GPU", "seconds": 0.0}

    from llama_fast.bench.rows import llama_fast_backend

    info = new_bench_info(cfg, device, grid)
    info["llama_fast_backend"] = llama_fast_backend(device)
    report["steps"]["bench"] = info
    bench_start = time.monotonic()
    deadline = start + args.budget_s if args.budget_s else float("inf")
    jobs = build_jobs(ops, grid, dtypes, device, cfg, report["ceilings"], info, log)
    run_jobs(jobs, report, info, deadline, log, save, progress)
    progress.close()
    info["seconds"] = round(time.monotonic() - bench_start, 1)
    table = save()

    if not args.no_plots:
        from llama_fast.bench.plots import write_plots

        pngs = write_plots(report, folder, stem)
        if pngs is None:
            print("plots: matplotlib is not installed; no PNGs written (pip install matplotlib)", file=sys.stderr)
        else:
            log(f"plots: {len(pngs)} PNG files in {folder}")
    log(f"done in {time.monotonic() - start:.0f} s: {len(report['rows'])} rows, "
        f"{len(info['unavailable'])} unavailable, {len(info['skipped'])} skipped, {len(info['errors'])} errors")
    print(table, end="", flush=True)  # the table last: a cut-off stdout keeps its tail
    return 1 if info["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
