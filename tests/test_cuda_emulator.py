"""The CPU emulator of the CUDA kernels (tests/cuda_emulator) itself: its PTX emulation
against plain matrix products, and planted bugs it must catch (deadlocks, divergent
barriers, misaligned or out-of-bounds accesses, launch-limit violations) instead of running
through them or hanging. The kernels' numerics under the emulator are tested by the per-op
tests, which run the cuda backend on CPU tensors when the emulator is on (conftest.py)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llama_fast import backends

from conftest import emulator_build_module

HERE = Path(__file__).resolve().parent / "cuda_emulator"
emulator_build = emulator_build_module()

needs_compiler = pytest.mark.skipif(shutil.which(emulator_build.CXX) is None, reason="no C++ compiler")


def _run_program(name: str, tmp_path_factory) -> list[str]:
    exe = emulator_build.build_program(HERE / f"{name}.cpp", tmp_path_factory.mktemp(name) / name)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return lines


@needs_compiler
def test_mma_and_ldmatrix_emulation_match_a_float64_product(tmp_path_factory):
    lines = _run_program("ptx_test", tmp_path_factory)
    for what in ("bf16: mma(ldmatrix.x4 A, ldmatrix.x2 B^T)", "f16: mma(ldmatrix.x4 A, ldmatrix.x4.trans B2)",
                 "cp.async: nothing lands before the wait"):
        assert any(line.startswith("ok") and what in line for line in lines), f"missing check: {what}"


@needs_compiler
def test_planted_bugs_are_caught(tmp_path_factory):
    lines = _run_program("faults_test", tmp_path_factory)
    for what in ("__syncthreads in divergent code", "deadlock between a warp shuffle and __syncthreads",
                 "shuffle with an exited lane", "misaligned 16-byte vector load", "misaligned uint4 load",
                 "ldmatrix outside dynamic shared memory",
                 "a missing __syncthreads shows in the results", "grid y of 65536", "block of 1025 threads",
                 "dynamic shared memory above 48 KB without the attribute"):
        assert any(line.startswith("ok") and what in line for line in lines), f"missing check: {what}"


@pytest.mark.skipif(backends.get("cuda").auto, reason="the emulator is off (GPU machine or LLAMA_FAST_NO_EMULATOR=1)")
def test_emulator_serves_the_cuda_backend_on_cpu_only_when_forced():
    cpu = torch.device("cpu")
    assert backends.backend_status("cuda") is None
    assert backends.device_reason("cuda", cpu) is None
    for op in backends.OPS:
        assert backends.pick(op, cpu) != "cuda", "auto must not pick the emulator"
    module = backends.get("cuda").load_extension()
    assert module.cuda_archs == "emulated"
