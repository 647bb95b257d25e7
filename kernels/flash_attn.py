"""Flash attention for Llama-3 in Triton: forward and backward, GQA, causal (bottom-right
aligned), fixed-length batches and packed variable-length sequences.

Design
- Layout (B, S, H, D) with any strides (Hugging Face's (B, H, S, D) tensors arrive as
  transposed views); GQA by indexing: query head h reads kv head h // (Hq / Hkv), K and V
  are never repeated. Varlen is the same kernel with IS_VARLEN: a sequence's rows come from
  cu_seqlens instead of a batch stride.
- Forward (FlashAttention-2): one program per (query block, batch x head). The online
  softmax runs in base 2 (the scale is folded with log2(e), so each score costs one FMA and
  one exp2); the log-sum-exp is stored (natural log) for the backward.
- Causal masks cost only where they bite: key blocks that every row of the query block
  sees entirely run a loop with no mask code at all; only the blocks on the diagonal (and
  the ragged end of the keys) run the masked loop. Blocks past the diagonal are skipped.
- Backward, deterministic (no atomics): a preprocess computes delta = rowsum(dO * O); one
  program per (key block, batch x kv head) accumulates dK and dV over every query head of
  its group and every query block that sees the keys, in registers; dQ has its own pass,
  one program per (query block, batch x head). P is recomputed from the saved log-sum-exp.
- Offsets: 64-bit for the per-sequence base (batch x stride, cu_seqlens x stride) and the
  block start, 32-bit inside a tile.
- Rows that see no key at all (causal with Sq > Sk) output 0 and store lse = -inf; the
  backward reads their lse as +inf so their P is exactly 0 instead of NaN.
- Precision: 16-bit operands feed the tensor cores (wgmma on sm_90, mma on sm_80) with
  float32 accumulation; float32 inputs use IEEE float32 dots (not tf32), slower but exact
  to float32. Under the Triton interpreter (CPU tests) bf16 dots are wrong, so operands are
  upcast there (UPCAST).
- Block sizes, warps and stages come from the head dim, the GPU class (``gpu_class``:
  hopper sm_90, blackwell sm_100, ampere sm_80, consumer sm_86/89/120, from the device's
  capability and shared-memory opt-in limit) and varlen (see ``forward_config`` /
  ``backward_configs``), never from sequence lengths, so nothing re-specialises per length.

Compiled evidence (Triton 3.6, ``python -m llama_fast.tools.compile_check``; bf16, sm_90 unless
named; work = MMA FLOPs issued per loop iteration / useful GEMM FLOPs, 1.0 = no duplicate)
- dK/dV at head dim 128. Before: 32 queries x 64 keys, 8 warps, 2 stages. S^T = K Q^T and
  dP^T = V dO^T have only 64 rows, so Triton laid them out warpsPerCTA [8, 1] and the
  second warpgroup repeated the first's: per loop body 32 wgmma m64n16k16 + 4 m64n64k16
  per warpgroup, work 1.50; 255 registers, spills 52/60 bytes (causal), 0 (non-causal),
  196/196 (varlen); 65792 B shared, 1 block/SM. Merging the two masked query loops (the
  diagonal blocks and the ragged last block share one loop; ``_bwd_dkdv_inner``'s gap)
  alone cut the spills to 20/20, 12/12, 12/12. Now: 16 queries x 128 keys, 8 warps,
  1 stage: each warpgroup owns 64 keys, work 1.00, 233/222/241 registers, no spills,
  73728 B shared, 1 block/SM (the mma.sync archs sm_80/86/89/120 spill 8-16 bytes
  causal or varlen, 0 non-causal; sm_100 none). Rejected: 32 x 128 keys with 2
  stages (work 1.00, spills 84/28/120) or 1 stage (36/0/32); 64 keys on 4 warps (work
  1.00, spills 372+). The 16-query tile issues m64n16 wgmma that re-read K and V from
  shared memory per 16 queries; bench/tune.py lists 32 x 128 to measure against it on a
  GPU. Head dim 64 keeps 32 x 128 keys, 8 warps, 2 stages: work 1.00, no spills on sm_90.
  Pre-scaling K was not needed: exp2(st * qk_scale - lse) already compiles to one FFMA
  per score.
- Forward on Hopper, head dim 128: was 128 x 64, 8 warps, 3 stages (131072 B shared, 190
  registers, 1 block/SM). The scale is now folded: the row max is taken on raw scores
  and scaled once per row, each score costs one FFMA in the exp2 argument (``_fwd_inner``;
  needs scale > 0, which the launcher checks). 128 x 128, 2 stages: 163840 B, before the
  fold 255 registers and 12/12 bytes spilled (causal), after it 255 and none, so sm_90
  uses it; varlen still spills 16/16 at 128 keys and keeps 128 x 64 (180 registers), and
  so does sm_100 (128 x 128 spills 4/4 there). Consumer parts (99 KiB): 128 x 64 with 3 stages needs 131072 B and would
  not launch; with 2 stages it spills 32/96 bytes on sm_86; 128 x 32 with 2 stages: 49152
  B, 196 registers, no spills.
- dQ on Hopper: 64 x 32 keys, 3 stages (81920 B, 156 registers, 2 blocks/SM by shared
  memory) -> 64 x 64 keys, 2 stages: 98304 B, 230 registers, no spills, still 2 blocks/SM,
  half the loop iterations (3 stages would be 131072 B and 1 block/SM). sm_80/86 keep
  64 x 32: 64 keys spill 16-24 bytes there.
"""
from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from llama_fast import _alloc

