"""Run-time autotuning of the attention kernels' launch configurations, cached on disk.

The launchers of ``flash_attn.py`` (forward, dK/dV, dQ) and ``flash_decode.py`` (the split
kernel) ask ``choose(role, key, default, candidates, run_candidate)`` for the configuration
to launch. The answer is, in this order:

- the static ``default`` when tuning is off: ``LLAMA_FAST_AUTOTUNE=0``, inside
  ``static_configs()``, off CUDA or under the Triton interpreter (the key is None), or when
  the call has no candidate besides the default (float32, head dims other than 64 and 128);
- the configuration remembered for ``key``: in this process (the memo), else in the cache
  file of this GPU model and these llama_fast and triton versions. A hit times nothing, so
  the launches are deterministic given the cache;
- the default again while a CUDA graph is being captured or torch.compile is tracing
  (nothing may be timed or synchronised there);
- else the result of tuning: each candidate is compiled for the device without a launch
  (Triton's warm-up compile) and dropped if it breaks a static check (see ``prune``); the
  default and the survivors are timed with CUDA events (median of ``REPS`` after
  ``WARMUP`` calls) on the caller's real inputs, writing into scratch outputs (the caller's
  outputs are written once, afterwards, by the chosen configuration); the fastest wins if it
  beats the default by more than ``MIN_GAIN``. The choice goes to the memo and the file.

Keys are coarse so that a model pays the tuning once, not per sequence length: the role,
the GPU's compute capability, dtype, head dim, causal, varlen and a length bucket (the next
power of two of the longest sequence, clamped to [1K, 16K]); for decode the query-row tile
(GQA group x new tokens), a batch bucket and a context bucket (the cache's capacity Smax,
clamped to [1K, 128K]).

The cache: JSON, one file per GPU model, llama_fast version and triton version, in
``$LLAMA_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/llama_fast``, else ``~/.cache/llama_fast``.
It also records a fingerprint of the attention kernels' sources: a file written by other
kernels, or one that does not parse, is ignored with a warning and rewritten. Writes go to
a temporary file renamed over the old one (``os.replace``), merged with what another process
wrote meanwhile. A directory that cannot be written leaves the choices in the memo.

Compiled evidence for the candidate tables (Triton 3.6, ``llama_fast.tools.compile_check``'s
compile of each configuration as the launcher specialises it; bf16, causal, fixed length; decode
with splits, GQA 4 x 1 token). Per configuration (BLOCK_M/BLOCK_N/warps/stages, * the static
default): shared memory, registers, spilled bytes if any, blocks per SM; the tensor-core work
ratio is 1.00 for every one listed. Candidates dropped from the tables on this evidence: on
sm_90, dK/dV 32x128/w8/s1 (spills 36) and 16x64/w4/s2 (28) at head dim 128, 64x128/w8/s2 (4)
at 64; on sm_80 and sm_86, every dK/dV tile tried at head dim 128 but 16x32 on 2 warps (16x64
on 4 warps: work 1.50; the others spill 16-304 bytes), dK/dV 32x64 and 64x64 at 64 (16-360), dQ
64x64 at either head dim (8-40), dQ 128x32/w8/s2 at 128 (48-56), the forward 128x64/w8/s2 at
128 on sm_80 (16), on sm_86 dQ 64x32/w4/s2 and 32x32/w2/s3 at 64 (4), and on sm_100 (which
otherwise takes the Hopper table; tcgen05, so no work ratio) dK/dV 16x128 with 2 or 3 stages
(272, 336) and dQ 128x64/w8/s2 (40) at head dim 128. The static defaults (*) are listed as
they were when these tables were measured (some spilled on sm_80/86/100); flash_attn.py has
since moved those classes' dK/dV tiles and sm_80's head-dim-128 forward to tiles that spill
nothing (its design notes have the numbers). Whatever the default, it is always timed.

- sm_90 fwd 64: M128/N64/w8/s3* 64K 126r 2b, M128/N128/w8/s3 112K 238r 1b, M128/N64/w4/s4 80K 241r 2b,
  M64/N64/w4/s4 72K 128r 3b
- sm_90 fwd 128: M128/N128/w8/s2* 160K 255r 1b, M128/N64/w8/s3 128K 186r 1b, M128/N64/w8/s2 96K 198r 1b,
  M64/N64/w4/s3 112K 224r 2b
- sm_90 dkdv 64: M32/N128/w8/s2* 48K 241r 1b, M16/N128/w8/s2 40K 214r 1b, M32/N128/w8/s1 40K 165r 1b,
  M16/N64/w4/s2 24K 180r 2b
- sm_90 dkdv 128: M16/N128/w8/s1* 72K 233r 1b, M16/N128/w8/s2 80K 254r 1b, M16/N128/w8/s3 88K 255r 1b,
  M16/N64/w4/s1 40K 254r 2b
- sm_90 dq 64: M64/N64/w4/s2* 48K 168r 3b, M64/N64/w4/s3 64K 164r 3b, M128/N64/w8/s3 80K 163r 1b,
  M128/N32/w8/s3 56K 110r 2b
- sm_90 dq 128: M64/N64/w4/s2* 96K 230r 2b, M64/N32/w4/s3 80K 156r 2b, M128/N64/w8/s2 128K 216r 1b,
  M128/N32/w8/s2 96K 128r 2b
- sm_90 decode 64: M16/N128/w4/s2* 38K 137r 3b, M16/N64/w4/s2 20K 88r 5b, M16/N256/w4/s2 74K 184r 2b,
  M16/N128/w4/s3 70K 128r 3b
- sm_90 decode 128: M16/N64/w4/s2* 38K 128r 4b, M16/N32/w4/s2 21K 80r 6b, M16/N128/w4/s2 72K 255r 2b,
  M16/N64/w4/s3 70K 128r 3b
- sm_80 fwd 64: M128/N64/w8/s3* 48K 184r 1b, M128/N128/w8/s2 48K 255r 1b, M64/N64/w4/s3 40K 189r 2b,
  M128/N32/w4/s3 32K 196r 2b
- sm_80 fwd 128: M128/N64/w8/s3* 96K 255r spills 12 1b, M64/N64/w4/s3 88K 255r 1b, M128/N32/w8/s3 64K
  200r 1b, M64/N32/w4/s3 52K 212r 2b
- sm_80 dkdv 64: M32/N128/w8/s2* 44K 255r spills 56 1b, M16/N128/w8/s2 38K 255r 1b, M16/N64/w4/s2 22K
  255r 2b, M16/N128/w8/s1 38K 206r 1b
- sm_80 dkdv 128: M16/N128/w8/s1* 76K 255r spills 8 1b, M16/N32/w2/s1 28K 255r 4b
- sm_80 dq 64: M64/N32/w4/s3* 30K 226r 2b, M128/N32/w8/s2 44K 216r 1b, M64/N32/w4/s2 26K 220r 2b,
  M32/N32/w2/s3 21K 168r 6b
- sm_80 dq 128: M64/N32/w4/s3* 58K 225r 2b, M64/N32/w4/s2 50K 217r 2b, M32/N32/w2/s3 42K 245r 3b,
  M64/N32/w4/s4 66K 226r 2b
- sm_80 decode 64: M16/N128/w4/s2* 38K 128r 4b, M16/N64/w4/s2 20K 80r 6b, M16/N256/w4/s2 74K 255r 2b,
  M16/N128/w4/s3 70K 137r 2b
- sm_80 decode 128: M16/N64/w4/s2* 38K 128r 4b, M16/N32/w4/s2 21K 96r 5b, M16/N128/w4/s2 72K 168r 2b,
  M16/N64/w4/s3 70K 128r 2b
- sm_86 fwd 64: M128/N64/w8/s3* 48K 158r 1b, M64/N64/w4/s3 40K 187r 2b, M128/N32/w8/s3 32K 128r 2b,
  M128/N64/w8/s2 32K 173r 1b
- sm_86 fwd 128: M128/N32/w8/s2* 48K 196r 1b, M64/N64/w4/s2 56K 255r 1b, M64/N32/w4/s3 52K 178r 1b,
  M128/N32/w8/s3 64K 194r 1b
- sm_86 dkdv 64: M32/N128/w8/s2* 44K 255r spills 12 1b, M16/N128/w8/s2 38K 255r 1b, M16/N64/w4/s2 22K
  255r 2b, M16/N128/w8/s1 38K 206r 1b
- sm_86 dkdv 128: M16/N128/w8/s1* 76K 255r spills 12 1b, M16/N32/w2/s1 28K 245r 3b
- sm_86 dq 64: M64/N32/w4/s3* 30K 186r 2b, M128/N32/w8/s2 44K 216r 1b
- sm_86 dq 128: M64/N32/w4/s3* 58K 219r 1b, M64/N32/w4/s2 50K 209r 1b, M32/N32/w2/s3 42K 243r 2b,
  M64/N32/w4/s4 66K 220r 1b
- sm_86 decode 64: M16/N128/w4/s2* 38K 138r 2b, M16/N64/w4/s2 20K 80r 4b, M16/N256/w4/s2 74K 180r 1b,
  M16/N128/w4/s3 70K 137r 1b
- sm_86 decode 128: M16/N64/w4/s2* 38K 128r 2b, M16/N32/w4/s2 21K 80r 4b, M16/N128/w4/s2 72K 168r 1b,
  M16/N64/w4/s3 70K 128r 1b

- sm_100 fwd 64: M128/N64/w8/s3* 65K 202r 1b, M128/N128/w8/s3 113K 231r 1b, M128/N64/w4/s4 81K 242r 2b,
  M64/N64/w4/s4 73K 168r 3b
- sm_100 fwd 128: M128/N64/w8/s3* 129K 232r 1b, M128/N64/w8/s2 96K 234r 1b, M64/N64/w4/s3 113K 243r 2b
- sm_100 dkdv 64: M32/N128/w8/s2* 56K 255r spills 4 1b, M16/N128/w8/s2 44K 248r 1b, M32/N128/w8/s1 40K
  118r 2b, M16/N64/w4/s2 28K 210r 2b
- sm_100 dkdv 128: M16/N128/w8/s1* 72K 222r 1b, M16/N128/w8/s2 88K 255r spills 272 1b, M16/N128/w8/s3
  96K 255r spills 336 1b, M16/N64/w4/s1 40K 220r 2b
- sm_100 dq 64: M64/N64/w4/s2* 57K 128r 3b, M64/N64/w4/s3 73K 128r 3b, M128/N64/w8/s3 89K 120r 2b,
  M128/N32/w8/s3 60K 63r 3b
- sm_100 dq 128: M64/N64/w4/s2* 113K 168r 2b, M64/N32/w4/s3 89K 95r 2b, M128/N64/w8/s2 145K 128r spills
  40 1b, M128/N32/w8/s2 104K 108r 2b
This module imports no triton (the benchmarks import it before TRITON_INTERPRET is settled)
and nothing of llama_fast (kernels sit below every other layer).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

SWITCH = "LLAMA_FAST_AUTOTUNE"  # "0" (or false/off/no): the static defaults everywhere
CACHE_DIR = "LLAMA_FAST_CACHE_DIR"
FORMAT = 1  # of the cache file
WARMUP = 2  # untimed calls per configuration before the timed ones
REPS = 5  # timed calls per configuration: their median is its time
# A candidate replaces the default only if it is faster by more than this: two
# configurations within timing noise of each other keep the default.
MIN_GAIN = 0.02
LENGTH_BUCKETS = (1024, 16384)  # attention: next power of two of the longest sequence, clamped
CONTEXT_BUCKETS = (1024, 131072)  # decode: of the cache's capacity
BATCH_BUCKETS = (1, 64)  # decode: of the batch
MMA_ROWS_PER_WARP = 16  # see prune()
# The sources whose change makes a cache file stale (same llama_fast version, new kernels).
SOURCES = ("flash_attn.py", "flash_decode.py", "_common.py", "_autotune.py")

# Candidates per GPU class (flash_attn.gpu_class), role and head dim, besides the static
# default (which is always timed too). Attention: (BLOCK_M, BLOCK_N, num_warps, num_stages),
# BLOCK_M counting queries and BLOCK_N keys as in flash_attn.py. Few per kernel: each costs
# a compile on the device. Every one compiles, bf16 causal fixed-length, with no spills and
# a tensor-core work ratio of 1.00 for its class's first arch (sm_90, sm_80, sm_86; sm_100:
# no spills, its tcgen05 work is not measured; see "Compiled evidence" in the docstring);
# other archs, dtypes and varlen are checked on the device.
_LARGE_SMEM = {  # hopper (sm_90): 227 KiB per block
    ("fwd", 64): ((128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)),
    ("fwd", 128): ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)),
    ("dkdv", 64): ((16, 128, 8, 2), (32, 128, 8, 1), (16, 64, 4, 2)),
    ("dkdv", 128): ((16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 4, 1)),
    ("dq", 64): ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)),
    ("dq", 128): ((64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2)),
}
# blackwell (sm_100): the Hopper table but the tiles that spill there (see the evidence).
_BLACKWELL = {**_LARGE_SMEM, ("dkdv", 128): ((16, 64, 4, 1),), ("dq", 128): ((64, 32, 4, 3), (128, 32, 8, 2))}
_MID_SMEM = {  # ampere (sm_80): 163 KiB
    ("fwd", 64): ((128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)),
    ("fwd", 128): ((64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)),
    ("dkdv", 64): ((16, 128, 8, 2), (16, 64, 4, 2), (16, 128, 8, 1)),
    ("dkdv", 128): ((16, 32, 2, 1),),
    ("dq", 64): ((128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 2, 3)),
    ("dq", 128): ((64, 32, 4, 2), (32, 32, 2, 3), (64, 32, 4, 4)),
}
_SMALL_SMEM = {  # consumer (sm_86, sm_89, sm_120): 99 KiB
    ("fwd", 64): ((64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)),
    ("fwd", 128): ((64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)),
    ("dkdv", 64): ((16, 128, 8, 2), (16, 64, 4, 2), (16, 128, 8, 1)),
    ("dkdv", 128): ((16, 32, 2, 1),),
    ("dq", 64): ((128, 32, 8, 2),),
    ("dq", 128): ((64, 32, 4, 2), (32, 32, 2, 3), (64, 32, 4, 4)),
}
ATTENTION_CANDIDATES = {"hopper": _LARGE_SMEM, "blackwell": _BLACKWELL, "ampere": _MID_SMEM, "consumer": _SMALL_SMEM}
# flash_decode's split kernel, any class: (BLOCK_N, num_warps, num_stages); its BLOCK_M and
# BLOCK_D stay the launcher's (they follow from the GQA group and the head dim). Decode is
# bound by memory bandwidth: what varies is the bytes in flight per program.
DECODE_CANDIDATES = {
    64: ((64, 4, 2), (256, 4, 2), (128, 4, 3)),
    128: ((32, 4, 2), (128, 4, 2), (64, 4, 3)),
}
TUNED_DTYPES = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

GpuIdentity = collections.namedtuple("GpuIdentity", "arch name smem_optin")
KernelStats = collections.namedtuple("KernelStats", "shared registers spills")


# ---------------------------------------------------------------------------------------
# when tuning is on, and the keys


def _switch_on() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


_static_depth = 0  # > 0 inside static_configs()


@contextlib.contextmanager
def static_configs():
    """Inside this block every launcher runs its static default (as LLAMA_FAST_AUTOTUNE=0):
    for measuring the defaults against the tuned choices in one process."""
    global _static_depth
    _static_depth += 1
    try:
        yield
    finally:
        _static_depth -= 1


def tuning_allowed() -> bool:
    return _static_depth == 0 and _switch_on()


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_identity(index: int) -> GpuIdentity:
    p = torch.cuda.get_device_properties(index)
    return GpuIdentity(p.major * 10 + p.minor, p.name, p.shared_memory_per_block_optin)


def gpu_identity(device: torch.device) -> GpuIdentity | None:
    """Compute capability, name and per-block shared memory of a CUDA device; None off CUDA
    and under the Triton interpreter: never tuned there."""
    if device.type != "cuda" or _interpreter_on():
        return None
    return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())


def _bucket(n: int, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    return min(max(1 << max(0, int(n) - 1).bit_length(), lo), hi)


class TuneKey:
    """What a tuned choice is remembered by: the GPU (name: the cache file; compute
    capability) and the role's coarse shape fields, as one readable text."""

    def __init__(self, role: str, gpu: GpuIdentity, fields: tuple[str, ...]):
        self.role, self.gpu = role, gpu
        self.text = " ".join((role, f"sm{gpu.arch}", *fields))

    def __eq__(self, other):
        return isinstance(other, TuneKey) and (self.gpu.name, self.text) == (other.gpu.name, other.text)

    def __hash__(self):
        return hash((self.gpu.name, self.text))

    def __repr__(self):
        return f"TuneKey({self.text!r} on {self.gpu.name!r})"


