"""Test set-up: on a machine without CUDA the Triton kernels run under the Triton
interpreter, which must be switched on before anything imports triton (transformers and
torch._inductor do), so this runs first, at collection."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llama_fast import _alloc  # noqa: E402

# Fresh inputs every run; the seed is printed in the header so a failure can be replayed
# with LLAMA_FAST_TEST_SEED=<seed>.
RUN_SEED = int(os.environ.get("LLAMA_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"llama_fast: LLAMA_FAST_TEST_SEED={RUN_SEED}, TRITON_INTERPRET={interp}, cuda={torch.cuda.is_available()}"


@pytest.fixture(autouse=True)
def fresh_seed_and_poison(request, monkeypatch):
    """Seed per test from the run seed and the test's id; and start every kernel output as
    NaN, so an element a kernel fails to write fails the test."""
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.setattr(_alloc, "POISON", True)
    yield
