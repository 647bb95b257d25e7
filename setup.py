"""Build script for llama_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and the
benchmark suite in ``bench/``; both ship inside the package, as ``llama_fast.kernels`` and
``llama_fast.bench``. Neither folder has an ``__init__.py``: with the repository root on
sys.path (``python -m ...`` from the root does that), a top-level package named ``kernels``
would hide Hugging Face's ``kernels`` distribution, which transformers imports. As folders
without ``__init__.py`` they are at most namespace portions, which any installed package of
the same name wins over; ``llama_fast`` is the only package importable from the root.

The CUDA C++ extension ``llama_fast._C`` (sources in ``csrc/``) is built whenever nvcc is
found ($CUDA_HOME/bin/nvcc, else nvcc on PATH); without nvcc, or with LLAMA_FAST_NO_CUDA=1,
the package installs without it and the Triton kernels serve. The extension does not link
libtorch (the C++ side takes raw pointers, sizes, strides and the stream), so the build
needs no torch and one build serves every torch version. nvcc compiles each ``.cu`` file,
the host compiler the pybind11 bindings, and nvcc links the module with the CUDA runtime
linked statically. ninja (a build requirement in pyproject.toml) runs the compiles in
parallel and reruns only what a changed source, header or flag affects; without ninja
(``--no-build-isolation`` in an environment that lacks it) the same commands run one at a
time.

Settings (environment variables)
  LLAMA_FAST_NO_CUDA=1        skip the extension
  LLAMA_FAST_CUDA_ARCHS       ";"-separated compute capabilities, default "80;90;90a"
                              (sm_90a: the arch-specific Hopper target that wgmma/TMA code
                              needs); PTX for the newest plain arch is embedded too, so
                              later GPUs JIT-compile it
  LLAMA_FAST_WERROR=1         warnings in our sources are errors (CI sets it)
  LLAMA_FAST_BUILD_JOBS       parallel compile jobs (ninja -j; default: ninja's)

Next to the module the build leaves ``_C.ptxas.txt``: ptxas's report of registers, shared
memory and spills for every kernel, after a first line naming the build tool, nvcc and
the archs (tests/test_cuda_backend.py reads it).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
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
    raw = os.environ.get("LLAMA_FAST_CUDA_ARCHS", "80;90;90a")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(re.fullmatch(r"\d+a?", a) for a in archs):
        raise SystemExit(f"LLAMA_FAST_CUDA_ARCHS must list compute capabilities such as '80;90;90a', got {raw!r}")
    return sorted(set(archs), key=lambda a: (int(a.rstrip("a")), a))


def ptx_arch(archs: list[str]) -> str:
    """The arch whose PTX is embedded for later GPUs to JIT-compile: the newest plain one
    (arch-specific "a" targets such as sm_90a run on that arch only, their PTX too)."""
    plain = [a for a in archs if not a.endswith("a")]
    return plain[-1] if plain else archs[-1].rstrip("a")


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def find_ninja() -> str | None:
    try:  # the ninja wheel (a build requirement) puts its binary in the build environment
        import ninja

        binary = Path(ninja.BIN_DIR) / "ninja"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("ninja")


# The build rules as shell commands (ninja runs each with /bin/sh -c and shell-quotes $in
# and $out). An nvcc compile's output, ptxas's report of every kernel, goes to $out.log and
# is shown only when the compile fails; the depfiles make a header change rebuild its users.
RULES = {
    "nvcc": "$nvcc $nvcc_flags -MMD -MF $out.d -c $in -o $out > $out.log 2>&1 || { cat $out.log; exit 1; }",
    "cxx": "$cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
    "link": "$nvcc -shared -cudart static $gencode -o $out $in",
}


def ninja_file(variables: dict[str, list[str]], edges: list[tuple[str, Path, list[Path]]]) -> str:
    """build.ninja for the (rule, output, inputs) edges; ninja reruns an edge when an input
    or a header named in its depfile is newer, or when its command line changed."""
    def path(p: Path) -> str:
        return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

    lines = ["ninja_required_version = 1.3"]
    lines += [f"{name} = " + shlex.join(value).replace("$", "$$") for name, value in variables.items()]
    for rule, command in RULES.items():
        lines += [f"rule {rule}", f"  command = {command}", f"  description = {rule} $out"]
        if "$out.d" in command:
            lines += ["  depfile = $out.d", "  deps = gcc"]
    lines += [f"build {path(out)}: {rule} " + " ".join(map(path, inputs)) for rule, out, inputs in edges]
    return "\n".join(lines) + "\n"


def expand(command: str, variables: dict[str, list[str]], out: Path, inputs: list[Path]) -> str:
    """One rule's shell command with its variables filled in, as ninja would run it."""
    values = {name: shlex.join(value) for name, value in variables.items()}
    values.update(out=shlex.quote(str(out)), **{"in": shlex.join(map(str, inputs))})
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], command)


