"""Who is benchmarked: the providers of the suite, whether each can run here, and the
functions of the ones that are other libraries (Liger-Kernel, flash-attn).

Providers (the ``provider`` field of a row)
-------------------------------------------
triton          llama_fast under ``llama_fast.backend("triton")``; on a GPU the attention and
                decode launch configurations are the autotuner's (kernels/_autotune.py)
triton_static   the same with the static launch configurations (the autotuner off, as with
                LLAMA_FAST_AUTOTUNE=0): attention and decode rows only, to show what tuning gains
cuda            llama_fast under ``llama_fast.backend("cuda")`` (the C++ extension); listed
                as unavailable, with ``backend_status("cuda")``'s reason, where it is not built
eager           PyTorch written as Hugging Face's Llama modules compute it (bench/cases.py)
torch.compile   torch.compile of the eager functions
liger           Liger-Kernel's functional ops (``liger_kernel.transformers.functional``)
sdpa            F.scaled_dot_product_attention, PyTorch's own backend choice
sdpa_flash, sdpa_cudnn, sdpa_efficient   SDPA with one backend pinned (CUDA only)
flex_attention  compiled FlexAttention (CUDA only)
flash-attn      ``flash_attn.flash_attn_func`` / ``flash_attn_with_kvcache``

A provider whose library does not import, or that cannot run on this device, is
"unavailable": its rows stay null and the reason is listed once. The CUDA-only SDPA
backends and FlexAttention are simply left out on a CPU (they have no CPU kernel to
compare). The end-to-end providers are in bench/end_to_end.py.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

import llama_fast
from llama_fast.bench.cases import EPS
from llama_fast.kernels import _autotune  # imports no triton (TRITON_INTERPRET is settled later)

LLAMA_FAST = ("triton", "cuda")  # llama_fast's own backends: an error there is a failure
STATIC = "triton_static"  # the triton backend with its static launch configurations
MEMORY_PROVIDERS = ("triton", "cuda", "eager", "liger", "torch.compile")
ATTN_PROVIDERS = ("triton", STATIC, "cuda", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash-attn",
                  "flex_attention")
DECODE_PROVIDERS = ("triton", STATIC, "cuda", "sdpa", "flash-attn")
CUDA_ONLY = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_attention")
COMPILED = ("torch.compile", "flex_attention")  # slow first call: scheduled last


@functools.lru_cache(maxsize=None)
def import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{module} does not import ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


def unavailable_reason(provider: str, device: torch.device) -> str | None:
    """None when ``provider`` can run on ``device``, else why not (one line)."""
    if provider in LLAMA_FAST or provider == STATIC:
        backends = llama_fast.backends
        if provider == "cuda":
            return backends.backend_status("cuda")
        return backends.device_reason("triton", device)
    if provider == "liger":
        if device.type != "cuda":
            return "Liger-Kernel runs on CUDA tensors"
        return import_reason("liger_kernel.transformers.functional")
    if provider == "flash-attn":
        if device.type != "cuda":
            return "flash-attn runs on CUDA tensors"
        return import_reason("flash_attn")
    return None


def under_backend(fn: Callable, backend: str) -> Callable:
    """``fn`` run under ``llama_fast.backend(backend)`` (its backward follows the forward's backend)."""
    lf = llama_fast

    def run(*args, **kwargs):
        with lf.backend(backend):
            return fn(*args, **kwargs)

    return run


def static_configs(calls: list[Callable]) -> list[Callable]:
    """``calls`` each run inside ``_autotune.static_configs()``: its launches, the backward's
    too, take the static configurations (the triton_static provider)."""
    def static(call: Callable) -> Callable:
        def run():
            with _autotune.static_configs():
                return call()
        return run

    return [static(call) for call in calls]


# ---------------------------------------------------------------------------------------
# Liger-Kernel and flash-attn


def liger_fn(op: str) -> tuple[Callable, tuple[str, ...]]:
    """Liger-Kernel's function for a memory-bound case and the input names it takes.

    The norms run with ``in_place=False``: in place, Liger writes dX over the upstream
    gradient, and the timed backward reuses that gradient on every call. RoPE gets q and k
    in Hugging Face's (B, H, S, D) layout (transposed views, as HF's attention hands them
    over) and the (1, S, D) tables HF's rotary embedding makes."""
    F = importlib.import_module("liger_kernel.transformers.functional")
    if op == "rms_norm":
        return (lambda x, w: F.liger_rms_norm(x, w, EPS, in_place=False)), ("x", "weight")
    if op == "add_rms_norm":
        return (lambda x, r, w: F.liger_fused_add_rms_norm(x, r, w, EPS, in_place=False)), ("x", "residual", "weight")
    if op == "apply_rope":
        def rope(q, k, cos, sin):
            return F.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
        return rope, ("q", "k", "cos", "sin")
    if op == "swiglu":
        return F.liger_swiglu, ("gate", "up")
    if op == "cross_entropy":
        def fused_linear_ce(hidden, weight, target):
            out = F.liger_fused_linear_cross_entropy(hidden, weight, target)
            return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)
        return fused_linear_ce, ("hidden", "weight", "target")
    raise LookupError(f"Liger-Kernel has no functional op for {op}")


def flash_attn_fn(causal: bool) -> Callable:
    from flash_attn import flash_attn_func

    return functools.partial(flash_attn_func, causal=causal)


def flash_attn_decode_fn() -> Callable:
    from flash_attn import flash_attn_with_kvcache

    def run(q, k_cache, v_cache, cache_seqlens):
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens)

    return run
