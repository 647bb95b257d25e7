"""Flash decoding in Triton: attention of a few new tokens over a KV cache, split-KV.

Decoding reads the whole cache for very little arithmetic, so it is bound by memory
bandwidth, and one program per (batch, head) leaves most of the GPU idle when the batch
is small. So the valid cache length is split across programs ("flash decoding"), and the
last program to finish for each row tile merges the partial results (one launch).

Split kernel, grid (B * Hkv * row_blocks, num_splits). A program owns ONE kv head and all
the rows that read it: its ``group = Hq / Hkv`` query heads times the Sq new tokens, as the
rows of one (BLOCK_M, BLOCK_D) q tile (row r is head ``r // Sq`` of the group, token
``r % Sq``), padded to BLOCK_M >= 16 rows for ``tl.dot``. The cache is thus read once per
kv head, not once per query head. (A group * Sq beyond MAX_BLOCK_M is cut into row_blocks
tiles, each of which reads the cache again; Llama-3 shapes never get there.) The program
takes its share of the sequence's key blocks -- the valid length L is read on the device
and its cdiv(L, BLOCK_N) blocks are dealt out evenly over the splits, so short sequences
use every split too -- and walks them BLOCK_N keys at a time with an online softmax in base
2 (``exp2``; the softmax scale is folded with log2(e) into one multiplier of the scores).
New token t sits at position L - Sq + t and sees keys j <= L - Sq + t (bottom-right causal
alignment). Blocks that every row sees whole take a loop without any mask; only the last
block(s), where the causal edge or the end of the valid length falls, take the masked
loop. That one mask (j <= L - Sq + t) also keeps keys >= L out, and their loads are masked
too, so whatever the cache holds beyond L (stale values, NaN) never reaches the result.
The program writes, per row, its normalised partial output and the partial log-sum-exp
(base 2) to float32 scratch, (B * Hq * Sq, num_splits, D) and (B * Hq * Sq, num_splits).
A split that gets no keys (more splits than blocks, a short sequence) writes lse = -inf
and a zero output, which the combine weighs 0.

Fused combine: after storing its partials a program adds 1 to its row tile's arrival
counter (one int32 per index of grid dimension 0; ``tl.atomic_add`` with acq_rel
semantics at GPU scope, after a barrier so every thread's stores precede it); the program
that sees num_splits - 1 is the last of the tile. It resets the counter to 0 (so the next launch, or a CUDA graph
replay, needs no memset) and merges the tile's num_splits partials per row with weights
2^(lse_s - max lse) / sum, in split order (the result does not depend on which program
was last), reading them with .cg loads (L2; the other programs' stores went there), and
writes the output in q's dtype. A row that sees no key at all (token t when L - Sq + t <
0: L = 0, or L < Sq) outputs 0. With a single split the split kernel writes the output
itself (WRITE_OUT): no scratch, no counter. The counters live in a small buffer per
(device, stream) (``split_counters``), zero-filled once; the Triton interpreter (CPU
tests) runs programs one after another, so there the last program is simply the last
one run, which still proves the merge and the reset.

CUDA graphs: no host synchronisation and no data-dependent allocation. The number of
splits, the scratch sizes and the grid depend only on shapes (B, Hkv, Hq, Sq, Smax, D) and
the GPU's SM count, never on cache_seqlens; lengths are read on the device and clamped to
[0, Smax]. (num_splits=0 picks about 2 programs per SM, see choose_num_splits.)

Layouts: q (B, Sq, Hq, D), caches (B, Smax, Hkv, D) with any strides but a unit stride on
the head dim (the kernels assume it, so loads are contiguous and vectorised); a q or a
cache with a strided last dim is copied by the launcher (for a cache that is a full copy:
pass caches with a unit last stride); cache_seqlens is made contiguous. Batch and cache-position offsets are 64-bit
(B * Smax * Hkv * D can pass 2^31); offsets inside a block stay 32-bit. Head dims up to 256,
held as BLOCK_D = next_pow2(max(D, 16)) columns, masked.

Launch configurations depend on the GPU class (``kernels.flash_attn.gpu_class``, from
the device's capability and shared memory): the consumer parts (sm_86/89/120, 100 KiB of
shared memory per SM) take 64 keys per step at head dim 64 instead of 128.

Compiled evidence (Triton 3.6, ``python -m llama_fast.tools.compile_check``, launch
variant, the 16-row single-token tiles at head dims 64/128, bf16 and fp16 alike; registers,
spill bytes, blocks per SM; before = split kernel + separate combine kernel)
- Splits, hd 128: before 128 registers on sm_80/86/89/90/100 (4 blocks/SM; sm_86/89 2,
  limited by 38912 B of shared memory), 136 on sm_120 (2). With the fused combine: sm_80
  128 (4 blocks), sm_90 140 and sm_100 138 (3 blocks: the merge's state costs 10-12
  registers there), sm_86/89 128 and sm_120 164 (2, shared memory). No spills.
- Splits, hd 64: before 128/138/138/137/137/128 (sm_80/86/89/90/100/120; 4, 2, 2, 3, 3, 2
  blocks). Now sm_80 128 (4), sm_90/100 139 (3), and the consumer tiles of 64 keys: 20480
  B of shared memory, 76 registers on sm_86/89 and 102 on sm_120, 4 blocks/SM (was 2).
- WRITE_OUT (one split) is unchanged but for the consumer hd-64 tile (80 registers on
  sm_86/89, 122 on sm_120, 4 blocks/SM, was 128/168 and 2).
- The merge's weighted sum is unrolled by COMBINE_UNROLL = 2 splits per step, 16-byte .cg
  loads: unrolled by 4 it spills 16 bytes on sm_80 at hd 128 (128 registers); by 1 it
  still takes 137 registers on sm_90 and spills 8 bytes on sm_100. The 32- and 64-row
  tiles (speculative decoding) unroll by 1: by 2 they spill 32 bytes on sm_120 (248 and
  222 registers by 1, no spills). Rejected for the consumer parts: 32 keys at hd 128 (4
  blocks/SM on sm_86/89, but sm_120 spills 12 bytes in WRITE_OUT).
- The general variant (no alignment or stride specialisation; reported, not launched by
  Llama-shaped calls) spilled before and spills more with the merge, on sm_90 with splits:
  hd 64 8/4 -> 76/72 bytes, hd 128 552/552 -> 752/764 bytes (255 registers).
- The PTX of the arrival: the partial stores, ``bar.sync``, then thread 0's
  ``atom.global.gpu.acq_rel.add.u32``, its result broadcast through shared memory after a
  second ``bar.sync``; the reset is thread 0's ``atom.global.gpu.relaxed.exch.b32``.

Precision: scores and the output accumulate in float32; P is rounded to the cache dtype
before the P @ V product (as FlashAttention does). float32 inputs use full float32 dot
products (``input_precision="ieee"``), not TF32, so they match a float32 reference. Under
the Triton interpreter both dot operands are upcast to float32 (UPCAST), because the
interpreter's 16-bit ``tl.dot`` is wrong.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast import _alloc

from . import _autotune
from ._common import _sm_count, device_guard, device_limits, load_tile, next_pow2
from .flash_attn import GPU_CLASS_ARCHS, gpu_class

LOG2E = 1.4426950408889634


@triton.jit
def _attend_blocks(
    acc, m_i, l_i, q, k_base, v_base, lo, hi, length, q_pos, k_offs, v_offs, d_ok, stride_ks, stride_vs, qk_scale,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks lo..hi-1. MASKED: apply the causal/length mask (and
    mask the loads past ``length``); else every key of every block is visible to every row."""
    keys = tl.arange(0, BLOCK_N)
    for blk in range(lo, hi):
        start = blk * BLOCK_N  # positions fit 32 bits; the pointer offset takes 64
        n0 = start.to(tl.int64)
        key_ok = keys < length - start
        k = load_tile(k_base + n0 * stride_ks + k_offs, d_ok[:, None], key_ok[None, :], MASKED, EVEN_D)
        v = load_tile(v_base + n0 * stride_vs + v_offs, d_ok[None, :], key_ok[:, None], MASKED, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
        if MASKED:
            visible = (start + keys)[None, :] <= q_pos[:, None]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with no visible key so far keeps m = -inf; exponentiate against 0 then
            # (every p and alpha is exp2(-inf) = 0) instead of computing -inf - -inf = NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_ref = m_new
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_decode_split_kernel(
    Q, K, V, SEQLENS, O_PART, LSE_PART, OUT, COUNTERS,
    q_len, group, kv_heads, seqlen_max, num_splits, row_blocks,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_OUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, COMBINE_UNROLL: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % row_blocks
    bh = pid // row_blocks  # b * kv_heads + kv head
    b = (bh // kv_heads).to(tl.int64)
    kv_head = bh % kv_heads

    # This program's rows: head g of the group (query head kv_head * group + g), token t.
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = group * q_len
    row_ok = rows < n_rows
    g = rows // q_len
    t = rows % q_len
    head = kv_head * group + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    length = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), seqlen_max)
    q_pos = length - q_len + t  # new token t sees keys j <= q_pos

    q_at = Q + b * stride_qb + (t * stride_qs + head * stride_qh)[:, None] + d[None, :]
    q = tl.load(q_at, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # This split's key blocks: the sequence's blocks dealt out evenly over the splits.
    n_blocks = tl.cdiv(length, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    lo = tl.minimum(split * per_split, n_blocks)
    hi = tl.minimum(lo + per_split, n_blocks)
    # Blocks below n_full are visible whole to every row (the earliest new token sees
    # keys j <= length - q_len).
    n_full = tl.maximum(length - q_len + 1, 0) // BLOCK_N

    keys = tl.arange(0, BLOCK_N)
    # 64-bit: a (B, Hkv, Smax, D) cache viewed as (B, Smax, Hkv, D) has a head stride of Smax * D.
    k_base = K + b * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kv_head.to(tl.int64) * stride_vh
    k_offs = keys[None, :] * stride_ks + d[:, None]  # (BLOCK_D, BLOCK_N): K transposed
    v_offs = keys[:, None] * stride_vs + d[None, :]  # (BLOCK_N, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, k_base, v_base, lo, tl.minimum(hi, n_full), length, q_pos, k_offs, v_offs, d_ok,
        stride_ks, stride_vs, qk_scale, BLOCK_N, EVEN_D, False, UPCAST, DOT_PRECISION)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, k_base, v_base, tl.maximum(lo, n_full), hi, length, q_pos, k_offs, v_offs, d_ok,
        stride_ks, stride_vs, qk_scale, BLOCK_N, EVEN_D, True, UPCAST, DOT_PRECISION)

    seen = l_i > 0.0  # rows that saw no key (in this split) output 0 with lse -inf
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    out_at = OUT + b * stride_ob + (t * stride_os + head * stride_oh)[:, None] + d[None, :]
    if WRITE_OUT:
        tl.store(out_at, o.to(OUT.dtype.element_ty), mask=mask)
    else:
        # Scratch rows are (b, query head, token) = bh * group * q_len + row, each holding
        # num_splits runs of HEAD_DIM values.
        row_id = bh.to(tl.int64) * n_rows + rows
        part = row_id * num_splits + split
        tl.store(O_PART + part[:, None] * HEAD_DIM + d[None, :], o, mask=mask)
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=row_ok)
        # The last of the num_splits programs of this row tile to get here merges the
        # partials (no second launch). The barrier orders every thread's partial stores
        # before the counter update, whose release (acq_rel, GPU scope) publishes them and
        # whose acquire, in the last program, makes every other program's visible to it.
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNTERS + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            # Every program of the tile has counted: reset for the next launch (a CUDA
            # graph replays with the same counters, and no memset runs between calls).
            tl.atomic_xchg(COUNTERS + pid, 0, sem="relaxed", scope="gpu")
            out = _combine_splits(O_PART, LSE_PART, row_id, row_ok, d, mask, num_splits,
                                  HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_S, COMBINE_UNROLL)
            tl.store(out_at, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _combine_splits(O_PART, LSE_PART, row_id, row_ok, d, mask, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    COMBINE_UNROLL: tl.constexpr):
    """The merged output of a row tile's num_splits partial outputs: weights 2^(lse_s -
    max lse), normalised by their sum, added in split order (so the result does not
    depend on which program merges). The partials were written by other programs: loaded
    with .cg (L2, where their stores went; never a stale L1 line)."""
    lse_rows = LSE_PART + row_id * num_splits
    # Pass 1, the max and the sum of the weights: BLOCK_S splits per (BLOCK_M, BLOCK_S) step.
    splits = tl.arange(0, BLOCK_S)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        lse = tl.load(lse_rows[:, None] + (s0 + splits)[None, :], mask=row_ok[:, None] & (splits < num_splits - s0)[None, :],
                      other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key anywhere yet: weights 0
        l = l * tl.math.exp2(m - m_ref) + tl.sum(tl.math.exp2(lse - m_ref[:, None]), 1)
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    # Pass 2, the weighted sum: COMBINE_UNROLL splits per step, unrolled so their loads are
    # in flight together instead of one L2 round trip per split.
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    o_rows = O_PART + (row_id * num_splits * HEAD_DIM)[:, None] + d[None, :]
    for s0 in range(0, num_splits, COMBINE_UNROLL):
        for j in tl.static_range(COMBINE_UNROLL):
            split_ok = s0 + j < num_splits
            lse = tl.load(lse_rows + s0 + j, mask=row_ok & split_ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(o_rows + (s0 + j) * HEAD_DIM, mask=mask & split_ok, other=0.0, cache_modifier=".cg")
            w = tl.math.exp2(lse - m_ref)  # 0 for an empty split (lse = -inf)
            acc += tl.where(w[:, None] > 0.0, w[:, None] * o, 0.0)
    return acc / tl.where(l > 0.0, l, 1.0)[:, None]  # no key anywhere: acc is 0, so is the output


# Launch heuristics.
# Keys per step: K and V tiles (BLOCK_N, BLOCK_D) of 8K-16K values each keep enough bytes
# in flight to stream the cache at full bandwidth without spilling: 128 keys for head dims
# up to 64, 64 keys for 128 and 256.
BLOCK_N_SMALL_D = 128
BLOCK_N_LARGE_D = 64
# Rows (query heads of a group x new tokens) per tile: dot needs >= 16; beyond 64 the
# float32 accumulator would crowd the registers, so bigger groups take several row blocks.
MIN_BLOCK_M = 16
MAX_BLOCK_M = 64
# 4 warps; 8 for the head dim 256 and for tiles of more than 4096 float32 accumulator
# values (64 rows of 128). With 16 rows every warp holds the whole q tile as its dot
# operand, so at head dim 256 four warps need all 255 registers (sm_80); eight need ~180.
NUM_WARPS = 4
WIDE_NUM_WARPS = 8
ACC_VALUES_PER_4_WARPS = 4096
# num_splits=0: launch about PROGRAMS_PER_SM programs per SM so every SM has two resident
# programs to overlap loads with math; on the CPU (the interpreter runs programs one after
# another) a few programs are plenty, and a few splits still exercise the combine.
PROGRAMS_PER_SM = 2
CPU_PROGRAMS = 4
# The fused combine (the last program of a row tile): the max and sum of the weights over
# COMBINE_BLOCK_S splits per step (a 16 x 64 float32 lse tile is 8 values per thread on 4
# warps: one step up to 64 splits), then the weighted sum COMBINE_UNROLL splits per step
# for the 16-row tiles, 1 for the 32- and 64-row ones (unrolled by 2 they spill 32 bytes
# on sm_120; see the design notes for the registers it costs).
COMBINE_BLOCK_S = 64
COMBINE_UNROLL = 2
# Software pipelining of the key loop: 2 stages = one K/V block in flight while the
# previous one is used. With several programs resident per SM that is plenty of bytes in
# flight for a bandwidth-bound loop, at half the shared memory of 3 stages (and 3 stages
# spill registers at the 32-row and float32 tiles).
NUM_STAGES = 2
# Grid dimension 1 (the splits) stops at 65535.
MAX_SPLITS = 65535
# A chosen split (num_splits=0, on a GPU) gets at least MIN_BLOCKS_PER_SPLIT key blocks of a
# full cache. Short contexts at small batch (B <= 4, <= 8K keys: 1-2 blocks per split
# before) otherwise pay per split a pipeline that never fills (2 stages, 1-2 blocks), the
# Q load, and float32 partials written and read back by the combine: at B=1, 32/8 heads,
# D=128, 2K keys, 32 splits move 1 MB of partials beside 8.4 MB of cache (12 %), 8 splits
# 3 %. Explicit num_splits are honoured as given.
MIN_BLOCKS_PER_SPLIT = 4


# Shared memory by GPU class (kernels.flash_attn.gpu_class): the 16-row tiles take 38912 B
# at head dims 64 (128 keys) and 128 (64 keys), which the consumer parts (sm_86/89/120,
# 100 KiB per SM) fit twice, the others 3-4 times (registers limit them first). At head
# dim 64 the consumer parts take half the keys per step: 20480 B, 4 blocks per SM; at 128
# they keep 64 keys (32 spill 12 bytes on sm_120 without splits; see the design notes).
CONSUMER_KEY_FRACTION = 2


def launch_config(group: int, q_len: int, head_dim: int, gpu: str = "hopper") -> dict:
    """Tile sizes and warps of the split kernel for a (group x Sq) row tile on a GPU of
    class ``gpu`` (``kernels.flash_attn.gpu_class``; the hopper tiles off CUDA)."""
    block_d = next_pow2(max(head_dim, 16))
    block_m = min(max(next_pow2(group * q_len), MIN_BLOCK_M), MAX_BLOCK_M)
    wide = block_d >= 256 or block_m * block_d > ACC_VALUES_PER_4_WARPS
    warps = WIDE_NUM_WARPS if wide else NUM_WARPS
    block_n = BLOCK_N_SMALL_D if block_d <= 64 else BLOCK_N_LARGE_D
    if gpu == "consumer" and block_d <= 64:
        block_n //= CONSUMER_KEY_FRACTION
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": warps, "num_stages": NUM_STAGES,
            # the merge's unroll holds COMBINE_UNROLL (rows x D) tiles: 1 for the wider row tiles
            "COMBINE_UNROLL": COMBINE_UNROLL if block_m <= MIN_BLOCK_M else 1}


def choose_num_splits(requested: int, device: torch.device, programs_per_split: int, seqlen_max: int,
                      block_n: int) -> int:
    """Splits of the cache length: ``requested`` if > 0, else enough to fill the GPU but
    with at least MIN_BLOCKS_PER_SPLIT key blocks each; then clamped to the number of key
    blocks of Smax (a split gets at least one block when the cache is full). Shapes only,
    never the lengths."""
    key_blocks = max(1, triton.cdiv(seqlen_max, block_n))
    max_splits = min(key_blocks, MAX_SPLITS)
    if requested <= 0:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            target = PROGRAMS_PER_SM * _sm_count(index)
            max_splits = min(max_splits, triton.cdiv(key_blocks, MIN_BLOCKS_PER_SPLIT))
        else:
            target = CPU_PROGRAMS
        requested = triton.cdiv(target, max(1, programs_per_split))
    return max(1, min(requested, max_splits))


# Arrival counters of the fused combine, one int32 per row tile (grid dimension 0), per
# (device, stream): launches on one stream run one after another, so they can share them.
_COUNTERS: dict = {}


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed int32 arrival counters for the split kernel on ``device``'s current
    stream. Allocated (zero-filled) once and grown when a launch needs more; every launch
    leaves them zero again (the last program of each row tile resets its own), so calls
    run no memset and a captured CUDA graph replays with the same buffer (warm up once
    before capturing, as for any allocation)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index, torch.cuda.current_stream(index).stream_id)
    else:
        key = (device.type, device.index, None)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 2 * (0 if counters is None else counters.numel())),
                               dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def _interpreted() -> bool:
    return not isinstance(_flash_decode_split_kernel, triton.runtime.JITFunction)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def decode(q, k_cache, v_cache, cache_seqlens, scale, num_splits, counters=None):
    """Registry entry "decode" (see ``llama_fast.reference.decode``). ``counters``: the
    int32 arrival counters to use (zero, at least one per row tile; by default the
    device's and stream's own, ``split_counters``), which the call leaves zero."""
    batch, q_len, q_heads, head_dim = q.shape
    seqlen_max, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = _alloc.empty(q.shape, q.dtype, q.device)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads lengths[b] at offset b
    group = q_heads // kv_heads
    interpreted = _interpreted()
    default = launch_config(group, q_len, head_dim, gpu_class(device_limits(q.device)))
    # BLOCK_M follows from the GQA group and Sq (the autotuner varies only BLOCK_N, warps
    # and stages), so the row tiles, and the counters they need, are known before tuning.
    row_blocks = triton.cdiv(group * q_len, default["BLOCK_M"])
    programs_per_split = batch * kv_heads * row_blocks
    if counters is not None and (counters.dtype != torch.int32 or counters.device != q.device
                                 or counters.numel() < programs_per_split or not counters.is_contiguous()):
        raise ValueError(f"counters must be a contiguous int32 tensor on {q.device} with at least "
                         f"{programs_per_split} elements (one per row tile), got {counters.dtype} "
                         f"{tuple(counters.shape)} on {counters.device}")
    rows = batch * q_heads * q_len

    def launch(cfg, out, warmup=False):
        """The split kernel, with the combine fused, with ``cfg`` (warmup: compile only)."""
        splits = choose_num_splits(num_splits, q.device, programs_per_split, seqlen_max, cfg["BLOCK_N"])
        consts = dict(HEAD_DIM=head_dim, UPCAST=interpreted and q.dtype != torch.float32,
                      # full-precision float32 dots (no TF32); 16-bit dots ignore it
                      DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                      BLOCK_S=COMBINE_BLOCK_S, **cfg)
        if splits == 1:
            o_part = lse_part = out  # unused (WRITE_OUT)
            arrivals = cache_seqlens  # unused
        else:
            o_part = _alloc.empty((rows, splits, head_dim), torch.float32, q.device)
            lse_part = _alloc.empty((rows, splits), torch.float32, q.device)
            arrivals = counters if counters is not None else split_counters(q.device, programs_per_split)
        with device_guard(q.device):
            return _flash_decode_split_kernel.run(
                q, k_cache, v_cache, cache_seqlens, o_part, lse_part, out, arrivals,
                q_len, group, kv_heads, seqlen_max, splits, row_blocks,
                *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
                scale * LOG2E, WRITE_OUT=splits == 1, **consts, grid=(programs_per_split, splits), warmup=warmup,
            )

    # The static launch_config, or the autotuner's choice (kernels/_autotune.py; shapes only,
    # never cache_seqlens, and under CUDA-graph capture only what is cached).
    key = _autotune.decode_key(q.device, q.dtype, head_dim, group, q_len, batch, seqlen_max)
    cfg = _autotune.choose("decode", key, default, _autotune.candidates("decode", head_dim, q.dtype),
                           _autotune.on_scratch(launch, out))
    launch(cfg, out)
    return out


