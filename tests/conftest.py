"""Test set-up: on a machine without CUDA the Triton kernels run under the Triton
interpreter, which must be switched on before anything imports triton (transformers and
torch._inductor do), so this runs first, at collection.

Without CUDA, the CUDA C++ kernels run too: under the CPU emulator of tests/cuda_emulator
(the same csrc/ sources compiled as host C++), built here once (cached under
build/cuda_emulator) and named by LLAMA_FAST_CUDA_EMULATOR before tests/_helpers.py asks
which backends can run. LLAMA_FAST_NO_EMULATOR=1 skips it; a failed build fails the run."""
import importlib.util
import os
import sys
import zlib
from pathlib import Path

import torch


def emulator_build_module():
    """tests/cuda_emulator/build.py, imported under a name no installed package uses."""
    name = "llama_fast_cuda_emulator_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "cuda_emulator" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("LLAMA_FAST_NO_EMULATOR", "0") in ("", "0") and not os.environ.get("LLAMA_FAST_CUDA_EMULATOR"):
        os.environ["LLAMA_FAST_CUDA_EMULATOR"] = str(emulator_build_module().build())  # raises (loudly) when it fails

import pytest  # noqa: E402

from llama_fast import _alloc  # noqa: E402

# Fresh inputs every run; the seed is printed in the header so a failure can be replayed
# with LLAMA_FAST_TEST_SEED=<seed>.
RUN_SEED = int(os.environ.get("LLAMA_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_terminal_summary(terminalreporter):
    # pytest -q drops the header: repeat the seed at the end, where a failure is read.
    terminalreporter.write_line(f"llama_fast: LLAMA_FAST_TEST_SEED={RUN_SEED}")


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    emulator = os.environ.get("LLAMA_FAST_CUDA_EMULATOR", "")
    return (f"llama_fast: LLAMA_FAST_TEST_SEED={RUN_SEED}, TRITON_INTERPRET={interp}, cuda={torch.cuda.is_available()}, "
            f"LLAMA_FAST_CUDA_EMULATOR={emulator or '(off)'}")


# Tests of the real extension and of the benchmarks, which must not see the emulator (it
# is a test device for the kernels' numerics, not a backend to benchmark or to install).
WITHOUT_EMULATOR = {"test_cuda_backend", "test_bench", "test_gpu_check"}


@pytest.fixture(autouse=True, scope="module")
def emulator_only_for_kernel_tests(request):
    """Module scope: before the modules' own module-scoped fixtures (which run benchmarks)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.module.__name__ in WITHOUT_EMULATOR:
            mp.delenv("LLAMA_FAST_CUDA_EMULATOR", raising=False)
        yield


@pytest.fixture(autouse=True)
def fresh_seed_and_poison(request, monkeypatch):
    """Seed per test from the run seed and the test's id; and start every kernel output as
    NaN, so an element a kernel fails to write fails the test."""
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.setattr(_alloc, "POISON", True)
    yield
