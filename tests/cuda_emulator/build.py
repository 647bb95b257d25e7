"""Builds the CPU emulator of the CUDA kernels: every csrc/*.cu compiled as host C++ against
cuda_emu.h (see its header comment), plus csrc/bindings.cpp, into the Python module
``_C_emu`` that the test-only cuda backend of backend.py loads (tests/conftest.py registers it).

    python tests/cuda_emulator/build.py [out_dir]     # prints the module's path

Builds are cached under ``build/cuda_emulator/<hash>`` (build/ is git-ignored) by a hash of
the sources, the flags, the compiler and the Python version, so repeated test runs do not
rebuild. ``LLAMA_FAST_EMULATE_ASAN=1`` builds with AddressSanitizer and UBSan (local
debugging: run python with ``LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++
-print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0``).
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
MODULE = "_C_emu"
CXX = os.environ.get("CXX", "g++")


class BuildError(RuntimeError):
    pass


def asan() -> bool:
    return os.environ.get("LLAMA_FAST_EMULATE_ASAN", "0") not in ("", "0")


def common_flags() -> list[str]:
    flags = ["-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-Wall",
             "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable", "-Wno-unused-but-set-variable",
             "-pthread"]
    if asan():
        flags += ["-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    return flags


def emulated_flags() -> list[str]:
    """Flags for the CUDA sources (and the emulator's own tests) compiled as host C++.
    -fsanitize=alignment: a misaligned typed access throws (cuda_emu.cpp), as a GPU traps."""
    flags = common_flags() + ["-DLLAMA_FAST_EMULATE", "-include", str(HERE / "cuda_emu.h"), f"-I{HERE / 'include'}",
                              f"-I{CSRC}"]
    if asan():
        return flags + ["-DLLAMA_FAST_EMULATE_UBSAN_RUNTIME"]
    return flags + ["-fsanitize=alignment"]


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise BuildError("the CUDA emulator needs pybind11 (pip install pybind11, or the 'test' extra)") from exc
    return pybind11.get_include()


def binding_flags() -> list[str]:
    return common_flags() + [
        f"-I{CSRC}", f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}",
        f"-DLLAMA_FAST_MODULE_NAME={MODULE}", '-DLLAMA_FAST_CUDA_ARCHS="emulated"',
        '-DLLAMA_FAST_NVCC_VERSION="emulated"', "-fvisibility=hidden",
    ]


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"the CUDA emulator needs a C++17 compiler ({CXX}): {exc}") from exc


def _digest() -> str:
    h = hashlib.sha256()
    files = sources() + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")) + [CSRC / "bindings.cpp"]
    files += sorted(HERE.glob("*.h")) + sorted(HERE.glob("*.cpp")) + sorted((HERE / "include").glob("*.h"))
    files.append(Path(__file__))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(emulated_flags() + binding_flags()).encode())
    h.update(_compiler_version().encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compiling for the CUDA emulator failed:\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def compile_objects(jobs: list[list[str]]) -> None:
    """Runs the compile commands in parallel, one process each."""
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(_run, cmd) for cmd in jobs]:
            future.result()


def build(out_dir: str | os.PathLike | None = None) -> Path:
    """Builds (or finds in the cache) the emulator module; returns the module file's path."""
    base = Path(out_dir) if out_dir is not None else ROOT / "build" / "cuda_emulator"
    target_dir = base / (_digest() + ("-asan" if asan() else ""))
    module = target_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if module.exists():
        return module
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test runs)
        if module.exists():
            return module
        tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=base))
        try:
            objects, jobs = [], []
            for src in sources():
                obj = tmp / (src.stem + ".o")
                jobs.append([CXX, *emulated_flags(), "-x", "c++", "-c", str(src), "-o", str(obj)])
                objects.append(obj)
            obj = tmp / "cuda_emu.o"
            jobs.append([CXX, *emulated_flags(), "-c", str(HERE / "cuda_emu.cpp"), "-o", str(obj)])
            objects.append(obj)
            obj = tmp / "bindings.o"
            jobs.append([CXX, *binding_flags(), "-c", str(CSRC / "bindings.cpp"), "-o", str(obj)])
            objects.append(obj)
            compile_objects(jobs)
            linked = tmp / module.name
            _run([CXX, "-shared", *common_flags(), *map(str, objects), "-o", str(linked)])
            staged = tmp / "staged"
            staged.mkdir()
            linked.rename(staged / module.name)
            if target_dir.exists():
                shutil.rmtree(target_dir)
            staged.rename(target_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return module


def build_program(source: Path, out: Path) -> Path:
    """An executable from a C++ test source of the emulator (tests/cuda_emulator/*_test.cpp)
    that includes csrc headers and runs kernels through the emulator."""
    out.parent.mkdir(parents=True, exist_ok=True)
    objects = [out.with_suffix(".main.o"), out.with_suffix(".emu.o")]
    compile_objects([
        [CXX, *emulated_flags(), "-x", "c++", "-c", str(source), "-o", str(objects[0])],
        [CXX, *emulated_flags(), "-c", str(HERE / "cuda_emu.cpp"), "-o", str(objects[1])],
    ])
    _run([CXX, *common_flags(), *map(str, objects), "-o", str(out)])
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
