"""SwiGLU, ``silu(gate) * up``, in Triton, forward and backward.

Elementwise over a (rows, N) view with a row stride per tensor, so the two halves of a
fused gate_up projection (``gate_up[..., :I]`` and ``gate_up[..., I:]``) are read in place
and the backward writes both gradient halves straight into one (rows, 2I) buffer. silu is
computed in float32 and rounded to the input dtype before multiplying ``up``, as eager
PyTorch does, so the fused kernel matches the unfused module bit for bit in the common
case. The backward recomputes the sigmoid instead of saving it: one less tensor in memory.
"""
from __future__ import annotations

import triton
import triton.language as tl

from llama_fast import _alloc

from ._common import as_rows, device_guard, next_pow2, row_stride


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, M, N, stride_g, stride_u, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    du = dy * silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))  # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)


# Elementwise and memory-bound: a program moves ELEMENTS_PER_PROGRAM values per tensor,
# 16 per thread (two 16-byte loads of bf16), whole rows at once when rows are narrow.
ELEMENTS_PER_PROGRAM = 2048
MAX_BLOCK_N = 1024
VALUES_PER_THREAD = 16


def launch_config(n: int) -> dict:
    block_n = min(next_pow2(n), MAX_BLOCK_N)
    block_m = max(1, ELEMENTS_PER_PROGRAM // block_n)
    warps = max(1, min(4, block_m * block_n // (32 * VALUES_PER_THREAD)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps}


def _grid(m: int, n: int, cfg: dict) -> tuple[int, int]:
    return (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))


def swiglu_fwd(gate, up):
    """Registry entry "swiglu_fwd" (see ``llama_fast.reference.swiglu_fwd``)."""
    shape, n = gate.shape, gate.shape[-1]
    y = _alloc.empty(shape, gate.dtype, gate.device)
    if y.numel() == 0:
        return y
    g2, u2 = as_rows(gate), as_rows(up)
    m = g2.shape[0]
    cfg = launch_config(n)
    with device_guard(gate.device):
        _swiglu_fwd_kernel[_grid(m, n, cfg)](g2, u2, y, m, n, row_stride(g2), row_stride(u2), n, **cfg)
    return y


def swiglu_bwd(dy, gate, up, dgate, dup):
    """Registry entry "swiglu_bwd": writes into ``dgate``/``dup``, which must be views that
    flatten to (rows, N) without a copy (the op layer allocates them so)."""
    n = gate.shape[-1]
    if gate.numel() == 0:
        return
    dy2, g2, u2 = as_rows(dy), as_rows(gate), as_rows(up)
    dg2, du2 = dgate.view(-1, n), dup.view(-1, n)
    m = g2.shape[0]
    cfg = launch_config(n)
    with device_guard(gate.device):
        _swiglu_bwd_kernel[_grid(m, n, cfg)](
            dy2, g2, u2, dg2, du2, m, n,
            row_stride(dy2), row_stride(g2), row_stride(u2), row_stride(dg2), row_stride(du2), **cfg,
        )


def compile_configs():
    """Every launch configuration: BLOCK_N takes each power of two up to MAX_BLOCK_N."""
    for block_n in [2**i for i in range(0, 11)]:
        cfg = launch_config(block_n)
        warps = cfg.pop("num_warps")
        for t in ("bf16", "fp16", "fp32") if block_n == MAX_BLOCK_N else ("bf16",):
            yield _swiglu_fwd_kernel, {
                "G": f"*{t}", "U": f"*{t}", "Y": f"*{t}", "M": "i32", "N": "i32",
                "stride_g": "i32", "stride_u": "i32", "stride_y": "i32",
            }, cfg, warps
            yield _swiglu_bwd_kernel, {
                "DY": f"*{t}", "G": f"*{t}", "U": f"*{t}", "DG": f"*{t}", "DU": f"*{t}", "M": "i32", "N": "i32",
                "stride_dy": "i32", "stride_g": "i32", "stride_u": "i32", "stride_dg": "i32", "stride_du": "i32",
            }, cfg, warps
