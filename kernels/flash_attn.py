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
- TMA (sm_90+): with USE_TMA the Q/K/V/O (forward), Q/K/V/dO/dK/dV (dK/dV) and
  Q/K/V/dO/dQ (dQ) tiles move through host-side tensor descriptors, one per tensor, over
  the (batch, row, head, dim) layout with its own strides and a [1, rows, 1, BLOCK_D] box
  (``_tiles``, ``_rows``, ``_store_rows``). A 4-D descriptor needs no copy for the layouts
  callers pass (contiguous, (B, H, S, D) transposed views, slices of a fused projection)
  and its sequence dimension ends at the sequence end, so TMA zero-fills rows past it on
  load and clips them on store: no mask code (a 2-D descriptor over batch x rows would run
  into the next batch element). Host descriptors need no device-side allocator
  (``tl.make_tensor_descriptor`` would need ``triton.set_allocator``, a process-wide
  setting). The launcher sets USE_TMA (``_use_tma``) for fixed-length batches only, when
  Triton has ``TensorDescriptor``, the tensors meet TMA's rules (``tma_strides``: 16-byte
  aligned base and strides, unit last stride) and ``tma_default`` picks it for the GPU
  class (sm_90/sm_100, 16-bit, head dim 64 or 128, not in ``TMA_OFF``); ``tma_mode``
  ("auto", "on", "off") overrides. Varlen stays on pointers: a packed (tokens, heads, D)
  tensor holds every sequence, and a host descriptor's shape can only end at the tensor's
  end, so a tile past one sequence's end would read the next sequence and, worse, store
  into it (bounding each sequence needs a descriptor per sequence, built on the device, or
  Triton's ragged-descriptor trick with 5-D boxes: left for a GPU to measure).
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
  73728 B shared, 1 block/SM (the mma.sync archs: see "Spills" below). Rejected: 32 x
  128 keys with 2 stages (work 1.00, spills 84/28/120) or 1 stage (36/0/32); 64 keys on 4 warps (work
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
- Spills (bf16; bytes stored/loaded; before -> after, every 16-bit Llama-shape tile now
  spills nothing on sm_80/86/89/90/100/120, which tests/test_compile_sm90.py holds).
  dK/dV at head dim 64, 32 x 128 keys, 8 warps, 2 stages, spilled causal / non-causal /
  varlen: sm_80 56/52, 8/4, 20/16; sm_86/89 12/8, 8/4, 12/8; sm_120 12/8, 16/12, 12/8;
  sm_100 4/4, 0, 16/20. With 1 stage (shared memory 45312 -> 45056 B, sm_100 57664 -> 40968),
  registers causal / non-causal / varlen: sm_80 252/246/254, sm_86/89 250/252/242, sm_120
  248/250/248, sm_100 118/110/168 (2 blocks/SM fixed-length, was 1); no spills, work 1.00.
  sm_90 keeps 2 stages (241/216/255 registers, none). ptxas sits near 255 on the mma.sync
  archs: small code changes move these spills (16 queries x 128 keys, 1 stage, has more
  room on sm_80: 206/199/241).
  dK/dV at head dim 128 on the mma.sync archs, 16 x 128, 8 warps: causal sm_80 8/4, sm_86/89
  12/12, sm_120 16/16; varlen 8/8 (sm_120 16/12); fp16 as bf16 (by count, a warp's 16
  key rows of K and V as MMA operands take 64 registers a thread and its share of the two
  float32 accumulators 128). Now 64 queries x 64 keys, 8 warps, 1 stage: the TTGIR lays
  every product out warpsPerCTA [1, 8] (8 of S^T's 64 columns a warp, one 8-wide MMA),
  work 1.00, 81920 B shared (fits 99 KiB), registers causal / non-causal / varlen sm_80
  236/228/255, sm_86/89 216/228/226, sm_120 227/220/224, no spills, 1 block/SM as before.
  Rejected: 32 x 64 on 8 warps (the same [1, 8] layout gives S^T's 32 columns 4 a warp
  against the 8-wide MMA: work 1.50), 16 x 64 (8 warps 2.50, 4 warps 1.50), 64 x 64 on 4
  warps (spills 640/612), clamping the masked loop's query rows instead of masking their
  loads (16 x 128: sm_86/89/120 clean, sm_80 72/68).
  Forward at head dim 128 on sm_80 (was 128 x 64, 3 stages: causal 12/36; 2 stages
  spilled too): 128 x 32 with 2 stages (the consumer tile): 202/204/204 registers (causal
  / non-causal / varlen), none, 49152 B shared, 1 block/SM as before.
- TMA (sm_90 and sm_100, bf16, fixed-length; registers / shared bytes, pointer -> TMA,
  causal and non-causal; every TMA variant has cp.async.bulk.tensor loads and stores in its
  PTX, no spills but one, work 1.00 on sm_90). sm_90: forward D=128 255/163840 -> 255/131104
  and 255 -> 229: on. dK/dV D=64 241/49408 -> 193/16672 and 216 -> 187: on. Forward D=64
  126/65536 -> 149/49208 (2 -> 1 block/SM) and 115 -> 123; dQ D=64 164 -> 168, 134 -> 154
  (49152 -> 32800 B); dK/dV D=128 233/73728 -> 252/32776, 222 -> 247; dQ D=128
  230/98304 -> 244/65568, 212 -> 220: off (``TMA_OFF``: more registers; the descriptor
  loads hold the loop-invariant tiles in registers where the pointer path feeds wgmma
  from shared memory). sm_100: forward D=64 202 -> 128 (1 -> 2 blocks/SM), 128 -> 100;
  D=128 229 -> 166 causal, and 179 -> 128 registers but 12/16 bytes spilled non-causal (off);
  dK/dV D=64 118 -> 99, 110 -> 89; D=128 222 -> 196, 212 -> 189; dQ D=64 128 -> 113,
  110 -> 81; D=128 168 -> 113, 126 -> 84; shared memory the same: on. No GPU has timed
  either path yet.
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

try:  # host-side TMA descriptors (Triton >= 3.4); without them the pointer path serves
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

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
def _rows(P, b, head, start, row_stride, local, offs_d, d_ok, row_ok, TRANSPOSED: tl.constexpr, MASKED: tl.constexpr,
          EVEN_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows start + local of one head as a (ROWS, BLOCK_D) tile, or (BLOCK_D, ROWS)
    TRANSPOSED. USE_TMA: ``P`` is a (batch, row, head, dim) tensor descriptor and one TMA
    copy brings the box [b, start:start + ROWS, head, :] into shared memory; the
    descriptor's shape ends at the sequence end and the head dim, so rows and dims past
    them arrive as zeros with no mask code. Else ``P`` points at row 0 of the head (see
    load_rows)."""
    if USE_TMA:
        tile = P.load([b, start, head, 0]).reshape(ROWS, BLOCK_D)
        if TRANSPOSED:
            tile = tl.trans(tile)
    else:
        tile = load_rows(P, start, row_stride, local, offs_d, d_ok, row_ok, TRANSPOSED, MASKED, EVEN_D)
    return tile


@triton.jit
def _store_rows(P, b, head, row0, row_stride, local, offs_d, mask, tile, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Store a (ROWS, BLOCK_D) float32 tile at rows row0 + local of one head in P's dtype:
    one TMA copy (clipped at the sequence end and the head dim by the descriptor's shape),
    or masked stores through ``P`` pointing at row 0 of the head."""
    if USE_TMA:
        P.store([b, row0, head, 0], tile.to(P.dtype).reshape(1, ROWS, 1, BLOCK_D))
    else:
        tl.store(P + tl.cast(row0, tl.int64) * row_stride + (local[:, None] * row_stride + offs_d[None, :]),
                 tile.to(P.dtype.element_ty), mask=mask)


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
    acc, l_i, m_i, q, K, V, b, kv_h, stride_kn, stride_vn, offs_m, offs_d, lo, hi, k_len, diff, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    local_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        key_ok = offs_n < k_len
        kt = _rows(K, b, kv_h, start_n, stride_kn, local_n, offs_d, d_ok, key_ok, True, MASKED, HEAD_DIM == BLOCK_D,
                   BLOCK_N, BLOCK_D, USE_TMA)
        v = _rows(V, b, kv_h, start_n, stride_vn, local_n, offs_d, d_ok, key_ok, False, MASKED, HEAD_DIM == BLOCK_D,
                  BLOCK_N, BLOCK_D, USE_TMA)
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
    USE_TMA: tl.constexpr,
):
    """USE_TMA: Q, K, V and O are (batch, row, head, dim) tensor descriptors (fixed-length
    batches only); else pointers."""
    b, h, kv_h, m0, q_start, q_len, k_start, k_len = _query_block(
        CU_Q, CU_K, q_heads, group, seq_q, seq_k, BLOCK_M, IS_VARLEN)
    if m0 >= q_len:
        return
    b64 = tl.cast(b, tl.int64)
    if not USE_TMA:
        h64 = tl.cast(h, tl.int64)
        kv_h64 = tl.cast(kv_h, tl.int64)
        Q += b64 * stride_qb + q_start * stride_qs + h64 * stride_qh
        K += b64 * stride_kb + k_start * stride_ks + kv_h64 * stride_kh
        V += b64 * stride_vb + k_start * stride_vs + kv_h64 * stride_vh
    local_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + local_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q = _rows(Q, b, h, m0, stride_qs, local_m, offs_d, d_ok, row_ok, False, True, False, BLOCK_M, BLOCK_D, USE_TMA)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, end = _causal_ranges(m0, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    diff = k_len - q_len
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, kv_h, stride_ks, stride_vs, offs_m, offs_d, 0, full, k_len,
                               diff, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, kv_h, stride_ks, stride_vs, offs_m, offs_d, full, end, k_len,
                               diff, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION, USE_TMA)

    seen = l_i > 0.0  # rows that saw at least one key
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    if not USE_TMA:  # (the output's base is formed here, not live across the loops)
        O += b64 * stride_ob + q_start * stride_os + tl.cast(h, tl.int64) * stride_oh
    _store_rows(O, b, h, m0, stride_os, local_m, offs_d, row_ok[:, None] & d_ok[None, :], out, BLOCK_M, BLOCK_D, USE_TMA)
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
    dk, dv, k, v, Q, DO, b, h, LSE, DELTA, stride_qs, stride_dos, offs_n, offs_d, lo, hi, gap_at, gap, q_len, diff,
    qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
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
        qt = _rows(Q, b, h, start_m, stride_qs, local_m, offs_d, d_ok, query_ok, True, MASKED, HEAD_DIM == BLOCK_D,
                   BLOCK_M, BLOCK_D, USE_TMA)
        do = _rows(DO, b, h, start_m, stride_dos, local_m, offs_d, d_ok, query_ok, False, MASKED, HEAD_DIM == BLOCK_D,
                   BLOCK_M, BLOCK_D, USE_TMA)
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
    USE_TMA: tl.constexpr,
):
    """USE_TMA: Q, K, V, dO, dK and dV are (batch, row, head, dim) tensor descriptors."""
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
    key_ok = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    kv_mask = key_ok[:, None] & d_ok[None, :]
    if not USE_TMA:
        kv_h64 = tl.cast(kv_h, tl.int64)
        K += b64 * stride_kb + k_start * stride_ks + kv_h64 * stride_kh
        V += b64 * stride_vb + k_start * stride_vs + kv_h64 * stride_vh
    k = _rows(K, b, kv_h, n0, stride_ks, local_n, offs_d, d_ok, key_ok, False, True, False, BLOCK_N, BLOCK_D, USE_TMA)
    v = _rows(V, b, kv_h, n0, stride_vs, local_n, offs_d, d_ok, key_ok, False, True, False, BLOCK_N, BLOCK_D, USE_TMA)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
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
        h = kv_h * group + g
        h64 = tl.cast(h, tl.int64)
        if USE_TMA:
            q_base = Q
            do_base = DO
        else:
            q_base = Q + b64 * stride_qb + q_start * stride_qs + h64 * stride_qh
            do_base = DO + b64 * stride_dob + q_start * stride_dos + h64 * stride_doh
        stats = b64 * stride_lb + h64 * stride_lh + q_start
        # Masked: [lo, full) (the diagonal) then [full_end, q_ceil) (the ragged end).
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, b, h, LSE + stats, DELTA + stats, stride_qs, stride_dos,
                                 offs_n, offs_d, lo, full + (q_ceil - full_end), full, full_end - full, q_len, diff,
                                 qk_scale, True, CAUSAL, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST, PRECISION, USE_TMA)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, b, h, LSE + stats, DELTA + stats, stride_qs, stride_dos,
                                 offs_n, offs_d, full, q_floor, q_floor, 0, q_len, diff, qk_scale,
                                 False, CAUSAL, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST, PRECISION, USE_TMA)

    dk *= scale
    if not USE_TMA:  # (the gradients' bases are formed here, not live across the loops)
        kv_h64 = tl.cast(kv_h, tl.int64)
        DK += b64 * stride_dkb + k_start * stride_dks + kv_h64 * stride_dkh
        DV += b64 * stride_dvb + k_start * stride_dvs + kv_h64 * stride_dvh
    _store_rows(DK, b, kv_h, n0, stride_dks, local_n, offs_d, kv_mask, dk, BLOCK_N, BLOCK_D, USE_TMA)
    _store_rows(DV, b, kv_h, n0, stride_dvs, local_n, offs_d, kv_mask, dv, BLOCK_N, BLOCK_D, USE_TMA)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, K, V, b, kv_h, stride_kn, stride_vn, offs_m, offs_d, lo, hi, k_len, diff, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    local_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        key_ok = offs_n < k_len
        kt = _rows(K, b, kv_h, start_n, stride_kn, local_n, offs_d, d_ok, key_ok, True, MASKED, HEAD_DIM == BLOCK_D,
                   BLOCK_N, BLOCK_D, USE_TMA)
        vt = _rows(V, b, kv_h, start_n, stride_vn, local_n, offs_d, d_ok, key_ok, True, MASKED, HEAD_DIM == BLOCK_D,
                   BLOCK_N, BLOCK_D, USE_TMA)
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
    USE_TMA: tl.constexpr,
):
    """USE_TMA: Q, K, V, dO and dQ are (batch, row, head, dim) tensor descriptors."""
    b, h, kv_h, m0, q_start, q_len, k_start, k_len = _query_block(
        CU_Q, CU_K, q_heads, group, seq_q, seq_k, BLOCK_M, IS_VARLEN)
    if m0 >= q_len:
        return
    b64 = tl.cast(b, tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + local_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    if not USE_TMA:
        h64 = tl.cast(h, tl.int64)
        kv_h64 = tl.cast(kv_h, tl.int64)
        Q += b64 * stride_qb + q_start * stride_qs + h64 * stride_qh
        DO += b64 * stride_dob + q_start * stride_dos + h64 * stride_doh
        K += b64 * stride_kb + k_start * stride_ks + kv_h64 * stride_kh
        V += b64 * stride_vb + k_start * stride_vs + kv_h64 * stride_vh
    q = _rows(Q, b, h, m0, stride_qs, local_m, offs_d, d_ok, row_ok, False, True, False, BLOCK_M, BLOCK_D, USE_TMA)
    do = _rows(DO, b, h, m0, stride_dos, local_m, offs_d, d_ok, row_ok, False, True, False, BLOCK_M, BLOCK_D, USE_TMA)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stats = b64 * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
    lse, delta = _load_row_stats(LSE + stats, DELTA + stats, offs_m, q_len)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, end = _causal_ranges(m0, q_len, k_len, BLOCK_M, BLOCK_N, CAUSAL)
    diff = k_len - q_len
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, b, kv_h, stride_ks, stride_vs, offs_m, offs_d, 0, full, k_len,
                       diff, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION, USE_TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, b, kv_h, stride_ks, stride_vs, offs_m, offs_d, full, end, k_len,
                       diff, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST, PRECISION, USE_TMA)
    dq *= scale
    if not USE_TMA:  # (the gradient's base is formed here, not live across the loops)
        DQ += b64 * stride_dqb + q_start * stride_dqs + tl.cast(h, tl.int64) * stride_dqh
    _store_rows(DQ, b, h, m0, stride_dqs, local_m, offs_d, row_ok[:, None] & d_ok[None, :], dq, BLOCK_M, BLOCK_D,
                USE_TMA)


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
    with 3 stages needs 128 KiB > 99 KiB, with 2 it spills 32/96 bytes on sm_86); so does
    sm_80 (128 x 64 spills 12/36 bytes causal with 3 stages, 16/48 with 2)."""
    if dtype == torch.float32:
        return dict(FLOAT32_FORWARD)
    block_d = _block_d(head_dim)
    if block_d <= 128:
        if block_d == 128 and gpu == "hopper" and not varlen:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
        if block_d == 128 and gpu in ("consumer", "ampere"):
            return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def backward_configs(head_dim: int, dtype: torch.dtype = torch.bfloat16, varlen: bool = False,
                     gpu: str = "hopper") -> tuple[dict, dict]:
    """(dK/dV config, dQ config); BLOCK_M counts queries, BLOCK_N keys. dK/dV takes 128 keys
    on 8 warps at head dims 64 and 128 on sm_90/100: each warpgroup owns 64 key rows, so no
    warpgroup repeats another's MMAs; the mma.sync classes take 64 x 64 at head dim 128
    (see the design notes' "Spills"). dQ on sm_90/100: 64 keys, 2 stages."""
    if dtype == torch.float32:
        return tuple(dict(c) for c in FLOAT32_BACKWARD)
    block_d = _block_d(head_dim)
    if gpu in ("hopper", "blackwell"):
        dq = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    else:
        dq = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    if block_d <= 64:
        if gpu == "hopper":
            return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}, dq
        # 2 stages spill 4-56 bytes on the others (causal or varlen), 1 stage none.
        return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1}, dq
    if block_d <= 128:
        if gpu in ("hopper", "blackwell"):
            return {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1}, dq
        # mma.sync: 16 x 128 spills 8-16 bytes causal or varlen. 64 x 64 on 8 warps: every
        # product laid out warpsPerCTA [1, 8] (8 key-block columns a warp; 64 queries keep
        # S^T's 8 columns a warp whole, work 1.00), 236 registers on sm_80, no spills.
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}, dq
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


