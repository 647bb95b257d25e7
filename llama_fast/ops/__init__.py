"""The public ops.

Each public function validates its arguments once (``ValueError``/``TypeError`` naming the
argument and the rule), then calls a ``torch.ops.llama_fast`` custom op. The custom op asks
the registry (``llama_fast.backends``) which backend serves the tensors' device, so the
same code runs the Triton kernels, the CUDA extension or the PyTorch reference. Custom ops
are opaque to ``torch.compile``: with their fake impls it compiles callers with no graph
break, and the backend is chosen at run time. Backward passes are custom ops too, so
compiled training graphs keep the fused kernels.
"""
from ._checks import SUPPORTED_DTYPES
from .cross_entropy import fused_linear_cross_entropy
from .attention import MAX_HEAD_DIM, flash_attn, flash_attn_varlen, flash_decode
from .norm import MAX_NORM_SIZE, add_rms_norm, rms_norm
from .rope import apply_rope, rope_cos_sin, rope_inv_freq
from .swiglu import swiglu, swiglu_fused

__all__ = [
    "MAX_HEAD_DIM",
    "flash_attn",
    "flash_attn_varlen",
    "flash_decode",
    "fused_linear_cross_entropy",
    "MAX_NORM_SIZE",
    "SUPPORTED_DTYPES",
    "add_rms_norm",
    "apply_rope",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "swiglu",
    "swiglu_fused",
]
