"""The backend registry: which implementation serves an op on a given tensor.

One table, ``REGISTRY``, maps op -> backend -> "module:function". Implementations are
imported lazily, the first time they are picked, so ``import llama_fast`` never imports
Triton (tests must be able to set ``TRITON_INTERPRET=1`` first) nor the CUDA extension.

Backends
  torch   the float32-accumulating PyTorch reference (``llama_fast.reference``); any device.
  triton  the Triton kernels (``llama_fast.kernels``); CUDA tensors, or CPU tensors when
          ``TRITON_INTERPRET=1`` is set (the Triton interpreter, for testing).
  cuda    the CUDA C++ extension ``llama_fast._C`` (``llama_fast.cuda_ops``); CUDA tensors
          (or CPU tensors, when forced, under the tests' CPU emulator of the kernels:
          ``LLAMA_FAST_CUDA_EMULATOR``). What its kernels do not cover goes to the Triton
          kernels (``cuda_ops.ROUTED``).

``auto`` (the default) picks, on CUDA tensors, the first available backend of the op's
``AUTO_ORDER_CUDA`` entry, and torch on CPU tensors (triton when the interpreter is on).
``backend(name)`` forces one for a block of code, and the ``LLAMA_FAST_BACKEND`` variable
sets the default; a forced backend that cannot serve an input raises
``BackendUnavailableError`` rather than quietly running something else.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

_R = "llama_fast.reference"
_K = "llama_fast.kernels"
_C = "llama_fast.cuda_ops"

# op -> backend -> "module:function". Every op has a torch entry: it is the reference the
# others are tested against and the fallback when nothing faster can serve.
REGISTRY: dict[str, dict[str, str]] = {
    "rms_norm_fwd": {"torch": f"{_R}:rms_norm_fwd", "triton": f"{_K}.rms_norm:rms_norm_fwd", "cuda": f"{_C}:rms_norm_fwd"},
    "rms_norm_bwd": {"torch": f"{_R}:rms_norm_bwd", "triton": f"{_K}.rms_norm:rms_norm_bwd", "cuda": f"{_C}:rms_norm_bwd"},
    "rope_fwd": {"torch": f"{_R}:rope_fwd", "triton": f"{_K}.rope:rope_fwd", "cuda": f"{_C}:rope_fwd"},
    "swiglu_fwd": {"torch": f"{_R}:swiglu_fwd", "triton": f"{_K}.swiglu:swiglu_fwd", "cuda": f"{_C}:swiglu_fwd"},
    "swiglu_bwd": {"torch": f"{_R}:swiglu_bwd", "triton": f"{_K}.swiglu:swiglu_bwd", "cuda": f"{_C}:swiglu_bwd"},
    "attn_fwd": {"torch": f"{_R}:attn_fwd", "triton": f"{_K}.flash_attn:attn_fwd", "cuda": f"{_C}:attn_fwd"},
    "attn_bwd": {"torch": f"{_R}:attn_bwd", "triton": f"{_K}.flash_attn:attn_bwd", "cuda": f"{_C}:attn_bwd"},
    "attn_varlen_fwd": {"torch": f"{_R}:attn_varlen_fwd", "triton": f"{_K}.flash_attn:attn_varlen_fwd", "cuda": f"{_C}:attn_varlen_fwd"},
    "attn_varlen_bwd": {"torch": f"{_R}:attn_varlen_bwd", "triton": f"{_K}.flash_attn:attn_varlen_bwd", "cuda": f"{_C}:attn_varlen_bwd"},
    "decode": {"torch": f"{_R}:decode", "triton": f"{_K}.flash_decode:decode", "cuda": f"{_C}:decode"},
    # No C++ kernel: the matmuls are cuBLAS either way, and cuda serves the softmax step with Triton's.
    "linear_cross_entropy": {"torch": f"{_R}:linear_cross_entropy", "triton": f"{_K}.cross_entropy:linear_cross_entropy", "cuda": f"{_K}.cross_entropy:linear_cross_entropy"},
}

# Which backend auto tries first on CUDA tensors, per op. cuda goes first for an op once a
# GPU run of bench/gpu_check.py has shown its kernel correct and faster than triton's; no
# GPU has run the CUDA kernels yet, so every op starts with triton, and backend("cuda")
# or LLAMA_FAST_BACKEND=cuda opts in.
AUTO_ORDER_CUDA: dict[str, tuple[str, ...]] = {op: ("triton", "cuda", "torch") for op in REGISTRY}


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
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Test hook: LLAMA_FAST_CUDA_EMULATOR holds the path of a build of the CPU emulator of the
# CUDA kernels (tests/cuda_emulator: the same csrc/ sources compiled as host C++). The cuda
# backend then runs them on CPU tensors when forced (never under auto), as triton runs on
# CPU tensors under TRITON_INTERPRET=1. For the test suite only.
def cuda_emulator_path() -> str | None:
    return os.environ.get("LLAMA_FAST_CUDA_EMULATOR") or None


@functools.lru_cache(maxsize=None)
def load_cuda_emulator(path: str):
    """The emulator module built at ``path`` (imported from that file, as ``_C_emu``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_C_emu", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"LLAMA_FAST_CUDA_EMULATOR={path!r} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_reason(load: Callable[[str], object], what: str) -> str | None:
    """None when ``load(what)`` succeeds, else why not (one line)."""
    try:
        load(what)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


@functools.lru_cache(maxsize=None)
def _emulator_status(path: str) -> str | None:
    return _load_reason(load_cuda_emulator, path)


@functools.lru_cache(maxsize=None)
def _import_status(module: str) -> str | None:
    """None when ``module`` imports, else why not (one line)."""
    return _load_reason(importlib.import_module, module)


def backend_status(name: str) -> str | None:
    """None when backend ``name`` is installed and usable on some device, else the reason."""
    if name == "torch":
        return None
    if name == "triton":
        why = _import_status("triton")
        if why:
            return f"triton does not import ({why})"
        if not torch.cuda.is_available() and not triton_interpreter_on():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"
        return None
    if name == "cuda":
        emulator = cuda_emulator_path()
        if emulator:  # test hook (see cuda_emulator_path)
            why = _emulator_status(emulator)
            return f"the CUDA emulator {emulator} does not load ({why})" if why else None
        why = _import_status("llama_fast._C")
        if why:
            return f"the CUDA extension llama_fast._C is not built ({why})"
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        return None
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def device_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else why not."""
    why = backend_status(name)
    if why:
        return why
    if name == "torch":
        return None
    if device.type == "cuda":
        return None
    if name == "triton" and device.type == "cpu" and triton_interpreter_on():
        return None
    if name == "cuda" and device.type == "cpu" and cuda_emulator_path():
        return None  # the CPU emulator of the tests
    extra = " (or CPU tensors with TRITON_INTERPRET=1)" if name == "triton" else ""
    return f"backend {name!r} runs on CUDA tensors{extra}, got a {device.type} tensor"


def pick(op: str, device: torch.device) -> str:
    """The backend that serves ``op`` on ``device`` under the current choice."""
    impls = REGISTRY[op]
    choice = current_backend()
    if choice != "auto":
        why = device_reason(choice, device)
        if choice not in impls:
            why = f"it has no implementation of {op} (backends that do: {sorted(impls)})" + (f"; and {why}" if why else "")
        if why:
            raise BackendUnavailableError(f"backend {choice!r} cannot serve {op}: {why}")
        return choice
    if device.type == "cuda":
        order = AUTO_ORDER_CUDA[op]
    elif device.type == "cpu" and triton_interpreter_on():
        order = ("triton", "torch")
    else:
        order = ("torch",)
    for name in order:
        if name in impls and device_reason(name, device) is None:
            return name
    return "torch"


@functools.lru_cache(maxsize=None)
def _load(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def implementation(op: str, name: str) -> Callable:
    return _load(REGISTRY[op][name])


def dispatch(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``."""
    return implementation(op, pick(op, device))
