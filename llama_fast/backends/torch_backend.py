"""Backend "torch": the PyTorch reference (``llama_fast.reference``) on any device; every
op has it, so it is what the others are tested against and the last resort of ``auto``."""
from __future__ import annotations

from llama_fast import reference

from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    OPS = frozenset({"rms_norm_fwd", "rms_norm_bwd", "rope_fwd", "swiglu_fwd", "swiglu_bwd", "attn_fwd", "attn_bwd",
                     "attn_varlen_fwd", "attn_varlen_bwd", "decode", "linear_cross_entropy"})

    def load_ops(self):
        return {
            "rms_norm_fwd": reference.rms_norm_fwd, "rms_norm_bwd": reference.rms_norm_bwd,
            "rope_fwd": reference.rope_fwd,
            "swiglu_fwd": reference.swiglu_fwd, "swiglu_bwd": reference.swiglu_bwd,
            "attn_fwd": reference.attn_fwd, "attn_bwd": reference.attn_bwd,
            "attn_varlen_fwd": reference.attn_varlen_fwd, "attn_varlen_bwd": reference.attn_varlen_bwd,
            "decode": reference.decode,
            "linear_cross_entropy": reference.linear_cross_entropy,
        }
