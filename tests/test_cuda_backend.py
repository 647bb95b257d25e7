"""The CUDA extension without (and with) a GPU: the build, its ptxas report, clear errors,
and auto's fallback. The kernels' numerics are tested by the per-op tests, which run every
available backend (cuda among them on a GPU machine with the extension built)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama_fast
from llama_fast import backends

REPO = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and shutil.which("nvcc", path=os.environ["CUDA_HOME"] + "/bin"))
EXPECT_BUILT = bool(NVCC) and os.environ.get("LLAMA_FAST_NO_CUDA", "0") in ("", "0")
needs_extension = pytest.mark.skipif(not EXPECT_BUILT, reason="no nvcc here (or LLAMA_FAST_NO_CUDA set): the extension is not built")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNEL_FILES = ("rms_norm", "rope", "swiglu", "flash_attn", "flash_decode")


@needs_extension
def test_extension_imports():
    """The install built llama_fast._C (nvcc is here), and it imports with or without a GPU."""
    from llama_fast import _C

    assert set(_C.cuda_archs.split(";")) >= {"80", "90"} or os.environ.get("LLAMA_FAST_CUDA_ARCHS")
    for fn in ("rms_norm_fwd", "rms_norm_bwd", "rope", "swiglu_fwd", "swiglu_bwd", "attn_fwd", "decode"):
        assert callable(getattr(_C, fn))
    assert llama_fast.info()["cuda_extension"]["built"] is True


def _ptxas_entries() -> list[tuple[str, str, str, int, int]]:
    """(file, kernel, arch, registers, spill bytes) for every kernel in the build's report."""
    report = (REPO / "llama_fast" / "_C.ptxas.txt").read_text()
    entries, current_file, current = [], None, None
    for line in report.splitlines():
        if m := re.fullmatch(r"# (\w+\.cu)", line.strip()):
            current_file = m.group(1)
        elif m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            current = [current_file, m.group(1), m.group(2), None, 0]
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current[4] = int(m.group(1)) + int(m.group(2))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current[3] = int(m.group(1))
            entries.append(tuple(current))
            current = None
    return entries


@needs_extension
def test_ptxas_report_has_every_kernel_for_both_archs_and_no_spills():
    entries = _ptxas_entries()
    files = {e[0] for e in entries}
    assert {f"{name}.cu" for name in KERNEL_FILES} <= files, f"kernels missing from the report: {files}"
    for name in files:
        archs = {e[2] for e in entries if e[0] == name}
        assert {"sm_80", "sm_90"} <= archs, f"{name}: compiled for {archs}"
    spilling = [e for e in entries if e[4] > 0]
    assert not spilling, "kernels that spill registers: " + ", ".join(f"{f}:{k} {a} {s} B" for f, k, a, _, s in spilling)
    assert all(e[3] <= 255 for e in entries)


@needs_extension
def test_extension_was_built_by_ninja_for_the_default_archs():
    # ninja is a build requirement (pyproject.toml); the fallback (one compile at a time)
    # is for --no-build-isolation installs that lack it, not for CI.
    first = (REPO / "llama_fast" / "_C.ptxas.txt").read_text().splitlines()[0]
    assert re.match(r"# llama_fast\._C built by ninja \S+, nvcc .*, archs ", first), first
    if not os.environ.get("LLAMA_FAST_CUDA_ARCHS"):
        assert first.endswith("archs 80;90;90a"), first


@needs_extension
@cpu_only
def test_call_without_gpu_raises_clearly():
    from llama_fast import _C

    with pytest.raises(RuntimeError, match=r"llama_fast\._C: swiglu_fwd: no usable CUDA device"):
        _C.swiglu_fwd(gate=0, up=0, y=0, rows=1, n=1, stride_g=1, stride_u=1, stride_y=1, dtype=2, device=0, stream=0)
    with pytest.raises(ValueError, match="dtype code"):
        _C.swiglu_fwd(gate=0, up=0, y=0, rows=1, n=1, stride_g=1, stride_u=1, stride_y=1, dtype=7, device=0, stream=0)


@needs_extension
def test_wrappers_reject_cpu_tensors_by_name():
    from llama_fast.backends.cuda_kernels import CudaKernels

    x = torch.randn(3, 8)
    kernels = CudaKernels(backends.get("cuda").load_extension())
    with pytest.raises(ValueError, match="swiglu: gate must be a CUDA tensor"):
        kernels.swiglu_fwd(x, x)


