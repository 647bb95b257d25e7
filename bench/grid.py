"""The shape grids of the benchmark suite: ``full``, ``headline`` and ``smoke``.

* full      the sweep of issue #6: memory-bound ops at tokens 1K-32K for the three Llama-3
            widths (hidden 2048 / 4096 / 8192 with intermediate 8192 / 14336 / 28672 and
            heads 32/8 x 64, 32/8 x 128, 64/8 x 128); attention at S = 1K-16K (B = 16K / S)
            for those head layouts, causal and full; decode with batch 1-64 and context
            1K-128K; passes fwd, bwd and fwd+bwd.
* headline  what scripts/gpu_check.py runs in its budget: Llama-3-8B shapes (8192 tokens),
            four attention shapes, four decode shapes, the same passes.
* smoke     tiny shapes for a CPU (the Triton interpreter runs programs one by one).

The end-to-end grids are in bench/end_to_end.py (they are model configs, not op shapes).
"""
from __future__ import annotations

from llama_fast.bench.attention_cases import AttnShape
from llama_fast.bench.cases import LLAMA3_8B, SMOKE, Shapes

GRIDS = ("full", "headline", "smoke")
PASSES = ("fwd", "bwd", "fwd+bwd")

# One Shapes per Llama-3 width; the memory-bound grid is tokens x these.
WIDTHS = {
    "1b": Shapes(tokens=0, hidden=2048, inter=8192, q_heads=32, kv_heads=8, head_dim=64),
    "8b": Shapes(tokens=0, hidden=4096, inter=14336, q_heads=32, kv_heads=8, head_dim=128),
    "70b": Shapes(tokens=0, hidden=8192, inter=28672, q_heads=64, kv_heads=8, head_dim=128),
}
FULL_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)

ATTN_TOKENS = 16384  # B * S for every full-grid prefill shape
ATTN_SEQLENS = (1024, 2048, 4096, 8192, 16384)
ATTN_HEADS = ((128, 32, 8), (64, 32, 8), (128, 64, 8))  # (head dim, q heads, kv heads)
HEADLINE_ATTN = (  # (batch, seqlen, q heads, kv heads, head dim, causal)
    (4, 4096, 32, 8, 128, True), (1, 16384, 32, 8, 128, True), (4, 4096, 32, 8, 128, False), (4, 4096, 32, 8, 64, True))
SMOKE_ATTN = ((2, 32, 4, 2, 16, True), (1, 64, 4, 2, 16, False))

DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXTS = (1024, 8192, 32768, 131072)
DECODE_HEADS = (128, 32, 8)  # (head dim, q heads, kv heads): Llama-3-8B
HEADLINE_DECODE = ((1, 8192), (32, 8192), (1, 131072), (8, 131072))  # (batch, context)
SMOKE_DECODE = ((1, 64),)


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    return grid


def memory_shapes(grid: str) -> list[Shapes]:
    """The shapes every memory-bound op (bench/cases.py CASES) runs at."""
    if check_grid(grid) == "smoke":
        return [SMOKE]
    if grid == "headline":
        return [LLAMA3_8B]
    return [Shapes(tokens=t, **{k: v for k, v in vars(w).items() if k != "tokens"})
            for w in WIDTHS.values() for t in FULL_TOKENS]


def attention_shapes(grid: str) -> list[AttnShape]:
    if check_grid(grid) == "smoke":
        return [AttnShape(*s) for s in SMOKE_ATTN]
    if grid == "headline":
        return [AttnShape(*s) for s in HEADLINE_ATTN]
    return [AttnShape(ATTN_TOKENS // s, s, hq, hkv, d, causal)
            for d, hq, hkv in ATTN_HEADS for causal in (True, False) for s in ATTN_SEQLENS]


def decode_shapes(grid: str) -> list[AttnShape]:
    if check_grid(grid) == "smoke":
        d, hq, hkv = 16, 4, 2
        return [AttnShape(b, n, hq, hkv, d, False) for b, n in SMOKE_DECODE]
    d, hq, hkv = DECODE_HEADS
    pairs = HEADLINE_DECODE if grid == "headline" else [(b, n) for b in DECODE_BATCHES for n in DECODE_CONTEXTS]
    return [AttnShape(b, n, hq, hkv, d, False) for b, n in pairs]


def memory_size(case: dict, s: Shapes, pass_: str, dtype_bytes: int) -> tuple[str, float, str]:
    """(plot group, x, x label) for a memory-bound row: bytes moved, all widths on one axis."""
    passes = ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)
    return "", sum(case["bytes"][p](s, dtype_bytes) for p in passes) / 1e6, "MB moved"


def attention_size(s: AttnShape) -> tuple[str, float, str]:
    return f"hd{s.head_dim} {s.q_heads}/{s.kv_heads} {'causal' if s.causal else 'full'}", s.seqlen, "sequence length"


def decode_size(s: AttnShape, dtype_bytes: int) -> tuple[str, float, str]:
    kv = 2 * s.batch * s.seqlen * s.kv_heads * s.head_dim * dtype_bytes
    return f"hd{s.head_dim} {s.q_heads}/{s.kv_heads}", kv / 1e6, "KV cache MB"
