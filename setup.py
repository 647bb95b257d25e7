"""Build script for llama_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and ship
inside the package as ``llama_fast.kernels`` (a top-level ``kernels`` module would clash
with an unrelated PyPI package of that name).

The CUDA C++ extension ``llama_fast._C`` (sources in ``csrc/``) is built whenever nvcc is
found ($CUDA_HOME/bin/nvcc, else nvcc on PATH); without nvcc, or with LLAMA_FAST_NO_CUDA=1,
the package installs without it and the Triton kernels serve. The extension does not link
libtorch (the C++ side takes raw pointers, sizes, strides and the stream), so the build
needs no torch and one build serves every torch version. nvcc compiles each ``.cu`` file,
the host compiler the pybind11 bindings, and nvcc links the module with the CUDA runtime
linked statically. The compiles run in parallel, one thread per job (what ninja -j would
do, without a build-time dependency and with each job's ptxas report kept), and only
those whose object is older than its source or a header rerun.

Settings (environment variables)
  LLAMA_FAST_NO_CUDA=1        skip the extension
  LLAMA_FAST_CUDA_ARCHS       ";"-separated compute capabilities, default "80;90"; PTX for
                              the newest is embedded too, so later GPUs JIT-compile it
  LLAMA_FAST_WERROR=1         warnings in our sources are errors (CI sets it)
  LLAMA_FAST_BUILD_JOBS       parallel compile jobs (default: CPU count)

Next to the module the build leaves ``_C.ptxas.txt``: ptxas's report of registers, shared
memory and spills for every kernel (tests/test_cuda_build.py reads it).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_archs() -> list[str]:
    raw = os.environ.get("LLAMA_FAST_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"LLAMA_FAST_CUDA_ARCHS must list compute capabilities such as '80;90', got {raw!r}")
    return sorted(set(archs), key=int)


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


class BuildCudaExtension(build_ext):
    """Compiles csrc/ into llama_fast._C: nvcc for .cu, the host compiler for bindings.cpp."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement (pyproject.toml), imported only when building

        nvcc = find_nvcc()
        archs = cuda_archs()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        work = Path(self.build_temp).resolve() / "csrc"
        work.mkdir(parents=True, exist_ok=True)
        werror = os.environ.get("LLAMA_FAST_WERROR", "0") not in ("", "0")
        warn = ["-Wall", "-Wextra"] + (["-Werror"] if werror else [])
        includes = ["-I" + str(CSRC), "-isystem", pybind11.get_include(), "-isystem", sysconfig.get_paths()["include"]]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        nvcc_flags = ["-std=c++17", "-O3", "-I" + str(CSRC), "-Xcompiler", ",".join(["-fPIC", "-fvisibility=hidden"] + warn),
                      "--resource-usage", *gencode] + (["-Werror", "all-warnings"] if werror else [])
        cxx = os.environ.get("CXX", "c++")
        defines = [f'-DLLAMA_FAST_CUDA_ARCHS="{";".join(archs)}"', f'-DLLAMA_FAST_NVCC_VERSION="{nvcc_version(nvcc)}"']
        cxx_flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", *warn, *includes, *defines]

        jobs = []  # (output, command, ptxas report or None)
        for src in sorted(CSRC.glob("*.cu")):
            obj = work / (src.stem + ".o")
            jobs.append((obj, [nvcc, *nvcc_flags, "-c", str(src), "-o", str(obj)], work / (src.stem + ".ptxas.txt")))
        bindings = work / "bindings.o"
        jobs.append((bindings, [cxx, *cxx_flags, "-c", str(CSRC / "bindings.cpp"), "-o", str(bindings)], None))
        self._compile_all(jobs)

        target.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", "-cudart", "static", *gencode, "-o", str(target), *(str(j[0]) for j in jobs)]
        self._run(link, "link")
        # Beside the module in the wheel, and in the source package (where an editable
        # install's module lands).
        report = "".join(j[2].read_text() for j in jobs if j[2] is not None)
        for folder in {target.parent, ROOT / "llama_fast"}:
            (folder / "_C.ptxas.txt").write_text(report)

    def _compile_all(self, jobs) -> None:
        # ptxas reports registers and spills on stderr; each compile's stderr is kept.
        parallel = int(os.environ.get("LLAMA_FAST_BUILD_JOBS") or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            failures = [f for f in pool.map(self._compile_one, jobs) if f]
        if failures:
            raise SystemExit("llama_fast: building the CUDA extension failed (set LLAMA_FAST_NO_CUDA=1 to install "
                             "without it):\n" + "\n".join(failures))

    @staticmethod
    def _compile_one(job) -> str | None:
        obj, cmd, report = job
        inputs = [Path(cmd[cmd.index("-c") + 1]), *CSRC.glob("*.h"), *CSRC.glob("*.cuh"), ROOT / "setup.py"]
        cmd_file = obj.with_suffix(".cmd")  # a change of flags (archs, -Werror) rebuilds too
        fresh = obj.exists() and (report is None or report.exists())
        fresh = fresh and cmd_file.exists() and cmd_file.read_text() == shlex.join(cmd)
        if fresh and obj.stat().st_mtime > max(p.stat().st_mtime for p in inputs):
            return None  # up to date
        print("llama_fast:", shlex.join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if report is not None:
            report.write_text(f"# {obj.stem}.cu\n" + done.stderr)
        if done.returncode:
            return f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}"
        cmd_file.write_text(shlex.join(cmd))
        warnings = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
        if warnings:
            print("\n".join(warnings), file=sys.stderr)
        return None

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        print("llama_fast:", shlex.join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama_fast: {what} of the CUDA extension failed:\n$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}")


def extensions() -> list[Extension]:
    if os.environ.get("LLAMA_FAST_NO_CUDA", "0") not in ("", "0"):
        print("llama_fast: LLAMA_FAST_NO_CUDA is set: installing without the CUDA extension (Triton kernels serve)")
        return []
    if find_nvcc() is None:
        print("llama_fast: nvcc not found (set CUDA_HOME or put nvcc on PATH): installing without the CUDA "
              "extension; the Triton kernels serve")
        return []
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))] + ["csrc/bindings.cpp"]
    return [Extension("llama_fast._C", sources=sources)]


setup(
    packages=["llama_fast", "llama_fast.ops", "llama_fast.kernels"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildCudaExtension},
)
