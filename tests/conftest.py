"""Test set-up: on a machine without CUDA the Triton kernels run under the Triton
interpreter, which must be switched on before anything imports triton (transformers and
torch._inductor do), so this runs first, at collection.

Without CUDA, the CUDA C++ kernels run too: under the CPU emulator of tests/cuda_emulator
(the same csrc/ sources compiled as host C++), built here once (cached under
build/cuda_emulator) and registered as the "cuda" backend (a test-only one, on CPU
tensors, never picked by auto) before tests/_helpers.py asks which backends can run.
LLAMA_FAST_NO_EMULATOR=1 skips it; a failed build fails the run. The ``installed_cuda``
fixture puts the package's own cuda backend back for a test."""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import torch


def emulator_module(name: str):
    """tests/cuda_emulator/<name>.py, imported under a name no installed package uses."""
    full = f"llama_fast_cuda_emulator_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, Path(__file__).parent / "cuda_emulator" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def emulator_build_module():
    return emulator_module("build")


EMULATOR_PATH = None  # the built emulator module, when it stands in for the cuda backend
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("LLAMA_FAST_NO_EMULATOR", "0") in ("", "0"):
        EMULATOR_PATH = str(emulator_build_module().build())  # raises (loudly) when it fails

# The kernels are tested in their static launch configurations (tests/test_autotune.py turns
# the autotuner on where it is the subject), and no test reads or writes the user's cache.
os.environ.setdefault("LLAMA_FAST_AUTOTUNE", "0")
if "LLAMA_FAST_CACHE_DIR" not in os.environ:
    os.environ["LLAMA_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_fast-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LLAMA_FAST_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

from llama_fast import _alloc, backends  # noqa: E402

INSTALLED_CUDA = backends.get("cuda")
EMULATED_CUDA = emulator_module("backend").EmulatedCudaBackend(EMULATOR_PATH) if EMULATOR_PATH else None
if EMULATED_CUDA is not None:
    backends.register(EMULATED_CUDA)

# Fresh inputs every run; the seed is printed in the header so a failure can be replayed
# with LLAMA_FAST_TEST_SEED=<seed>.
RUN_SEED = int(os.environ.get("LLAMA_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_terminal_summary(terminalreporter):
    # pytest -q drops the header: repeat the seed at the end, where a failure is read.
    terminalreporter.write_line(f"llama_fast: LLAMA_FAST_TEST_SEED={RUN_SEED}")


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    emulator = EMULATOR_PATH or ""
    return (f"llama_fast: LLAMA_FAST_TEST_SEED={RUN_SEED}, TRITON_INTERPRET={interp}, cuda={torch.cuda.is_available()}, "
            f"cuda emulator={emulator or '(off)'}")


# Tests of the real extension and of the benchmarks, which must not see the emulator (it
# is a test device for the kernels' numerics, not a backend to benchmark or to install).
WITHOUT_EMULATOR = {"test_cuda_backend", "test_bench", "test_gpu_check"}


@pytest.fixture(autouse=True, scope="module")
def emulator_only_for_kernel_tests(request):
    """Module scope: before the modules' own module-scoped fixtures (which run benchmarks)."""
    if EMULATED_CUDA is not None and request.module.__name__ in WITHOUT_EMULATOR:
        backends.register(INSTALLED_CUDA)
        try:
            yield
        finally:
            backends.register(EMULATED_CUDA)
    else:
        yield


@pytest.fixture
def installed_cuda():
    """The package's own cuda backend for this test (not the CPU emulator)."""
    backends.register(INSTALLED_CUDA)
    try:
        yield INSTALLED_CUDA
    finally:
        backends.register(EMULATED_CUDA or INSTALLED_CUDA)


@pytest.fixture(autouse=True)
def fresh_seed_and_poison(request, monkeypatch):
    """Seed per test from the run seed and the test's id; and start every kernel output as
    NaN, so an element a kernel fails to write fails the test."""
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.setattr(_alloc, "POISON", True)
    yield
