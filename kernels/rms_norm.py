"""RMSNorm and residual-add + RMSNorm in Triton, forward and backward.

Forward: one program normalises BLOCK_M whole rows held in registers (BLOCK_N >= N), so x
is read once and y written once; with a residual the sum h = x + r is rounded to the input
dtype, stored (the next residual add needs it) and normalised in the same pass.

Backward: a persistent grid. Each program walks a contiguous run of rows, writes dx, and
accumulates its share of dweight in float32 registers, then writes it as one float32
partial row; a second small kernel (``_rms_norm_dw_kernel``, one program per 32 columns)
sums the (programs x N) partials column by column in a fixed order and writes dW in the
weight's dtype. So the weight gradient is bit-for-bit deterministic (no float atomics),
and there is no torch ``sum`` + ``to`` after the kernel. rstd is recomputed from h, which
the backward reads anyway, instead of being saved by the forward. Where registers allow
(hidden sizes 513-2048) the row loop prefetches: the next tile's h and dy are loaded
before the current tile's row reductions.

Numerics follow Hugging Face's LlamaRMSNorm: float32 statistics, the normalised value
rounded to the input dtype before the weight multiplies it.

Compiled evidence (Triton 3.6, ``python -m llama_fast.tools.compile_check``, launch variant;
"before" is the backward with a torch ``sum(0).to(dtype)`` over its partials and no
prefetch; registers / spill bytes / blocks per SM; bytes ratio 1.00 everywhere)
- Hidden 2048 (8 warps, 2 rows per tile), bf16: before 109/101/99 registers on
  sm_80/86/90 without dh, 121/121/127 with it, no spills, 2 blocks/SM. With PREFETCH:
  125/125/121 and 122/121/127, no spills, still 2 blocks/SM. In the SASS (sm_90) the next
  tile's four 16-byte LDGs sit in the loop after the first reduction's warp shuffles and
  before its first BAR.SYNC, so their latency overlaps both block reductions, the dx math
  and the dx stores.
- Hidden 4096 (16 warps) keeps the loop without prefetch: 64 registers, 2 blocks/SM as
  before (fp16 with dh 79-85, 1 block, as before). Prefetch measured there (bf16, fp16):
  76-96 registers, 1 block/SM: the second resident block, which hides the same latency,
  would be lost. Hidden 8192 (32 warps, 64 registers): prefetch spills 4-12
  bytes; without it nothing changes (64 registers, no spills, 1 block of 32 warps).
- Prefetch at narrower rows (8 or more per tile, 8 warps): 108-128 registers at 16-256
  and 1024 columns (2 blocks/SM) but 149-167 at 512 and 219-255 at 4-8 (1 block/SM); it
  is on from 1024 columns only (1-4 rows per tile, where one row's two dependent
  reductions are all a warp has to wait on).
- Rejected: one ``tl.reduce`` of (h*h, g*h) per row instead of the two dependent
  ``tl.sum`` calls (sum(g*xhat) = rstd * sum(g*h)): 79-83 registers at 4096 with dh (64
  before), 1 block/SM, and 4 spill bytes at 8192 on sm_80/86.
- dW: the torch ``sum(0)`` plus a ``to`` for a 16-bit weight (two launches, a float32 dW
  written and read again) is now one launch. ``_rms_norm_dw_kernel``: 39-40 registers,
  no spills, 12 blocks/SM (sm_80/86/90), 16-byte loads, bytes ratio 1.02 (1.05 for a
  float32 weight: the 32 sums are stored by all 128 threads of the reduced layout, 256
  bytes where 64 suffice). At 8192 tokens x 4096 with 264 programs the partials are 4.3
  MB written + 4.3 MB read beside the 201 MB that dy, h and dx move.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast import _alloc

from ._common import as_rows, device_guard, next_pow2, persistent_programs, row_stride


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H,
    M, N, stride_x, stride_r, stride_y, stride_h, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    # 64-bit arithmetic only for the program's first row (rows * stride can pass 2^31);
    # offsets inside the tile stay 32-bit, which halves their registers.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    local = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (local < M - row0)[:, None] & col_ok[None, :]
    x = tl.load(X + row0 * stride_x + (local[:, None] * stride_x + cols[None, :]), mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row0 * stride_r + (local[:, None] * stride_r + cols[None, :]), mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row0 * stride_h + (local[:, None] * stride_h + cols[None, :]), x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    xhat = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xhat * w[None, :]
    tl.store(Y + row0 * stride_y + (local[:, None] * stride_y + cols[None, :]), y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, H, W, DX, DW_PARTIAL,
    M, N, stride_dy, stride_dh, stride_h, stride_dx, eps, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    # This program's rows are first .. end - 1 (rows_per_program is a multiple of BLOCK_M,
    # so runs of programs never overlap); the prefetch never reads past them.
    end = tl.minimum(first + rows_per_program, M)
    local = tl.arange(0, BLOCK_M)
    tile_h = local[:, None] * stride_h + cols[None, :]
    tile_dy = local[:, None] * stride_dy + cols[None, :]
    if PREFETCH:
        mask = (local < end - first)[:, None] & col_ok[None, :]
        h_next = tl.load(H + first * stride_h + tile_h, mask=mask, other=0.0)
        dy_next = tl.load(DY + first * stride_dy + tile_dy, mask=mask, other=0.0)
    for offset in range(0, rows_per_program, BLOCK_M):
        row0 = first + offset
        mask = (local < end - row0)[:, None] & col_ok[None, :]
        if PREFETCH:
            h = h_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            # Software prefetch: the next tile's loads are issued before this tile's row
            # reduction, so their latency hides behind its shuffles and barriers (masked
            # off, so no memory traffic, past this program's last row).
            row1 = row0 + BLOCK_M
            mask_next = (local < end - row1)[:, None] & col_ok[None, :]
            h_next = tl.load(H + row1 * stride_h + tile_h, mask=mask_next, other=0.0)
            dy_next = tl.load(DY + row1 * stride_dy + tile_dy, mask=mask_next, other=0.0)
        else:
            h = tl.load(H + row0 * stride_h + tile_h, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row0 * stride_dy + tile_dy, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        xhat = h * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None])
        if HAS_DH:
            dh = tl.load(DH + row0 * stride_dh + (local[:, None] * stride_dh + cols[None, :]), mask=mask, other=0.0)
            dx += dh.to(tl.float32)
        dx_at = DX + row0 * stride_dx + (local[:, None] * stride_dx + cols[None, :])
        tl.store(dx_at, dx.to(DX.dtype.element_ty), mask=mask)
        # The forward multiplied the weight by xhat rounded to the input dtype.
        dw += tl.sum(dy * xhat.to(H.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


@triton.jit
def _rms_norm_dw_kernel(
    DW_PARTIAL, DW, programs, N,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dW = the column sums of the (programs, N) float32 partial rows, in a fixed order
    (deterministic), rounded once to the weight's dtype. One program per BLOCK_N columns;
    it accumulates a (BLOCK_P, BLOCK_N) tile so its loads are independent, and reduces
    across the tile's rows once at the end."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, programs, BLOCK_P):
        mask = (rows < programs - p0)[:, None] & col_ok[None, :]
        acc += tl.load(DW_PARTIAL + (p0 + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_ok)


# Launch heuristics. A program handles about ELEMENTS_PER_PROGRAM values: whole rows for
# wide hidden sizes, several rows at once for narrow ones (a 64-wide row alone would leave
# most lanes idle). About 16 values per thread keeps loads 16 bytes wide without spilling;
# 32 warps (the most a block can have) hold a 16384-wide row that way. Wider rows (up to
# MAX_NORM_SIZE) still work but hold more per thread and spill: a slow path.
ELEMENTS_PER_PROGRAM = 4096
VALUES_PER_THREAD = 16
MAX_WARPS = 32
# Persistent backward: as many programs per SM as stay resident. The compile check shows 2
# at Llama hidden sizes 1024-4096 on sm_80 and sm_90 (2048: 8 warps at 99-127 registers;
# 4096: 16 warps at 64, see bwd_launch_config) and 1 from 8192 (32 warps). It was 4: the second
# pair of programs per SM only started when the first finished its rows (the same total
# time), and each program adds one float32 dW partial row to write and reduce (at 8192
# tokens x 4096, 132 SMs: 528 rows, 8.7 MB written and read back, 8 % of the op's 204 MB;
# now 4 %). They are summed by _rms_norm_dw_kernel, not by torch (see the design notes).
BWD_PROGRAMS_PER_SM = 2


def launch_config(n: int) -> dict:
    block_n = next_pow2(n)
    block_m = max(1, ELEMENTS_PER_PROGRAM // block_n)
    warps = max(1, min(MAX_WARPS, block_m * block_n // (32 * VALUES_PER_THREAD)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps}


# The backward holds more per value (h, dy, the weight and the dW accumulator in float32)
# than the forward: at 16 values per thread ptxas needs 99-127 registers at hidden 2048-8192
# (sm_80/sm_90), so 16 warps stay resident per SM (2 blocks of 8 at 4096, 1 of 16 at 8192).
# From BWD_WIDE_FROM up it takes half the values per thread (twice the warps, up to
# MAX_WARPS): bf16 4096 on 16 warps holds 64 registers with no spills, 2 blocks = 32
# resident warps (fp16 with dh: 79-85 registers, 1 block, 16 warps as before); 8192 on 32
# warps, 64 registers, 32 warps. Each thread still moves 16 bytes per access. 2048 stays at
# 8 warps: on 16 it keeps 16 resident warps either way and spills 8/4 bytes on sm_80.
BWD_VALUES_PER_THREAD = 8
BWD_WIDE_FROM = 4096


# The dW reduction: BLOCK_N = 32 float32 columns (128 bytes: one cache line per partial
# row) per program, so a 4096-wide weight spreads over 128 programs; BLOCK_P = 64 partial
# rows per step on 4 warps is 16 values per thread, loaded 16 bytes at a time.
DW_BLOCK_N = 32
DW_BLOCK_P = 64
DW_NUM_WARPS = 4


# Software prefetch of the next tile (PREFETCH) where it costs no resident block: tiles of
# 1-4 rows of 1024-2048 columns (16 values per thread on 8 warps), 121-128 registers with it
# (sm_80/90; 2048 on sm_86 too), 2 blocks per SM. At 4096 it takes 76-96 registers (64 without): 1 block of
# 16 warps instead of 2, so the second resident block, which hides the same latency, would
# go; at 8192 (32 warps, 64 registers at most) it spills 4-12 bytes. Narrower rows come 8
# or more to a tile, whose row reductions are independent of each other already; there it
# would cost a block at 512 columns (149-167 registers) and at 4-8 (219-255). See the
# design notes.
BWD_PREFETCH_FROM = 1024
BWD_PREFETCH_BELOW = BWD_WIDE_FROM


def bwd_launch_config(n: int) -> dict:
    cfg = launch_config(n)
    if cfg["BLOCK_N"] >= BWD_WIDE_FROM:
        cfg["num_warps"] = max(1, min(MAX_WARPS, cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * BWD_VALUES_PER_THREAD)))
    cfg["PREFETCH"] = BWD_PREFETCH_FROM <= cfg["BLOCK_N"] < BWD_PREFETCH_BELOW
    return cfg


def rms_norm_fwd(x, residual, weight, eps):
    """Registry entry "rms_norm_fwd" (see ``llama_fast.reference.rms_norm_fwd``)."""
    shape, n = x.shape, x.shape[-1]
    cfg = launch_config(n)
    x2 = as_rows(x, cfg["BLOCK_M"])
    m = x2.shape[0]
    y = _alloc.empty((m, n), torch.promote_types(x.dtype, weight.dtype), x.device)
    h = r2 = None
    if residual is not None:
        r2 = as_rows(residual, cfg["BLOCK_M"])
        h = _alloc.empty((m, n), x.dtype, x.device)
    if m:
        with device_guard(x.device):
            _rms_norm_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
                x2, r2 if r2 is not None else x2, weight, y, h if h is not None else y,
                m, n, row_stride(x2), row_stride(r2) if r2 is not None else 0, n, n, eps,
                HAS_RESIDUAL=residual is not None, **cfg,
            )
    return y.view(shape), (None if h is None else h.view(shape))


def rms_norm_bwd(dy, dh, h, weight, eps):
    """Registry entry "rms_norm_bwd" (see ``llama_fast.reference.rms_norm_bwd``)."""
    shape, n = h.shape, h.shape[-1]
    cfg = bwd_launch_config(n)
    h2, dy2 = as_rows(h, cfg["BLOCK_M"]), as_rows(dy, cfg["BLOCK_M"])
    dh2 = as_rows(dh, cfg["BLOCK_M"]) if dh is not None else None
    m = h2.shape[0]
    dx = _alloc.empty((m, n), h.dtype, h.device)
    if m == 0:
        return dx.view(shape), torch.zeros_like(weight)
    programs = persistent_programs(h.device, triton.cdiv(m, cfg["BLOCK_M"]), BWD_PROGRAMS_PER_SM)
    rows_per_program = triton.cdiv(triton.cdiv(m, cfg["BLOCK_M"]), programs) * cfg["BLOCK_M"]
    programs = triton.cdiv(m, rows_per_program)
    dw_partial = _alloc.empty((programs, n), torch.float32, h.device)
    with device_guard(h.device):
        _rms_norm_bwd_kernel[(programs,)](
            dy2, dh2 if dh2 is not None else dy2, h2, weight, dx, dw_partial,
            m, n, row_stride(dy2), row_stride(dh2) if dh2 is not None else 0, row_stride(h2), n, eps,
            rows_per_program, HAS_DH=dh is not None, **cfg,
        )
        dw = reduce_dw_partials(dw_partial, weight.dtype)
    return dx.view(shape), dw


def reduce_dw_partials(dw_partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The column sums of the contiguous float32 (programs, N) partial weight gradients, in
    ``dtype``: one launch of _rms_norm_dw_kernel (the caller sets the device)."""
    programs, n = dw_partial.shape
    dw = _alloc.empty((n,), dtype, dw_partial.device)
    _rms_norm_dw_kernel[(triton.cdiv(n, DW_BLOCK_N),)](
        dw_partial, dw, programs, n, BLOCK_P=DW_BLOCK_P, BLOCK_N=DW_BLOCK_N, num_warps=DW_NUM_WARPS,
    )
    return dw


