#!/usr/bin/env python
"""One command for a GPU session: install llama_fast, run the tests, benchmark, report.

    python bench/gpu_check.py [--out DIR] [--smoke] [--skip-install] [--skip-tests]
                              [--skip-compile] [--commit SHA] [--budget-s S]
    python -m bench.gpu_check ...            (the same, from the repository root)

Steps, each timed and logged; a failing step is recorded and the later steps still run,
and the exit status is 1 if anything failed:

1. install    ``python -m pip install --no-build-isolation --no-deps -e .`` -> install.log
2. tests      ``python -m pytest tests -q`` on the GPU (no TRITON_INTERPRET), killed
              after --tests-timeout seconds -> tests.log; passed/failed counts recorded
3. ceilings   a 1 GiB device-to-device copy (read + write bytes) -> copy_gbps, and a bf16
              8192^3 matmul -> bf16_tflops
4. bench      every op/pass of ``CASES`` at Llama-3-8B shapes in bf16, for the providers
              llama_fast (auto backend: triton on a GPU), eager (PyTorch written as Hugging
              Face's Llama modules are) and torch.compile of the same eager functions;
              then attention: flash_attn forward and backward against SDPA's flash, cuDNN
              and memory-efficient backends and compiled flex_attention, and flash_decode
              against SDPA (see "Attention" below)

Results go to --out, else $OUT, else bench/results/<gpu-name>-<date>/: gpu_check.json,
gpu_check.md (a table), gpu_check.log (this script's progress) and the two step logs. The
JSON and markdown are rewritten after every step and every row, so a run killed by an
outer time limit still leaves what it measured; --budget-s (from the script's start) makes
the benchmark skip what it has no time for instead.

How things are timed
--------------------
* Forward: the op called on inputs that do not require grad (no autograd graph recorded).
* Backward: for each input set the forward is run once, outside the timed region, on
  inputs that require grad, and an upstream gradient is drawn once per output. The timed
  call is ``torch.autograd.grad(outputs, inputs, upstream, retain_graph=True)``: the
  backward alone, exactly what autograd runs for that op, with no fwd+bwd minus fwd
  subtraction (whose noise would be as large as a fast backward).
* On CUDA: a pair of CUDA events around every call, the median over --reps calls after
  --warmup calls (which also absorb Triton's JIT and torch.compile's compilation). Before
  each timed call the GPU spins for about half a millisecond (``torch.cuda._sleep``), so
  the host has queued the whole call before the GPU reaches the start event: the events
  measure GPU time, not Python dispatch. We do not flush L2 by writing a big buffer (the
  dirty lines it leaves would be written back during the timed call); instead inputs rotate
  among N_SETS sets, each set larger than the 50 MB L2 at full size, so no call finds its
  inputs left in L2 by the call before.
* On the CPU (``--smoke``): ``time.perf_counter`` around each call, the same median.

GB/s is the minimum traffic of the op (each input read once, each output written once,
the formula beside each case) divided by the time: the same bytes for every provider, so it
is throughput, comparable with the copy ceiling measured in the same run. Peak memory is
what one call allocates above what was live before it (outputs and temporaries), in MiB.

Attention
---------
* Prefill (op "attention"): bf16, head dim 128 (32 q / 8 kv heads, Llama-3-8B) and 64
  (32 / 8, Llama-3.2-1B), causal and full, S = 1K, 2K, 4K, 8K, 16K with B = 16K / S, fwd
  and bwd (timed as above). TFLOP/s = FLOPs / time with forward = 4 * B * Hq * Sq * Sk * D,
  halved when causal, and backward = 2.5 * forward (FlashAttention's convention);
  fraction_of_ceiling is over the measured bf16 matmul ceiling, gbps stays null. Providers:
  llama_fast (flash_attn), sdpa_flash / sdpa_cudnn / sdpa_efficient (SDPA on transposed
  (B, H, S, D) views under sdpa_kernel; enable_gqa=True, or K/V expanded in the call where a
  backend refuses GQA, logged per row) and flex_attention (compiled, causal block mask; the
  last rows of all, each shape a fresh compile).
* Decode (op "decode"): flash_decode vs SDPA (its own backend choice; q (B, Hq, 1, D)
  against the whole cache, non-causal as the one query is the last token), head dim 128,
  32 / 8 heads, B = 1, 8, 32, 64 and context L = 1K, 8K, 32K, 128K with a full cache (Smax = L);
  shapes whose K + V cache exceeds 40 GB are skipped and logged. GB/s = (K and V,
  2 * B * L * Hkv * D * 2 bytes, plus q and out) / time, as a fraction of the copy ceiling.
* Order and budget: the attention and decode rows run after the memory-bound rows of
  llama_fast and eager, and before the torch.compile rows; flex_attention comes last, so
  rows skipped for lack of --budget-s are the compiled ones. Repetitions: at 16K tokens a
  prefill call's work grows as S, so on a GPU warm-up and reps scale as 1K / S (10 / 100
  at 1K down to 2 / 6 at 16K, at least 5 reps): at most ~0.3 s of timed GPU work per row,
  ~160 rows (+ 40 flex). Decode keeps 100 reps up to a 1 GB cache and scales them as
  1 GB / cache bytes above (at least 10), and rotates small caches among enough copies
  (up to 64) to fill 200 MB, a large one used alone. A baseline that raises for a shape
  (another library's kernel) gives a null row and an entry under the bench step's
  "unavailable" with the reason, not a failure; a llama_fast error is a failure.
* --smoke: tiny shapes (B = 2 / 1, S = 32 / 64, heads 4 / 2, D = 16, causal and full; one
  decode case, B = 1, L = 64) for llama_fast (the Triton interpreter) and SDPA's default
  CPU kernel ("sdpa"); the CUDA-only providers give no rows.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import site
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


# ---------------------------------------------------------------------------------------
# shapes and settings


@dataclass(frozen=True)
class Shapes:
    tokens: int
    hidden: int
    inter: int
    q_heads: int
    kv_heads: int
    head_dim: int


LLAMA3_8B = Shapes(tokens=8192, hidden=4096, inter=14336, q_heads=32, kv_heads=8, head_dim=128)
# RoPE runs one program per token, and the interpreter runs programs one by one: few tokens.
SMOKE = Shapes(tokens=32, hidden=256, inter=512, q_heads=4, kv_heads=2, head_dim=16)

DTYPE = torch.bfloat16
DTYPE_NAME = "bfloat16"
EPS = 1e-5
ROPE_THETA = 500000.0


@dataclass(frozen=True)
class Settings:
    shapes: Shapes
    n_sets: int  # input sets rotated between timed calls
    warmup: int
    reps: int
    compile: bool  # run the torch.compile provider


GPU_SETTINGS = dict(shapes=LLAMA3_8B, n_sets=3, warmup=10, reps=100)
SMOKE_SETTINGS = dict(shapes=SMOKE, n_sets=2, warmup=1, reps=2)  # the interpreter is slow: few calls

COPY_BYTES = 2**30  # the copy ceiling's buffer: far larger than L2
MATMUL_N = 8192  # the matmul ceiling: bf16 (N, N) @ (N, N)
HEAD_START_CYCLES = 1_000_000  # ~0.5 ms of GPU spin before each timed call (see the docstring)
BENCH_RESERVE_S = 150  # the test run is cut short to leave the benchmark this much of --budget-s
ROW_RESERVE_S = 15  # a benchmark row is not started with less time left than this
COMPILE_RESERVE_S = 45  # nor a torch.compile row (its first call compiles)


# ---------------------------------------------------------------------------------------
# the eager baselines, written as Hugging Face's Llama modules compute them


def hf_rms_norm(x, weight, eps=EPS):
    """LlamaRMSNorm: float32 statistics, normalised value cast back before the weight."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def hf_add_rms_norm(x, residual, weight, eps=EPS):
    """The unfused residual add of a decoder layer followed by its RMSNorm: (y, h)."""
    h = x + residual
    return hf_rms_norm(h, weight, eps), h


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_apply_rope(q, k, cos, sin):
    """apply_rotary_pos_emb with cos/sin (S, D) in the inputs' dtype, as LlamaRotaryEmbedding
    returns them; q/k are (B, S, H, D), so the tables broadcast over the head axis."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def hf_swiglu(gate, up):
    """LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), given the two projections."""
    return F.silu(gate) * up


def hf_swiglu_fused(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------
# inputs


def _randn(*shape, device):
    return torch.randn(*shape, dtype=DTYPE, device=device)


def norm_inputs(s: Shapes, device) -> dict:
    return {"x": _randn(s.tokens, s.hidden, device=device), "weight": 1 + 0.1 * _randn(s.hidden, device=device)}


def add_norm_inputs(s: Shapes, device) -> dict:
    return dict(norm_inputs(s, device), residual=_randn(s.tokens, s.hidden, device=device))


def rope_inputs(s: Shapes, device) -> dict:
    """q and k, and the tables in both forms: float32 (S, D/2) for llama_fast (what
    ``rope_cos_sin`` returns) and (S, D) in the inputs' dtype for the Hugging Face code."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim)
    angles = torch.arange(s.tokens, device=device, dtype=torch.float32)[:, None] * inv_freq
    full = torch.cat((angles, angles), dim=-1)
    return {
        "q": _randn(1, s.tokens, s.q_heads, s.head_dim, device=device),
        "k": _randn(1, s.tokens, s.kv_heads, s.head_dim, device=device),
        "cos_half": angles.cos(),
        "sin_half": angles.sin(),
        "cos": full.cos().to(DTYPE),
        "sin": full.sin().to(DTYPE),
    }


