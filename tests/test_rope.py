"""apply_rope and rope_cos_sin, every backend, against float64 and against Hugging Face."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_fast
from _helpers import BACKENDS, DEVICE, DTYPES, assert_close, f64, randn, row_strided

THETA = 500000.0
LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ---------------------------------------------------------------------------------------
# the float64 reference


def rotate_pairs(x, interleaved):
    """The partner of every element, signed: (x1, x2) -> (-x2, x1) for each rotated pair."""
    if interleaved:  # pairs (2i, 2i + 1)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # pairs (i, i + D/2), Hugging Face's rotate_half
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference(x, cos, sin, interleaved):
    """x (B, S, H, D) rotated by the (S, D/2) or (B, S, D/2) tables: x * cos + rotate(x) * sin."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    if interleaved:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return x * cos + rotate_pairs(x, interleaved) * sin


# ---------------------------------------------------------------------------------------
# inputs


def make_heads(batch, seq, heads, head_dim, dtype, layout):
    """A (B, S, H, D) tensor in one of the layouts callers pass."""
    shape = (batch, seq, heads, head_dim)
    if layout == "contiguous":
        return randn(shape, dtype)
    if layout == "hf_transposed":  # Hugging Face's (B, H, S, D) projections, transposed
        return randn((batch, heads, seq, head_dim), dtype).transpose(1, 2)
    if layout == "row_padded":
        return row_strided(shape, dtype)
    if layout == "strided_last":
        return randn(shape, dtype, strided=True)
    raise ValueError(layout)


def make_tables(batch, seq, head_dim, dtype, kind):
    """cos and sin, (S, D/2) or (B, S, D/2), real ones or random numbers."""
    half = head_dim // 2
    if kind == "positions_2d":
        return llama_fast.rope_cos_sin(torch.arange(seq, device=DEVICE), head_dim)
    if kind == "positions_3d_llama31":  # each sequence at its own offset, Llama 3.1 scaling
        positions = torch.randint(0, 100_000, (batch, 1), device=DEVICE) + torch.arange(seq, device=DEVICE)
        return llama_fast.rope_cos_sin(positions, head_dim, THETA, LLAMA31_SCALING)
    if kind == "positions_expanded":  # (B, S, D/2) with a zero batch stride
        cos, sin = llama_fast.rope_cos_sin(torch.arange(seq, device=DEVICE), head_dim)
        return cos.expand(batch, seq, half), sin.expand(batch, seq, half)
    if kind == "random_2d":
        return randn((seq, half), torch.float32), randn((seq, half), torch.float32)
    if kind == "random_3d_lowp":  # tables in q's dtype
        return randn((batch, seq, half), dtype), randn((batch, seq, half), dtype)
    if kind == "random_strided_mixed":  # cos with a strided last dim, sin dense: different strides
        return randn((seq, half), torch.float32, strided=True), randn((seq, half), torch.float32)
    raise ValueError(kind)


def strides(t):
    """The strides that matter: those of dimensions longer than 1."""
    return tuple(st if size > 1 else None for size, st in zip(t.shape, t.stride()))


