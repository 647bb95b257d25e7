"""The dispatcher: which backend serves an op on a given call.

Backends register themselves here (``register``): ``torch`` (the PyTorch reference, any
device), ``triton`` (the Triton kernels; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``cuda`` (the CUDA C++ extension; CUDA tensors). Each says
whether it is available and why not, whether it serves a given call and why not, and
loads its implementations on first use (``base.Backend``), so ``import llama_fast`` imports
neither Triton nor the extension.

Choosing, in this one place:

* a forced backend (``backend(name)``, or ``LLAMA_FAST_BACKEND``) serves the call, or raises
  ``BackendUnavailableError`` saying why; never something else in silence;
* ``auto`` (the default) tries, on CUDA tensors, the op's ``AUTO_ORDER_CUDA`` entry, on CPU
  tensors torch (triton first when the interpreter is on), and takes the first that can;
* the routing rule, ``ROUTES``: a call the chosen backend's kernels do not cover (an op it
  has no kernel for, or a shape its ``gap`` names) goes to the backend ``ROUTES`` names for
  it, today cuda -> triton (the attention backward, float32 attention, odd head dims).
  ``info()`` lists these routes.

A backward pass runs on the backend its forward was chosen under (``ops._autograd``).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import torch

from llama_fast import reference
from llama_fast.op_names import public_op_name

from .base import Backend
from .cuda_backend import GAPS as CUDA_GAPS
from .cuda_backend import CudaBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend, interpreter_on

__all__ = ["AUTO_ORDER_CUDA", "BACKENDS", "Backend", "BackendUnavailableError", "CudaBackend", "OPS", "ROUTES",
           "backend", "backend_status", "current_backend", "device_reason", "get", "pick", "register", "run",
           "triton_interpreter_on"]

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# The dispatcher's op names: every op has a reference implementation (ops split into passes;
# llama_fast.op_names names them to users).
OPS = tuple(reference.IMPLEMENTATIONS)

# The routing rule: what a backend's kernels do not cover goes to this backend.
ROUTES = {"cuda": "triton"}

# Which backend auto tries first on CUDA tensors, per op. cuda goes first for an op once a
# GPU run of scripts/gpu_check.py has shown its kernel correct and faster than triton's; no
# GPU has run the CUDA kernels yet, so every op starts with triton, and backend("cuda")
# or LLAMA_FAST_BACKEND=cuda opts in.
AUTO_ORDER_CUDA: dict[str, tuple[str, ...]] = {op: ("triton", "cuda", "torch") for op in OPS}

_REGISTRY: dict[str, Backend] = {}


def register(new: Backend) -> Backend | None:
    """Make ``new`` the backend of its name; returns the one it replaces (None if none)."""
    if new.name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {new.name!r}")
    old = _REGISTRY.get(new.name)
    _REGISTRY[new.name] = new
    return old


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return _REGISTRY[name]


for _backend in (TorchBackend(), TritonBackend(), CudaBackend()):
    register(_backend)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve this op on this input."""


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("llama_fast_backend", default=None)


def _check_choice(name: str, where: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{where} must be one of {_CHOICES}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend choice in force: ``backend()``'s, else ``LLAMA_FAST_BACKEND``, else auto."""
    name = _forced.get()
    if name is not None:
        return name
    return _check_choice(os.environ.get("LLAMA_FAST_BACKEND", "auto") or "auto", "LLAMA_FAST_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend ("auto", "torch", "triton" or "cuda") for the ops called in this block."""
    token = _forced.set(_check_choice(name, "backend name"))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_interpreter_on() -> bool:
    return interpreter_on()


def backend_status(name: str) -> str | None:
    """None when backend ``name`` is installed and usable on some device, else the reason."""
    return get(name).unavailable()


def device_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not."""
    b = get(name)
    return b.unavailable() or b.cannot_run_on(device)


def routes() -> dict[str, dict[str, str]]:
    """backend -> {op: when its calls go to ROUTES[backend]} (for info())."""
    gaps = {"cuda": CUDA_GAPS}
    return {name: {"to": target, **gaps.get(name, {})} for name, target in ROUTES.items()}


def _serving(name: str, op: str, device: torch.device, args: tuple) -> str:
    """The backend that serves the call once ``name`` is chosen: ``name``, or where the
    routing rule sends what its kernels do not cover. Raises when none can."""
    why = device_reason(name, device)
    if why is None:
        b = get(name)
        gap = b.gap(op, args) if op in b.OPS else f"it has no {public_op_name(op)} kernel"
        if gap is None:
            return name
        if name in ROUTES:
            return _serving(ROUTES[name], op, device, args)
        why = gap
    raise BackendUnavailableError(f"backend {name!r} cannot serve {public_op_name(op)}: {why}")


def pick(op: str, device: torch.device, args: tuple = ()) -> str:
    """The backend that serves ``op`` on ``device`` (with these arguments) under the current choice."""
    choice = current_backend()
    if choice != "auto":
        return _serving(choice, op, device, args)
    if device.type == "cuda":
        order = AUTO_ORDER_CUDA[op]
    elif device.type == "cpu" and interpreter_on():
        order = ("triton", "torch")
    else:
        order = ("torch",)
    for name in order:
        if get(name).auto:
            try:
                return _serving(name, op, device, args)
            except BackendUnavailableError:
                continue
    return "torch"


def implementation(op: str, name: str) -> Callable:
    return get(name).ops()[op]


def run(op: str, device: torch.device, *args):
    """Call ``op`` on the backend chosen for ``device`` and these arguments."""
    return implementation(op, pick(op, device, args))(*args)
