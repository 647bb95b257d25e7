"""Backend "triton": the Triton kernels (``llama_fast.kernels``, one file per op) on CUDA
tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, for tests:
slow, but the same kernel code)."""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil

import torch

from llama_fast import kernels, reference  # kernels: a namespace package, importing it imports no kernel

from .base import Backend, load_reason


def interpreter_on() -> bool:
    # The same test as llama_fast.kernels._common.interpreter_on, which imports triton.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_modules() -> list[str]:
    """The Triton files (``kernels/*.py`` but the shared ``_common``), found without importing
    them: importing triton fixes TRITON_INTERPRET for the process."""
    return sorted(f"llama_fast.kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)
                  if not m.name.startswith("_"))


class TritonBackend(Backend):
    """Every op has a Triton kernel (one file per op): each file's ``LAUNCHERS`` maps the
    dispatcher's op names to its launchers, and ``CHUNK_STEPS`` to per-chunk steps of a
    chunked loop of the reference (the fused cross-entropy's softmax step)."""

    name = "triton"
    OPS = frozenset(reference.IMPLEMENTATIONS)

    @functools.cached_property
    def _import_why(self) -> str | None:  # once: the dispatcher asks on every call
        return load_reason(lambda: importlib.import_module("triton"))

    def unavailable(self):
        why = self._import_why
        if why:
            return f"triton does not import ({why})"
        if not torch.cuda.is_available() and not interpreter_on():
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, slowly)"
        return None

    def cannot_run_on(self, device):
        if device.type == "cuda" or (device.type == "cpu" and interpreter_on()):
            return None
        return f"backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got a {device.type} tensor"

    def load_ops(self):
        # On first use, not at import (see kernel_modules).
        ops = {}
        for name in kernel_modules():
            module = importlib.import_module(name)
            ops.update(module.LAUNCHERS)
            for op, step in getattr(module, "CHUNK_STEPS", {}).items():
                ops[op] = functools.partial(reference.IMPLEMENTATIONS[op], chunk_fn=step)
        return ops