def is_dense(t):
    """Whether ``t`` fills its memory without gaps, in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_rope(backend, q, k, cos, sin, interleaved, *, dtype=None, use_k=True):
    """Forward and backward (dq, dk) against float64; random upstream gradients in q's layout."""
    dtype = dtype or q.dtype
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    with llama_fast.backend(backend):
        q_out, k_out = llama_fast.apply_rope(q, k, cos, sin, interleaved=interleaved)
    assert q_out.dtype == q.dtype and k_out.dtype == k.dtype
    for out, inp in ((q_out, q), (k_out, k)):
        if is_dense(inp):  # e.g. HF's transposed heads: the output is the same view, no copy
            assert strides(out) == strides(inp), f"output strides {out.stride()} != input strides {inp.stride()}"
    q64, k64 = f64(q, True), f64(k, True)
    q_ref, k_ref = reference(q64, f64(cos), f64(sin), interleaved), reference(k64, f64(cos), f64(sin), interleaved)
    assert_close(q_out, q_ref, dtype, "q_out")
    assert_close(k_out, k_ref, dtype, "k_out")

    # Upstream gradients with the inputs' layout (HF's backward hands transposed ones).
    dq = torch.empty_like(q).copy_(torch.randn(q.shape, device=q.device))
    dk = torch.empty_like(k).copy_(torch.randn(k.shape, device=k.device))
    outs, grads = ((q_out, k_out), (dq, dk)) if use_k else ((q_out,), (dq,))
    with llama_fast.backend(backend):
        torch.autograd.backward(outs, grads)
    refs = (q_ref, k_ref) if use_k else (q_ref,)
    torch.autograd.backward(refs, tuple(f64(g) for g in grads))
    assert_close(q.grad, q64.grad, dtype, "dq")
    if use_k:
        assert_close(k.grad, k64.grad, dtype, "dk")
    else:  # k_out took no part in the loss: k gets no gradient, or zeros
        assert k64.grad is None
        assert k.grad is None or torch.equal(k.grad, torch.zeros_like(k)), "k.grad is not zero"
    assert q.grad.dtype == q.dtype


# ---------------------------------------------------------------------------------------
# forward and backward against float64


@dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    k_heads: int
    gqa: int  # q heads per k head
    head_dim: int
    layout: str
    tables: str


