"""The memory-bound benchmark cases: shapes, settings and ``CASES`` (the grids of shapes
they run at are in bench/grid.py).

Each case is one op (rms_norm, add_rms_norm, apply_rope, swiglu, swiglu_fused,
cross_entropy) with its
input builder, the eager reference written as Hugging Face's Llama modules compute it
(the "eager" provider, and what torch.compile compiles), the llama_fast function it is
compared with, and the minimum bytes each pass moves.

GB/s is the minimum traffic of the op (each input read once, each output written once,
the formula beside each case) divided by the time: the same bytes for every provider, so it
is throughput, comparable with the copy ceiling measured in the same run. A fwd+bwd row
counts the two passes' bytes added.

cross_entropy (the fused linear cross-entropy of the lm_head) is matmul-bound, not
memory-bound: its rows report TFLOP/s (``flops``: 2·N·H·V for the logits, three times that
with the two gradient matmuls) and peak memory, the point of fusing it. It runs its own
token counts (``shapes``) and no ``bwd`` pass: llama_fast computes this op's gradients in
the forward, so the backward alone measures nothing (and its graph is backwarded once).

The attention and decode cases are in bench/attention_cases.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------
# shapes and settings


@dataclass(frozen=True)
class Shapes:
    tokens: int
    hidden: int
    inter: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 128256  # Llama 3's; the cross_entropy case's V


LLAMA3_8B = Shapes(tokens=8192, hidden=4096, inter=14336, q_heads=32, kv_heads=8, head_dim=128)
# RoPE runs one program per token, and the interpreter runs programs one by one: few tokens.
SMOKE = Shapes(tokens=16, hidden=256, inter=512, q_heads=4, kv_heads=2, head_dim=16, vocab=1000)

DTYPE = torch.bfloat16  # the GPU check's dtype; the suite (bench/suite.py) takes --dtypes
DTYPE_NAME = "bfloat16"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --dtypes names


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
EPS = 1e-5
ROPE_THETA = 500000.0


@dataclass(frozen=True)
class Settings:
    shapes: Shapes
    n_sets: int  # input sets rotated between timed calls
    warmup: int
    reps: int
    compile: bool  # run the torch.compile provider


GPU_SETTINGS = dict(shapes=LLAMA3_8B, n_sets=3, warmup=10, reps=100)
# --smoke checks the harness, not speed: the interpreter is slow (one timed call) and
# compiles nothing (no warm-up needed); two input sets still exercise the rotation.
SMOKE_SETTINGS = dict(shapes=SMOKE, n_sets=2, warmup=0, reps=1)


# ---------------------------------------------------------------------------------------
# the eager baselines, written as Hugging Face's Llama modules compute them


def hf_rms_norm(x, weight, eps=EPS):
    """LlamaRMSNorm: float32 statistics, normalised value cast back before the weight."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def hf_add_rms_norm(x, residual, weight, eps=EPS):
    """The unfused residual add of a decoder layer followed by its RMSNorm: (y, h)."""
    h = x + residual
    return hf_rms_norm(h, weight, eps), h


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_apply_rope(q, k, cos, sin):
    """apply_rotary_pos_emb with cos/sin (S, D) in the inputs' dtype, as LlamaRotaryEmbedding
    returns them; q/k are (B, S, H, D), so the tables broadcast over the head axis."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def hf_swiglu(gate, up):
    """LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), given the two projections."""
    return F.silu(gate) * up


def hf_swiglu_fused(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def hf_linear_cross_entropy(hidden, weight, target):
    """LlamaForCausalLM's loss: lm_head logits in the model's dtype, upcast to float32 (as
    transformers' ForCausalLMLoss does) and F.cross_entropy, mean over the tokens."""
    return F.cross_entropy(F.linear(hidden, weight).float(), target)


# ---------------------------------------------------------------------------------------
# inputs


def _randn(*shape, device, dtype=DTYPE):  # the input builders take the row's dtype (bf16 or fp16)
    return torch.randn(*shape, dtype=dtype, device=device)


def norm_inputs(s: Shapes, device, dtype=DTYPE) -> dict:
    return {"x": _randn(s.tokens, s.hidden, device=device, dtype=dtype),
            "weight": 1 + 0.1 * _randn(s.hidden, device=device, dtype=dtype)}


def add_norm_inputs(s: Shapes, device, dtype=DTYPE) -> dict:
    return dict(norm_inputs(s, device, dtype), residual=_randn(s.tokens, s.hidden, device=device, dtype=dtype))


def rope_inputs(s: Shapes, device, dtype=DTYPE) -> dict:
    """q and k, and the tables in both forms: float32 (S, D/2) for llama_fast (what
    ``rope_cos_sin`` returns) and (S, D) in the inputs' dtype for the Hugging Face code."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, s.head_dim, 2, device=device, dtype=torch.float32) / s.head_dim)
    angles = torch.arange(s.tokens, device=device, dtype=torch.float32)[:, None] * inv_freq
    full = torch.cat((angles, angles), dim=-1)
    return {
        "q": _randn(1, s.tokens, s.q_heads, s.head_dim, device=device, dtype=dtype),
        "k": _randn(1, s.tokens, s.kv_heads, s.head_dim, device=device, dtype=dtype),
        "cos_half": angles.cos(),
        "sin_half": angles.sin(),
        "cos": full.cos().to(dtype),
        "sin": full.sin().to(dtype),
    }


def swiglu_inputs(s: Shapes, device, dtype=DTYPE) -> dict:
    return {"gate": _randn(s.tokens, s.inter, device=device, dtype=dtype),
            "up": _randn(s.tokens, s.inter, device=device, dtype=dtype)}


def swiglu_fused_inputs(s: Shapes, device, dtype=DTYPE) -> dict:
    return {"gate_up": _randn(s.tokens, 2 * s.inter, device=device, dtype=dtype)}


def cross_entropy_inputs(s: Shapes, device, dtype=DTYPE) -> dict:
    """The last hidden states, an lm_head weight at its initialisation scale and targets."""
    return {"hidden": _randn(s.tokens, s.hidden, device=device, dtype=dtype),
            "weight": 0.02 * _randn(s.vocab, s.hidden, device=device, dtype=dtype),
            "target": torch.randint(0, s.vocab, (s.tokens,), device=device)}


CE_TOKENS = (1024, 2048, 4096, 8192, 16384)


def cross_entropy_shapes(grid: str) -> list[Shapes]:
    """Llama-3-8B's head (H 4096, V 128256) at 1K-16K tokens (the full grid), 8K tokens
    (headline), the smoke shapes (V 1000)."""
    if grid == "smoke":
        return [SMOKE]
    tokens = CE_TOKENS if grid == "full" else (LLAMA3_8B.tokens,)
    return [Shapes(tokens=t, **{k: v for k, v in vars(LLAMA3_8B).items() if k != "tokens"}) for t in tokens]


# ---------------------------------------------------------------------------------------
# the benchmark cases: one entry per op
#
#   inputs      builds one input set (a dict of tensors)
#   grad        the inputs that receive gradients in the backward pass
#   llama_fast  (name of the llama_fast function, the input names it takes, in order)
#   eager       (the eager function, the input names it takes); torch.compile compiles it
#   bytes       pass -> minimum bytes moved, from the shapes and e = bytes per element of
#               the bf16 tensors (the llama_fast rope tables are float32: 4 bytes)
#   flops       (optional) pass -> floating-point operations: the row reports TFLOP/s
#               against the matmul ceiling instead of GB/s against the copy ceiling
#   shapes      (optional) grid -> its shapes, instead of bench/grid.py's memory_shapes
#   passes      (optional) the passes it runs, instead of those its bytes name

T_H = lambda s: s.tokens * s.hidden  # noqa: E731  elements of one (tokens, hidden) tensor
T_I = lambda s: s.tokens * s.inter  # noqa: E731  elements of one (tokens, inter) tensor
QK = lambda s: s.tokens * (s.q_heads + s.kv_heads) * s.head_dim  # noqa: E731  q and k elements
TABLES = lambda s: 2 * s.tokens * (s.head_dim // 2) * 4  # noqa: E731  cos + sin, float32 (S, D/2)
NHV = lambda s: s.tokens * s.hidden * s.vocab  # noqa: E731  multiply-adds of the lm_head's matmul

CASES = [
    {
        "op": "rms_norm",
        "shape": lambda s: f"x({s.tokens},{s.hidden})",
        "inputs": norm_inputs,
        "grad": ("x", "weight"),
        "llama_fast": ("rms_norm", ("x", "weight")),
        "eager": (hf_rms_norm, ("x", "weight")),
        "bytes": {
            "fwd": lambda s, e: (2 * T_H(s) + s.hidden) * e,  # read x, weight; write y
            "bwd": lambda s, e: (3 * T_H(s) + 2 * s.hidden) * e,  # read dy, x, weight; write dx, dweight
        },
    },
    {
        "op": "add_rms_norm",
        "shape": lambda s: f"x,residual({s.tokens},{s.hidden})",
        "inputs": add_norm_inputs,
        "grad": ("x", "residual", "weight"),
        "llama_fast": ("add_rms_norm", ("x", "residual", "weight")),
        "eager": (hf_add_rms_norm, ("x", "residual", "weight")),
        "bytes": {
            "fwd": lambda s, e: (4 * T_H(s) + s.hidden) * e,  # read x, residual, weight; write y, h
            # read dy, dh, h, weight; write dx (= d residual, one tensor) and dweight
            "bwd": lambda s, e: (4 * T_H(s) + 2 * s.hidden) * e,
        },
    },
    {
        "op": "apply_rope",
        "shape": lambda s: f"q(1,{s.tokens},{s.q_heads},{s.head_dim}) k(1,{s.tokens},{s.kv_heads},{s.head_dim})",
        "inputs": rope_inputs,
        "grad": ("q", "k"),
        "llama_fast": ("apply_rope", ("q", "k", "cos_half", "sin_half")),
        "eager": (hf_apply_rope, ("q", "k", "cos", "sin")),
        "bytes": {
            "fwd": lambda s, e: 2 * QK(s) * e + TABLES(s),  # read q, k, cos, sin; write q_out, k_out
            "bwd": lambda s, e: 2 * QK(s) * e + TABLES(s),  # read dq_out, dk_out, cos, sin; write dq, dk
        },
    },
    {
        "op": "swiglu",
        "shape": lambda s: f"gate,up({s.tokens},{s.inter})",
        "inputs": swiglu_inputs,
        "grad": ("gate", "up"),
        "llama_fast": ("swiglu", ("gate", "up")),
        "eager": (hf_swiglu, ("gate", "up")),
        "bytes": {
            "fwd": lambda s, e: 3 * T_I(s) * e,  # read gate, up; write y
            "bwd": lambda s, e: 5 * T_I(s) * e,  # read dy, gate, up; write dgate, dup
        },
    },
    {
        "op": "swiglu_fused",
        "shape": lambda s: f"gate_up({s.tokens},{2 * s.inter})",
        "inputs": swiglu_fused_inputs,
        "grad": ("gate_up",),
        "llama_fast": ("swiglu_fused", ("gate_up",)),
        "eager": (hf_swiglu_fused, ("gate_up",)),
        "bytes": {
            "fwd": lambda s, e: 3 * T_I(s) * e,  # read gate_up (2I wide); write y (I wide)
        },
    },
    {
        "op": "cross_entropy",
        "shape": lambda s: f"hidden({s.tokens},{s.hidden}) weight({s.vocab},{s.hidden})",
        "inputs": cross_entropy_inputs,
        "grad": ("hidden", "weight"),
        "llama_fast": ("fused_linear_cross_entropy", ("hidden", "weight", "target")),
        "eager": (hf_linear_cross_entropy, ("hidden", "weight", "target")),
        "shapes": cross_entropy_shapes,
        "passes": ("fwd", "fwd+bwd"),
        "bytes": {
            "fwd": lambda s, e: (T_H(s) + s.vocab * s.hidden) * e + 8 * s.tokens,  # read hidden, weight, target
            "bwd": lambda s, e: (T_H(s) + s.vocab * s.hidden) * e,  # write d hidden, d weight
        },
        "flops": {
            "fwd": lambda s: 2 * NHV(s),  # the logits
            "bwd": lambda s: 4 * NHV(s),  # d hidden and d weight
        },
    },
]

PROVIDERS = ("llama_fast", "eager", "torch.compile")


def empty_row(case: dict, pass_: str, provider: str, s: Shapes, dtype: torch.dtype = DTYPE) -> dict:
    """A row with every field; the measurements stay null where a row failed or was skipped."""
    return {"op": case["op"], "shape": case["shape"](s), "dtype": dtype_name(dtype), "pass": pass_, "provider": provider,
            "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None, "peak_mem_mb": None}
