"""Compile every Triton kernel configuration for sm_80 and sm_90, no GPU needed.

Why this exists: the CPU test suite runs the kernels under the Triton interpreter, which
never lowers them to PTX, so a kernel that fails to compile for a real GPU, needs too much
shared memory, or spills registers to local memory would pass every CPU test. This tool
compiles each ``(kernel, signature, constexprs, num_warps)`` that a module in
``KERNEL_MODULES`` lists in its ``compile_configs()`` for each target architecture and
reports what the GPU would get: shared memory (Triton's metadata), registers and stack
frame (``cuobjdump --dump-resource-usage``) and spill bytes (the ``ptxas -v`` log Triton
writes while compiling; cuobjdump does not report spills).

    python -m llama_fast.compile_check [--arch 80 90] [--jobs N] [--json FILE]

Exits 1 if any configuration fails to compile, 2 if TRITON_INTERPRET is on (the
interpreter replaces the compiler, so there would be nothing to check).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

KERNEL_MODULES = (
    "llama_fast.kernels.rms_norm",
    "llama_fast.kernels.rope",
    "llama_fast.kernels.swiglu",
)
DEFAULT_ARCHS = (80, 90)


class InterpreterEnabledError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _configs(module: str) -> list:
    return list(importlib.import_module(module).compile_configs())


def _worker_init(cache_dir: str) -> None:
    # A private cache, always compiling: ptxas must run for every task or its log is lost.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def _cuobjdump_usage(cubin: bytes) -> dict:
    """Registers and stack frame from ``cuobjdump --dump-resource-usage``; "?" if unavailable."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
        return {"registers": int(regs), "stack": int(stack)}
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return {"registers": "?", "stack": "?"}


def _compile_one(task: tuple) -> dict:
    module, index, arch = task
    fn, signature, constexprs, num_warps = _configs(module)[index]
    result = {
        "module": module, "kernel": fn.__name__, "arch": arch, "constexprs": dict(constexprs),
        "num_warps": num_warps, "types": ",".join(dict.fromkeys(t[1:] for t in signature.values() if t[0] == "*")),
        "shared": None, "registers": "?", "stack": "?", "spill_stores": "?", "spill_loads": "?",
        "compile_s": None, "error": None,
    }
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        # Triton 3.6 wants every constexpr in the signature too, typed "constexpr".
        full_signature = dict(signature, **{name: "constexpr" for name in constexprs})
        src = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=constexprs)
        ptxas_log = io.StringIO()  # Triton prints it (TRITON_DUMP_PTXAS_LOG) after ptxas runs
        start = time.perf_counter()
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        result["compile_s"] = round(time.perf_counter() - start, 3)
        result["shared"] = int(compiled.metadata.shared)
        result.update(_cuobjdump_usage(compiled.asm["cubin"]))
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log.getvalue())
        if spills:
            result["spill_stores"], result["spill_loads"] = map(int, spills.groups())
    except Exception as e:  # noqa: BLE001 - any failure is a result to report, not a crash
        # Triton's CompilationError message already points at the kernel source line.
        result["error"] = "".join(traceback.format_exception_only(e)).strip()
    return result


def check(archs=DEFAULT_ARCHS, jobs: int | None = None, modules=KERNEL_MODULES) -> list[dict]:
    """Compile every configuration of ``modules`` for each arch; one dict per (config, arch),
    in module, config, arch order. A failure's exception message is in ``"error"``."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise InterpreterEnabledError(
            "TRITON_INTERPRET is set: the Triton interpreter replaces the compiler, so nothing can be "
            "compiled. Unset it (e.g. `env -u TRITON_INTERPRET python -m llama_fast.compile_check`).")
    tasks = [(m, i, arch) for m in modules for i in range(len(_configs(m))) for arch in archs]
    with tempfile.TemporaryDirectory(prefix="llama_fast_compile_check_") as cache_dir:
        # spawn: a fresh interpreter per worker, no forked LLVM/CUDA state.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs or os.cpu_count() or 1, initializer=_worker_init, initargs=(cache_dir,)) as pool:
            return pool.map(_compile_one, tasks, chunksize=1)


def format_table(results: list[dict]) -> str:
    def constexprs(r):
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items())

    header = ("kernel", "sm", "types", "constexprs", "warps", "smem", "regs", "stack", "spill st/ld")
    rows = [header] + [
        (r["kernel"], str(r["arch"]), r["types"], constexprs(r), str(r["num_warps"]),
         "FAILED" if r["error"] else str(r["shared"]), str(r["registers"]), str(r["stack"]),
         f"{r['spill_stores']}/{r['spill_loads']}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_fast.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as a JSON list")
    args = parser.parse_args(argv)
    try:
        results = check(args.arch, args.jobs)
    except InterpreterEnabledError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failures = [r for r in results if r["error"]]
    for r in failures:
        print(f"\nFAILED {r['kernel']} sm_{r['arch']} types={r['types']} {r['constexprs']} "
              f"num_warps={r['num_warps']}:\n{r['error']}", file=sys.stderr)
    spilling = sum(isinstance(r["spill_stores"], int) and r["spill_stores"] + r["spill_loads"] > 0 for r in results)
    print(f"\n{len(results)} configurations x archs: {len(failures)} failed, {spilling} spill registers",
          file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
