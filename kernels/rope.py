"""Rotary position embedding of q and k in Triton, in one launch.

One program per token (b, s): it loads that token's cos/sin row once and rotates every
head of q and of k with it, so the tables are read once per token, not once per head. All
four strides of q, k and the outputs are honoured, so Hugging Face's (B, H, S, D) tensors
arrive as transposed views with no copy. Pairs are (i, i + D/2) (``rotate_half``) or, with
INTERLEAVED, (2i, 2i + 1) (Meta's reference). The backward pass is the same kernel with
INVERSE: the transpose of a rotation is the rotation by minus the angle.
"""
from __future__ import annotations

import triton
import triton.language as tl

from llama_fast import _alloc

from ._common import device_guard, next_pow2


@triton.jit
def _rotate_heads(
    X, OUT, b, s, n_heads, half_dim,
    stride_xb, stride_xs, stride_xh, stride_xd, stride_ob, stride_os, stride_oh, stride_od,
    cos, sin,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    """Rotate all ``n_heads`` heads of token (b, s) of X into OUT.

    Interleaved pairs are loaded as whole rows and split in registers (reshape to
    (heads, pairs, 2)): two stride-2 gathers would load and store 2 bytes at a time where a
    row moves 16."""
    pair = tl.arange(0, BLOCK_HALF)
    dim = tl.arange(0, 2 * BLOCK_HALF)  # INTERLEAVED: the whole row
    x_row = X + b * stride_xb + s * stride_xs
    o_row = OUT + b * stride_ob + s * stride_os
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # heads * stride can pass 2^31 for long caches
        x_at = x_row + heads[:, None] * stride_xh
        o_at = o_row + heads[:, None] * stride_oh
        if INTERLEAVED:
            mask = (heads < n_heads)[:, None] & (dim < 2 * half_dim)[None, :]
            x = tl.load(x_at + dim[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        else:
            mask = (heads < n_heads)[:, None] & (pair < half_dim)[None, :]
            x1 = tl.load(x_at + pair[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_at + (pair + half_dim)[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        if INTERLEAVED:
            o = tl.reshape(tl.join(o1, o2), (BLOCK_H, 2 * BLOCK_HALF))
            tl.store(o_at + dim[None, :] * stride_od, o.to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(o_at + pair[None, :] * stride_od, o1.to(OUT.dtype.element_ty), mask=mask)
            tl.store(o_at + (pair + half_dim)[None, :] * stride_od, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    seq_len, q_heads, k_heads, half_dim,
    stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod, stride_kob, stride_kos, stride_koh, stride_kod,
    stride_cb, stride_cs, stride_cd,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    pair = tl.arange(0, BLOCK_HALF)
    table_at = b * stride_cb + s * stride_cs + pair * stride_cd
    cos = tl.load(COS + table_at, mask=pair < half_dim, other=0.0).to(tl.float32)
    sin = tl.load(SIN + table_at, mask=pair < half_dim, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    _rotate_heads(Q, QO, b, s, q_heads, half_dim, stride_qb, stride_qs, stride_qh, stride_qd,
                  stride_qob, stride_qos, stride_qoh, stride_qod, cos, sin, BLOCK_HQ, BLOCK_HALF, INTERLEAVED)
    _rotate_heads(K, KO, b, s, k_heads, half_dim, stride_kb, stride_ks, stride_kh, stride_kd,
                  stride_kob, stride_kos, stride_koh, stride_kod, cos, sin, BLOCK_HK, BLOCK_HALF, INTERLEAVED)


# A program rotates up to ELEMENTS_PER_STEP pairs per step: with head dim 128 (64 pairs)
# that is all 32 query heads in one step, and the 8 key heads in another; 4 warps hold 16
# pairs (32 values) per thread.
ELEMENTS_PER_STEP = 2048
NUM_WARPS = 4


def launch_config(q_heads: int, k_heads: int, head_dim: int) -> dict:
    block_half = next_pow2(head_dim // 2)
    cap = max(1, ELEMENTS_PER_STEP // block_half)
    return {
        "BLOCK_HQ": min(next_pow2(q_heads), cap),
        "BLOCK_HK": min(next_pow2(k_heads), cap),
        "BLOCK_HALF": block_half,
        "num_warps": NUM_WARPS,
    }


def rope_fwd(q, k, cos, sin, interleaved, inverse):
    """Registry entry "rope_fwd" (see ``llama_fast.reference.rope_fwd``)."""
    batch, seq_len, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    q_out, k_out = _alloc.empty_like(q), _alloc.empty_like(k)
    if batch * seq_len == 0 or head_dim == 0:
        return q_out, k_out
    if sin.stride() != cos.stride():  # one set of table strides serves both
        cos, sin = cos.contiguous(), sin.contiguous()
    if cos.dim() == 2:  # (S, D/2): every sequence of the batch shares the table
        stride_cb, stride_cs, stride_cd = 0, cos.stride(0), cos.stride(1)
    else:
        stride_cb, stride_cs, stride_cd = cos.stride()
    with device_guard(q.device):
        _rope_kernel[(batch * seq_len,)](
            q, k, cos, sin, q_out, k_out,
            seq_len, q_heads, k_heads, head_dim // 2,
            *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
            stride_cb, stride_cs, stride_cd,
            INTERLEAVED=interleaved, INVERSE=inverse, **launch_config(q_heads, k_heads, head_dim),
        )
    return q_out, k_out


_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def min_global_bytes(kernel: str, constexprs: dict, signature: dict) -> int:
    """Bytes the code must move with each head loop run once (compile check's bytes
    ratio): the cos and sin rows, then BLOCK_HQ query heads and BLOCK_HK key heads read and
    written."""
    row = 2 * constexprs["BLOCK_HALF"]
    x, table = _BYTES[signature["Q"][1:]], _BYTES[signature["COS"][1:]]
    return 2 * constexprs["BLOCK_HALF"] * table + 2 * row * x * (constexprs["BLOCK_HQ"] + constexprs["BLOCK_HK"])


def compile_configs():
    """The configurations the launcher uses for Llama-3 shapes (head dims 64 and 128 with
    32/8 or 64/8 heads, and 256 for the largest tile), each layout and direction.
    launch_hints (see llama_fast.tools.compile_check): last-dim strides are 1; seq_len, half_dim,
    head counts of 16 or more and the other strides (products of those; 0 for a shared
    table) are multiples of 16."""
    shapes = [(32, 8, 64), (32, 8, 128), (8, 8, 256)]  # 64/8 heads launch as 32/8 do
    for (hq, hk, d), (xt, ct) in [(sh, ("bf16", "fp32")) for sh in shapes] + [((32, 8, 128), (t, t)) for t in ("fp16", "fp32", "bf16")]:
        cfg = launch_config(hq, hk, d)
        warps = cfg.pop("num_warps")
        signature = {"Q": f"*{xt}", "K": f"*{xt}", "COS": f"*{ct}", "SIN": f"*{ct}", "QO": f"*{xt}", "KO": f"*{xt}"}
        strides = [f"stride_{t}{a}" for t in ("q", "k", "qo", "ko") for a in "bshd"] + [
            "stride_cb", "stride_cs", "stride_cd"]
        signature.update({name: "i32" for name in ["seq_len", "q_heads", "k_heads", "half_dim"] + strides})
        hints = {"seq_len": 16, "half_dim": 16, **{s: 1 if s.endswith("d") else 16 for s in strides},
                 **{name: 16 for name, h in (("q_heads", hq), ("k_heads", hk)) if h % 16 == 0}}
        for interleaved in (False, True):
            for inverse in (False, True):
                yield _rope_kernel, signature, dict(cfg, INTERLEAVED=interleaved, INVERSE=inverse), warps, hints


# The triton backend's implementations from this file, by the dispatcher's op names.
LAUNCHERS = {"rope_fwd": rope_fwd}
