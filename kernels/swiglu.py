"""SwiGLU, ``silu(gate) * up``, in Triton, forward and backward.

Elementwise over a (rows, N) view with a row stride per tensor, in BLOCK_M x BLOCK_N
tiles, so the two halves of a fused gate_up projection (``gate_up[..., :I]`` and
``gate_up[..., I:]``) are read in place and the backward writes both gradient halves
straight into one (rows, 2I) buffer. silu is
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
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: its first row and column (64-bit, as rows * stride can pass
    2^31), 32-bit offsets inside it, and the mask. A 1-D grid over (row block, column
    block), because a 2-D grid's second dimension stops at 65535 blocks."""
    col_blocks = tl.cdiv(N, BLOCK_N)
    row0 = (pid // col_blocks).to(tl.int64) * BLOCK_M
    col0 = (pid % col_blocks).to(tl.int64) * BLOCK_N
    local_rows = tl.arange(0, BLOCK_M)
    local_cols = tl.arange(0, BLOCK_N)
    mask = (local_rows < M - row0)[:, None] & (local_cols < N - col0)[None, :]
    return row0, col0, local_rows, local_cols, mask


@triton.jit
def _at(P, stride, row0, col0, local_rows, local_cols):
    return P + (row0 * stride + col0) + (local_rows[:, None] * stride + local_cols[None, :])


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, M, N, stride_g, stride_u, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r0, c0, rows, cols, mask = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    g = tl.load(_at(G, stride_g, r0, c0, rows, cols), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(_at(U, stride_u, r0, c0, rows, cols), mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(_at(Y, stride_y, r0, c0, rows, cols), (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r0, c0, rows, cols, mask = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    dy = tl.load(_at(DY, stride_dy, r0, c0, rows, cols), mask=mask, other=0.0).to(tl.float32)
    g = tl.load(_at(G, stride_g, r0, c0, rows, cols), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(_at(U, stride_u, r0, c0, rows, cols), mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    du = dy * silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))  # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(_at(DU, stride_du, r0, c0, rows, cols), du.to(DU.dtype.element_ty), mask=mask)
    tl.store(_at(DG, stride_dg, r0, c0, rows, cols), dg.to(DG.dtype.element_ty), mask=mask)


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


def _grid(m: int, n: int, cfg: dict) -> tuple[int]:
    return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)


def swiglu_fwd(gate, up):
    """Registry entry "swiglu_fwd" (see ``llama_fast.reference.swiglu_fwd``)."""
    shape, n = gate.shape, gate.shape[-1]
    y = _alloc.empty(shape, gate.dtype, gate.device)
    if y.numel() == 0:
        return y
    cfg = launch_config(n)
    g2, u2 = as_rows(gate, cfg["BLOCK_M"]), as_rows(up, cfg["BLOCK_M"])
    m = g2.shape[0]
    with device_guard(gate.device):
        _swiglu_fwd_kernel[_grid(m, n, cfg)](g2, u2, y, m, n, row_stride(g2), row_stride(u2), n, **cfg)
    return y


def swiglu_bwd(dy, gate, up, dgate, dup):
    """Registry entry "swiglu_bwd": writes into ``dgate``/``dup``, which must be views that
    flatten to (rows, N) without a copy (the op layer allocates them so)."""
    n = gate.shape[-1]
    if gate.numel() == 0:
        return
    cfg = launch_config(n)
    dy2, g2, u2 = (as_rows(t, cfg["BLOCK_M"]) for t in (dy, gate, up))
    dg2, du2 = dgate.view(-1, n), dup.view(-1, n)
    m = g2.shape[0]
    with device_guard(gate.device):
        _swiglu_bwd_kernel[_grid(m, n, cfg)](
            dy2, g2, u2, dg2, du2, m, n,
            row_stride(dy2), row_stride(g2), row_stride(u2), row_stride(dg2), row_stride(du2), **cfg,
        )


_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def min_global_bytes(kernel: str, constexprs: dict, signature: dict) -> int:
    """Bytes one tile must move (compile check's bytes ratio): g, u and y forward; dy, g,
    u, dg and du backward."""
    tile = constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
    return tile * sum(_BYTES[t[1:]] for t in signature.values() if t.startswith("*"))


def compile_configs():
    """Every launch configuration: BLOCK_N takes each power of two up to MAX_BLOCK_N.
    launch_hints (see llama_fast.tools.compile_check), for N = BLOCK_N (at MAX_BLOCK_N: Llama
    intermediate sizes) and contiguous rows: N and the row strides are multiples of 16 from
    16 up and 1 at 1; the token count M is a multiple of 16."""
    for block_n in [2**i for i in range(0, 11)]:
        cfg = launch_config(block_n)
        warps = cfg.pop("num_warps")
        n_hint = 16 if block_n >= 16 else 1 if block_n == 1 else None
        hints = {"M": 16, **dict.fromkeys(
            ["N", "stride_dy", "stride_g", "stride_u", "stride_y", "stride_dg", "stride_du"], n_hint)}
        for t in ("bf16", "fp16", "fp32") if block_n == MAX_BLOCK_N else ("bf16",):
            sig = {
                "G": f"*{t}", "U": f"*{t}", "Y": f"*{t}", "M": "i32", "N": "i32",
                "stride_g": "i32", "stride_u": "i32", "stride_y": "i32",
            }
            yield _swiglu_fwd_kernel, sig, cfg, warps, {k: v for k, v in hints.items() if k in sig and v}
            sig = {
                "DY": f"*{t}", "G": f"*{t}", "U": f"*{t}", "DG": f"*{t}", "DU": f"*{t}", "M": "i32", "N": "i32",
                "stride_dy": "i32", "stride_g": "i32", "stride_u": "i32", "stride_dg": "i32", "stride_du": "i32",
            }
            yield _swiglu_bwd_kernel, sig, cfg, warps, {k: v for k, v in hints.items() if k in sig and v}


# The triton backend's implementations from this file, by the dispatcher's op names.
LAUNCHERS = {"swiglu_fwd": swiglu_fwd, "swiglu_bwd": swiglu_bwd}