def low_occupancy_reason(kernel: str, constexprs: dict, arch: int) -> str | None:
    """Why a launch configuration keeps fewer than 2 blocks per SM (the compile check's
    occupancy test asks), or None."""
    n = constexprs["BLOCK_N"]
    if kernel == "_rms_norm_bwd_kernel" and n == BWD_WIDE_FROM:
        # 16 warps: 64 registers in bf16 (2 blocks); fp16 with dh takes 79-85, so 1 block
        # of 16 warps, as many resident warps as the 2 blocks of 8 it replaced.
        return "16-warp row: 1 block is 16 resident warps"
    if n >= 8192:
        # One row per program held in registers over 16-32 warps (512-1024 threads): a block
        # is a quarter to half of an SM's threads, so one resident block still runs 16-32
        # warps. Prefetching the next row does not fit there: at 32 warps (64 registers at
        # most) it spills 4-12 bytes (see the design notes).
        return "one wide row per program on 16-32 warps"
    if kernel == "_rms_norm_bwd_kernel" and n <= 8:
        # Hidden sizes of 8 or fewer (not a Llama shape): 512-1024 rows per step and their
        # per-row reductions hold 229-255 registers per thread.
        return "tiny hidden size: 512-1024 rows per step in registers"
    return None


_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def min_global_bytes(kernel: str, constexprs: dict, signature: dict) -> int:
    """Bytes the kernel's code must move with each loop body run once, for the compile
    check's bytes ratio: forward x and y (with a residual also r and h) of a BLOCK_M x
    BLOCK_N tile and the weight; backward dy, h and dx (and dh) of one tile in the row
    loop (h and dy twice: the prefetch before the loop and in it), plus the weight and the
    float32 dW partial row outside it; the dW reduction one (BLOCK_P, BLOCK_N) float32
    tile of partials and BLOCK_N weight-dtype values."""
    size = {name: _BYTES[t[1:]] for name, t in signature.items() if t.startswith("*")}
    if kernel == "_rms_norm_dw_kernel":
        return constexprs["BLOCK_P"] * constexprs["BLOCK_N"] * 4 + constexprs["BLOCK_N"] * size["DW"]
    tile = constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
    if kernel == "_rms_norm_fwd_kernel":
        tensors = ["X", "Y"] + (["R", "H"] if constexprs["HAS_RESIDUAL"] else [])
        return tile * sum(size[t] for t in tensors) + constexprs["BLOCK_N"] * size["W"]
    tensors = ["DY", "H", "DX"] + (["DH"] if constexprs["HAS_DH"] else [])
    if constexprs["PREFETCH"]:
        # The prefetch's loads of h and dy are in the code twice (the first tile before the
        # loop, the next one inside it); each runs once per tile.
        tensors += ["DY", "H"]
    return tile * sum(size[t] for t in tensors) + constexprs["BLOCK_N"] * (size["W"] + 4)


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps, launch_hints) the launchers above can
    use, for the hidden sizes we ship (BLOCK_N spans all powers of two a supported size
    rounds to). launch_hints (see llama_fast.tools.compile_check), for a Llama launch: the token
    count M and, from BLOCK_N 16 up, the hidden size N and the row strides (N, or 0 without
    R/DH) are multiples of 16; rows_per_program is a multiple of BLOCK_M."""
    dtypes = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32")]
    for block_n in [2**i for i in range(2, 17)]:
        cfg = launch_config(block_n)
        warps = cfg.pop("num_warps")
        bwd_cfg = bwd_launch_config(block_n)
        bwd_warps, prefetch = bwd_cfg["num_warps"], bwd_cfg["PREFETCH"]
        n16 = 16 if block_n >= 16 else None
        hints = {"M": 16, "rows_per_program": 16 if cfg["BLOCK_M"] % 16 == 0 else None, **dict.fromkeys(
            ["N", "stride_x", "stride_r", "stride_y", "stride_h", "stride_dy", "stride_dh", "stride_dx"], n16)}
        for xt, wt in dtypes if block_n == 4096 else dtypes[:1]:
            yt = "fp32" if "fp32" in (xt, wt) else xt
            for flag in (False, True):
                sig = {
                    "X": f"*{xt}", "R": f"*{xt}", "W": f"*{wt}", "Y": f"*{yt}", "H": f"*{xt}",
                    "M": "i32", "N": "i32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32",
                    "stride_h": "i32", "eps": "fp32",
                }
                yield (_rms_norm_fwd_kernel, sig, dict(cfg, HAS_RESIDUAL=flag), warps,
                       {k: v for k, v in hints.items() if k in sig and v})
                sig = {
                    "DY": f"*{yt}", "DH": f"*{xt}", "H": f"*{xt}", "W": f"*{wt}", "DX": f"*{xt}",
                    "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "stride_dy": "i32", "stride_dh": "i32",
                    "stride_h": "i32", "stride_dx": "i32", "eps": "fp32", "rows_per_program": "i32",
                }
                yield (_rms_norm_bwd_kernel, sig, dict(cfg, HAS_DH=flag, PREFETCH=prefetch), bwd_warps,
                       {k: v for k, v in hints.items() if k in sig and v})
    # The dW reduction: one configuration per weight dtype; programs (the partial rows) and
    # N (the hidden size) are multiples of 16 at Llama shapes.
    for wt in ("bf16", "fp16", "fp32"):
        sig = {"DW_PARTIAL": "*fp32", "DW": f"*{wt}", "programs": "i32", "N": "i32"}
        yield (_rms_norm_dw_kernel, sig, {"BLOCK_P": DW_BLOCK_P, "BLOCK_N": DW_BLOCK_N}, DW_NUM_WARPS,
               {"programs": 16, "N": 16})


# The triton backend's implementations from this file, by the dispatcher's op names.
LAUNCHERS = {"rms_norm_fwd": rms_norm_fwd, "rms_norm_bwd": rms_norm_bwd}