def attention_key(role: str, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, varlen: bool,
                  max_seqlen: int) -> TuneKey | None:
    """The key of an attention launch (role fwd, dkdv or dq); None where tuning is off."""
    gpu = gpu_identity(device) if tuning_allowed() else None
    if gpu is None:
        return None
    return TuneKey(role, gpu, (DTYPE_NAMES.get(dtype, str(dtype)), f"d{head_dim}", "causal" if causal else "full",
                               "varlen" if varlen else "dense", f"S{_bucket(max_seqlen, LENGTH_BUCKETS)}"))


def decode_key(device: torch.device, dtype: torch.dtype, head_dim: int, group: int, q_len: int, batch: int,
               context: int) -> TuneKey | None:
    """The key of a decode launch: the rows of a program (GQA group x new tokens), batch and
    cache capacity buckets; None where tuning is off."""
    gpu = gpu_identity(device) if tuning_allowed() else None
    if gpu is None:
        return None
    return TuneKey("decode", gpu, (DTYPE_NAMES.get(dtype, str(dtype)), f"d{head_dim}", f"g{group}", f"q{q_len}",
                                   f"B{_bucket(batch, BATCH_BUCKETS)}", f"L{_bucket(context, CONTEXT_BUCKETS)}"))


def candidates(role: str, head_dim: int, dtype: torch.dtype, gpu_class: str = "hopper") -> list[dict]:
    """The alternatives to the default for one launch: config overrides, merged by ``choose``
    onto the default (decode's keep the default's BLOCK_M and BLOCK_D)."""
    if dtype not in TUNED_DTYPES:
        return []
    if role == "decode":
        return [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in DECODE_CANDIDATES.get(head_dim, ())]
    table = ATTENTION_CANDIDATES.get(gpu_class, {})
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in table.get((role, head_dim), ())]


