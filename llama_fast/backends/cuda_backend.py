"""Backend "cuda": the CUDA C++ extension ``llama_fast._C`` (sources in csrc/) on CUDA tensors.

Its kernels cover part of each op: ``gap`` says which calls they do not (the attention
forward in float32 or at head dims other than 64 and 128; decoding shapes outside the
decode kernel's tile), and it has no attention backward. The dispatcher's routing rule
(``llama_fast.backends.ROUTES``) hands those calls to the Triton kernels; ``GAPS`` describes
them for ``llama_fast.info()``. The wrappers that call the extension are
``llama_fast.backends.cuda_kernels``, loaded with the extension on first use.

A test can register another instance (``llama_fast.backends.register``) with its own
``load_extension``, device type and kernel class: that is how the tests run these kernels
through a CPU emulator of the CUDA execution model, which the installed package knows
nothing about.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from .base import Backend, load_reason

ATTN_HEAD_DIMS = (64, 128)
DECODE_MAX_HEAD_DIM = 256  # any head dim up to this (padded to 64/128/256 inside)
DECODE_MAX_ROWS = 64  # GQA group x Sq rows of one KV head that the decode kernel's tile holds
# float32 at head dims past 128 with more than 16 rows needs ~210 KiB of shared memory:
# more than an A100 has, so those go to Triton everywhere.
DECODE_FLOAT32_WIDE_MAX_ROWS = 16

# What the cuda kernels do not cover, in words (info() shows it): routed to Triton.
GAPS = {
    "attn_bwd": "always (the attention backward runs the Triton kernels)",
    "attn_varlen_bwd": "always (the attention backward runs the Triton kernels)",
    "attn_fwd": "float32, head dims other than 64 and 128, or a softmax scale <= 0",
    "attn_varlen_fwd": "float32, head dims other than 64 and 128, or a softmax scale <= 0",
    "linear_cross_entropy": "always (its matmuls are cuBLAS either way; the softmax step is the Triton kernel)",
    "decode": "head dims above 256, more than 64 query rows (GQA group x Sq) per KV head, or float32 with head "
              "dim > 128 and > 16 rows",
}


def attention_in_cuda(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in ATTN_HEAD_DIMS


def decode_in_cuda(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    rows = q.shape[2] // max(1, k_cache.shape[2]) * q.shape[1]
    if q.dtype == torch.float32 and q.shape[-1] > 128 and rows > DECODE_FLOAT32_WIDE_MAX_ROWS:
        return False
    return q.shape[-1] <= DECODE_MAX_HEAD_DIM and rows <= DECODE_MAX_ROWS


def _load_installed_extension():
    return importlib.import_module("llama_fast._C")


class CudaBackend(Backend):
    name = "cuda"
    OPS = frozenset({"rms_norm_fwd", "rms_norm_bwd", "rope_fwd", "swiglu_fwd", "swiglu_bwd", "attn_fwd",
                     "attn_varlen_fwd", "decode"})

    def __init__(self, load_extension: Callable[[], object] = _load_installed_extension, device_type: str = "cuda",
                 kernels_class=None) -> None:
        self.load_extension = load_extension
        self.device_type = device_type
        self.kernels_class = kernels_class

    @functools.cached_property
    def _load_why(self) -> str | None:  # once: the dispatcher asks on every call
        return load_reason(self.load_extension)

    def unavailable(self):
        why = self._load_why
        if why:
            return f"the CUDA extension llama_fast._C is not built ({why})"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU"
        return None

    def cannot_run_on(self, device):
        if device.type == self.device_type:
            return None
        return f"backend 'cuda' runs on {self.device_type.upper()} tensors, got a {device.type} tensor"

    def gap(self, op, args):
        # (the kernel folds a positive scale into its exp2: the last argument is the scale)
        if op in ("attn_fwd", "attn_varlen_fwd") and not (attention_in_cuda(args[0]) and args[-1] > 0):
            return GAPS[op]
        if op == "decode" and not decode_in_cuda(args[0], args[1]):
            return GAPS[op]
        return None

    def load_ops(self):
        # The wrappers import the Triton helpers they share (row flattening, the decode split
        # count): loaded with the extension, on first use.
        from llama_fast.backends.cuda_kernels import CudaKernels

        kernels = (self.kernels_class or CudaKernels)(self.load_extension(), self.device_type)
        return {op: getattr(kernels, op) for op in self.OPS}