# Few tokens each: the interpreter runs one program per token.
CASES = {
    "all_ones": Case(1, 1, 1, 1, 2, "contiguous", "positions_2d"),
    "mha_hf_layout": Case(2, 3, 3, 1, 8, "hf_transposed", "positions_2d"),
    "gqa2_llama31_batch_tables": Case(2, 2, 2, 2, 6, "hf_transposed", "positions_3d_llama31"),
    "gqa4_random_tables": Case(1, 5, 1, 4, 10, "contiguous", "random_2d"),
    "gqa2_row_padded_lowp_tables": Case(2, 2, 2, 2, 8, "row_padded", "random_3d_lowp"),
    "gqa2_strided_last_dim_mixed_table_strides": Case(1, 3, 1, 2, 4, "strided_last", "random_strided_mixed"),
    "gqa4_expanded_tables": Case(3, 1, 2, 4, 16, "hf_transposed", "positions_expanded"),
    "20_q_heads_over_two_steps": Case(1, 1, 5, 4, 256, "hf_transposed", "positions_2d"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64(backend, dtype, interleaved, case):
    q = make_heads(case.batch, case.seq, case.k_heads * case.gqa, case.head_dim, dtype, case.layout)
    k = make_heads(case.batch, case.seq, case.k_heads, case.head_dim, dtype, case.layout)
    cos, sin = make_tables(case.batch, case.seq, case.head_dim, dtype, case.tables)
    check_rope(backend, q, k, cos, sin, interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_gradients_when_only_q_out_is_used(backend, dtype, interleaved):
    q = make_heads(2, 3, 4, 8, dtype, "hf_transposed")
    k = make_heads(2, 3, 2, 8, dtype, "hf_transposed")
    cos, sin = make_tables(2, 3, 8, dtype, "positions_3d_llama31")
    check_rope(backend, q, k, cos, sin, interleaved, use_k=False)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 3),
    k_heads=st.integers(1, 3),
    gqa=st.sampled_from([1, 2, 4]),
    half_dim=st.integers(1, 9),
    layout=st.sampled_from(["contiguous", "hf_transposed", "row_padded", "strided_last"]),
    batched_tables=st.booleans(),
    interleaved=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_random_shapes(batch, seq, k_heads, gqa, half_dim, layout, batched_tables, interleaved, backend):
    d = 2 * half_dim
    q = make_heads(batch, seq, k_heads * gqa, d, torch.float32, layout)
    k = make_heads(batch, seq, k_heads, d, torch.float32, layout)
    table_shape = (batch, seq, half_dim) if batched_tables else (seq, half_dim)
    check_rope(backend, q, k, randn(table_shape, torch.float32), randn(table_shape, torch.float32), interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,seq", [(2, 0), (0, 3)])
def test_empty(backend, batch, seq):
    q = randn((batch, seq, 4, 8), torch.float32).requires_grad_()
    k = randn((batch, seq, 2, 8), torch.float32).requires_grad_()
    cos, sin = llama_fast.rope_cos_sin(torch.arange(seq, device=DEVICE), 8)
    with llama_fast.backend(backend):
        q_out, k_out = llama_fast.apply_rope(q, k, cos, sin)
        (q_out.sum() + k_out.sum()).backward()
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ---------------------------------------------------------------------------------------
# the tables, and the rotation, against Hugging Face's Llama


def hf_llama_config(head_dim, scaling):
    """A LlamaConfig with rope theta 500000 and, given ``scaling``, the Llama 3.1 rope."""
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "llama3", **scaling} if scaling else {"rope_type": "default"}
    common = dict(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=head_dim, max_position_embeddings=131072)
    if hasattr(transformers.LlamaConfig(), "rope_parameters"):  # transformers >= 5
        return transformers.LlamaConfig(**common, rope_parameters={**rope, "rope_theta": THETA})
    return transformers.LlamaConfig(**common, rope_theta=THETA, rope_scaling=rope if scaling else None)


def hf_rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config).to(DEVICE)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scaling", [LLAMA31_SCALING, None], ids=["llama3.1", "llama3"])
def test_inv_freq_matches_hugging_face(head_dim, scaling):
    config = hf_llama_config(head_dim, scaling)
    if scaling:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        expected = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))[0]
    else:
        expected = hf_rotary(config).inv_freq.cpu()
    ours = llama_fast.rope_inv_freq(head_dim, THETA, scaling, device=DEVICE)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    # Exact on the CPU; a GPU's pow may differ by one float32 ulp.
    torch.testing.assert_close(ours.cpu(), expected.float(), rtol=2.0**-23, atol=0.0)
    if scaling:  # the scaling changes the long wavelengths and keeps the short ones
        plain = llama_fast.rope_inv_freq(head_dim, THETA, device=DEVICE)
        assert torch.equal(ours[0], plain[0]) and torch.allclose(ours[-1], plain[-1] / 8)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scaling", [LLAMA31_SCALING, None], ids=["llama3.1", "llama3"])