def label(cfg: dict) -> str:
    return f"M{cfg.get('BLOCK_M')} N{cfg.get('BLOCK_N')} w{cfg.get('num_warps')} s{cfg.get('num_stages')}"


# ---------------------------------------------------------------------------------------
# pruning and timing


def mma_rows(role: str, cfg: dict) -> int | None:
    """Rows of the M dimension of the role's tensor-core products: queries for the forward
    and dQ, keys for dK/dV (all four of its products, S^T = K Q^T first, have keys as rows)."""
    return {"fwd": cfg.get("BLOCK_M"), "dq": cfg.get("BLOCK_M"), "dkdv": cfg.get("BLOCK_N")}.get(role)


def static_reason(role: str, cfg: dict) -> str | None:
    """Why a candidate is not worth compiling, from its numbers alone: fewer than 16 MMA rows
    per warp means warps (a wgmma warpgroup owns 64 rows, an mma.sync warp 16) repeat each
    other's products -- the compile check measured work 1.50 for 64 keys on 8 warps of
    dK/dV on sm_90. Necessary, not sufficient: on the mma.sync archs 64 keys x 16 queries on
    4 warps measured 1.50 as well, so the tables leave such tiles out. Decode's 16-row
    tiles are bandwidth-bound and exempt."""
    rows = mma_rows(role, cfg)
    if rows is not None and rows < MMA_ROWS_PER_WARP * cfg["num_warps"]:
        return f"duplicated work: {rows} MMA rows on {cfg['num_warps']} warps"
    return None