@cpu_only
def test_forced_cuda_on_cpu_tensors_says_why():
    x, w = torch.randn(2, 8), torch.randn(8)
    with llama_fast.backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="no CUDA GPU|not built"):
        llama_fast.rms_norm(x, w)


def test_auto_falls_back_when_the_extension_is_missing(monkeypatch):
    """A GPU machine where llama_fast._C failed to build: auto serves every op with triton,
    and a forced cuda backend names the reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def not_built():
        raise ImportError("no module named _C")

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register(backends.CudaBackend(load_extension=not_built))
    cuda = torch.device("cuda", 0)
    for op in backends.OPS:
        assert backends.pick(op, cuda) == "triton"
    assert "not built" in backends.backend_status("cuda")
    with llama_fast.backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="not built"):
        backends.pick("rms_norm_fwd", cuda)


def test_auto_order_lists_every_op_and_backend():
    assert set(backends.AUTO_ORDER_CUDA) == set(backends.OPS)
    for op, order in backends.AUTO_ORDER_CUDA.items():
        assert set(order) == set(backends.BACKENDS), op
        assert op in backends.get("cuda").OPS or "cuda" in backends.ROUTES, f"{op} has no cuda kernel and no route"


def _setup_py_output(env_changes: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "LLAMA_FAST_NO_CUDA")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_nvcc_installs_pure_triton_with_a_notice(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _setup_py_output({"PATH": f"{empty}:{Path(sys.executable).parent}"})
    assert "nvcc not found" in out and "Triton kernels serve" in out


def test_no_cuda_variable_skips_the_extension():
    assert "LLAMA_FAST_NO_CUDA is set" in _setup_py_output({"LLAMA_FAST_NO_CUDA": "1"})


def test_sdist_carries_the_cuda_sources(tmp_path):
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    env = dict(os.environ, LLAMA_FAST_NO_CUDA="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import tarfile

    (sdist,) = tmp_path.glob("llama_fast-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    expected = {"csrc/llama_fast.h", "csrc/common.cuh", "csrc/bindings.cpp"} | {f"csrc/{k}.cu" for k in KERNEL_FILES}
    assert expected <= names, sorted(expected - names)


# ---------------------------------------------------------------------------------------
# On a GPU


@gpu_only
@needs_extension
def test_kernel_errors_name_the_kernel():
    from llama_fast import _C
    from llama_fast.backends.cuda_kernels import CudaKernels

    q = torch.randn(1, 4, 2, 96, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(1, 2, 4, device="cuda")
    with pytest.raises(RuntimeError, match="attn_fwd"):
        _C.attn_fwd(q=q.data_ptr(), k=q.data_ptr(), v=q.data_ptr(), out=q.data_ptr(), lse=lse.data_ptr(), cu_q=0,
                    cu_k=0, batch=1, q_heads=2, kv_heads=2, seq_q=4, seq_k=4, head_dim=96, q_stride=q.stride()[:3],
                    k_stride=q.stride()[:3], v_stride=q.stride()[:3], o_stride=q.stride()[:3], lse_stride=(8, 4),
                    scale=0.1, causal=True, dtype=2, **CudaKernels(_C).launch(q))
    torch.cuda.synchronize()  # the guard threw before any launch: the context is healthy


@gpu_only
@needs_extension
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu_run_there_and_leave_the_current_device_alone():
    x = torch.randn(5, 64, device="cuda:1", dtype=torch.bfloat16)
    w = torch.randn(64, device="cuda:1", dtype=torch.bfloat16)
    torch.cuda.set_device(0)
    with llama_fast.backend("cuda"):
        y = llama_fast.rms_norm(x, w)
    assert torch.cuda.current_device() == 0
    with llama_fast.backend("torch"):
        expected = llama_fast.rms_norm(x, w)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


@gpu_only
@needs_extension
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not installed")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    """Every CUDA kernel once, on small odd shapes, under compute-sanitizer."""
    cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=9", sys.executable,
           str(REPO / "tests" / "cuda_sanitizer_cases.py")]
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
    # access past a tensor's end instead of landing in the rest of a pooled block.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