# TMA: "auto" uses tensor descriptors where ``tma_default`` says they pay and the tensors
# allow them; "on" wherever the tensors allow them (any device: the interpreter runs them
# too, which is how the CPU tests check the descriptor path); "off" never.
tma_mode = "auto"


def tma_capable(head_dim: int, dtype: torch.dtype, gpu: str) -> bool:
    """Whether the kernels have a compile-checked TMA variant for this launch: 16-bit
    fixed-length batches at head dims 64 and 128 on sm_90 and sm_100."""
    return gpu in ("hopper", "blackwell") and dtype in (torch.bfloat16, torch.float16) and _block_d(head_dim) in (64, 128)


def tma_default(kernel: str, head_dim: int, dtype: torch.dtype, gpu: str, causal: bool) -> bool:
    """Whether ``kernel`` ("fwd", "dkdv", "dq") loads its tiles through TMA by default:
    where it has a TMA variant (``tma_capable``) that compiles to no worse static evidence
    than its pointer variant (``TMA_OFF``; see the design notes)."""
    return tma_capable(head_dim, dtype, gpu) and (kernel, _block_d(head_dim), causal, gpu) not in TMA_OFF


# (kernel, BLOCK_D, causal, GPU class) whose TMA variant compiles to more registers, lower
# occupancy or spills against the pointer variant (sm_90/sm_100, Triton 3.6; the design
# notes have the numbers): off by default, selectable with tma_mode = "on". On sm_90 the
# descriptor loads move loop-invariant K/V (dK/dV) or Q/dO (dQ) into registers where the
# pointer path feeds wgmma from shared memory.
TMA_OFF: frozenset = frozenset(
    [("fwd", 64, causal, "hopper") for causal in (True, False)]  # 149/123 registers vs 126/115; 1 block/SM causal
    + [("dq", d, causal, "hopper") for d in (64, 128) for causal in (True, False)]  # +4 to +20 registers
    + [("dkdv", 128, causal, "hopper") for causal in (True, False)]  # 252/247 registers vs 233/222
    + [("fwd", 128, False, "blackwell")]  # spills 12/16 bytes (the pointer variant: none)
)