def swiglu_inputs(s: Shapes, device) -> dict:
    return {"gate": _randn(s.tokens, s.inter, device=device), "up": _randn(s.tokens, s.inter, device=device)}


def swiglu_fused_inputs(s: Shapes, device) -> dict:
    return {"gate_up": _randn(s.tokens, 2 * s.inter, device=device)}


# ---------------------------------------------------------------------------------------
# the benchmark cases: one entry per op
#
#   inputs      builds one input set (a dict of tensors)
#   grad        the inputs that receive gradients in the backward pass
#   llama_fast  (name of the llama_fast function, the input names it takes, in order)
#   eager       (the eager function, the input names it takes); torch.compile compiles it
#   bytes       pass -> minimum bytes moved, from the shapes and e = bytes per element of
#               the bf16 tensors (the llama_fast rope tables are float32: 4 bytes)

T_H = lambda s: s.tokens * s.hidden  # noqa: E731  elements of one (tokens, hidden) tensor
T_I = lambda s: s.tokens * s.inter  # noqa: E731  elements of one (tokens, inter) tensor
QK = lambda s: s.tokens * (s.q_heads + s.kv_heads) * s.head_dim  # noqa: E731  q and k elements
TABLES = lambda s: 2 * s.tokens * (s.head_dim // 2) * 4  # noqa: E731  cos + sin, float32 (S, D/2)

CASES = [
    {
        "op": "rms_norm",
        "shape": lambda s: f"x({s.tokens},{s.hidden})",
        "inputs": norm_inputs,
        "grad": ("x", "weight"),
        "llama_fast": ("rms_norm", ("x", "weight")),
        "eager": (hf_rms_norm, ("x", "weight")),
        "bytes": {
            "fwd": lambda s, e: (2 * T_H(s) + s.hidden) * e,  # read x, weight; write y
            "bwd": lambda s, e: (3 * T_H(s) + 2 * s.hidden) * e,  # read dy, x, weight; write dx, dweight
        },
    },
    {
        "op": "add_rms_norm",
        "shape": lambda s: f"x,residual({s.tokens},{s.hidden})",
        "inputs": add_norm_inputs,
        "grad": ("x", "residual", "weight"),
        "llama_fast": ("add_rms_norm", ("x", "residual", "weight")),
        "eager": (hf_add_rms_norm, ("x", "residual", "weight")),
        "bytes": {
            "fwd": lambda s, e: (4 * T_H(s) + s.hidden) * e,  # read x, residual, weight; write y, h
            # read dy, dh, h, weight; write dx (= d residual, one tensor) and dweight
            "bwd": lambda s, e: (4 * T_H(s) + 2 * s.hidden) * e,
        },
    },
    {
        "op": "apply_rope",
        "shape": lambda s: f"q(1,{s.tokens},{s.q_heads},{s.head_dim}) k(1,{s.tokens},{s.kv_heads},{s.head_dim})",
        "inputs": rope_inputs,
        "grad": ("q", "k"),
        "llama_fast": ("apply_rope", ("q", "k", "cos_half", "sin_half")),
        "eager": (hf_apply_rope, ("q", "k", "cos", "sin")),
        "bytes": {
            "fwd": lambda s, e: 2 * QK(s) * e + TABLES(s),  # read q, k, cos, sin; write q_out, k_out
            "bwd": lambda s, e: 2 * QK(s) * e + TABLES(s),  # read dq_out, dk_out, cos, sin; write dq, dk
        },
    },
    {
        "op": "swiglu",
        "shape": lambda s: f"gate,up({s.tokens},{s.inter})",
        "inputs": swiglu_inputs,
        "grad": ("gate", "up"),
        "llama_fast": ("swiglu", ("gate", "up")),
        "eager": (hf_swiglu, ("gate", "up")),
        "bytes": {
            "fwd": lambda s, e: 3 * T_I(s) * e,  # read gate, up; write y
            "bwd": lambda s, e: 5 * T_I(s) * e,  # read dy, gate, up; write dgate, dup
        },
    },
    {
        "op": "swiglu_fused",
        "shape": lambda s: f"gate_up({s.tokens},{2 * s.inter})",
        "inputs": swiglu_fused_inputs,
        "grad": ("gate_up",),
        "llama_fast": ("swiglu_fused", ("gate_up",)),
        "eager": (hf_swiglu_fused, ("gate_up",)),
        "bytes": {
            "fwd": lambda s, e: 3 * T_I(s) * e,  # read gate_up (2I wide); write y (I wide)
        },
    },
]

PROVIDERS = ("llama_fast", "eager", "torch.compile")


# ---------------------------------------------------------------------------------------
# attention: flash_attn (prefill, fwd and bwd) and flash_decode (one token over a KV cache)
#
# These are not CASES entries: they are compute-bound (reported in TFLOP/s against the
# matmul ceiling), their baselines are other kernels rather than eager code, and they run
# over a grid of shapes.

ATTN_TOKENS = 16384  # B * S for every prefill shape
ATTN_SEQLENS = (1024, 2048, 4096, 8192, 16384)
ATTN_HEADS = ((128, 32, 8), (64, 32, 8))  # (head dim, q heads, kv heads): Llama-3-8B, Llama-3.2-1B
SMOKE_ATTN_TOKENS = 64
SMOKE_ATTN_SEQLENS = (32, 64)
SMOKE_ATTN_HEADS = ((16, 4, 2),)
ATTN_REF_SEQLEN = 1024  # prefill reps scale as ATTN_REF_SEQLEN / S (see the docstring)
ATTN_MIN_REPS = 5

DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (1024, 8192, 32768, 131072)
DECODE_HEADS = (128, 32, 8)
SMOKE_DECODE = ((1, 64),)  # (batch, context)
SMOKE_DECODE_HEADS = (16, 4, 2)
DECODE_MAX_CACHE_BYTES = 40e9  # larger K + V caches are skipped (logged)
DECODE_ROTATE_BYTES = 200e6  # small caches rotate among enough sets to fill this (> 50 MB L2)
DECODE_MAX_SETS = 64
DECODE_REF_BYTES = 1e9  # decode reps scale as DECODE_REF_BYTES / cache bytes above this

# Providers. "sdpa" is F.scaled_dot_product_attention with PyTorch's own backend choice:
# the prefill baseline in --smoke (CPU) and the decode baseline everywhere. The sdpa_*
# providers pin one backend with sdpa_kernel; they and flex_attention are CUDA-only.
ATTN_PROVIDERS = ("llama_fast", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_attention")
CUDA_ONLY = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_attention")
DECODE_PROVIDERS = ("llama_fast", "sdpa")
ALL_PROVIDERS = PROVIDERS + tuple(p for p in ATTN_PROVIDERS if p not in PROVIDERS)
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


def attn_shapes(smoke: bool) -> list[AttnShape]:
    tokens = SMOKE_ATTN_TOKENS if smoke else ATTN_TOKENS
    seqlens = SMOKE_ATTN_SEQLENS if smoke else ATTN_SEQLENS
    return [AttnShape(tokens // s, s, hq, hkv, d, causal)
            for d, hq, hkv in (SMOKE_ATTN_HEADS if smoke else ATTN_HEADS)
            for causal in (True, False) for s in seqlens]


def decode_shapes(smoke: bool) -> list[AttnShape]:
    d, hq, hkv = SMOKE_DECODE_HEADS if smoke else DECODE_HEADS
    grid = SMOKE_DECODE if smoke else [(b, n) for b in DECODE_BATCHES for n in DECODE_CONTEXTS]
    return [AttnShape(b, n, hq, hkv, d, False) for b, n in grid]


def attn_flops(s: AttnShape, pass_: str) -> float:
    """FlashAttention's convention: forward = 4 * B * Hq * Sq * Sk * D (QK^T and PV, two
    flops per multiply-add), halved when causal; backward = 2.5 * forward (five matmuls,
    dQ, dK, dV, dP and the recomputed QK^T, against the forward's two)."""
    fwd = 4 * s.batch * s.q_heads * s.seqlen * s.seqlen * s.head_dim / (2 if s.causal else 1)
    return fwd if pass_ == "fwd" else 2.5 * fwd


def decode_bytes(s: AttnShape, e: int) -> int:
    """K and V read once (2 * B * L * Hkv * D elements), q read and out written (B * Hq * D each)."""
    return (2 * s.batch * s.seqlen * s.kv_heads * s.head_dim + 2 * s.batch * s.q_heads * s.head_dim) * e


def attn_inputs(s: AttnShape, device) -> dict:
    return {"q": _randn(s.batch, s.seqlen, s.q_heads, s.head_dim, device=device),
            "k": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device),
            "v": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device)}


def decode_inputs(s: AttnShape, device) -> dict:
    """A full cache: Smax = L = cache_seqlens, so both providers read exactly L entries."""
    return {"q": _randn(s.batch, 1, s.q_heads, s.head_dim, device=device),
            "k_cache": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device),
            "v_cache": _randn(s.batch, s.seqlen, s.kv_heads, s.head_dim, device=device),
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


def attn_empty_row(op: str, s: AttnShape, pass_: str, provider: str) -> dict:
    return {"op": op, "shape": s.label(decode=op == "decode"), "dtype": DTYPE_NAME, "pass": pass_,
            "provider": provider, "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None,
            "peak_mem_mb": None}


def attn_row(s: AttnShape, pass_: str, provider: str, cfg: Settings, device, ceilings: dict, note: Callable) -> dict:
    """One prefill row: TFLOP/s by attn_flops, as a fraction of the matmul ceiling."""
    lf = import_llama_fast()
    input_sets = [attn_inputs(s, device) for _ in range(cfg.n_sets)]
    if provider == "llama_fast":
        fn = functools.partial(lf.flash_attn, causal=s.causal)
    elif provider == "flex_attention":
        fn = flex_fn(s, device)
    else:
        fn = sdpa_fn(SDPA_BACKENDS[provider], s.causal, expand_kv=False)
        first = input_sets[0]
        try:
            with torch.no_grad():
                fn(first["q"], first["k"], first["v"])
            note(provider, "enable_gqa")
        except RuntimeError as exc:  # the backend refuses GQA (or the shape: then this rerun raises too)
            note(provider, f"expand K/V ({str(exc).splitlines()[0][:200]})")
            fn = sdpa_fn(SDPA_BACKENDS[provider], s.causal, expand_kv=True)
    args = ("q", "k", "v")
    calls = [make_call(fn, args, inputs, pass_, args) for inputs in input_sets]
    warmup, reps = attn_reps(cfg, s, device)
    ms = time_ms(calls, device, warmup, reps)
    peak = peak_mem_mb(calls[0], device)
    tflops = attn_flops(s, pass_) / (ms * 1e9)
    ceiling = ceilings.get("bf16_tflops")
    row = attn_empty_row("attention", s, pass_, provider)
    row.update(ms=_sig(ms), tflops=_sig(tflops), fraction_of_ceiling=_sig(tflops / ceiling) if ceiling else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row


def decode_row(s: AttnShape, provider: str, cfg: Settings, device, ceilings: dict, note: Callable) -> dict:
    """One decode row: GB/s by decode_bytes, as a fraction of the copy ceiling. SDPA gets q
    as (B, Hq, 1, D) against the whole cache, non-causal (the one query is the last token)."""
    n_sets, warmup, reps = decode_plan(cfg, s, device)
    input_sets = [decode_inputs(s, device) for _ in range(n_sets)]
    if provider == "llama_fast":
        decode = import_llama_fast().flash_decode
        calls = [functools.partial(decode, i["q"], i["k_cache"], i["v_cache"], i["cache_seqlens"]) for i in input_sets]
    else:
        first = input_sets[0]
        fn = sdpa_fn(SDPA_BACKENDS[provider], False, expand_kv=False)
        try:
            fn(first["q"], first["k_cache"], first["v_cache"])
            note(provider, "enable_gqa")
        except RuntimeError as exc:
            note(provider, f"expand K/V ({str(exc).splitlines()[0][:200]})")
            fn = sdpa_fn(SDPA_BACKENDS[provider], False, expand_kv=True)
        calls = [functools.partial(fn, i["q"], i["k_cache"], i["v_cache"]) for i in input_sets]
    with torch.no_grad():
        ms = time_ms(calls, device, warmup, reps)
        peak = peak_mem_mb(calls[0], device)
    gbps = decode_bytes(s, DTYPE.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = attn_empty_row("decode", s, "fwd", provider)
    row.update(ms=_sig(ms), gbps=_sig(gbps), fraction_of_ceiling=_sig(gbps / copy) if copy else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row


# ---------------------------------------------------------------------------------------
# timing and memory: device-agnostic entry points, one implementation per device type


def _spin(cycles: int) -> None:
    # torch.cuda._sleep is private but long-standing; without it the host merely has no head start.
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(cycles)


def _time_cuda(calls: list[Callable], warmup: int, reps: int) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        _spin(HEAD_START_CYCLES)  # the host queues the call while the GPU spins
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _time_wall(calls: list[Callable], warmup: int, reps: int) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_ms(calls: list[Callable], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of one call, rotating through ``calls`` (one per input set)."""
    timer = _time_cuda if device.type == "cuda" else _time_wall
    return timer(calls, warmup, reps)


def peak_mem_mb(call: Callable, device: torch.device) -> float | None:
    """MiB one call allocates above what was live before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / MiB


# ---------------------------------------------------------------------------------------
# the report


def new_report(device: torch.device, commit: str | None) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "commit": commit,
        "ceilings": {"copy_gbps": None, "bf16_tflops": None},
        "rows": [],
        "steps": {},
    }


def _dist_version(dist: str) -> str | None:
    # Read from the metadata: importing triton here would fix TRITON_INTERPRET too early.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, ".2g" if spec == ".0f" and abs(value) < 10 else spec)  # keep tiny (CPU) values readable


def _speedup(rows: list[dict], row: dict, provider: str) -> str:
    key = (row["op"], row["pass"], row["shape"])
    base = next((r for r in rows if (r["op"], r["pass"], r["shape"], r["provider"]) == (*key, provider)), None)
    if base is None or base["ms"] is None or row["ms"] is None or row["ms"] <= 0:
        return "—"
    return f"{base['ms'] / row['ms']:.2f}×"


def _step_summary(name: str, step: dict) -> str:
    text = f"{name} {step['status']}"
    if step.get("passed") is not None or step.get("failed") is not None:
        text += f", {step.get('passed')} passed, {step.get('failed')} failed"
    if step.get("seconds") is not None:
        text += f" ({step['seconds']:.0f} s)"
    return text


def markdown(report: dict) -> str:
    ceil, steps, bench = report["ceilings"], report["steps"], report["steps"].get("bench", {})
    lines = [
        "# llama_fast GPU check",
        "",
        f"- device: {report['device']} · torch {report['torch']} · triton {report['triton']} · commit {report['commit'] or 'unknown'}",
        f"- ceilings: copy {_fmt(ceil['copy_gbps'], '.0f')} GB/s · bf16 matmul {_fmt(ceil['bf16_tflops'], '.0f')} TFLOP/s",
        f"- llama_fast backend: {bench.get('llama_fast_backend')} · dtype {DTYPE_NAME}"
        f" · timing: {bench.get('timing')}",
        "- steps: " + " · ".join(_step_summary(name, step) for name, step in steps.items()),
        "",
        "| op | pass | shape | provider | ms | GB/s | % of copy | vs eager | vs torch.compile | peak MiB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = report["rows"]
    case_ops = {case["op"] for case in CASES}
    for r in (r for r in rows if r["op"] in case_ops):
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} "
            f"| {_fmt(r['gbps'], '.0f')} | {_fmt(pct, '.1f')} | {_speedup(rows, r, 'eager')} "
            f"| {_speedup(rows, r, 'torch.compile')} | {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    lines += [
        "",
        "## Attention (flash_attn)",
        "",
        "TFLOP/s: forward 4·B·Hq·Sq·Sk·D (halved when causal), backward 2.5× forward; "
        "% of the bf16 matmul ceiling.",
        "",
        "| pass | shape | provider | ms | TFLOP/s | % of matmul | vs sdpa_flash | vs sdpa_cudnn | peak MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in rows if r["op"] == "attention"):
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['pass']} | {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} | {_fmt(r['tflops'], '.0f')} "
            f"| {_fmt(pct, '.1f')} | {_speedup(rows, r, 'sdpa_flash')} | {_speedup(rows, r, 'sdpa_cudnn')} "
            f"| {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    lines += [
        "",
        "## Decode (flash_decode)",
        "",
        "GB/s: K and V read once (2·B·L·Hkv·D·2 bytes) plus q and out; % of the copy ceiling.",
        "",
        "| shape | provider | ms | GB/s | % of copy | vs sdpa | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in rows if r["op"] == "decode"):
        pct = None if r["fraction_of_ceiling"] is None else 100 * r["fraction_of_ceiling"]
        lines.append(
            f"| {r['shape']} | {r['provider']} | {_fmt(r['ms'], '.4f')} | {_fmt(r['gbps'], '.0f')} "
            f"| {_fmt(pct, '.1f')} | {_speedup(rows, r, 'sdpa')} | {_fmt(r['peak_mem_mb'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def _row_order(rows: list[dict]) -> Callable[[dict], tuple]:
    """Sort key: op, then shape in the order shapes first appear (attention and decode run
    a grid of shapes; the memory-bound ops have one each), then pass, then provider."""
    ops = [case["op"] for case in CASES] + ["attention", "decode"]
    first_seen: dict = {}
    for i, r in enumerate(rows):
        first_seen.setdefault((r["op"], r["shape"]), i)

    def key(row: dict) -> tuple:
        return (ops.index(row["op"]), first_seen[(row["op"], row["shape"])], ("fwd", "bwd").index(row["pass"]),
                ALL_PROVIDERS.index(row["provider"]))

    return key


def write_outputs(out_dir: Path, report: dict) -> str:
    report["rows"].sort(key=_row_order(report["rows"]))
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "gpu_check.md").write_text(table)
    return table


class Log:
    """Progress lines to stdout and to gpu_check.log (stdout may be cut to its tail)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")


# ---------------------------------------------------------------------------------------
# steps 1 and 2: install and tests (child processes)


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> tuple[int | None, bool]:
    """Run ``cmd`` in the repository root, output to ``log_path``; (return code, timed out)."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # A session of its own, so a timeout ends the whole group (pytest's compile workers too).
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout_s)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[gpu_check] killed after {timeout_s:.0f} s\n")
            return None, True


def _activate_editable_install() -> None:
    """pip ran in a child process: the import hook of the editable install is a .pth file
    this interpreter read at start-up, before it existed. Read llama_fast's .pth files now."""
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    for sitedir in filter(os.path.isdir, dirs):
        for pth in sorted(Path(sitedir).glob("__editable__*llama_fast*.pth")):
            site.addpackage(sitedir, pth.name, None)
    importlib.invalidate_caches()


def step_install(out_dir: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    code, timed_out = run_logged(cmd, out_dir / "install.log", timeout_s)
    if code == 0:
        _activate_editable_install()
    return {"status": "ok" if code == 0 else ("timeout" if timed_out else "failed"), "returncode": code,
            "log": "install.log"}


PYTEST_WORDS = {"passed": "passed", "failed": "failed", "error": "errors", "errors": "errors",
                "skipped": "skipped", "xfailed": "xfailed", "xpassed": "xpassed", "deselected": "deselected"}
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$")


def parse_pytest(text: str) -> dict:
    """Counts from pytest's summary line ("3 failed, 120 passed, 2 skipped in 80.1s"); with
    no summary (the run was killed) counts from the progress characters printed so far."""
    counts = dict.fromkeys(sorted(set(PYTEST_WORDS.values())), 0)
    for line in reversed(text.splitlines()):
        stripped = line.strip("= \t")
        if re.search(r"\bin \d+(\.\d+)?s\b", stripped) and (_COUNT.search(stripped) or "no tests ran" in stripped):
            for n, word in _COUNT.findall(stripped):
                counts[PYTEST_WORDS[word]] += int(n)
            return dict(counts, summary=stripped)
    progress = "".join(m.group(1) for m in map(_PROGRESS.match, text.splitlines()) if m)
    for char, key in {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}.items():
        counts[key] = progress.count(char)
    return dict(counts, summary=None)


def step_tests(out_dir: Path, timeout_s: float, on_gpu: bool) -> dict:
    env = dict(os.environ)
    if on_gpu:
        env.pop("TRITON_INTERPRET", None)  # the kernels must run compiled on the GPU
    # Every failure is worth seeing from a scarce GPU session, so no -x; pytest-xdist (on
    # the GPU image) spreads Triton's JIT compiles over the cores.
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "--maxfail=25", "-p", "no:cacheprovider"]
    if on_gpu and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    code, timed_out = run_logged(cmd, out_dir / "tests.log", timeout_s, env)
    counts = parse_pytest((out_dir / "tests.log").read_text(errors="replace"))
    status = "ok" if code == 0 else ("timeout" if timed_out else "failed")
    return {"status": status, "returncode": code, "timeout_s": timeout_s, "log": "tests.log", **counts}


# ---------------------------------------------------------------------------------------
# step 3: ceilings


def step_ceilings(report: dict, device: torch.device, warmup: int, reps: int) -> dict:
    src = torch.empty(COPY_BYTES // 2, dtype=DTYPE, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms([lambda: dst.copy_(src)], device, warmup, reps)
    report["ceilings"]["copy_gbps"] = round(2 * COPY_BYTES / (copy_ms * 1e6), 1)  # read + write
    del src, dst
    a = _randn(MATMUL_N, MATMUL_N, device=device)
    b = _randn(MATMUL_N, MATMUL_N, device=device)
    mm_ms = time_ms([lambda: a @ b], device, warmup, reps)
    report["ceilings"]["bf16_tflops"] = round(2 * MATMUL_N**3 / (mm_ms * 1e9), 1)
    return {"status": "ok", "copy_ms": round(copy_ms, 5), "matmul_ms": round(mm_ms, 5),
            "copy_bytes": COPY_BYTES, "matmul_n": MATMUL_N}


# ---------------------------------------------------------------------------------------
# step 4: benchmarks


@functools.lru_cache(maxsize=None)
def import_llama_fast():
    """llama_fast as installed; if it is not (the install step failed), straight from this
    working tree, where setup.py's mapping of ``kernels/`` to ``llama_fast.kernels`` is
    redone by adding the repository root to the package's search path."""
    try:
        importlib.import_module("llama_fast.kernels")
    except ImportError:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        package = importlib.import_module("llama_fast")
        if str(REPO) not in package.__path__:
            package.__path__.append(str(REPO))  # llama_fast.kernels -> REPO/kernels
        importlib.import_module("llama_fast.kernels")
    return importlib.import_module("llama_fast")


def provider_fn(case: dict, provider: str, compiled: dict) -> tuple[Callable, tuple[str, ...]]:
    """The function that provider runs for ``case`` and the names of the inputs it takes."""
    if provider == "llama_fast":
        name, args = case["llama_fast"]
        return getattr(import_llama_fast(), name), args
    fn, args = case["eager"]
    if provider == "torch.compile":
        if fn not in compiled:  # one compiled wrapper per function, shared by fwd and bwd
            compiled[fn] = torch.compile(fn)
        fn = compiled[fn]
    return fn, args


def _sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (interpreter timings are tiny in GB/s)."""
    return float(f"{value:.{digits}g}")


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def make_call(fn: Callable, args: tuple[str, ...], inputs: dict, pass_: str, grad: tuple[str, ...]) -> Callable:
    """A no-argument callable running one pass of ``fn`` on one input set."""
    if pass_ == "fwd":
        tensors = [inputs[name] for name in args]
        return lambda: fn(*tensors)
    leaves = {name: t.detach().requires_grad_(name in grad) for name, t in inputs.items()}
    outputs = _as_tuple(fn(*[leaves[name] for name in args]))  # forward once, outside the timing
    upstream = tuple(torch.randn_like(o) for o in outputs)  # a fixed upstream gradient
    wrt = tuple(leaves[name] for name in grad)
    return lambda: torch.autograd.grad(outputs, wrt, upstream, retain_graph=True)


def empty_row(case: dict, pass_: str, provider: str, s: Shapes) -> dict:
    """A row with every field; the measurements stay null where a row failed or was skipped."""
    return {"op": case["op"], "shape": case["shape"](s), "dtype": DTYPE_NAME, "pass": pass_, "provider": provider,
            "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None, "peak_mem_mb": None}


def bench_row(case: dict, pass_: str, provider: str, cfg: Settings, device, ceilings: dict, compiled: dict) -> dict:
    s = cfg.shapes
    fn, args = provider_fn(case, provider, compiled)
    input_sets = [case["inputs"](s, device) for _ in range(cfg.n_sets)]
    calls = [make_call(fn, args, inputs, pass_, case["grad"]) for inputs in input_sets]
    ms = time_ms(calls, device, cfg.warmup, cfg.reps)
    peak = peak_mem_mb(calls[0], device)
    gbps = case["bytes"][pass_](s, DTYPE.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = empty_row(case, pass_, provider, s)
    row.update(
        ms=_sig(ms),
        gbps=_sig(gbps),
        # tflops stays null: these ops are memory-bound, their few flops say nothing.
        fraction_of_ceiling=_sig(gbps / copy) if copy else None,
        peak_mem_mb=None if peak is None else _sig(peak),
    )
    return row


def llama_fast_backend(device: torch.device) -> str:
    backends = import_llama_fast().backends
    name = backends.pick("rms_norm_fwd", device)
    return f"{name} (interpreter)" if name == "triton" and device.type == "cpu" else name


def step_bench(report, cfg: Settings, device, deadline: float, log: Log, save: Callable, smoke: bool = False) -> dict:
    info = {"status": "ok", "shapes": asdict(cfg.shapes), "timing": _timing_note(cfg, device), "errors": [],
            "skipped": [], "unavailable": [], "gqa": {}}
    try:
        info["llama_fast_backend"] = llama_fast_backend(device)
    except Exception as exc:
        info["llama_fast_backend"] = None
        info["errors"].append({"what": "import llama_fast", "error": f"{type(exc).__name__}: {exc}"})
    providers = [p for p in PROVIDERS if p != "torch.compile" or cfg.compile]
    ceilings = report["ceilings"]
    compiled: dict = {}

    def note_gqa(what: str) -> Callable[[str, str], None]:
        def note(provider: str, how: str) -> None:
            info["gqa"][what] = how
            if how != "enable_gqa":
                log(f"{what}: GQA by {how}")
        return note

    # Jobs: (what, empty row, reserve, body, baseline). A baseline (another library's
    # kernel) that raises for a shape is "unavailable", not a failure of this check.
    def case_job(case, pass_, provider):
        return (f"{case['op']} {pass_} {provider}", empty_row(case, pass_, provider, cfg.shapes),
                COMPILE_RESERVE_S if provider == "torch.compile" else ROW_RESERVE_S,
                lambda: bench_row(case, pass_, provider, cfg, device, ceilings, compiled), False)

    def attn_job(s, pass_, provider):
        what = f"attention {pass_} {provider} {s.label()}"
        return (what, attn_empty_row("attention", s, pass_, provider),
                COMPILE_RESERVE_S if provider == "flex_attention" else ROW_RESERVE_S,
                lambda: attn_row(s, pass_, provider, cfg, device, ceilings, note_gqa(what)), provider != "llama_fast")

    def decode_job(s, provider):
        what = f"decode fwd {provider} {s.label(decode=True)}"
        return (what, attn_empty_row("decode", s, "fwd", provider), ROW_RESERVE_S,
                lambda: decode_row(s, provider, cfg, device, ceilings, note_gqa(what)), provider != "llama_fast")

    # Order: llama_fast and eager for the memory-bound cases, then attention and decode
    # (no compiler), then torch.compile and flex_attention: if time runs short, the
    # slow-to-compile rows are the ones skipped.
    attn_providers = [p for p in ATTN_PROVIDERS
                      if p != "flex_attention" and (p not in CUDA_ONLY or device.type == "cuda")
                      and (p != "sdpa" or smoke)]
    jobs = [case_job(case, pass_, provider) for case in CASES for pass_ in case["bytes"] for provider in providers[:2]]
    prefill = attn_shapes(smoke)
    jobs += [attn_job(s, pass_, provider) for s in prefill for pass_ in ("fwd", "bwd") for provider in attn_providers]
    for s in decode_shapes(smoke):
        if decode_bytes(s, DTYPE.itemsize) > DECODE_MAX_CACHE_BYTES:
            what = f"decode {s.label(decode=True)}"
            info["unavailable"].append({"what": what, "why": f"cache over {DECODE_MAX_CACHE_BYTES / 1e9:.0f} GB"})
            log(f"skip {what}: K + V cache {decode_bytes(s, DTYPE.itemsize) / 1e9:.0f} GB over the "
                f"{DECODE_MAX_CACHE_BYTES / 1e9:.0f} GB limit")
            continue
        jobs += [decode_job(s, provider) for provider in DECODE_PROVIDERS]
    jobs += [case_job(case, pass_, provider) for case in CASES for pass_ in case["bytes"] for provider in providers[2:]]
    if cfg.compile and device.type == "cuda":
        try:
            _flex()
            jobs += [attn_job(s, pass_, "flex_attention") for s in prefill for pass_ in ("fwd", "bwd")]
        except Exception as exc:
            info["unavailable"].append({"what": "flex_attention", "why": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            log(f"skip flex_attention: unavailable: {type(exc).__name__}: {exc}")
    else:
        log("skip flex_attention: " + ("--smoke or --skip-compile" if not cfg.compile else "no GPU"))

    for what, empty, reserve, body, baseline in jobs:
        if time.monotonic() > deadline - reserve:
            info["skipped"].append(what)
            report["rows"].append(empty)
            log(f"skip {what}: out of time")
            continue
        start = time.monotonic()
        try:
            row = body()
            rate = (f"{row['tflops']:.4g} TFLOP/s" if row["tflops"] is not None else f"{_fmt(row['gbps'], '.0f')} GB/s")
            log(f"{what}: {row['ms']:.4f} ms, {rate} ({time.monotonic() - start:.1f} s)")
        except Exception as exc:
            row = empty
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if baseline:
                info["unavailable"].append({"what": what, "why": reason})
                log(f"{what}: UNAVAILABLE {reason}")
            else:
                info["errors"].append({"what": what, "error": reason})
                log(f"{what}: FAILED {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        report["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand back this row's cached blocks (eager's float32 temporaries are large)
        save()
    if info["errors"] or info["skipped"]:
        info["status"] = "failed"
    return info


def _timing_note(cfg: Settings, device: torch.device) -> str:
    clock = "CUDA events, GPU head start" if device.type == "cuda" else "wall clock"
    return (f"{clock}; median of {cfg.reps} after {cfg.warmup} warm-up; {cfg.n_sets} input sets rotated; "
            "bwd = autograd.grad of a recorded forward (retain_graph)")


# ---------------------------------------------------------------------------------------
# driver


def resolve_commit(given: str | None) -> str | None:
    if given:
        return given
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LLAMA_FAST_COMMIT") or None


def default_out_dir(device_name: str) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    return REPO / "bench" / "results" / f"{slug}-{datetime.date.today().isoformat()}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (default: $OUT, else bench/results/<gpu>-<date>/)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, no install/tests/ceilings/torch.compile: a CPU check of this script")
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--commit", help="commit to report (default: git rev-parse HEAD, else $LLAMA_FAST_COMMIT)")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall time for everything; late rows are skipped")
    p.add_argument("--tests-timeout", type=float, default=240.0, help="seconds before the test run is killed")
    p.add_argument("--install-timeout", type=float, default=180.0)
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    return p.parse_args(argv)


def run_step(report: dict, name: str, body: Callable[[], dict], log: Log, save: Callable) -> None:
    """Run one step; its outcome (or the exception) and its time go into report["steps"]."""
    log(f"== {name}")
    start = time.monotonic()
    try:
        result = body()
    except Exception as exc:
        log(traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    report["steps"][name] = {**result, "seconds": round(time.monotonic() - start, 1)}
    log(f"== {name}: {result['status']}")
    save()


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        # Before anything imports triton: on a GPU the kernels run compiled, never interpreted.
        os.environ.pop("TRITON_INTERPRET", None)
    device = torch.device("cuda" if on_gpu else "cpu")
    settings = dict(SMOKE_SETTINGS if args.smoke else GPU_SETTINGS)
    settings.update({k: v for k, v in (("warmup", args.warmup), ("reps", args.reps)) if v is not None})
    cfg = Settings(**settings, compile=not (args.smoke or args.skip_compile))

    report = new_report(device, resolve_commit(args.commit))
    out_dir = args.out or default_out_dir(report["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu_check.log")
    log(f"gpu_check: {report['device']}, torch {report['torch']}, triton {report['triton']}, out {out_dir}")

    def save() -> str:
        return write_outputs(out_dir, report)

    def remaining() -> float:
        return args.budget_s - (time.monotonic() - start)

    def skipped(why: str) -> Callable[[], dict]:
        return lambda: {"status": "skipped", "why": why}

    # (step, why it is skipped or None, what it runs)
    steps = [
        ("install", "--smoke or --skip-install" if args.smoke or args.skip_install else None,
         lambda: step_install(out_dir, max(10.0, min(args.install_timeout, remaining())))),
        # The test run is cut short if it would eat into the benchmark's share of the budget.
        ("tests", "--smoke or --skip-tests" if args.smoke or args.skip_tests else None,
         lambda: step_tests(out_dir, max(10.0, min(args.tests_timeout, remaining() - BENCH_RESERVE_S)), on_gpu)),
        ("ceilings", "--smoke or no GPU" if args.smoke or not on_gpu else None,
         lambda: step_ceilings(report, device, cfg.warmup, max(10, cfg.reps // 2))),
        ("bench", None, lambda: step_bench(report, cfg, device, start + args.budget_s, log, save, args.smoke)),
    ]
    for name, why_skipped, body in steps:
        run_step(report, name, skipped(why_skipped) if why_skipped else body, log, save)

    table = save()
    failed = [name for name, step in report["steps"].items() if step["status"] not in ("ok", "skipped")]
    log(f"done in {time.monotonic() - start:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    print("\n" + table, end="", flush=True)  # the table last: a cut-off stdout keeps its tail
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