def _split_signature(dtype: str, write_out: bool) -> dict:
    """The split kernel's signature as the launcher calls it: with WRITE_OUT the scratch
    arguments are the output and the counters the lengths (all unused)."""
    part = dtype if write_out else "fp32"
    sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "SEQLENS": "*i32",
           "O_PART": f"*{part}", "LSE_PART": f"*{part}", "OUT": f"*{dtype}", "COUNTERS": "*i32"}
    ints = ["q_len", "group", "kv_heads", "seqlen_max", "num_splits", "row_blocks",
            "stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
            "stride_vb", "stride_vs", "stride_vh", "stride_ob", "stride_os", "stride_oh"]
    sig.update(dict.fromkeys(ints, "i32"))
    sig["qk_scale"] = "fp32"
    return sig


def low_occupancy_reason(kernel: str, constexprs: dict, arch: int) -> str | None:
    """Why a launch configuration keeps fewer than 2 blocks per SM (the compile check's
    occupancy test asks), or None."""
    if kernel == "_flash_decode_split_kernel" and (constexprs["BLOCK_M"] >= 64 or constexprs["HEAD_DIM"] >= 256):
        # 64-row tiles (speculative decoding, GQA 16 x 4 tokens) and head dim 256 hold a
        # (rows x D) float32 accumulator on 8 warps: 160-180 registers, 1 block of 8 warps.
        # They are not the Llama-3 single-token path (16 rows at head dim 64/128).
        return "64-row or head-dim-256 tile: 8 warps, 160-180 registers"
    if kernel == "_flash_decode_split_kernel" and arch in (86, 89, 120) and constexprs["DOT_PRECISION"] == "ieee":
        # float32 caches (not a Llama-3 serving dtype): two stages of float32 K and V tiles
        # take 76 KiB of the consumer SM's 100.
        return "float32 cache tiles on a 100 KiB SM"
    return None


