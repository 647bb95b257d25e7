"""Cross-entropy of a chunk of logits in Triton: loss, log-sum-exp and d loss / d logits.

The fused linear cross-entropy (``llama_fast.fused_linear_cross_entropy``) never holds the
(tokens x V) logits: ``llama_fast.reference.linear_cross_entropy`` walks the tokens in
chunks, computes a chunk's logits with one cuBLAS matmul (float32 accumulation, rounded to
the input dtype as ``F.linear`` rounds them) and hands the chunk to the kernel here, which
replaces the logits, in place, with their gradient. The two gradient matmuls then read
that buffer, so a chunk costs one (rows x V) buffer and nothing else of that size.

One program per row, two passes over the vocabulary in BLOCK_V tiles (V = 128256 is far
wider than a block):

1. online softmax: the running max m and the sum s of exp(z - m), rescaled when m grows,
   in float32; with label smoothing also the sum of the logits. The target's logit is one
   scalar load. lse = m + log(s); the row's loss is
   ``(1 - eps) * (lse - z[y]) + eps * (lse - sum(z) / V)`` (PyTorch's label smoothing), 0
   for an ignored row.
2. with COMPUTE_GRAD, each tile is read again and overwritten with
   ``scale * (softmax - eps / V - (1 - eps) * onehot(y))``, zeros for an ignored row.
   ``scale`` is the reduction's factor (1 / non-ignored tokens for "mean", 1 for "sum"),
   a one-element tensor so the count never leaves the GPU, or one factor per row
   (ROW_SCALE: the upstream gradient of reduction="none"). A row is V x 2 bytes in
   16-bit (250 KiB at V = 128256), so the second read can be served from L2 rather than
   HBM; no single pass is possible, as every gradient needs the whole row's log-sum-exp.

Vocabulary-parallel steps (``llama_fast.ops._cross_entropy_vocab_parallel``: the weight
sharded on the vocabulary, each rank holding rows [offset, offset + V_local)). The two
passes are split around the ranks' all-reduces, sharing the kernel's pass code
(``_row_stats``, ``_write_grad``):

* ``_vocab_shard_stats_kernel`` reads the shard's logits once (pass 1) and writes per row
  the local max m_r, sum_v exp(z - m_r), the target's logit when ``target - offset`` is in
  the shard (else 0) and, with label smoothing, the sum of the logits;
* the ranks combine them in torch (``reference.linear_cross_entropy_vocab_shard``): m =
  all-reduce MAX of m_r, then one SUM all-reduce of (s_r * exp(m_r - m), z_y, sum z), so
  lse = m + log(sum); still two all-reduces per chunk, as the PyTorch steps;
* ``_vocab_shard_grad_kernel`` is pass 2 given that global lse: the logits become
  ``scale * (exp(z - lse) - eps / vocab - (1 - eps) * onehot(target - offset))`` in place.

Compiled (llama_fast.tools.compile_check, BLOCK_V = 4096, 8 warps, every dtype and flag;
the "launch" variant): the statistics kernel uses 62-64 registers without label smoothing
and 80 with it on sm_80 and sm_90 (4 and 3 CTAs per SM, 32 bytes of shared memory for the
cross-lane reductions), the gradient kernel 29-32 registers (8 CTAs per SM, no shared
memory); 0 spill stores and loads, 0 stack, in every configuration. Factoring passes 1 and
2 into ``_row_stats`` / ``_write_grad`` left every ``_cross_entropy_kernel`` configuration's
registers, shared memory, stack and spills exactly as before (compared configuration by
configuration, sm_80 and sm_90).

exp and log are exp2 and log2 with the constants folded in (no libdevice). A target that
is neither ignore_index nor in [0, V) gives a NaN loss instead of reading out of bounds.
Row offsets are 64-bit (rows x V passes 2^31 at 16K x 128K); offsets inside a row are not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast import _alloc

from ._common import device_guard, next_pow2

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_stats(z_row, V, BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """Pass 1 over a row of V logits, in base 2 (the logits scaled by log2 e): the max, the
    sum of exp2(z - max) and (HAS_SMOOTHING) the sum of the logits."""
    cols = tl.arange(0, BLOCK_V)
    # Lanes keep their own running max and sum (no cross-lane reduction per tile); they are
    # combined once at the end. Masked lanes read -inf and contribute exp2(-inf) = 0.
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    total = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = cols < V - v0
        z = tl.load(z_row + v0 + cols, mask=ok, other=float("-inf")).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, z)
        # A lane that has seen only -inf keeps m = -inf: exp2(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_safe) + tl.exp2(z - m_safe)
        m = m_new
        if HAS_SMOOTHING:
            total += tl.where(ok, z, 0.0)
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp2(m - m_row), axis=0)
    return m_row, s_row, tl.sum(total, axis=0)


@triton.jit
def _write_grad(z_row, V, y, lse2, scale, floor, label_smoothing, BLOCK_V: tl.constexpr,
                HAS_SMOOTHING: tl.constexpr):
    """Pass 2: overwrites the row's V logits with ``scale * (exp2(z - lse2) - floor - (1 -
    eps) * onehot(y))`` (``y`` outside [0, V): no one-hot term)."""
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        ok = cols < V - v0
        z = tl.load(z_row + v0 + cols, mask=ok, other=0.0).to(tl.float32) * LOG2E
        g = tl.exp2(z - lse2)
        if HAS_SMOOTHING:
            g -= floor
        g = tl.where(v0 + cols == y, g - (1.0 - label_smoothing), g)
        tl.store(z_row + v0 + cols, (g * scale).to(z_row.dtype.element_ty), mask=ok)


@triton.jit
def _cross_entropy_kernel(
    LOGITS, TARGET, SCALE, LOSS, LSE,
    V, stride_row, ignore_index, label_smoothing,
    BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * stride_row
    y = tl.load(TARGET + row)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < V)

    # Pass 1.
    m_row, s_row, total = _row_stats(z_row, V, BLOCK_V, HAS_SMOOTHING)
    lse2 = m_row + tl.log2(s_row)  # log-sum-exp in base 2 (the logits were scaled by log2 e)
    lse = lse2 * LN2
    z_y = tl.load(z_row + y, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    z_y = tl.where(in_range | ignored, z_y, float("nan"))
    loss = lse - z_y
    if HAS_SMOOTHING:
        smooth = lse - total * LN2 / V
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    loss = tl.where(ignored, 0.0, loss)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)

    if COMPUTE_GRAD:  # pass 2
        if ROW_SCALE:
            scale = tl.load(SCALE + row)
        else:
            scale = tl.load(SCALE)
        scale = tl.where(ignored, 0.0, scale)  # 0, not 0 * scale: "mean" of no tokens scales by inf
        _write_grad(z_row, V, y, lse2, scale, label_smoothing / V, label_smoothing, BLOCK_V, HAS_SMOOTHING)


@triton.jit
def _vocab_shard_stats_kernel(
    LOGITS, TARGET, STATS, V, stride_row, offset, rows,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    """The vocabulary-parallel statistics of one row of a shard's V logits (vocabulary rows
    [offset, offset + V)): STATS (4, rows) gets the max, the sum of exp(z - max), the target's
    logit (0 when the shard does not hold it) and the sum of the logits, in natural units."""
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * stride_row
    local = tl.load(TARGET + row) - offset
    m_row, s_row, total = _row_stats(z_row, V, BLOCK_V, HAS_SMOOTHING)
    here = (local >= 0) & (local < V)
    z_y = tl.load(z_row + local, mask=here, other=0.0).to(tl.float32)
    tl.store(STATS + row, m_row * LN2)
    tl.store(STATS + rows + row, s_row)
    tl.store(STATS + 2 * rows + row, z_y)
    tl.store(STATS + 3 * rows + row, total * LN2)


@triton.jit
def _vocab_shard_grad_kernel(
    LOGITS, TARGET, LSE, SCALE, V, stride_row, offset, vocab, ignore_index, label_smoothing,
    BLOCK_V: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    """Pass 2 of a shard's row given the log-sum-exp over the whole ``vocab`` (LSE, natural
    units, from the ranks' combined statistics)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * stride_row
    y = tl.load(TARGET + row)
    if ROW_SCALE:
        scale = tl.load(SCALE + row)
    else:
        scale = tl.load(SCALE)
    scale = tl.where(y == ignore_index, 0.0, scale)
    lse2 = tl.load(LSE + row) * LOG2E
    _write_grad(z_row, V, y - offset, lse2, scale, label_smoothing / vocab, label_smoothing, BLOCK_V,
                HAS_SMOOTHING)