def test_cos_sin_match_hugging_face(head_dim, scaling):
    rotary = hf_rotary(hf_llama_config(head_dim, scaling))
    positions = torch.cat((torch.arange(16), torch.randint(0, 131072, (16,)))).reshape(2, 16).to(DEVICE)
    hf_cos, hf_sin = rotary(torch.zeros(1, device=DEVICE), positions)  # (B, S, D), float32
    half = head_dim // 2
    assert torch.equal(hf_cos[..., :half], hf_cos[..., half:])  # rotate_half repeats the table
    cos, sin = llama_fast.rope_cos_sin(positions, head_dim, THETA, scaling)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 16, half)
    # Identical on one device; if inv_freq differs by an ulp (a GPU's pow), so do the
    # angles, by up to angle * 2^-23.
    angle = positions[..., None].double() * rotary.inv_freq.double()
    bound = 1e-6 + 2 * angle * 2.0**-23
    for ours, theirs in ((cos, hf_cos[..., :half]), (sin, hf_sin[..., :half])):
        assert bool(((ours.double() - theirs.double()).abs() <= bound).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_matches_hugging_face_apply_rotary_pos_emb(backend, gqa):
    """HF's rotation of (B, H, S, D) tensors equals apply_rope on their (B, S, H, D) views,
    forward and backward, float32."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, seq, k_heads, head_dim = 2, 3, 2, 16
    rotary = hf_rotary(hf_llama_config(head_dim, LLAMA31_SCALING))
    positions = torch.randint(0, 131072, (batch, 1), device=DEVICE) + torch.arange(seq, device=DEVICE)
    hf_cos, hf_sin = rotary(torch.zeros(1, device=DEVICE), positions)
    q = randn((batch, k_heads * gqa, seq, head_dim), torch.float32).requires_grad_()
    k = randn((batch, k_heads, seq, head_dim), torch.float32).requires_grad_()
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    dq, dk = torch.randn_like(hf_q), torch.randn_like(hf_k)
    hf_grads = torch.autograd.grad((hf_q, hf_k), (q, k), (dq, dk))

    cos, sin = llama_fast.rope_cos_sin(positions, head_dim, THETA, LLAMA31_SCALING)
    with llama_fast.backend(backend):
        q_out, k_out = llama_fast.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        grads = torch.autograd.grad((q_out, k_out), (q, k), (dq.transpose(1, 2), dk.transpose(1, 2)))
    assert_close(q_out.transpose(1, 2), hf_q.double(), torch.float32, "q")
    assert_close(k_out.transpose(1, 2), hf_k.double(), torch.float32, "k")
    assert_close(grads[0], hf_grads[0].double(), torch.float32, "dq")
    assert_close(grads[1], hf_grads[1].double(), torch.float32, "dk")


def test_rope_cos_sin_shapes():
    positions = torch.arange(6, device=DEVICE).reshape(2, 3)
    cos, sin = llama_fast.rope_cos_sin(positions, 10)
    assert cos.shape == sin.shape == (2, 3, 5) and cos.dtype == torch.float32
    inv_freq = THETA ** (-torch.arange(0, 10, 2, dtype=torch.float64) / 10)
    angles = positions.cpu().double()[..., None] * inv_freq
    torch.testing.assert_close(cos.cpu().double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.cpu().double(), angles.sin(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# bad inputs and unavailable backends


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def _rope(q_shape=(1, 3, 4, 8), k_shape=(1, 3, 2, 8), cos_shape=(3, 4), sin_shape=None, *,
          q_dtype=torch.float32, k_dtype=None, cos_dtype=torch.float32, cos_grad=False, **kwargs):
    """A call of apply_rope with one thing changed from a valid call (inputs made when called)."""

    def call():
        q, k = _t(*q_shape, dtype=q_dtype), _t(*k_shape, dtype=k_dtype or q_dtype)
        cos = _t(*cos_shape, dtype=cos_dtype).requires_grad_(cos_grad)
        sin = _t(*(sin_shape or cos_shape))
        return llama_fast.apply_rope(q, k, cos, sin, **kwargs)

    return call


BAD_INPUTS = [
    # (description, call, exception, message pattern)
    ("q float64", _rope(q_dtype=torch.float64), TypeError, r"q must be float32, float16 or bfloat16, got torch\.float64"),
    ("k integer", lambda: llama_fast.apply_rope(_t(1, 3, 4, 8), torch.ones(1, 3, 2, 8, dtype=torch.int64, device=DEVICE), _t(3, 4), _t(3, 4)),
     TypeError, r"k must be float32, float16 or bfloat16, got torch\.int64"),
    ("cos float64", _rope(cos_dtype=torch.float64), TypeError, "cos must be float32"),
    ("q fp16, k bf16", _rope(q_dtype=torch.float16, k_dtype=torch.bfloat16), TypeError, "q and k must have the same dtype"),
    ("k batch differs", _rope(k_shape=(2, 3, 2, 8)), ValueError, r"k must be \(B, S, Hkv, D\) with q's B, S and D"),
    ("k seq differs", _rope(k_shape=(1, 4, 2, 8)), ValueError, r"k must be \(B, S, Hkv, D\)"),
    ("k head dim differs", _rope(k_shape=(1, 3, 2, 6)), ValueError, r"k must be \(B, S, Hkv, D\)"),
    ("Hq not a multiple of Hkv", _rope(q_shape=(1, 3, 3, 8)), ValueError, r"q's heads \(3\) must be a multiple of k's heads \(2\)"),
    ("k without heads", _rope(k_shape=(1, 3, 0, 8)), ValueError, r"must be a multiple of k's heads \(0\)"),
    ("odd head dim", _rope(q_shape=(1, 3, 4, 7), k_shape=(1, 3, 2, 7), cos_shape=(3, 3)), ValueError, r"head dim .* must be even, got 7"),
    ("q 3-d", _rope(q_shape=(3, 4, 8)), ValueError, r"q must have 4 dimensions, got shape \(3, 4, 8\)"),
    ("q 0-d", _rope(q_shape=()), ValueError, r"q must have 4 dimensions, got shape \(\)"),
    ("cos 1-d", _rope(cos_shape=(4,)), ValueError, "cos must have 2 or 3 dimensions"),
    ("cos wrong seq", _rope(cos_shape=(4, 4)), ValueError, r"cos and sin must be \(S, D/2\)=\(3, 4\) or \(B, S, D/2\)=\(1, 3, 4\), got \(4, 4\)"),
    ("cos full head dim", _rope(cos_shape=(3, 8)), ValueError, r"cos and sin must be \(S, D/2\)"),
    ("cos wrong batch", _rope(cos_shape=(2, 3, 4)), ValueError, r"cos and sin must be \(S, D/2\)"),
    ("cos vs sin shape", _rope(cos_shape=(3, 4), sin_shape=(1, 3, 4)), ValueError, "cos and sin must have the same shape"),
    ("cos requires grad", _rope(cos_grad=True), ValueError, "cos and sin must not require grad"),
    ("interleaved not a bool", _rope(interleaved=1), TypeError, "interleaved must be a bool"),
    ("q not a tensor", lambda: llama_fast.apply_rope([[1.0]], _t(1, 3, 2, 8), _t(3, 4), _t(3, 4)), TypeError, "q must be a torch.Tensor, got list"),
    ("float positions", lambda: llama_fast.rope_cos_sin(torch.arange(3.0, device=DEVICE), 8), TypeError, "positions must be an integer tensor"),
    ("odd table head dim", lambda: llama_fast.rope_cos_sin(torch.arange(3, device=DEVICE), 7), ValueError, "head_dim must be a positive even integer"),
    ("theta 0", lambda: llama_fast.rope_inv_freq(8, 0.0), ValueError, "theta must be > 0"),
    ("scaling incomplete", lambda: llama_fast.rope_inv_freq(8, THETA, {"factor": 8.0}), ValueError, "scaling is missing"),
    ("scaling low >= high", lambda: llama_fast.rope_inv_freq(8, THETA, dict(LLAMA31_SCALING, low_freq_factor=4.0)), ValueError, "low_freq_factor < high_freq_factor"),
]


@pytest.mark.parametrize("call,exc,pattern", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def _cpu_rope_call():
    q, k = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 1, 4)
    cos, sin = llama_fast.rope_cos_sin(torch.arange(2), 4)
    return lambda: llama_fast.apply_rope(q, k, cos, sin)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="needs the CPU as test device")
def test_cuda_backend_refuses_cpu_tensors(monkeypatch, installed_cuda):  # the CPU emulator would accept them
    call = _cpu_rope_call()
    with llama_fast.backend("cuda"), pytest.raises(llama_fast.BackendUnavailableError, match="cuda"):
        call()


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    call = _cpu_rope_call()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with llama_fast.backend("triton"), pytest.raises(llama_fast.BackendUnavailableError, match="TRITON_INTERPRET"):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix with a CPU tensor")
def test_device_mix():
    with pytest.raises(ValueError, match="same device"):
        llama_fast.apply_rope(_t(1, 3, 4, 8), _t(1, 3, 2, 8), torch.randn(3, 4), torch.randn(3, 4))