def useful_mma_flops(kernel: str, constexprs: dict) -> int | None:
    """GEMM FLOPs of one key block of the split kernel (QK^T and PV over the padded row
    tile; decoding is memory-bound, the ratio only shows the tile has no duplicated work)."""
    if kernel != "_flash_decode_split_kernel":
        return None
    return 2 * 2 * constexprs["BLOCK_M"] * constexprs["BLOCK_N"] * constexprs["HEAD_DIM"]


def compile_configs():
    """The configurations the launchers use for Llama-3 decoding, per GPU class (the 6th
    element: the archs that launch it): head dims 64 and 128 in bf16 and fp16 at Sq 1 with
    GQA 4 or 8 (8B/70B: 32/8 and 64/8 heads; 8 x Sq 1 rounds up to the same 16-row tile as
    4 x 1, and the group is a run-time argument, so one compile serves both), with splits
    (the fused combine) and without (WRITE_OUT); speculative-decoding tiles of 32 rows
    (group 8 x Sq 4) and 64 rows (16 x 4, 8 warps); head dim 256; float32 once (full
    precision dots, the largest tiles in shared memory).

    launch_hints (see llama_fast.tools.compile_check), for contiguous tensors: the strides are
    multiples of 16 (products of the head dim and head counts); Smax is a multiple of 16;
    q_len is 1 at Sq 1, row_blocks is 1 (the rows fit one tile), num_splits is 1 with
    WRITE_OUT.
    """
    strides = [f"stride_{t}{a}" for t in "qkvo" for a in "bsh"]
    cases = [(dtype, 4, 1, head_dim) for dtype in ("bf16", "fp16") for head_dim in (64, 128)]
    cases += [("bf16", 8, 4, 128), ("bf16", 16, 4, 128), ("bf16", 4, 1, 256), ("fp32", 4, 1, 128)]
    seen: dict = {}  # one entry per distinct configuration, with the archs of every class using it
    for dtype, group, q_len, head_dim in cases:
        for gpu, archs in GPU_CLASS_ARCHS.items():
            cfg = launch_config(group, q_len, head_dim, gpu)
            seen.setdefault((dtype, q_len, head_dim, tuple(sorted(cfg.items()))), []).extend(archs)
    for (dtype, q_len, head_dim, items), archs in seen.items():
        cfg = dict(items)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        consts = dict(HEAD_DIM=head_dim, UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                      BLOCK_S=COMBINE_BLOCK_S, **cfg)
        for write_out in (False, True):
            hints = {**dict.fromkeys(strides, 16), "seqlen_max": 16, "row_blocks": 1,
                     **({"q_len": 1} if q_len == 1 else {}), **({"num_splits": 1} if write_out else {})}
            yield (_flash_decode_split_kernel, _split_signature(dtype, write_out), dict(consts, WRITE_OUT=write_out),
                   options, hints, tuple(sorted(archs)))


# The triton backend's implementations from this file, by the dispatcher's op names.
LAUNCHERS = {"decode": decode}
