"""The attention cases of the benchmarks: flash_attn (prefill) and flash_decode.

Input builders, FLOP and byte formulas, the SDPA and compiled flex_attention baselines and
the per-shape repetition plans; the grids are in bench/grid.py, the providers in
bench/providers.py, and the rows are measured by bench/rows.py.

Attention
---------
* Prefill (op "attention"): q (B, S, Hq, D), k/v (B, S, Hkv, D), causal or full, passes
  fwd, bwd and fwd+bwd (timed as bench/timing.py describes). TFLOP/s = FLOPs / time with
  forward = 4 * B * Hq * Sq * Sk * D, halved when causal; backward = 2.5 * forward
  (FlashAttention's convention) and fwd+bwd = 3.5 * forward; fraction_of_ceiling is over
  the measured bf16 matmul ceiling, gbps stays null. SDPA runs on transposed (B, H, S, D)
  views under sdpa_kernel, with enable_gqa=True, or K/V expanded in the call where a
  backend refuses GQA (logged, and recorded under the bench step's "gqa"); flex_attention
  is compiled with a causal block mask, each shape a fresh compile.
* Decode (op "decode"): one query per row against a full cache (Smax = L = cache_seqlens),
  q (B, 1, Hq, D); SDPA (its own backend choice) gets q as (B, Hq, 1, D) against the whole
  cache, non-causal as the one query is the last token. Shapes whose K + V cache exceeds
  40 GB are skipped. GB/s = (K and V, 2 * B * L * Hkv * D * e bytes, plus q and out) / time,
  as a fraction of the copy ceiling.
* Repetitions on a GPU: a prefill call's work grows as S at a fixed B * S, so warm-up and
  reps scale as 1K / S (10 / 100 at 1K down to 2 / 6 at 16K, at least 5 reps): at most
  ~0.3 s of timed GPU work per row. Decode keeps 100 reps up to a 1 GB cache and scales
  them as 1 GB / cache bytes above (at least 10), and rotates small caches among enough
  copies (up to 64) to fill 200 MB, a large one used alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llama_fast.bench.cases import DTYPE, Settings, _randn, dtype_name


# ---------------------------------------------------------------------------------------
# attention: flash_attn (prefill, fwd and bwd) and flash_decode (one token over a KV cache)
#
# These are not CASES entries: they are compute-bound (reported in TFLOP/s against the
# matmul ceiling), their baselines are other kernels rather than eager code, and they run
# over a grid of shapes.

# The shape grids are in bench/grid.py, the provider lists in bench/providers.py.
ATTN_REF_SEQLEN = 1024  # prefill reps scale as ATTN_REF_SEQLEN / S (see the module docstring)
ATTN_MIN_REPS = 5

DECODE_MAX_CACHE_BYTES = 40e9  # larger K + V caches are skipped (logged)
DECODE_ROTATE_BYTES = 200e6  # small caches rotate among enough sets to fill this (> 50 MB L2)
DECODE_MAX_SETS = 64
DECODE_REF_BYTES = 1e9  # decode reps scale as DECODE_REF_BYTES / cache bytes above this

# "sdpa" is F.scaled_dot_product_attention with PyTorch's own backend choice (the prefill
# baseline on a CPU, the decode baseline everywhere); the others pin one backend (CUDA only).
SDPA_BACKENDS = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}


@dataclass(frozen=True)
class AttnShape:
    batch: int
    seqlen: int  # Sq = Sk for prefill; the context length L for decode
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    def label(self, decode: bool = False) -> str:
        b, s, hq, hkv, d = self.batch, self.seqlen, self.q_heads, self.kv_heads, self.head_dim
        if decode:
            return f"q({b},1,{hq},{d}) cache({b},{s},{hkv},{d})"
        return f"q({b},{s},{hq},{d}) kv({b},{s},{hkv},{d}) {'causal' if self.causal else 'full'}"


def attn_flops(s: AttnShape, pass_: str) -> float:
    """FlashAttention's convention: forward = 4 * B * Hq * Sq * Sk * D (QK^T and PV, two
    flops per multiply-add), halved when causal; backward = 2.5 * forward (five matmuls,
    dQ, dK, dV, dP and the recomputed QK^T, against the forward's two)."""
    fwd = 4 * s.batch * s.q_heads * s.seqlen * s.seqlen * s.head_dim / (2 if s.causal else 1)
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * fwd


def decode_bytes(s: AttnShape, e: int) -> int:
    """K and V read once (2 * B * L * Hkv * D elements), q read and out written (B * Hq * D each)."""
    return (2 * s.batch * s.seqlen * s.kv_heads * s.head_dim + 2 * s.batch * s.q_heads * s.head_dim) * e


def attn_inputs(s: AttnShape, device, dtype=DTYPE) -> dict:
    return {"q": _randn(s.batch, s.seqlen, s.q_heads, s.head_dim, device=device, dtype=dtype),
            "k": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device, dtype=dtype),
            "v": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device, dtype=dtype)}


