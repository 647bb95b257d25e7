"""RMSNorm and residual-add + RMSNorm in Triton, forward and backward.

Forward: one program normalises BLOCK_M whole rows held in registers (BLOCK_N >= N), so x
is read once and y written once; with a residual the sum h = x + r is rounded to the input
dtype, stored (the next residual add needs it) and normalised in the same pass.

Backward: a persistent grid. Each program walks a contiguous run of rows, writes dx, and
accumulates its share of dweight in float32 registers; the per-program partial sums are
reduced afterwards by one ``sum`` over programs. That order is fixed, so the weight
gradient is bit-for-bit deterministic (no float atomics). rstd is recomputed from h, which
the backward reads anyway, instead of being saved by the forward.

Numerics follow Hugging Face's LlamaRMSNorm: float32 statistics, the normalised value
rounded to the input dtype before the weight multiplies it.
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    local = tl.arange(0, BLOCK_M)
    # rows_per_program is a multiple of BLOCK_M, so runs of programs never overlap.
    for offset in range(0, rows_per_program, BLOCK_M):
        row0 = first + offset
        mask = (local < M - row0)[:, None] & col_ok[None, :]
        h = tl.load(H + row0 * stride_h + (local[:, None] * stride_h + cols[None, :]), mask=mask, other=0.0)
        h = h.to(tl.float32)
        dy = tl.load(DY + row0 * stride_dy + (local[:, None] * stride_dy + cols[None, :]), mask=mask, other=0.0)
        dy = dy.to(tl.float32)
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
# now 4 %). Fusing that reduction into the kernel is the next step.
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


def bwd_launch_config(n: int) -> dict:
    cfg = launch_config(n)
    if cfg["BLOCK_N"] >= BWD_WIDE_FROM:
        cfg["num_warps"] = max(1, min(MAX_WARPS, cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * BWD_VALUES_PER_THREAD)))
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
    return dx.view(shape), dw_partial.sum(0).to(weight.dtype)


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
        # warps. Known gap (sm_90, 8192 backward: 122 registers x 512 threads = 1 block, 16
        # warps): a persistent kernel that prefetches the next row would hide more latency.
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
    loop, plus the weight and the float32 dW partial row outside it."""
    tile = constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
    size = {name: _BYTES[t[1:]] for name, t in signature.items() if t.startswith("*")}
    if kernel == "_rms_norm_fwd_kernel":
        tensors = ["X", "Y"] + (["R", "H"] if constexprs["HAS_RESIDUAL"] else [])
        return tile * sum(size[t] for t in tensors) + constexprs["BLOCK_N"] * size["W"]
    tensors = ["DY", "H", "DX"] + (["DH"] if constexprs["HAS_DH"] else [])
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
        bwd_warps = bwd_launch_config(block_n)["num_warps"]
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
                yield (_rms_norm_bwd_kernel, sig, dict(cfg, HAS_DH=flag), bwd_warps,
                       {k: v for k, v in hints.items() if k in sig and v})


# The triton backend's implementations from this file, by the dispatcher's op names.
LAUNCHERS = {"rms_norm_fwd": rms_norm_fwd, "rms_norm_bwd": rms_norm_bwd}