# Launch heuristics. The kernel streams a row twice: 16 values per thread keep the loads
# 16 bytes wide (bf16: two per tile) and the three float32 running vectors in registers;
# 8 warps (a 4096 tile) leave a few programs resident per SM to hide the latency. Narrow
# vocabularies get one tile of the next power of two and fewer warps.
MAX_BLOCK_V = 4096
VALUES_PER_THREAD = 16


def launch_config(v: int) -> dict:
    block_v = min(next_pow2(v), MAX_BLOCK_V)
    warps = max(1, min(8, block_v // (32 * VALUES_PER_THREAD)))
    return {"BLOCK_V": block_v, "num_warps": warps}


def cross_entropy_chunk(logits, target, scale, ignore_index, label_smoothing, compute_grad):
    """Per-row cross-entropy of ``logits`` (rows, V), unit stride along V, against ``target``
    (rows,) int64: returns ``(loss, lse)``, float32 (rows,). With ``compute_grad`` the logits
    are overwritten with ``scale * d loss / d logits``; ``scale`` is a float32 tensor of one
    element or of one per row. The registry's per-chunk step (see
    ``llama_fast.reference.cross_entropy_chunk``, the torch one)."""
    rows, v = logits.shape
    loss = _alloc.empty((rows,), torch.float32, logits.device)
    lse = _alloc.empty((rows,), torch.float32, logits.device)
    if rows == 0:
        return loss, lse
    cfg = launch_config(v)
    with device_guard(logits.device):
        _cross_entropy_kernel[(rows,)](
            logits, target, scale, loss, lse, v, logits.stride(0), ignore_index, float(label_smoothing),
            COMPUTE_GRAD=compute_grad, ROW_SCALE=scale.numel() != 1, HAS_SMOOTHING=label_smoothing != 0.0, **cfg,
        )
    return loss, lse


def vocab_shard_stats(logits, target, offset, label_smoothing):
    """The Triton step of ``llama_fast.reference.vocab_shard_stats``: float32 (4, rows)."""
    rows, v = logits.shape
    stats = _alloc.empty((4, rows), torch.float32, logits.device)
    if rows == 0:
        return stats
    with device_guard(logits.device):
        _vocab_shard_stats_kernel[(rows,)](
            logits, target, stats, v, logits.stride(0), offset, rows,
            HAS_SMOOTHING=label_smoothing != 0.0, **launch_config(v),
        )
    return stats


def vocab_shard_grad(logits, target, lse, scale, offset, vocab, ignore_index, label_smoothing):
    """The Triton step of ``llama_fast.reference.vocab_shard_grad``: the logits, in place."""
    rows, v = logits.shape
    if rows == 0:
        return
    with device_guard(logits.device):
        _vocab_shard_grad_kernel[(rows,)](
            logits, target, lse, scale, v, logits.stride(0), offset, vocab, ignore_index, float(label_smoothing),
            ROW_SCALE=scale.numel() != 1, HAS_SMOOTHING=label_smoothing != 0.0, **launch_config(v),
        )


def compile_configs():
    """Every launch configuration: BLOCK_V takes each power of two up to MAX_BLOCK_V (the
    vocabularies that fit one tile; every wider one uses MAX_BLOCK_V), the three logits
    dtypes at MAX_BLOCK_V, and every flag combination there. launch_hints (see
    llama_fast.tools.compile_check): for Llama-3's V = 128256 the row stride is a multiple of 16
    and V itself is too."""
    for block_v in [2**i for i in range(4, 13)]:
        cfg = launch_config(block_v)
        warps = cfg.pop("num_warps")
        full = block_v == MAX_BLOCK_V
        hints = {"V": 16, "stride_row": 16}
        for t in ("bf16", "fp16", "fp32") if full else ("bf16",):
            sig = {
                "LOGITS": f"*{t}", "TARGET": "*i64", "SCALE": "*fp32", "LOSS": "*fp32", "LSE": "*fp32",
                "V": "i32", "stride_row": "i32", "ignore_index": "i32", "label_smoothing": "fp32",
            }
            flags = [(g, r, s) for g in (False, True) for r in (False, True) for s in (False, True)
                     if g or not r] if full else [(True, False, False)]
            for grad, row_scale, smoothing in flags:
                yield (_cross_entropy_kernel, sig,
                       dict(cfg, COMPUTE_GRAD=grad, ROW_SCALE=row_scale, HAS_SMOOTHING=smoothing), warps, hints)
    # The vocabulary-parallel steps: a shard of Llama-3's vocabulary (over 2 to 8 ranks) is
    # wider than MAX_BLOCK_V, so only that tile, each dtype and flag.
    cfg = launch_config(MAX_BLOCK_V)
    warps = cfg.pop("num_warps")
    hints = {"V": 16, "stride_row": 16}
    for t in ("bf16", "fp16", "fp32"):
        stats_sig = {"LOGITS": f"*{t}", "TARGET": "*i64", "STATS": "*fp32", "V": "i32", "stride_row": "i32",
                     "offset": "i32", "rows": "i32"}
        for smoothing in (False, True):
            yield _vocab_shard_stats_kernel, stats_sig, dict(cfg, HAS_SMOOTHING=smoothing), warps, hints
        grad_sig = {"LOGITS": f"*{t}", "TARGET": "*i64", "LSE": "*fp32", "SCALE": "*fp32", "V": "i32",
                    "stride_row": "i32", "offset": "i32", "vocab": "i32", "ignore_index": "i32",
                    "label_smoothing": "fp32"}
        for row_scale in (False, True):
            for smoothing in (False, True):
                yield (_vocab_shard_grad_kernel, grad_sig, dict(cfg, ROW_SCALE=row_scale, HAS_SMOOTHING=smoothing),
                       warps, hints)


# No launcher of a whole op here: the triton backend runs the reference's chunked loops
# (cuBLAS matmuls and, vocabulary-parallel, the all-reduces through torch) with this file's
# kernels as their per-chunk steps.
LAUNCHERS = {}
CHUNK_STEPS = {"linear_cross_entropy": cross_entropy_chunk,
               "linear_cross_entropy_vocab_shard": (vocab_shard_stats, vocab_shard_grad)}
