"""Backend "triton": the Triton kernels (``llama_fast.kernels``, one file per op) on CUDA
tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, for tests:
slow, but the same kernel code)."""
from __future__ import annotations

import functools
import importlib
import os

import torch

from llama_fast import reference

from .base import Backend, load_reason


def interpreter_on() -> bool:
    # The same test as llama_fast.kernels._common.interpreter_on, which imports triton.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"
    OPS = frozenset({"rms_norm_fwd", "rms_norm_bwd", "rope_fwd", "swiglu_fwd", "swiglu_bwd", "attn_fwd", "attn_bwd",
                     "attn_varlen_fwd", "attn_varlen_bwd", "decode", "linear_cross_entropy"})

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
        # Imported on first use, not at import: importing triton fixes TRITON_INTERPRET for the
        # process, and `import llama_fast` must leave that to the caller.
        from llama_fast.kernels import cross_entropy, flash_attn, flash_decode, rms_norm, rope, swiglu

        return {
            "rms_norm_fwd": rms_norm.rms_norm_fwd, "rms_norm_bwd": rms_norm.rms_norm_bwd,
            "rope_fwd": rope.rope_fwd,
            "swiglu_fwd": swiglu.swiglu_fwd, "swiglu_bwd": swiglu.swiglu_bwd,
            "attn_fwd": flash_attn.attn_fwd, "attn_bwd": flash_attn.attn_bwd,
            "attn_varlen_fwd": flash_attn.attn_varlen_fwd, "attn_varlen_bwd": flash_attn.attn_varlen_bwd,
            "decode": flash_decode.decode,
            # The chunked loop's matmuls stay cuBLAS (through torch); the kernel is the
            # per-chunk softmax, loss and logits gradient.
            "linear_cross_entropy": functools.partial(reference.linear_cross_entropy,
                                                      chunk_fn=cross_entropy.cross_entropy_chunk),
        }