from . import _autotune
from ._common import device_guard, device_limits, interpreter_on, load_rows, next_pow2

LOG2E = math.log2(math.e)


@triton.jit
def _seq_bounds(CU, b, seq_len, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence b: from cu_seqlens, or (0, seq_len) for batches."""
    if IS_VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        return start, (tl.load(CU + b + 1) - start).to(tl.int32)
    return tl.zeros([], dtype=tl.int64), seq_len


@triton.jit
def _query_block(CU_Q, CU_K, q_heads, group, seq_q, seq_k, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
    """This program's (batch, head, kv head, first query row) and its sequence's bounds.
    Grid (batch x head, query block): heads of one GQA group run side by side and share K/V
    in L2; the longest causal blocks (the last) start first, for a shorter tail."""
    bh = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = bh // q_heads
    h = bh % q_heads
    q_start, q_len = _seq_bounds(CU_Q, b, seq_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seq_k, IS_VARLEN)
    return b, h, h // group, m0, q_start, q_len, k_start, k_len


@triton.jit
def _load_tile(P, b64, stride_b, row0, stride_s, head, stride_h, local, offs_d, mask, UPCAST: tl.constexpr):
    """Rows row0 + local of one head of sequence b: a 64-bit base, 32-bit offsets inside."""
    base = P + b64 * stride_b + row0 * stride_s + head * stride_h
    tile = tl.load(base + (local[:, None] * stride_s + offs_d[None, :]), mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _causal_ranges(m0, q_len, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key ranges for query rows [m0, m0 + BLOCK_M): [0, full) needs no mask, [full, end)
    does (the diagonal and the ragged end of the keys), keys past ``end`` are invisible."""
    k_full = (k_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        diff = k_len - q_len  # bottom-right alignment: row i sees keys j <= i + diff
        end = tl.minimum(tl.maximum(m0 + BLOCK_M + diff, 0), k_len)
        full = tl.minimum((tl.maximum(m0 + diff + 1, 0) // BLOCK_N) * BLOCK_N, k_full)
    else:
        end = k_len
        full = k_full
    return tl.minimum(full, end), end


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, k_len, diff, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    local_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        key_ok = offs_n < k_len
        kt = load_rows(K, start_n, stride_kn, local_n, offs_d, d_ok, key_ok, True, MASKED, HEAD_DIM == BLOCK_D)
        v = load_rows(V, start_n, stride_vn, local_n, offs_d, d_ok, key_ok, False, MASKED, HEAD_DIM == BLOCK_D)
        if UPCAST:
            kt = kt.to(tl.float32)
        # Raw scores; the scale (> 0, with log2(e) folded in) enters the row max once per
        # row and every score through one FFMA inside the exp2 argument.
        s = tl.dot(q, kt, input_precision=PRECISION)
        if MASKED:
            visible = offs_n[None, :] < k_len
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diff)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    q_heads, group, seq_q, seq_k, qk_scale,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, kv_h, m0, q_start, q_len, k_start, k_len = _query_block(
        CU_Q, CU_K, q_heads, group, seq_q, seq_k, BLOCK_M, IS_VARLEN)
    if m0 >= q_len:
        return
    b64 = tl.cast(b, tl.int64)
    Q += b64 * stride_qb + q_start * stride_qs + h * stride_qh + tl.cast(m0, tl.int64) * stride_qs
    K += b64 * stride_kb + k_start * stride_ks + kv_h * stride_kh
    V += b64 * stride_vb + k_start * stride_vs + kv_h * stride_vh
    local_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + local_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + (local_m[:, None] * stride_qs + offs_d[None, :]), mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, end = _causal_ranges(m0, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    diff = k_len - q_len
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, 0, full, k_len, diff,
                               qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, full, end, k_len, diff,
                               qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION)

    seen = l_i > 0.0  # rows that saw at least one key
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    O += b64 * stride_ob + q_start * stride_os + h * stride_oh + tl.cast(m0, tl.int64) * stride_os
    tl.store(O + (local_m[:, None] * stride_os + offs_d[None, :]), out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    LSE += b64 * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start + m0
    tl.store(LSE + local_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
    q_heads, seq_q,
    IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's correction term, per query row."""
    # Grid (batch x head, query block): heads of one GQA group run side by side and share
    # K/V in L2; the longest causal blocks (the last) start first, for a shorter tail.
    bh = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = bh // q_heads
    h = bh % q_heads
    q_start, q_len = _seq_bounds(CU_Q, b, seq_q, IS_VARLEN)
    if m0 >= q_len:
        return
    b64 = tl.cast(b, tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ((m0 + local_m) < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row0 = q_start + m0
    o = _load_tile(O, b64, stride_ob, row0, stride_os, h, stride_oh, local_m, offs_d, mask, False)
    do = _load_tile(DO, b64, stride_dob, row0, stride_dos, h, stride_doh, local_m, offs_d, mask, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start + m0 + local_m, delta, mask=(m0 + local_m) < q_len)


@triton.jit
def _load_row_stats(LSE, DELTA, offs_m, q_len):
    """log2-scaled lse and delta of query rows; rows past the end or with no visible key get
    lse = +inf so that their probabilities come out exactly 0."""
    row_ok = offs_m < q_len
    lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_d, lo, hi, gap_at, gap, q_len, diff,
    qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate one query head's contribution to dK, dV of a key block (transposed
    formulation: scores as (keys, queries) so the accumulators stay row-major). Query
    blocks lo, lo + BLOCK_M, ... < hi, each from ``gap_at`` on moved ``gap`` rows on: one
    masked loop covers both the diagonal blocks and the ragged last block."""
    local_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    for virtual_m in range(lo, hi, BLOCK_M):
        start_m = tl.where(virtual_m >= gap_at, virtual_m + gap, virtual_m)
        offs_m = start_m + local_m
        query_ok = offs_m < q_len
        qt = load_rows(Q, start_m, stride_qs, local_m, offs_d, d_ok, query_ok, True, MASKED, HEAD_DIM == BLOCK_D)
        do = load_rows(DO, start_m, stride_dos, local_m, offs_d, d_ok, query_ok, False, MASKED, HEAD_DIM == BLOCK_D)
        lse, delta = _load_row_stats(LSE, DELTA, offs_m, q_len)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED and CAUSAL:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + diff, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    kv_heads, group, seq_q, seq_k, qk_scale, scale,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N  # causal: early key blocks have the most queries; start them first
    b = bh // kv_heads
    kv_h = bh % kv_heads
    k_start, k_len = _seq_bounds(CU_K, b, seq_k, IS_VARLEN)
    if n0 >= k_len:
        return
    q_start, q_len = _seq_bounds(CU_Q, b, seq_q, IS_VARLEN)
    b64 = tl.cast(b, tl.int64)
    local_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + local_n
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    key_row0 = k_start + n0
    k = _load_tile(K, b64, stride_kb, key_row0, stride_ks, kv_h, stride_kh, local_n, offs_d, kv_mask, UPCAST)
    v = _load_tile(V, b64, stride_vb, key_row0, stride_vs, kv_h, stride_vh, local_n, offs_d, kv_mask, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks that see these keys: from the first row whose diagonal reaches n0;
    # rows from ``full`` on see the whole key block (no causal mask), and the last, ragged
    # query block needs the row mask.
    diff = k_len - q_len
    q_ceil = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    q_floor = (q_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.minimum((tl.maximum(n0 - diff, 0) // BLOCK_M) * BLOCK_M, q_ceil)
        full = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diff, 0), BLOCK_M) * BLOCK_M, q_ceil)
    else:
        lo = 0
        full = 0
    full_end = tl.maximum(q_floor, full)
    for g in range(0, group):
        h = (kv_h * group + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + q_start * stride_qs + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start * stride_dos + h * stride_doh
        stats = b64 * stride_lb + h * stride_lh + q_start
        # Masked: [lo, full) (the diagonal) then [full_end, q_ceil) (the ragged end).
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qs, stride_dos,
                                 offs_n, offs_d, lo, full + (q_ceil - full_end), full, full_end - full, q_len, diff,
                                 qk_scale, True, CAUSAL, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qs, stride_dos,
                                 offs_n, offs_d, full, q_floor, q_floor, 0, q_len, diff, qk_scale,
                                 False, CAUSAL, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST, PRECISION)

    dk *= scale
    tl.store(DK + b64 * stride_dkb + key_row0 * stride_dks + kv_h * stride_dkh + (local_n[:, None] * stride_dks + offs_d[None, :]),
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + key_row0 * stride_dvs + kv_h * stride_dvh + (local_n[:, None] * stride_dvs + offs_d[None, :]),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, k_len, diff, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    local_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        key_ok = offs_n < k_len
        kt = load_rows(K, start_n, stride_kn, local_n, offs_d, d_ok, key_ok, True, MASKED, HEAD_DIM == BLOCK_D)
        vt = load_rows(V, start_n, stride_vn, local_n, offs_d, d_ok, key_ok, True, MASKED, HEAD_DIM == BLOCK_D)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = offs_n[None, :] < k_len
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diff)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh,
    q_heads, group, seq_q, seq_k, qk_scale, scale,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, kv_h, m0, q_start, q_len, k_start, k_len = _query_block(
        CU_Q, CU_K, q_heads, group, seq_q, seq_k, BLOCK_M, IS_VARLEN)
    if m0 >= q_len:
        return
    b64 = tl.cast(b, tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + local_m
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row0 = q_start + m0
    q = _load_tile(Q, b64, stride_qb, row0, stride_qs, h, stride_qh, local_m, offs_d, mask, UPCAST)
    do = _load_tile(DO, b64, stride_dob, row0, stride_dos, h, stride_doh, local_m, offs_d, mask, UPCAST)
    stats = b64 * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
    lse, delta = _load_row_stats(LSE + stats, DELTA + stats, offs_m, q_len)
    K += b64 * stride_kb + k_start * stride_ks + kv_h * stride_kh
    V += b64 * stride_vb + k_start * stride_vs + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, end = _causal_ranges(m0, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    diff = k_len - q_len
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, offs_m, offs_d, 0, full, k_len, diff,
                       qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_vs, offs_m, offs_d, full, end, k_len, diff,
                       qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION)
    dq *= scale
    tl.store(DQ + b64 * stride_dqb + row0 * stride_dqs + h * stride_dqh + (local_m[:, None] * stride_dqs + offs_d[None, :]),
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch configuration, from the compile check's register, spill, shared-memory and work
# report per arch (see the design notes above). The dK/dV program holds two (keys x D)
# float32 accumulators, the most register-hungry of the three. Head dim 256 needs small
# tiles to fit at all.


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))  # tl.dot needs every dimension >= 16


# float32 inputs take IEEE float32 dots on CUDA cores: small tiles, or they spill and
# overflow shared memory.
FLOAT32_FORWARD = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
FLOAT32_BACKWARD = ({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1},
                    {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1})


# GPU classes, by what an SM offers (llama_fast.tools.compile_check.ARCH_LIMITS has the numbers):
# "hopper": sm_90, 227 KiB of shared memory per block, wgmma; "blackwell": sm_100, 227
# KiB, tcgen05; "ampere": sm_80 (A100, also sm_87), 163 KiB, mma.sync; "consumer": sm_86,
# sm_89 and sm_120 (A10, L4, L40S, RTX 30/40/50), 99 KiB and 48 warps per SM, mma.sync.
# The launchers pick the class from the device's compute capability and shared-memory
# opt-in limit; off CUDA (the interpreter) they run the hopper tiles, so the CPU tests
# prove the flagship configuration.
GPU_CLASS_ARCHS = {"hopper": (90,), "blackwell": (100,), "ampere": (80,), "consumer": (86, 89, 120)}


def gpu_class(limits) -> str:
    """The configuration class of a device (``kernels._common.device_limits``); a GPU too
    small for even the consumer tiles is not one Llama-3 attention targets (every sm_80+
    part has at least 99 KiB)."""
    if limits is None or (limits.arch >= 90 and limits.smem_optin >= 200 * 1024):
        return "hopper" if limits is None or limits.arch < 100 else "blackwell"
    return "ampere" if limits.smem_optin >= 160 * 1024 else "consumer"


def forward_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, varlen: bool = False,
                   gpu: str = "hopper") -> dict:
    """Forward tile. Hopper at head dim 128: 128 x 128 with 2 stages (160 KiB, as the
    Triton tutorial's Hopper configurations); varlen keeps 128 x 64 (its 128-key tile
    spills 16 bytes on sm_90), so does sm_100 (128 x 128 spills 4 bytes there; 128 x 64:
    232 registers, none). Consumer parts at 128: 128 x 32 with 2 stages (48 KiB; 128 x 64
    with 3 stages needs 128 KiB > 99 KiB, with 2 it spills 32/96 bytes on sm_86)."""
    if dtype == torch.float32:
        return dict(FLOAT32_FORWARD)
    block_d = _block_d(head_dim)
    if block_d <= 128:
        if block_d == 128 and gpu == "hopper" and not varlen:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
        if block_d == 128 and gpu == "consumer":
            return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def backward_configs(head_dim: int, dtype: torch.dtype = torch.bfloat16, varlen: bool = False,
                     gpu: str = "hopper") -> tuple[dict, dict]:
    """(dK/dV config, dQ config); BLOCK_M counts queries, BLOCK_N keys. dK/dV takes 128 keys
    on 8 warps at head dims 64 and 128: each warpgroup owns 64 key rows, so no warpgroup
    repeats another's MMAs (see the design notes). dQ on sm_90/100: 64 keys, 2 stages."""
    if dtype == torch.float32:
        return tuple(dict(c) for c in FLOAT32_BACKWARD)
    block_d = _block_d(head_dim)
    if gpu in ("hopper", "blackwell"):
        dq = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    else:
        dq = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    if block_d <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}, dq
    if block_d <= 128:
        return {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1}, dq
    return ({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1},
            {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1})


PREPROCESS_BLOCK_M = 64
# 8 warps: with 4, sm_100's ptxas holds the 64 x D tiles in 48 registers and spills 36
# bytes (D=128 varlen) to 68 (D=256); with 8, 44 registers and no spills.
PREPROCESS_WARPS = 8


def _common_constexprs(q: torch.Tensor, causal: bool, varlen: bool) -> dict:
    head_dim = q.shape[-1]
    return {
        "CAUSAL": causal, "IS_VARLEN": varlen, "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim),
        # The interpreter's bf16 dot is wrong: run its dots in float32 (CPU tests only).
        "UPCAST": interpreter_on() and q.dtype != torch.float32,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


class _Problem:
    """Shapes and (batch, row, head) strides of one attention call, fixed or varlen."""

    def __init__(self, q, k, cu_q, cu_k, max_q, max_k):
        self.varlen = cu_q is not None
        if self.varlen:
            self.batch, self.seq_q, self.seq_k = cu_q.shape[0] - 1, max_q, max_k
            self.q_heads, self.kv_heads = q.shape[1], k.shape[1]
        else:
            self.batch, self.seq_q, self.q_heads = q.shape[0], q.shape[1], q.shape[2]
            self.seq_k, self.kv_heads = k.shape[1], k.shape[2]
        self.group = self.q_heads // self.kv_heads
        self.cu_q = cu_q if cu_q is not None else q
        self.cu_k = cu_k if cu_k is not None else q

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, row, head) strides; a packed varlen tensor has no batch stride."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def stats_strides(self, stats: torch.Tensor) -> tuple[int, int]:
        """lse/delta are (B, Hq, Sq), or (Hq, Tq) for varlen."""
        return (0, stats.stride(0)) if self.varlen else (stats.stride(0), stats.stride(1))

    def empty_stats(self, q: torch.Tensor) -> torch.Tensor:
        shape = (self.q_heads, q.shape[0]) if self.varlen else (self.batch, self.q_heads, self.seq_q)
        return _alloc.empty(shape, torch.float32, q.device)


def _unit_last_stride(*tensors):
    # The kernels index the head dim contiguously (16-byte loads); a strided head dim is
    # rare enough that one copy is cheaper than a slow general path.
    return [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in tensors]


def _forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    q, k, v = _unit_last_stride(q, k, v)
    p = _Problem(q, k, cu_q, cu_k, max_q, max_k)
    out = _alloc.empty(q.shape, q.dtype, q.device)
    lse = p.empty_stats(q)
    if p.batch * p.q_heads * p.seq_q == 0 or q.numel() == 0:
        return out, lse
    if not scale > 0:
        raise ValueError(f"softmax scale must be positive, got {scale}")  # the row max is taken before scaling
    gpu = gpu_class(device_limits(q.device))

    def launch(cfg, out, lse, warmup=False):
        grid = (p.batch * p.q_heads, triton.cdiv(p.seq_q, cfg["BLOCK_M"]))
        with device_guard(q.device):
            return _attn_fwd_kernel.run(
                q, k, v, out, lse, p.cu_q, p.cu_k,
                *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(out), *p.stats_strides(lse),
                p.q_heads, p.group, p.seq_q, p.seq_k, scale * LOG2E,
                **_common_constexprs(q, causal, p.varlen), **cfg, grid=grid, warmup=warmup,
            )

    cfg = _tuned("fwd", p, q, causal, gpu, forward_config(q.shape[-1], q.dtype, p.varlen, gpu), launch, out, lse)
    launch(cfg, out, lse)
    return out, lse


def _backward(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    do, q, k, v, o = _unit_last_stride(do, q, k, v, o)
    p = _Problem(q, k, cu_q, cu_k, max_q, max_k)
    dq = _alloc.empty(q.shape, q.dtype, q.device)
    dk = _alloc.empty(k.shape, k.dtype, k.device)
    dv = _alloc.empty(v.shape, v.dtype, v.device)
    if p.batch * p.q_heads == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = p.empty_stats(q)
    consts = _common_constexprs(q, causal, p.varlen)
    gpu = gpu_class(device_limits(q.device))
    cfg_kv, cfg_q = backward_configs(q.shape[-1], q.dtype, p.varlen, gpu)
    lse_strides = p.stats_strides(lse)
    assert lse_strides == p.stats_strides(delta), "lse must be laid out as the forward wrote it"
    args = (*p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do))

    def launch_dkdv(cfg, dk, dv, warmup=False):
        with device_guard(q.device):
            return _attn_bwd_dkdv_kernel.run(
                q, k, v, do, lse, delta, dk, dv, p.cu_q, p.cu_k, *args, *p.strides(dk), *p.strides(dv), *lse_strides,
                p.kv_heads, p.group, p.seq_q, p.seq_k, scale * LOG2E, scale, **consts, **cfg,
                grid=(p.batch * p.kv_heads, triton.cdiv(max(p.seq_k, 1), cfg["BLOCK_N"])), warmup=warmup,
            )

    def launch_dq(cfg, dq, warmup=False):
        with device_guard(q.device):
            return _attn_bwd_dq_kernel.run(
                q, k, v, do, lse, delta, dq, p.cu_q, p.cu_k, *args, *p.strides(dq), *lse_strides,
                p.q_heads, p.group, p.seq_q, p.seq_k, scale * LOG2E, scale, **consts, **cfg,
                grid=(p.batch * p.q_heads, triton.cdiv(p.seq_q, cfg["BLOCK_M"])), warmup=warmup,
            )

    with device_guard(q.device):
        if p.seq_q:
            _attn_bwd_preprocess_kernel[(p.batch * p.q_heads, triton.cdiv(p.seq_q, PREPROCESS_BLOCK_M))](
                o, do, delta, p.cu_q, *p.strides(o), *p.strides(do), *lse_strides, p.q_heads, p.seq_q,
                IS_VARLEN=p.varlen, HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], BLOCK_M=PREPROCESS_BLOCK_M,
                num_warps=PREPROCESS_WARPS,
            )
    launch_dkdv(_tuned("dkdv", p, q, causal, gpu, cfg_kv, launch_dkdv, dk, dv), dk, dv)
    if p.seq_q:
        launch_dq(_tuned("dq", p, q, causal, gpu, cfg_q, launch_dq, dq), dq)
    return dq, dk, dv


def _tuned(role, p, q, causal, gpu, default, launch, *outputs) -> dict:
    """The config ``role`` launches with: its static ``default``, or the autotuner's choice
    among the default and the candidates of kernels/_autotune.py, timed by ``launch`` into
    scratch copies of ``outputs`` on a GPU (cached on disk; LLAMA_FAST_AUTOTUNE=0: never)."""
    head_dim = q.shape[-1]
    key = _autotune.attention_key(role, q.device, q.dtype, head_dim, causal, p.varlen, max(p.seq_q, p.seq_k))
    return _autotune.choose(role, key, default, _autotune.candidates(role, head_dim, q.dtype, gpu),
                            _autotune.on_scratch(launch, *outputs))


# Registry entries (signatures as in llama_fast.reference).


def attn_fwd(q, k, v, causal, scale):
    return _forward(q, k, v, None, None, 0, 0, causal, scale)


def attn_bwd(do, q, k, v, o, lse, causal, scale):
    return _backward(do, q, k, v, o, lse, None, None, 0, 0, causal, scale)


def attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    return _forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


def attn_varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    return _backward(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale)


def useful_mma_flops(kernel: str, constexprs: dict) -> int | None:
    """The GEMM FLOPs one iteration of a kernel's dot loop needs (whole CTA), for the
    compile check's work ratio: forward S = QK^T and O += PV; dK/dV S^T, dV, dP^T and dK;
    dQ S, dP and dQ. Each is 2 x (query rows) x (keys) x head dim."""
    per_gemm = 2 * constexprs.get("BLOCK_M", 0) * constexprs.get("BLOCK_N", 0) * constexprs.get("HEAD_DIM", 0)
    gemms = {"_attn_fwd_kernel": 2, "_attn_bwd_dkdv_kernel": 4, "_attn_bwd_dq_kernel": 3}.get(kernel)
    return gemms * per_gemm if gemms else None


def compile_configs():
    """The configurations the launchers use: head dims 64 and 128 in bf16, causal or not,
    fixed-length and varlen; float16 and float32 at 128; 256 (the smallest tiles)."""
    kernels = [(_attn_fwd_kernel, "fwd"), (_attn_bwd_preprocess_kernel, "pre"),
               (_attn_bwd_dkdv_kernel, "dkdv"), (_attn_bwd_dq_kernel, "dq")]
    cases = [(d, "bf16", causal, varlen) for d in (64, 128) for causal, varlen in ((True, False), (False, False), (True, True))]
    cases += [(128, "fp16", True, False), (128, "fp32", True, False), (256, "bf16", True, False)]
    # One entry per distinct configuration, with the archs of every GPU class that uses it.
    seen: dict = {}
    for head_dim, dtype, causal, varlen in cases:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for gpu, archs in GPU_CLASS_ARCHS.items():
            dkdv, dq = backward_configs(head_dim, torch_dtype, varlen, gpu)
            fwd = forward_config(head_dim, torch_dtype, varlen, gpu)
            block = {"fwd": fwd, "dkdv": dkdv, "dq": dq, "pre": {"BLOCK_M": PREPROCESS_BLOCK_M, "num_warps": PREPROCESS_WARPS}}
            for kernel, role in kernels:
                if role == "pre" and not causal:
                    continue  # the preprocess does not depend on the mask
                key = (kernel, role, head_dim, dtype, causal, varlen, tuple(sorted(block[role].items())))
                seen.setdefault(key, []).extend(archs)
    for (kernel, role, head_dim, dtype, causal, varlen, items), archs in seen.items():
        cfg = dict(items)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages", 3)}
        constexprs = {"IS_VARLEN": varlen, "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), **cfg}
        if role != "pre":
            constexprs.update(CAUSAL=causal, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
        signature, hints = {}, {}
        # (Read the Python signature: under the interpreter ``kernel`` is not a JITFunction.)
        for name, param in inspect.signature(kernel.fn).parameters.items():
            if "constexpr" in str(param.annotation):
                continue
            if name in ("LSE", "DELTA"):
                signature[name] = "*fp32"
            elif name.startswith("CU_"):
                signature[name] = "*i32" if varlen else f"*{dtype}"
            elif name.isupper():
                signature[name] = f"*{dtype}"
            elif name in ("qk_scale", "scale"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                # Llama launches: row and head strides, head counts and lengths are
                # multiples of 16; GQA group sizes (4, 8) and batch strides of varlen (0) vary.
                if name.startswith("stride_") or name in ("q_heads", "seq_q", "seq_k"):
                    hints[name] = 16
        yield kernel, signature, constexprs, options, hints, tuple(sorted(archs))


# The triton backend's implementations from this file, by the dispatcher's op names.
LAUNCHERS = {"attn_fwd": attn_fwd, "attn_bwd": attn_bwd, "attn_varlen_fwd": attn_varlen_fwd,
             "attn_varlen_bwd": attn_varlen_bwd}
