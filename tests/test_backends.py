"""The registry: how a backend is chosen, forced, refused and reported."""
from __future__ import annotations

import pytest
import torch

import llama_fast
import llama_fast.op_names
from llama_fast import backends
from _helpers import DEVICE


def test_every_op_has_a_torch_reference_and_every_backend_is_registered():
    assert set(backends.get("torch").OPS) == set(backends.OPS)
    assert [backends.get(name).name for name in backends.BACKENDS] == list(backends.BACKENDS)
    for name in backends.BACKENDS:
        assert backends.get(name).OPS <= set(backends.OPS), name


def test_every_backend_loads_what_it_declares():
    """Each backend's implementations exist (importing Triton needs no GPU)."""
    for name in backends.BACKENDS:
        if backends.backend_status(name):
            continue  # not installed here (the CUDA extension); backend_status says why
        impls = backends.get(name).ops()
        assert set(impls) == set(backends.get(name).OPS) and all(map(callable, impls.values())), name


def test_what_the_cuda_kernels_do_not_cover_is_routed_to_triton():
    """The routing rule, in the dispatcher: the attention backward (no cuda kernel) and a
    float32 or odd-head-dim forward (the kernels' gap) go to triton; info() says so."""
    cuda = backends.get("cuda")
    assert backends.ROUTES == {"cuda": "triton"}
    assert "attn_bwd" not in cuda.OPS and "attn_fwd" in cuda.OPS
    q = torch.empty(1, 4, 2, 96, dtype=torch.bfloat16)
    args = lambda t, scale=0.125: (t, t, t, True, scale)  # noqa: E731  (attn_fwd's arguments)
    assert cuda.gap("attn_fwd", args(q)) is not None and cuda.gap("attn_fwd", args(q[..., :64])) is None
    assert cuda.gap("attn_fwd", args(q[..., :64].float())) is not None
    assert cuda.gap("attn_fwd", args(q[..., :64], scale=-0.125)) is not None
    routes = llama_fast.info()["routes"]["cuda"]
    assert routes["to"] == "triton" and {"attn_bwd", "attn_fwd", "decode"} <= set(routes)


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.pick("rms_norm_fwd", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.pick("rms_norm_fwd", cpu) == "torch"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="auto on CUDA tensors needs a GPU")
def test_auto_on_cuda_follows_the_per_op_order():
    for op, order in backends.AUTO_ORDER_CUDA.items():
        expected = next(name for name in order if backends.device_reason(name, DEVICE) is None)
        assert backends.pick(op, DEVICE) == expected, op


def test_context_manager_forces_and_restores():
    assert backends.current_backend() == "auto"
    with llama_fast.backend("torch"):
        assert backends.current_backend() == "torch"
        assert backends.pick("swiglu_fwd", DEVICE) == "torch"
        with llama_fast.backend("auto"):
            assert backends.current_backend() == "auto"
        assert backends.current_backend() == "torch"
    assert backends.current_backend() == "auto"


def test_context_manager_restores_after_an_exception():
    with pytest.raises(RuntimeError), llama_fast.backend("torch"):
        raise RuntimeError("boom")
    assert backends.current_backend() == "auto"


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("LLAMA_FAST_BACKEND", "torch")
    assert backends.pick("rope_fwd", DEVICE) == "torch"
    with llama_fast.backend("auto"):  # the context manager wins over the variable
        assert backends.current_backend() == "auto"


def test_bad_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend name must be one of"):
        with llama_fast.backend("cudnn"):
            pass
    monkeypatch.setenv("LLAMA_FAST_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="LLAMA_FAST_BACKEND must be one of"):
        llama_fast.rms_norm(torch.randn(2, 4, device=DEVICE), torch.randn(4, device=DEVICE))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the CPU as the test device")
def test_forced_backends_refuse_what_they_cannot_serve(monkeypatch, installed_cuda):  # the CPU emulator would accept them
    x, w = torch.randn(2, 4), torch.randn(4)
    with llama_fast.backend("cuda"), pytest.raises(llama_fast.BackendUnavailableError, match="backend 'cuda' cannot serve"):
        llama_fast.rms_norm(x, w)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with llama_fast.backend("triton"), pytest.raises(llama_fast.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        llama_fast.rms_norm(x, w)


def test_info_reports_versions_and_backends():
    report = llama_fast.info()
    assert report["torch"] == torch.__version__
    assert report["triton"] is not None
    assert set(report["backends"]) == set(backends.BACKENDS)
    assert report["backends"]["torch"] == {"available": True, "reason": None, "ops": sorted(backends.OPS),
                                           "serves": list(llama_fast.op_names.PUBLIC_OPS)}
    for name, status in report["backends"].items():
        # Either available or a reason why not: never silent.
        assert status["available"] == (status["reason"] is None), name
    assert (report["gpu"] is None) == (not torch.cuda.is_available())


def test_import_does_not_import_triton():
    """The interpreter switch must be settable after ``import llama_fast``."""
    import subprocess
    import sys

    code = "import sys, llama_fast; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_backward_runs_on_the_backend_the_forward_ran_on(monkeypatch):
    """The backward pass may run after the ``with`` block (or on autograd's device thread):
    it must still use the backend that was forced for the forward."""
    picked = []
    real_pick = backends.pick
    monkeypatch.setattr(backends, "pick", lambda op, device, args=(): picked.append((op, real_pick(op, device, args))) or picked[-1][1])
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    with llama_fast.backend("torch"):
        y = llama_fast.rms_norm(x, w)
    y.sum().backward()
    assert ("rms_norm_bwd", "torch") in picked
    assert all(name == "torch" for _, name in picked), picked


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the CPU as the test device")
def test_unavailable_backend_errors_use_public_op_names(installed_cuda):
    x = torch.randn(4, 8)
    with llama_fast.backend("cuda"), pytest.raises(llama_fast.BackendUnavailableError,
                                                   match=r"cannot serve rms_norm/add_rms_norm \(forward\)"):
        llama_fast.rms_norm(x, torch.ones(8))
