"""llama_fast: fused Triton and CUDA C++ kernels for Llama-3.

Public API (all autograd-aware ``torch.library`` custom ops; see ``llama_fast.ops``)::

    rms_norm(x, weight, eps=1e-5) -> y
    add_rms_norm(x, residual, weight, eps=1e-5) -> (y, h)
    rope_cos_sin(positions, head_dim, theta=500000.0, scaling=None) -> (cos, sin)
    apply_rope(q, k, cos, sin, *, interleaved=False) -> (q_out, k_out)
    swiglu(gate, up) -> silu(gate) * up
    swiglu_fused(gate_up) -> silu(gate_up[..., :I]) * gate_up[..., I:]
    flash_attn(q, k, v, *, causal=True, softmax_scale=None, return_lse=False)
    flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=True, softmax_scale=None)
    flash_decode(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, num_splits=None)
    fused_linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, chunk_size=None) -> loss   # no (tokens x V) logits
    backend(name)   # "auto" | "torch" | "triton" | "cuda"; also LLAMA_FAST_BACKEND
    info() -> dict
    patch(model, *, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True) -> report
    unpatch(model)
    patch_transformers(...) / unpatch_transformers()   # patch HF Llama models built afterwards

Importing llama_fast imports torch but not triton: the Triton kernels load on first use.
"""
from llama_fast.backends import BackendUnavailableError, backend
from llama_fast.info import info
from llama_fast.checkpoint import load_checkpoint
from llama_fast.generation import generate
from llama_fast.model import ModelArgs, Transformer
from llama_fast.patching import patch, patch_transformers, unpatch, unpatch_transformers
from llama_fast import ops
from llama_fast.ops import *  # noqa: F403  (the public ops: exactly ops.__all__)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ModelArgs",
    "Transformer",
    "backend",
    "generate",
    "info",
    "load_checkpoint",
    "patch",
    "patch_transformers",
    "unpatch",
    "unpatch_transformers",
    *ops.__all__,
]