class BuildCudaExtension(build_ext):
    """Compiles csrc/ into llama_fast._C with ninja: nvcc for each .cu, the host compiler
    for bindings.cpp, nvcc for the link."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement (pyproject.toml), imported only when building

        nvcc = find_nvcc()
        archs = cuda_archs()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(self.build_temp).resolve() / "csrc"
        work.mkdir(parents=True, exist_ok=True)
        werror = os.environ.get("LLAMA_FAST_WERROR", "0") not in ("", "0")
        warn = ["-Wall", "-Wextra"] + (["-Werror"] if werror else [])
        includes = ["-I" + str(CSRC), "-isystem", pybind11.get_include(), "-isystem", sysconfig.get_paths()["include"]]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{ptx_arch(archs)},code=compute_{ptx_arch(archs)}")
        nvcc_flags = ["-std=c++17", "-O3", "-I" + str(CSRC), "-Xcompiler", ",".join(["-fPIC", "-fvisibility=hidden"] + warn),
                      "--resource-usage", *gencode] + (["-Werror", "all-warnings"] if werror else [])
        defines = [f'-DLLAMA_FAST_CUDA_ARCHS="{";".join(archs)}"', f'-DLLAMA_FAST_NVCC_VERSION="{nvcc_version(nvcc)}"']
        cxx_flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", *warn, *includes, *defines]
        variables = {"nvcc": [nvcc], "cxx": [os.environ.get("CXX", "c++")], "nvcc_flags": nvcc_flags,
                     "cxx_flags": cxx_flags, "gencode": gencode}
        edges = [("nvcc", work / (src.stem + ".o"), [src]) for src in sorted(CSRC.glob("*.cu"))]
        edges.append(("cxx", work / "bindings.o", [CSRC / "bindings.cpp"]))
        edges.append(("link", target, [out for _, out, _ in edges]))

        ninja = find_ninja()
        if ninja:
            (work / "build.ninja").write_text(ninja_file(variables, edges))
            jobs = os.environ.get("LLAMA_FAST_BUILD_JOBS")
            self._run([ninja, "-C", str(work), *(["-j", jobs] if jobs else [])])
            tool = f"ninja {subprocess.run([ninja, '--version'], capture_output=True, text=True).stdout.strip()}"
        else:  # the same commands, one at a time (ninja is a build requirement; this is --no-build-isolation without it)
            print("llama_fast: ninja not found (pip install ninja): compiling the CUDA extension one file at a time")
            for rule, out, inputs in edges:
                self._run(["sh", "-c", expand(RULES[rule], variables, out, inputs)])
            tool = "sequential compiles (no ninja)"

        # ptxas's report (registers, shared memory, spills) of each .cu, beside the module in
        # the wheel and in the source package (where an editable install's module lands).
        reports = [out.with_name(out.name + ".log") for rule, out, _ in edges if rule == "nvcc"]
        text = f"# llama_fast._C built by {tool}, nvcc {nvcc_version(nvcc)}, archs {';'.join(archs)}\n"
        text += "".join(f"# {r.name.split('.')[0]}.cu\n" + r.read_text() for r in reports)
        for folder in {target.parent, ROOT / "llama_fast"}:
            (folder / "_C.ptxas.txt").write_text(text)
        warnings = [line for line in text.splitlines() if "warning" in line.lower()]
        if warnings:
            print("\n".join(warnings), file=sys.stderr)

    @staticmethod
    def _run(cmd: list[str]) -> None:
        print("llama_fast:", shlex.join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            raise SystemExit("llama_fast: building the CUDA extension failed (the error is above; set "
                             "LLAMA_FAST_NO_CUDA=1 to install without it)")


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
    packages=["llama_fast", "llama_fast.ops", "llama_fast.kernels", "llama_fast.bench"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels", "llama_fast.bench": "bench"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildCudaExtension},
)