def tma_strides(t: torch.Tensor) -> list[int] | None:
    """Element strides for a (batch, row, head, dim) TMA descriptor over ``t``, or None if
    TMA cannot address it: the base and every stride but the last (1) must be multiples
    of 16 bytes, strides positive and below 2^40 bytes, sizes below 2^31 (32-bit box
    coordinates). A size-1 dimension's stride is never stepped: it gets a legal one."""
    if t.dim() != 4 or t.numel() == 0 or t.data_ptr() % 16 or any(n >= 2**31 for n in t.shape):
        return None
    size = t.element_size()
    span = 1 + sum(st * (n - 1) for st, n in zip(t.stride(), t.shape))  # elements t reaches
    outer = -(-span * size // 16) * 16 // size
    strides = []
    for n, st in zip(t.shape[:-1], t.stride()[:-1]):
        st = outer if n == 1 else st
        if st <= 0 or (st * size) % 16 or st * size >= 2**40:
            return None
        strides.append(st)
    if t.shape[-1] != 1 and t.stride(-1) != 1:
        return None
    return strides + [1]


def _use_tma(kernel: str, device: torch.device, varlen: bool, causal: bool, *tensors) -> bool:
    """USE_TMA for one launch: fixed-length batches only (a packed varlen tensor has no
    per-sequence end a host descriptor could clip at), an installed Triton with host
    descriptors, the mode (``tma_mode``, else ``tma_default`` for the device's class on
    sm_90+), and every tensor TMA-addressable (``tma_strides``)."""
    if varlen or TensorDescriptor is None or tma_mode == "off":
        return False
    if tma_mode == "auto":
        limits = device_limits(device)
        q = tensors[0]
        if limits is None or limits.arch < 90 or not tma_default(kernel, q.shape[-1], q.dtype, gpu_class(limits), causal):
            return False
    return all(tma_strides(t) is not None for t in tensors)


def _tiles(use_tma: bool, block_d: int, *tensor_rows):
    """The kernel's tile arguments: each (tensor, rows per tile) as a (batch, row, head,
    dim) descriptor with a [1, rows, 1, block_d] box when ``use_tma``, else the tensor."""
    if not use_tma:
        return [t for t, _ in tensor_rows]
    return [TensorDescriptor(t, list(t.shape), tma_strides(t), [1, rows, 1, block_d]) for t, rows in tensor_rows]


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
    block_d = _block_d(q.shape[-1])

    def launch(cfg, out, lse, warmup=False):
        block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
        use_tma = _use_tma("fwd", q.device, p.varlen, causal, q, k, v, out)
        grid = (p.batch * p.q_heads, triton.cdiv(p.seq_q, block_m))
        with device_guard(q.device):
            return _attn_fwd_kernel.run(
                *_tiles(use_tma, block_d, (q, block_m), (k, block_n), (v, block_n), (out, block_m)), lse, p.cu_q, p.cu_k,
                *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(out), *p.stats_strides(lse),
                p.q_heads, p.group, p.seq_q, p.seq_k, scale * LOG2E,
                **_common_constexprs(q, causal, p.varlen), **cfg, USE_TMA=use_tma, grid=grid, warmup=warmup,
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

    block_d = consts["BLOCK_D"]

    def launch_dkdv(cfg, dk, dv, warmup=False):
        block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
        tma = _use_tma("dkdv", q.device, p.varlen, causal, q, k, v, do, dk, dv)
        q_, k_, v_, do_, dk_, dv_ = _tiles(tma, block_d, (q, block_m), (k, block_n), (v, block_n), (do, block_m),
                                           (dk, block_n), (dv, block_n))
        with device_guard(q.device):
            return _attn_bwd_dkdv_kernel.run(
                q_, k_, v_, do_, lse, delta, dk_, dv_, p.cu_q, p.cu_k, *args, *p.strides(dk), *p.strides(dv),
                *lse_strides, p.kv_heads, p.group, p.seq_q, p.seq_k, scale * LOG2E, scale, **consts, **cfg,
                USE_TMA=tma, grid=(p.batch * p.kv_heads, triton.cdiv(max(p.seq_k, 1), block_n)), warmup=warmup,
            )

    def launch_dq(cfg, dq, warmup=False):
        block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
        tma = _use_tma("dq", q.device, p.varlen, causal, q, k, v, do, dq)
        q_, k_, v_, do_, dq_ = _tiles(tma, block_d, (q, block_m), (k, block_n), (v, block_n), (do, block_m),
                                      (dq, block_m))
        with device_guard(q.device):
            return _attn_bwd_dq_kernel.run(
                q_, k_, v_, do_, lse, delta, dq_, p.cu_q, p.cu_k, *args, *p.strides(dq), *lse_strides,
                p.q_heads, p.group, p.seq_q, p.seq_k, scale * LOG2E, scale, **consts, **cfg,
                USE_TMA=tma, grid=(p.batch * p.q_heads, triton.cdiv(p.seq_q, block_m)), warmup=warmup,
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
    fixed-length and varlen; float16 and float32 at 128; 256 (the smallest tiles). On
    sm_90/100 the 16-bit fixed-length tiles at head dims 64 and 128 twice: with TMA
    descriptors (USE_TMA, the tile arguments typed ``tensordesc<...>``) and with pointers
    (what TMA-illegal strides fall back to, and every config ``TMA_OFF`` names)."""
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
            with_tma = not varlen and tma_capable(head_dim, torch_dtype, gpu)
            for kernel, role in kernels:
                if role == "pre" and not causal:
                    continue  # the preprocess does not depend on the mask
                for use_tma in (False, True) if with_tma and role != "pre" else (False,):
                    key = (kernel, role, head_dim, dtype, causal, varlen, use_tma, tuple(sorted(block[role].items())))
                    seen.setdefault(key, []).extend(archs)
    for (kernel, role, head_dim, dtype, causal, varlen, use_tma, items), archs in seen.items():
        cfg = dict(items)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages", 3)}
        constexprs = {"IS_VARLEN": varlen, "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), **cfg}
        if role != "pre":
            constexprs.update(CAUSAL=causal, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32",
                              USE_TMA=use_tma)
        signature, hints = {}, {}
        # (Read the Python signature: under the interpreter ``kernel`` is not a JITFunction.)
        for name, param in inspect.signature(kernel.fn).parameters.items():
            if "constexpr" in str(param.annotation):
                continue
            if name in ("LSE", "DELTA"):
                signature[name] = "*fp32"
            elif name.startswith("CU_"):
                signature[name] = "*i32" if varlen else f"*{dtype}"
            elif use_tma and name.isupper():  # query-indexed tiles: BLOCK_M rows; key-indexed: BLOCK_N
                rows = cfg["BLOCK_M"] if name in ("Q", "O", "DO", "DQ") else cfg["BLOCK_N"]
                signature[name] = f"tensordesc<{dtype}[1, {rows}, 1, {_block_d(head_dim)}]>"
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