def decode_inputs(s: AttnShape, device, dtype=DTYPE) -> dict:
    """A full cache: Smax = L = cache_seqlens, so both providers read exactly L entries."""
    return {"q": _randn(s.batch, 1, s.q_heads, s.head_dim, device=device, dtype=dtype),
            "k_cache": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device, dtype=dtype),
            "v_cache": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device, dtype=dtype),
            "cache_seqlens": torch.full((s.batch,), s.seqlen, dtype=torch.int32, device=device)}


def sdpa_fn(backend: str | None, causal: bool, expand_kv: bool) -> Callable:
    """SDPA on the (B, S, H, D) tensors seen as (B, H, S, D) (transposed views, no copy).

    GQA: ``enable_gqa=True`` is tried first (PyTorch's flash backend takes it); a backend
    that refuses it (in our experience the memory-efficient one, and cuDNN on some PyTorch
    versions) is rerun with K and V expanded to Hq heads inside the timed call, as Hugging
    Face's repeat_kv does. Which one each row used goes to the log and to the bench step's
    ``gqa`` record."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = None if backend is None else getattr(SDPBackend, backend)

    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = q.shape[1] // k.shape[1]
        if expand_kv and groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        kwargs = {} if expand_kv else {"enable_gqa": groups > 1}
        if pinned is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)
        else:
            with sdpa_kernel(pinned):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)
        return out.transpose(1, 2)

    return run


def _raise_recompile_limit() -> None:
    # Each prefill shape is a fresh static compile of flex_attention; the default limit (8
    # per function) would silently fall back to the unfused eager path for the rest.
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
            return


@functools.lru_cache(maxsize=None)
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def flex_fn(s: AttnShape, device) -> Callable:
    compiled, create_block_mask = _flex()
    mask = None
    if s.causal:
        def causal_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        mask = create_block_mask(causal_mod, None, None, s.seqlen, s.seqlen, device=device)

    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return compiled(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)

    return run


def attn_reps(cfg: Settings, s: AttnShape, device) -> tuple[int, int]:
    """(warmup, reps) for a prefill shape: at 16K tokens the work per call grows as S, so on
    a GPU the counts shrink as ATTN_REF_SEQLEN / S (100 reps at 1K ... 6 at 16K) and every
    row costs about the same time."""
    if device.type != "cuda":
        return cfg.warmup, cfg.reps
    scale = ATTN_REF_SEQLEN / s.seqlen
    return max(2, round(cfg.warmup * scale)), max(ATTN_MIN_REPS, round(cfg.reps * scale))


def decode_plan(cfg: Settings, s: AttnShape, device) -> tuple[int, int, int]:
    """(input sets, warmup, reps) for a decode shape: on a GPU a small cache is rotated among
    enough copies to fill DECODE_ROTATE_BYTES (so no call finds it in L2), a large one is
    used alone (a 34 GB cache cannot be tripled), and reps shrink as 1 GB / cache bytes
    (at least 10) above a gigabyte."""
    if device.type != "cuda":
        return cfg.n_sets, cfg.warmup, cfg.reps
    nbytes = decode_bytes(s, DTYPE.itemsize)
    n_sets = min(DECODE_MAX_SETS, max(1, -(-int(DECODE_ROTATE_BYTES) // nbytes)))
    reps = max(10, min(cfg.reps, round(cfg.reps * DECODE_REF_BYTES / nbytes)))
    return n_sets, min(cfg.warmup, reps), reps


def attn_empty_row(op: str, s: AttnShape, pass_: str, provider: str, dtype: torch.dtype = DTYPE) -> dict:
    return {"op": op, "shape": s.label(decode=op == "decode"), "dtype": dtype_name(dtype), "pass": pass_,
            "provider": provider, "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None,
            "peak_mem_mb": None}