def kernel_stats(compiled) -> KernelStats | None:
    """Shared memory, registers and spilled bytes of a compiled Triton kernel (loading it on
    the device, which raises OutOfResources when it does not fit); None without one (the
    interpreter compiles nothing)."""
    if compiled is None:
        return None
    if hasattr(compiled, "result"):  # an asynchronous compile
        compiled = compiled.result()
    if getattr(compiled, "n_spills", None) is None and hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    return KernelStats(int(compiled.metadata.shared), compiled.n_regs, compiled.n_spills)


def compiled_reason(stats: KernelStats | None, gpu: GpuIdentity) -> str | None:
    """Why a compiled candidate is not timed: it needs more shared memory than a block may
    have, or it spills registers to local memory."""
    if stats is None:
        return None
    if stats.shared > gpu.smem_optin:
        return f"does not fit: {stats.shared} B of shared memory > {gpu.smem_optin}"
    if stats.spills:
        return f"spills {stats.spills} bytes ({stats.registers} registers)"
    return None


def cuda_timer(call: Callable[[], object], cfg: dict | None = None, warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median milliseconds of ``call`` (which launches ``cfg``) on the current CUDA stream:
    CUDA events around each of ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


timer = cuda_timer  # what choose() times with: timer(call, cfg) -> ms (the tests put a fake here)


def _capturing_or_compiling() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def on_scratch(launch: Callable, *outputs: torch.Tensor) -> Callable:
    """``run_candidate`` for ``choose``, from ``launch(cfg, *outputs, warmup=False)`` (which
    returns what Triton's ``run`` returns): it launches into tensors shaped as ``outputs``,
    allocated on first use (only when tuning), so candidates never write the caller's
    outputs; with ``warmup=True`` it compiles without launching and returns the compiled
    kernel's ``kernel_stats``, read on the outputs' device (a kernel is loaded per device)."""
    scratch: list = []
    device = outputs[0].device

    def run_candidate(cfg: dict, warmup: bool = False):
        if not scratch:
            scratch.extend(torch.empty_like(t) for t in outputs)
        if not warmup:
            return launch(cfg, *scratch)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return kernel_stats(launch(cfg, *scratch, warmup=True))

    return run_candidate


# ---------------------------------------------------------------------------------------
# the memo and the cache file

_memo: dict = {}  # TuneKey -> config
_file_entries: dict = {}  # cache file -> {key text: entry}, as read
_history: list = []  # one record per key resolved in this process (tuned, or read from the cache)
_write_failed: set = set()


def reset() -> None:
    """Forget what this process knows (memo, files read, history): the next lookup reads
    the cache file again."""
    _memo.clear()
    _file_entries.clear()
    _history.clear()
    _write_failed.clear()


def history() -> list[dict]:
    """What was resolved in this process, in order: key, role, source ("tuned" or "cache"),
    the chosen and default configs, the times and the dropped candidates (when tuned)."""
    return [dict(r) for r in _history]


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR):
        return Path(os.environ[CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llama_fast"


@functools.lru_cache(maxsize=None)
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def cache_path(gpu_name: str) -> Path:
    """The cache file of one GPU model under the installed llama_fast and triton versions."""
    return cache_dir() / f"autotune-{_slug(gpu_name)}-llama_fast-{_version('llama_fast')}-triton-{_version('triton')}.json"


@functools.lru_cache(maxsize=None)
def kernels_fingerprint() -> str:
    """A hash of the attention kernels' sources and this file: a cache written by other
    kernels (same version numbers, edited code) is stale."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def _header(gpu_name: str) -> dict:
    return {"format": FORMAT, "gpu": gpu_name, "llama_fast": _version("llama_fast"), "triton": _version("triton"),
            "kernels": kernels_fingerprint()}


def _read(path: Path, gpu_name: str) -> tuple[dict, str | None]:
    """(entries, why the file was ignored or None); a missing file is simply empty."""
    if not path.exists():
        return {}, None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        return {}, "not an autotune cache"
    want = _header(gpu_name)
    stale = [k for k, v in want.items() if doc.get(k) != v]
    if stale:
        return {}, "written for another " + ", ".join(f"{k} ({doc.get(k)!r}, here {want[k]!r})" for k in stale)
    return doc["entries"], None


def _load(path: Path, gpu_name: str) -> dict:
    entries, why = _read(path, gpu_name)
    if why:
        warnings.warn(f"llama_fast autotune: ignoring {path}: {why}; it will be rewritten", RuntimeWarning, stacklevel=3)
    return entries


def _file(path: Path, gpu_name: str) -> dict:
    """The entries of a cache file, read once per process (``reset`` reads it again)."""
    if path not in _file_entries:
        _file_entries[path] = {text: entry for text, entry in _load(path, gpu_name).items()
                               if isinstance(entry, dict) and isinstance(entry.get("config"), dict)}
    return _file_entries[path]


def _lookup(key: TuneKey, allowed: list[dict]) -> dict | None:
    if key in _memo and _memo[key] in allowed:
        return _memo[key]
    entry = _file(cache_path(key.gpu.name), key.gpu.name).get(key.text)
    if entry is None or entry["config"] not in allowed:  # a config no longer offered is tuned again
        return None
    _memo[key] = dict(entry["config"])
    _history.append({"key": key.text, "role": key.role, "gpu": key.gpu.name, "source": "cache",
                     "config": dict(entry["config"]), "default": entry.get("default")})
    return _memo[key]


def _store(key: TuneKey, entry: dict) -> None:
    """Add one entry to the GPU's cache file: read what is there now (another process may
    have written since), merge, write a temporary file and rename it over the old one."""
    path = cache_path(key.gpu.name)
    _file(path, key.gpu.name)[key.text] = entry
    if path in _write_failed:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries, _ = _read(path, key.gpu.name)
        entries[key.text] = entry
        doc = dict(_header(key.gpu.name), entries=dict(sorted(entries.items())))
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False) as tmp:
            json.dump(doc, tmp, indent=1)
            tmp.write("\n")
        os.replace(tmp.name, path)
    except OSError as exc:
        _write_failed.add(path)
        warnings.warn(f"llama_fast autotune: cannot write {path} ({exc}); tuned configurations are kept in this "
                      "process only", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# the choice


def choose(role: str, key: TuneKey | None, default: dict, alternatives: list[dict],
           run_candidate: Callable[..., object]) -> dict:
    """The configuration to launch ``role`` with (see the module docstring).

    ``alternatives`` (from ``candidates``) are merged onto ``default``; ``run_candidate(cfg)``
    launches the kernel with ``cfg`` into scratch outputs, ``run_candidate(cfg, warmup=True)``
    compiles it without a launch and returns its ``KernelStats`` (None when nothing is
    compiled: the interpreter). ``on_scratch`` makes one from a launcher.
    """
    if key is None or not alternatives:
        return default
    configs = [dict(default)]
    for alt in alternatives:
        cfg = dict(default, **alt)
        if cfg not in configs:
            configs.append(cfg)
    if len(configs) == 1:
        return default
    hit = _lookup(key, configs)
    if hit is not None:
        return dict(hit)
    if _capturing_or_compiling():
        return default
    start = time.monotonic()
    times, dropped = {}, {}
    for i, cfg in enumerate(configs):
        name = label(cfg)
        why = None if i == 0 else static_reason(role, cfg)  # the default runs regardless: it is always timed
        if why is None:
            try:
                why = None if i == 0 else compiled_reason(run_candidate(cfg, warmup=True), key.gpu)
                if why is None:
                    times[name] = timer(lambda cfg=cfg: run_candidate(cfg), cfg)
            except Exception as exc:  # OutOfResources, a compile error: the candidate is dropped, never the call
                why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if why is not None:
            dropped[name] = why
    chosen = dict(default)
    base = times.get(label(default))
    if times:
        best = min(times, key=times.get)
        if base is None or times[best] < base * (1 - MIN_GAIN):
            chosen = next(c for c in configs if label(c) == best)
    entry = {"config": chosen, "default": dict(default), "ms": times, "dropped": dropped,
             "seconds": round(time.monotonic() - start, 3)}
    _memo[key] = dict(chosen)
    _history.append({"key": key.text, "role": role, "gpu": key.gpu.name, "source": "tuned", **entry})
    _store(key, entry)
    return dict(chosen)
