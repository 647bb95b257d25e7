"""flash_attn, flash_attn_varlen and flash_decode, every backend that implements them,
against a float64 reference written here (explicit softmax, GQA, bottom-right causal mask).

Under the Triton interpreter (no GPU) the case lists are lean; the exhaustive lists (every
length, head dim, dtype and GQA ratio) run when the test device is a CUDA GPU.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_fast
from llama_fast import backends
from _helpers import BACKENDS, DEVICE, DTYPES, ON_GPU, TOLERANCE, assert_close, f64, randn, row_strided

F32, F64 = torch.float32, torch.float64
LENGTHS = [1, 17, 63, 64, 65, 127, 129, 300]
HEAD_DIMS = [16, 32, 64, 96, 128, 256]
GQA_RATIOS = [1, 2, 4, 8]


def implementing(*ops: str) -> list[str]:
    """The runnable backends that implement every one of ``ops`` (evaluated at collection,
    so a kernel added to the registry is tested without editing this file)."""
    return [b for b in BACKENDS if all(op in backends.get(b).OPS or b in backends.ROUTES for op in ops)]


ATTN = implementing("attn_fwd", "attn_bwd")
ATTN_FWD = implementing("attn_fwd")
VARLEN = implementing("attn_varlen_fwd", "attn_varlen_bwd")
DECODE = implementing("decode")


def on_device(cpu: list, gpu: list) -> list:
    """``gpu`` (the exhaustive list) on a CUDA test device, else the lean ``cpu`` one."""
    return gpu if ON_GPU else cpu


# ---------------------------------------------------------------------------------------
# the float64 reference


def visible(sq: int, sk: int, causal: bool, device=DEVICE) -> torch.Tensor:
    """(Sq, Sk) bool: which keys each query sees. Causal is bottom-right aligned: query i
    sees keys j <= i + Sk - Sq (so with Sq > Sk the first Sq - Sk queries see nothing)."""
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def _attention(q, k, v, causal, scale):
    """float64, differentiable: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) ->
    out (B, Sq, Hq, D), lse (B, Hq, Sq), probabilities (B, Hq, Sq, Sk) and k, v per query head."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    # GQA: each kv head serves `group` consecutive query heads (query head h reads kv head h // group).
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    if sk == 0 or b * hq * sq == 0:  # nothing to attend to (or nobody asking): zeros, lse -inf
        p = q.new_zeros(b, hq, sq, sk)
        out = q * 0 + (k.sum() + v.sum()) * 0  # zeros that still depend on q, k, v (zero gradients)
        return out, q.new_full((b, hq, sq), float("-inf")), p, k, v
    mask = visible(sq, sk, causal, q.device)
    seen = mask.any(-1, keepdim=True)  # (Sq, 1): rows that see at least one key
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.detach(), dim=-1)  # -inf on rows that see nothing
    s = torch.where(seen, s, 0.0)  # keep those rows finite (no NaN in autograd); zeroed below
    e = torch.exp(s - s.amax(-1, keepdim=True).detach())
    p = e / e.sum(-1, keepdim=True) * seen
    return torch.einsum("bhij,bjhd->bihd", p, v), lse, p, k, v


def reference(q, k, v, causal, scale):
    out, lse, _, _, _ = _attention(q, k, v, causal, scale)
    return out, lse


def cancellation_terms(q, k, v, dout, causal, scale):
    """How large the terms are that dq and dk are summed from, element by element.

    dS = P * (dP - delta), dP = dO . v and delta = dO . O cancel (exactly, for a query that
    sees a single key: dq and dk are then 0), so a kernel's error in dq and dk is relative
    to the products those are summed from, not to the result. Rounding errors of
    independent terms add in quadrature: with |dP|' = sqrt(sum_d (dO_d v_d)^2) and
    |delta|' = sqrt(sum_d (dO_d O_d)^2), the size is
    scale * sqrt(sum over the summed index of (P (|dP|' + |delta|'))^2 x^2), x = k for dq
    and q for dk (summed over each kv head's query group)."""
    with torch.no_grad():
        q, k, v, dout = (f64(t) for t in (q, k, v, dout))
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        out, _, p, kr, vr = _attention(q, k, v, causal, scale)
        dp = torch.einsum("bihd,bjhd->bhij", dout.square(), vr.square()).sqrt()
        delta = (dout * out).square().sum(-1).sqrt().transpose(1, 2)[..., None]  # (B, Hq, Sq, 1)
        w2 = (p * (dp + delta)).square()
        tq = torch.einsum("bhij,bjhd->bihd", w2, kr.square()).sqrt() * scale
        tk = torch.einsum("bhij,bihd->bjhd", w2, q.square()).reshape(b, sk, hkv, hq // hkv, d).sum(3).sqrt() * scale
    return tq, tk


def assert_close_terms(actual, expected, dtype, what, terms):
    """assert_close, with each element's absolute tolerance relative to the larger of the
    reference's largest magnitude and the size of the terms that element cancels from."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(F64).cpu()
    e = expected.detach().to(F64).cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN in the result (an element was not written?)"
    if not e.numel():
        return
    rtol, atol = TOLERANCE[dtype]
    scale = terms.to(F64).cpu().clamp(min=e.abs().max().item())
    err = (a - e).abs()
    bound = atol * scale.clamp(min=1e-30) + rtol * e.abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: max error {err.max().item():.3g} (dtype {dtype}); worst at flat index {worst.item()}: "
        f"got {a.flatten()[worst].item()}, expected {e.flatten()[worst].item()}, allowed {bound.flatten()[worst].item():.3g}"
    )


def assert_lse_close(lse, expected, what="lse"):
    """lse is float32 whatever the input dtype, and the q.k products of half inputs are exact
    in float32, so it is held to the float32 tolerance. -inf exactly where a row sees nothing."""
    assert lse.shape == expected.shape and lse.dtype == F32, f"{what}: {lse.dtype} {tuple(lse.shape)}"
    a, e = lse.detach().to(F64).cpu(), expected.detach().to(F64).cpu()
    empty = torch.isneginf(e)
    assert torch.equal(torch.isneginf(a), empty), f"{what}: -inf must be exactly on the rows that see no key"
    assert_close(a[~empty], e[~empty], F32, what)


# ---------------------------------------------------------------------------------------
# flash_attn: the shared check


def check_attn(backend, q, k, v, *, causal, softmax_scale=None, dtype=None, dout=None, grads=True):
    """Forward (out and lse) and the three gradients against float64; returns out."""
    dtype = dtype or q.dtype
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # detach keeps the strides
    b, sq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    with llama_fast.backend(backend):
        out, lse = llama_fast.flash_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, hq, sq) and lse.dtype == F32 and not lse.requires_grad
    q64, k64, v64 = f64(q, True), f64(k, True), f64(v, True)
    out64, lse64 = reference(q64, k64, v64, causal, scale)
    assert_close(out, out64, dtype, "out")
    assert_lse_close(lse, lse64)
    if not grads:
        return out
    if dout is None:
        dout = torch.randn_like(out)
    with llama_fast.backend(backend):
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), f64(dout))
    for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {g.dtype} {tuple(g.shape)}"
    tq, tk = cancellation_terms(q, k, v, dout, causal, scale)
    assert_close_terms(dq, dq64, dtype, "dq", tq)
    assert_close_terms(dk, dk64, dtype, "dk", tk)
    assert_close(dv, dv64, dtype, "dv")
    return out


def qkv(b, sq, sk, hq, hkv, d, dtype):
    return randn((b, sq, hq, d), dtype), randn((b, sk, hkv, d), dtype), randn((b, sk, hkv, d), dtype)


# ---------------------------------------------------------------------------------------
# flash_attn


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seqlen", on_device([1, 17, 65], LENGTHS))
def test_matches_float64(backend, dtype, causal, seqlen):
    """Sq = Sk across block boundaries; batch 2 and GQA 2."""
    check_attn(backend, *qkv(2, seqlen, seqlen, 4, 2, 64, dtype), causal=causal)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", on_device([F32], [F32, torch.bfloat16]))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "sq,sk",
    on_device([(1, 65), (17, 129), (65, 17), (64, 1)], [(a, b) for a in LENGTHS for b in LENGTHS if a != b]),
)
def test_query_and_key_lengths_differ(backend, dtype, causal, sq, sk):
    """Sq < Sk: prefill after a cached prefix (query i sees keys up to i + Sk - Sq).
    Sq > Sk with causal: the first Sq - Sk queries see nothing (zero output, lse -inf,
    zero dq)."""
    out = check_attn(backend, *qkv(2, sq, sk, 4, 2, 32, dtype), causal=causal)
    if causal and sq > sk:
        assert torch.equal(out[:, : sq - sk].float(), torch.zeros_like(out[:, : sq - sk].float()))


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", on_device([F32], DTYPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("ratio", GQA_RATIOS)
def test_gqa(backend, dtype, causal, ratio):
    """Each kv head serves ratio consecutive query heads; dk and dv sum over the group."""
    hkv = 2 if ON_GPU or ratio < 8 else 1
    sq, sk = (129, 300) if ON_GPU else (19, 33)
    check_attn(backend, *qkv(2, sq, sk, ratio * hkv, hkv, 32, dtype), causal=causal)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", on_device([F32, torch.bfloat16], DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_head_dims(backend, dtype, head_dim):
    """Every head dim up to 256 (Llama-3's is 128); on CPU few heads and tokens for large ones."""
    if ON_GPU:
        b, s, hq, hkv = 2, 129, 4, 2
    else:
        b, s, hq, hkv = (1, 33, 2, 1) if head_dim <= 64 else (1, 17, 2, 1)
    check_attn(backend, *qkv(b, s, s, hq, hkv, head_dim, dtype), causal=True)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("causal,dtype", [(True, torch.bfloat16), (False, F32)] + ([(True, F32), (False, torch.bfloat16), (True, torch.float16)] if ON_GPU else []))
def test_long_sequence(backend, causal, dtype):
    """300 tokens (several key blocks, a partial last one), (1, 300, 2, 64)."""
    check_attn(backend, *qkv(1, 300, 300, 2, 2, 64, dtype), causal=causal)


def make_layout(layout, b, s, hq, hkv, d, dtype):
    """q, k, v in the layouts callers pass."""
    if layout == "hf_transposed":  # Hugging Face's (B, H, S, D) projections, transposed
        return tuple(randn((b, h, s, d), dtype).transpose(1, 2) for h in (hq, hkv, hkv))
    if layout == "fused_qkv":  # slices of one fused projection (B, S, (Hq + 2 Hkv) * D)
        qkv_ = randn((b, s, (hq + 2 * hkv) * d), dtype)
        q, k, v = qkv_.split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
    if layout == "padded_rows":
        return tuple(row_strided((b, s, h, d), dtype) for h in (hq, hkv, hkv))
    if layout == "strided_last_dim":
        return tuple(randn((b, s, h, d), dtype, strided=True) for h in (hq, hkv, hkv))
    if layout == "mixed":  # a different layout for each of q, k and v
        return (randn((b, hq, s, d), dtype).transpose(1, 2), row_strided((b, s, hkv, d), dtype),
                randn((b, s, hkv, d), dtype))
    raise ValueError(layout)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("dtype", on_device([F32], DTYPES))
@pytest.mark.parametrize("layout", ["hf_transposed", "fused_qkv", "padded_rows", "strided_last_dim", "mixed"])
def test_strided_inputs(backend, dtype, layout):
    """Any strides for q, k, v, and a transposed upstream gradient."""
    b, s, hq, hkv, d = (2, 129, 8, 2, 64) if ON_GPU else (2, 21, 4, 2, 32)
    q, k, v = make_layout(layout, b, s, hq, hkv, d, dtype)
    assert not (q.is_contiguous() or k.is_contiguous())
    dout = randn((b, hq, s, d), dtype).transpose(1, 2)
    check_attn(backend, q, k, v, causal=True, dout=dout)


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("softmax_scale", [0.05, 0.7, 3])
def test_softmax_scale(backend, softmax_scale):
    """An explicit scale (an int too) replaces 1/sqrt(D)."""
    check_attn(backend, *qkv(2, 23, 40, 4, 2, 32, F32), causal=True, softmax_scale=softmax_scale)


@pytest.mark.parametrize("backend", ATTN_FWD)
def test_default_scale_is_inverse_sqrt_head_dim(backend):
    q, k, v = qkv(1, 9, 9, 2, 1, 64, F32)
    with llama_fast.backend(backend):
        assert torch.equal(llama_fast.flash_attn(q, k, v), llama_fast.flash_attn(q, k, v, softmax_scale=0.125))


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_batch_elements_are_independent(backend, causal):
    """Batch elements with very different content (softmax sharpness, magnitudes); each
    matches float64 and the same call on that element alone."""
    b, sq, sk, hq, hkv, d = 3, 20, 37, 4, 2, 32
    q, k, v = qkv(b, sq, sk, hq, hkv, d, F32)
    q = q * torch.tensor([0.1, 1.0, 4.0], device=DEVICE).view(b, 1, 1, 1)
    v = v * torch.tensor([100.0, 1.0, 0.01], device=DEVICE).view(b, 1, 1, 1)
    out = check_attn(backend, q, k, v, causal=causal)
    with llama_fast.backend(backend):
        for i in range(b):
            alone = llama_fast.flash_attn(q[i : i + 1], k[i : i + 1], v[i : i + 1], causal=causal)
            # the absolute tolerance is relative to this element's own magnitude
            assert_close(out[i : i + 1], alone.to(F64), F32, f"batch element {i}")


@pytest.mark.parametrize("backend", ATTN)
def test_lse_carries_no_gradient(backend):
    q, k, v = (t.requires_grad_() for t in qkv(2, 7, 11, 4, 2, 16, F32))
    with llama_fast.backend(backend):
        out, lse = llama_fast.flash_attn(q, k, v, return_lse=True)
        assert out.requires_grad and not lse.requires_grad and lse.grad_fn is None
        # a loss that also uses lse: lse contributes nothing, the rest flows as usual
        (out.sum() + lse.sum()).backward(retain_graph=True)
        grads = [t.grad.clone() for t in (q, k, v)]
        expected = torch.autograd.grad(out.sum(), (q, k, v))
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("backend", ATTN)
def test_backward_runs_on_the_forced_backend(backend, monkeypatch):
    """backend(name) forces the backward too (on a GPU autograd runs the backward on its own
    device thread: the choice must reach it there)."""
    served = []
    pick = backends.pick

    def spy(op, device, args=()):
        served.append((op, pick(op, device, args)))
        return served[-1][1]

    monkeypatch.setattr(backends, "pick", spy)
    q, k, v = (t.requires_grad_() for t in qkv(1, 5, 5, 2, 1, 16, F32))
    with llama_fast.backend(backend):
        llama_fast.flash_attn(q, k, v).sum().backward()
    assert [op for op, _ in served] == ["attn_fwd", "attn_bwd"]
    # The forced backend serves both, or the routing rule's target where its kernels stop
    # (cuda: float32 and the backward go to triton).
    assert all(name in (backend, backends.ROUTES.get(backend)) for _, name in served), served
    if backend == "cuda":
        assert served == [("attn_fwd", "triton"), ("attn_bwd", "triton")]


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("shape", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (2, 0, 0)], ids=["batch0", "sq0", "sk0", "both0"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_empty(backend, shape, causal):
    """Empty batch, no queries, or no keys (every query sees nothing: zeros and lse -inf)."""
    b, sq, sk = shape
    check_attn(backend, *qkv(b, sq, sk, 4, 2, 16, F32), causal=causal)


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 3),
    sq=st.integers(1, 70),
    sk=st.integers(1, 70),
    hkv=st.integers(1, 2),
    ratio=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([16, 32, 64]),
    causal=st.booleans(),
    backend=st.sampled_from(ATTN),
)
def test_random_shapes(b, sq, sk, hkv, ratio, head_dim, causal, backend):
    check_attn(backend, *qkv(b, sq, sk, ratio * hkv, hkv, head_dim, F32), causal=causal)


def test_torch_compile_fullgraph_matches_eager():
    """flash_attn under torch.compile(fullgraph=True), forward and backward, on every backend
    (compiled once: the backend is picked at run time, inside the custom op)."""
    torch._dynamo.reset()

    def loss(q, k, v):
        out, lse = llama_fast.flash_attn(q, k, v, causal=True, return_lse=True)
        return (out.float().square().sum() + lse.sum()), out

    compiled = torch.compile(loss, fullgraph=True)
    inputs = qkv(2, 9, 13, 4, 2, 16, F32)
    for backend in ATTN:
        eager_in = [t.detach().clone().requires_grad_() for t in inputs]
        compiled_in = [t.detach().clone().requires_grad_() for t in inputs]
        with llama_fast.backend(backend):
            expected, expected_out = loss(*eager_in)
            expected.backward()
            got, got_out = compiled(*compiled_in)
            got.backward()
        assert_close(got_out, expected_out.to(F64), F32, f"{backend}: out")
        assert_close(got, expected.to(F64), F32, f"{backend}: loss")
        for name, a, e in zip("qkv", compiled_in, eager_in):
            assert_close(a.grad, e.grad.to(F64), F32, f"{backend}: d{name}")


# ---------------------------------------------------------------------------------------
# flash_attn_varlen


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def varlen_reference(q, k, v, lens_q, lens_k, causal, scale):
    """Packed float64 attention, each sequence on its own (differentiable)."""
    outs, oq, ok = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        out, _ = reference(q[None, oq : oq + lq], k[None, ok : ok + lk], v[None, ok : ok + lk], causal, scale)
        outs.append(out[0])
        oq, ok = oq + lq, ok + lk
    return torch.cat(outs)


def varlen_terms(q, k, v, dout, lens_q, lens_k, causal, scale):
    tqs, tks, oq, ok = [], [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        rq, rk = slice(oq, oq + lq), slice(ok, ok + lk)
        tq, tk = cancellation_terms(q[None, rq], k[None, rk], v[None, rk], dout[None, rq], causal, scale)
        tqs.append(tq[0])
        tks.append(tk[0])
        oq, ok = oq + lq, ok + lk
    return torch.cat(tqs), torch.cat(tks)


def check_varlen(backend, lens_q, lens_k, hq, hkv, d, dtype, causal, *, extra_max=0, compare_alone=True):
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = randn((total_q, hq, d), dtype).requires_grad_()
    k = randn((total_k, hkv, d), dtype).requires_grad_()
    v = randn((total_k, hkv, d), dtype).requires_grad_()
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    max_q, max_k = max(lens_q) + extra_max, max(lens_k) + extra_max
    scale = 1.0 / math.sqrt(d)
    dout = torch.randn(total_q, hq, d, dtype=dtype, device=DEVICE)
    with llama_fast.backend(backend):
        out = llama_fast.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert out.shape == q.shape and out.dtype == dtype
    q64, k64, v64 = f64(q, True), f64(k, True), f64(v, True)
    out64 = varlen_reference(q64, k64, v64, lens_q, lens_k, causal, scale)
    assert_close(out, out64, dtype, "out")
    dq64, dk64, dv64 = torch.autograd.grad(out64, (q64, k64, v64), f64(dout))
    tq, tk = varlen_terms(q, k, v, dout, lens_q, lens_k, causal, scale)
    assert_close_terms(dq, dq64, dtype, "dq", tq)
    assert_close_terms(dk, dk64, dtype, "dk", tk)
    assert_close(dv, dv64, dtype, "dv")
    if compare_alone and backend in ATTN_FWD:
        # each sequence as flash_attn computes it on that sequence alone
        oq = ok = 0
        with llama_fast.backend(backend):
            for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
                alone = llama_fast.flash_attn(q[None, oq : oq + lq], k[None, ok : ok + lk], v[None, ok : ok + lk], causal=causal)
                assert_close(out[oq : oq + lq], alone[0].to(F64), dtype, f"sequence {i} vs flash_attn")
                oq, ok = oq + lq, ok + lk


VARLEN_CASES = {
    # name: (lengths of q, lengths of k)
    "same": ([1, 17, 5, 64], [1, 17, 5, 64]),
    "k_longer": ([1, 17, 5, 64], [3, 40, 5, 70]),
    "q_longer_and_empty": ([3, 0, 9, 4], [3, 2, 5, 4]),  # no queries in one; causal rows that see nothing
    "no_keys": ([2, 4], [3, 0]),  # a sequence without keys: zero output and gradients
}
if ON_GPU:
    VARLEN_CASES.update({
        "long": ([300, 1, 129, 63, 65], [300, 7, 200, 64, 65]),
        "many_short": ([1] * 9 + [2, 127], [1, 3, 5, 7, 9, 11, 13, 15, 17, 2, 127]),
    })


VARLEN_PARAMS = [(case, causal, dtype) for case in VARLEN_CASES for causal in (True, False)
                 for dtype in on_device([F32], DTYPES)]
if not ON_GPU:  # the half dtypes on one case
    VARLEN_PARAMS += [("k_longer", True, torch.float16), ("k_longer", True, torch.bfloat16)]


@pytest.mark.parametrize("backend", VARLEN)
@pytest.mark.parametrize("case,causal,dtype", VARLEN_PARAMS,
                         ids=[f"{c}-{'causal' if causal else 'full'}-{str(d)[6:]}" for c, causal, d in VARLEN_PARAMS])
def test_varlen_matches_float64(backend, case, causal, dtype):
    check_varlen(backend, *VARLEN_CASES[case], 4, 2, 32, dtype, causal)


@pytest.mark.parametrize("backend", VARLEN)
@pytest.mark.parametrize("ratio", GQA_RATIOS)
def test_varlen_gqa(backend, ratio):
    hkv = 1 if ratio == 8 and not ON_GPU else 2
    check_varlen(backend, [5, 1, 33], [9, 4, 33], ratio * hkv, hkv, 64, F32, True, compare_alone=False)


@pytest.mark.parametrize("backend", VARLEN)
def test_varlen_max_seqlen_larger_than_needed(backend):
    check_varlen(backend, [1, 17, 5], [2, 30, 5], 2, 1, 16, F32, True, extra_max=40, compare_alone=False)


@pytest.mark.parametrize("backend", VARLEN)
@pytest.mark.parametrize("head_dim", on_device([16, 128, 256], HEAD_DIMS))
def test_varlen_head_dims(backend, head_dim):
    check_varlen(backend, [3, 12], [3, 20], 2, 1, head_dim, torch.bfloat16, True, compare_alone=False)


# ---------------------------------------------------------------------------------------
# flash_decode


def decode_reference(q, k_cache, v_cache, lengths, scale):
    """The last Sq of each sequence's valid cache entries attend causally (bottom-right)."""
    q, k_cache, v_cache = f64(q), f64(k_cache), f64(v_cache)
    return torch.cat([reference(q[i : i + 1], k_cache[i : i + 1, :n], v_cache[i : i + 1, :n], True, scale)[0]
                      for i, n in enumerate(lengths)])


def make_cache(b, smax, hq, hkv, d, sq, lengths, dtype, layout="contiguous"):
    """q and caches with random content everywhere, beyond the valid lengths too."""
    if layout == "contiguous":
        q = randn((b, sq, hq, d), dtype)
        k_cache, v_cache = randn((b, smax, hkv, d), dtype), randn((b, smax, hkv, d), dtype)
    else:  # Hugging Face's (B, H, S, D) cache and projections, transposed
        q = randn((b, hq, sq, d), dtype).transpose(1, 2)
        k_cache = randn((b, hkv, smax, d), dtype).transpose(1, 2)
        v_cache = randn((b, hkv, smax, d), dtype).transpose(1, 2)
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def check_decode(backend, q, k_cache, v_cache, seqlens, *, num_splits=None, softmax_scale=None, dtype=None, lengths=None):
    """Against float64; then NaN written beyond every length must not change the result."""
    dtype = dtype or q.dtype
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    lengths = seqlens.tolist() if lengths is None else lengths
    with llama_fast.backend(backend):
        out = llama_fast.flash_decode(q, k_cache, v_cache, seqlens, softmax_scale=softmax_scale, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, decode_reference(q, k_cache, v_cache, lengths, scale), dtype, "out")
    for i, n in enumerate(lengths):
        k_cache[i, n:] = float("nan")
        v_cache[i, n:] = float("nan")
    with llama_fast.backend(backend):
        again = llama_fast.flash_decode(q, k_cache, v_cache, seqlens, softmax_scale=softmax_scale, num_splits=num_splits)
    assert torch.equal(again, out), "NaN beyond cache_seqlens changed the result"
    return out


# several key blocks of any kernel's likely tile (64 or 128 keys), a partial last one
DECODE_SMAX = 1000 if ON_GPU else 300


SPLITS = [None, 1, 3, 64 if not ON_GPU else 1024]
SPLIT_IDS = ["auto", "1", "3", "more_than_blocks"]


def check_decode_case(backend, dtype, sq, num_splits):
    """Lengths Sq (the minimum), Smax and in between; GQA 4."""
    lengths = [sq, DECODE_SMAX, 37, 513 if ON_GPU else 200]
    q, k, v, seqlens = make_cache(len(lengths), DECODE_SMAX, 8, 2, 128 if ON_GPU else 64, sq, lengths, dtype)
    check_decode(backend, q, k, v, seqlens, num_splits=num_splits)


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("num_splits", on_device([None], SPLITS), ids=on_device(["auto"], SPLIT_IDS))
def test_decode_matches_float64(backend, dtype, sq, num_splits):
    check_decode_case(backend, dtype, sq, num_splits)


@pytest.mark.skipif(ON_GPU, reason="test_decode_matches_float64 covers every split count on the GPU")
@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("num_splits", SPLITS[1:], ids=SPLIT_IDS[1:])
def test_decode_num_splits(backend, sq, num_splits):
    check_decode_case(backend, F32, sq, num_splits)


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("ratio,sq", on_device([(1, 4), (2, 1), (4, 4), (8, 1)], [(r, s) for r in GQA_RATIOS for s in (1, 4)]))
def test_decode_gqa(backend, ratio, sq):
    hkv = 1 if ratio == 8 and not ON_GPU else 2
    lengths = [sq, 200, 77]
    q, k, v, seqlens = make_cache(3, 200, ratio * hkv, hkv, 32, sq, lengths, F32)
    check_decode(backend, q, k, v, seqlens, num_splits=3)


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("head_dim", on_device([16, 128, 256], HEAD_DIMS))
def test_decode_head_dims(backend, head_dim):
    lengths = [1, 140, 70]
    q, k, v, seqlens = make_cache(3, 140, 4, 2, head_dim, 1, lengths, torch.bfloat16)
    check_decode(backend, q, k, v, seqlens)


@pytest.mark.parametrize("backend", DECODE)
@pytest.mark.parametrize("num_splits", [None, 2])
def test_decode_strided_inputs(backend, num_splits):
    """Hugging Face's (B, Hkv, Smax, D) cache transposed, a transposed q; explicit scale."""
    lengths = [4, 133, 150]
    q, k, v, seqlens = make_cache(3, 150, 4, 2, 32, 4, lengths, F32, layout="hf_transposed")
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_decode(backend, q, k, v, seqlens, num_splits=num_splits, softmax_scale=0.3)


@pytest.mark.parametrize("backend", DECODE)
def test_decode_lengths_are_clamped_to_the_cache(backend):
    """Documented: lengths are clamped to [0, Smax] on the device (no host check)."""
    q, k, v, _ = make_cache(2, 24, 2, 1, 16, 1, [24, 24], F32)
    seqlens = torch.tensor([24 + 5, 24], dtype=torch.int32, device=DEVICE)
    check_decode(backend, q, k, v, seqlens, lengths=[24, 24])


@pytest.mark.parametrize("backend", [b for b in DECODE if b in ATTN_FWD])
def test_decode_full_cache_matches_flash_attn(backend):
    q, k, v, seqlens = make_cache(2, 30, 4, 2, 32, 3, [30, 30], F32)
    with llama_fast.backend(backend):
        decoded = llama_fast.flash_decode(q, k, v, seqlens)
        expected = llama_fast.flash_attn(q, k, v, causal=True)
    assert_close(decoded, expected.to(F64), F32, "flash_decode vs flash_attn")


@pytest.mark.parametrize("backend", DECODE)
def test_decode_under_no_grad_with_tensors_requiring_grad(backend):
    q, k, v, seqlens = make_cache(1, 8, 2, 1, 16, 1, [5], F32)
    q.requires_grad_()
    with torch.no_grad(), llama_fast.backend(backend):
        out = llama_fast.flash_decode(q, k, v, seqlens)
    assert not out.requires_grad
    assert_close(out, decode_reference(q, k, v, [5], 0.25), F32, "out")


# ---------------------------------------------------------------------------------------
# bad inputs


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def _attn(q_shape=(1, 4, 4, 8), k_shape=(1, 6, 2, 8), v_shape=None, *, q_dtype=F32, k_dtype=None, **kwargs):
    """A call of flash_attn with one thing changed from a valid call (inputs made when called)."""

    def call():
        kd = k_dtype or q_dtype
        return llama_fast.flash_attn(_t(*q_shape, dtype=q_dtype), _t(*k_shape, dtype=kd), _t(*(v_shape or k_shape), dtype=kd), **kwargs)

    return call


def _varlen(lens_q=(2, 3), lens_k=(2, 3), cu_q=None, cu_k=None, max_q=3, max_k=3, *, q_dim=3, **kwargs):
    def call():
        tq, tk = sum(lens_q), sum(lens_k)
        q = _t(tq, 4, 8) if q_dim == 3 else _t(1, tq, 4, 8)
        cq = cu_seqlens(list(lens_q)) if cu_q is None else cu_q()
        ck = cu_seqlens(list(lens_k)) if cu_k is None else cu_k()
        return llama_fast.flash_attn_varlen(q, _t(tk, 2, 8), _t(tk, 2, 8), cq, ck, max_q, max_k, **kwargs)

    return call


def _cu(values, dtype=torch.int32):
    return lambda: torch.tensor(values, dtype=dtype, device=DEVICE)


def _decode(q_shape=(2, 1, 4, 8), cache_shape=(2, 6, 2, 8), seqlens=None, *, grad=False, **kwargs):
    def call():
        q = _t(*q_shape).requires_grad_(grad)
        lens = torch.tensor([3, 6], dtype=torch.int32, device=DEVICE) if seqlens is None else seqlens()
        return llama_fast.flash_decode(q, _t(*cache_shape), _t(*cache_shape), lens, **kwargs)

    return call


BAD_INPUTS = [
    # (description, call, exception, message pattern)
    ("q float64", _attn(q_dtype=torch.float64), TypeError, r"q must be float32, float16 or bfloat16, got torch\.float64"),
    ("q integer", lambda: llama_fast.flash_attn(torch.ones(1, 4, 4, 8, dtype=torch.int32, device=DEVICE), _t(1, 6, 2, 8), _t(1, 6, 2, 8)),
     TypeError, r"q must be float32, float16 or bfloat16, got torch\.int32"),
    ("q not a tensor", lambda: llama_fast.flash_attn([[1.0]], _t(1, 6, 2, 8), _t(1, 6, 2, 8)), TypeError, "q must be a torch.Tensor, got list"),
    ("q fp16, k and v bf16", _attn(q_dtype=torch.float16, k_dtype=torch.bfloat16), TypeError, "q and k and v must have the same dtype"),
    ("v dtype differs", lambda: llama_fast.flash_attn(_t(1, 4, 4, 8), _t(1, 6, 2, 8), _t(1, 6, 2, 8, dtype=torch.float16)),
     TypeError, "q and k and v must have the same dtype"),
    ("k and v shapes differ", _attn(v_shape=(1, 7, 2, 8)), ValueError, r"k and v must have the same shape, got \(1, 6, 2, 8\) and \(1, 7, 2, 8\)"),
    ("head dim differs", _attn(k_shape=(1, 6, 2, 16)), ValueError, "q and k must have the same head dim, got 8 and 16"),
    ("head dim 0", _attn(q_shape=(1, 4, 4, 0), k_shape=(1, 6, 2, 0)), ValueError, r"head dim must be in 1\.\.256, got 0"),
    ("head dim 257", _attn(q_shape=(1, 1, 2, 257), k_shape=(1, 1, 1, 257)), ValueError, r"head dim must be in 1\.\.256, got 257"),
    ("Hq not a multiple of Hkv", _attn(q_shape=(1, 4, 3, 8)), ValueError, r"q's heads \(3\) must be a multiple of k's heads \(2\)"),
    ("no kv heads", _attn(k_shape=(1, 6, 0, 8)), ValueError, r"must be a multiple of k's heads \(0\)"),
    ("q 3-d", _attn(q_shape=(4, 4, 8)), ValueError, r"q must have 4 dimensions, got shape \(4, 4, 8\)"),
    ("k 3-d", _attn(k_shape=(6, 2, 8)), ValueError, "k must have 4 dimensions"),
    ("batch differs", _attn(k_shape=(2, 6, 2, 8)), ValueError, r"k must be \(B, Sk, Hkv, D\) with q's B and D"),
    ("causal not a bool", _attn(causal=1), TypeError, "causal must be a bool, got int"),
    ("causal None", _attn(causal=None), TypeError, "causal must be a bool, got NoneType"),
    ("softmax_scale nan", _attn(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number or None, got nan"),
    ("softmax_scale inf", _attn(softmax_scale=float("inf")), ValueError, "softmax_scale must be a finite number or None, got inf"),
    ("softmax_scale bool", _attn(softmax_scale=True), ValueError, "softmax_scale must be a finite number or None"),
    ("softmax_scale tensor", _attn(softmax_scale=torch.tensor(0.5)), ValueError, "softmax_scale must be a finite number or None"),
    # flash_attn_varlen
    ("varlen q 4-d", _varlen(q_dim=4), ValueError, r"q must have 3 dimensions, got shape \(1, 5, 4, 8\)"),
    ("varlen causal not a bool", _varlen(causal="yes"), TypeError, "causal must be a bool, got str"),
    ("varlen softmax_scale nan", _varlen(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number"),
    ("cu_seqlens int64", _varlen(cu_q=_cu([0, 2, 5], torch.int64)), TypeError, r"cu_seqlens_q must be a 1-d int32 tensor of batch \+ 1 >= 2 offsets, got torch\.int64"),
    ("cu_seqlens_k float", _varlen(cu_k=_cu([0.0, 2.0, 5.0], torch.float32)), TypeError, "cu_seqlens_k must be a 1-d int32 tensor"),
    ("cu_seqlens one offset", _varlen(lens_q=(5,), lens_k=(5,), cu_q=_cu([5]), cu_k=_cu([5]), max_q=5, max_k=5), TypeError, r"cu_seqlens_q must be a 1-d int32 tensor of batch \+ 1 >= 2"),
    ("cu_seqlens 2-d", _varlen(cu_q=_cu([[0, 2, 5]])), TypeError, "cu_seqlens_q must be a 1-d int32 tensor"),
    ("cu_seqlens lengths differ", _varlen(cu_k=_cu([0, 1, 2, 5])), ValueError, "cu_seqlens_q and cu_seqlens_k must have the same length"),
    ("cu_seqlens not rising", _varlen(cu_q=_cu([0, 4, 3, 5]), cu_k=_cu([0, 1, 2, 5])), ValueError,
     r"cu_seqlens_q must rise from 0 to the packed length 5, got \[0, 4, 3, 5\]"),
    ("cu_seqlens not from 0", _varlen(cu_k=_cu([1, 2, 5])), ValueError, r"cu_seqlens_k must rise from 0 to the packed length 5"),
    ("cu_seqlens short of the packed length", _varlen(cu_q=_cu([0, 2, 4])), ValueError, r"cu_seqlens_q must rise from 0 to the packed length 5, got \[0, 2, 4\]"),
    ("cu_seqlens past the packed length", _varlen(cu_k=_cu([0, 3, 6])), ValueError, r"cu_seqlens_k must rise from 0 to the packed length 5"),
    ("max_seqlen_q too small", _varlen(max_q=2), ValueError, r"max_seqlen_q \(2\) is less than the longest sequence \(3\)"),
    ("max_seqlen_k too small", _varlen(lens_k=(1, 7), max_k=6), ValueError, r"max_seqlen_k \(6\) is less than the longest sequence \(7\)"),
    ("max_seqlen negative", _varlen(max_q=-1), ValueError, "max_seqlen_q must be an int >= 0, got -1"),
    ("max_seqlen float", _varlen(max_k=3.0), ValueError, "max_seqlen_k must be an int >= 0, got 3.0"),
    # flash_decode
    ("decode q 3-d", _decode(q_shape=(2, 4, 8)), ValueError, "q must have 4 dimensions"),
    ("decode cache dtype", lambda: llama_fast.flash_decode(_t(2, 1, 4, 8), _t(2, 6, 2, 8, dtype=torch.float16), _t(2, 6, 2, 8, dtype=torch.float16),
                                                          torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)),
     TypeError, "q and k_cache and v_cache must have the same dtype"),
    ("decode cache batch differs", _decode(cache_shape=(3, 6, 2, 8)), ValueError, r"k_cache must be \(B, Smax, Hkv, D\) with q's B and D"),
    ("decode Hq not a multiple", _decode(q_shape=(2, 1, 3, 8)), ValueError, r"q's heads \(3\) must be a multiple of k_cache's heads \(2\)"),
    ("cache_seqlens int64", _decode(seqlens=_cu([3, 6], torch.int64)), TypeError, r"cache_seqlens must be an int32 tensor of shape \(B,\)=\(2,\), got torch\.int64"),
    ("cache_seqlens wrong shape", _decode(seqlens=_cu([3, 6, 1])), TypeError, r"cache_seqlens must be an int32 tensor of shape \(B,\)=\(2,\), got torch\.int32 \(3,\)"),
    ("cache_seqlens 2-d", _decode(seqlens=_cu([[3], [6]])), TypeError, "cache_seqlens must be an int32 tensor of shape"),
    ("cache_seqlens a list", _decode(seqlens=lambda: [3, 6]), TypeError, "cache_seqlens must be an int32 tensor"),
    ("num_splits 0", _decode(num_splits=0), ValueError, "num_splits must be None or an int >= 1, got 0"),
    ("num_splits negative", _decode(num_splits=-2), ValueError, "num_splits must be None or an int >= 1, got -2"),
    ("num_splits bool", _decode(num_splits=True), ValueError, "num_splits must be None or an int >= 1, got True"),
    ("decode softmax_scale inf", _decode(softmax_scale=float("-inf")), ValueError, "softmax_scale must be a finite number"),
    ("decode with grad", _decode(grad=True), ValueError, r"flash_decode is inference only: call it under torch\.no_grad\(\)"),
]


@pytest.mark.parametrize("call,exc,pattern", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix with a CPU tensor")
def test_device_mix():
    with pytest.raises(ValueError, match="same device"):
        llama_fast.flash_attn(_t(1, 4, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8))
    with pytest.raises(ValueError, match="cu_seqlens_q must be on q's device"):
        cpu = torch.tensor([0, 5], dtype=torch.int32)
        llama_fast.flash_attn_varlen(_t(5, 4, 8), _t(5, 2, 8), _t(5, 2, 8), cpu, cu_seqlens([5]), 5, 5)
    with pytest.raises(ValueError, match="cache_seqlens must be on q's device"):
        llama_fast.flash_decode(_t(1, 1, 4, 8), _t(1, 6, 2, 8), _t(1, 6, 2, 8), torch.tensor([3], dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# The cuda backend's own kernels. On the CPU the cases above use small head dims and
# float32, which the cuda backend routes to Triton (the dispatcher's ROUTES); these reach its
# kernels (flash_attn: 16-bit dtypes, head dims 64 and 128; flash_decode: any head dim up
# to 256, up to 64 query rows per kv head) across their tile boundaries: on a GPU, or on
# the CPU under the emulator of the CUDA kernels (tests/cuda_emulator, see conftest.py).
# Forward only: the cuda backend's attention backward is Triton's.

CUDA = [b for b in BACKENDS if b == "cuda"]
F16, BF16 = torch.float16, torch.bfloat16

CUDA_ATTN_CASES = {  # name: (b, sq, sk, hq, hkv, d, dtype, causal)
    "two_query_blocks_gqa": (1, 200, 200, 4, 2, 64, BF16, True),
    "queries_after_a_prefix": (2, 37, 150, 2, 1, 128, F16, True),
    "more_queries_than_keys": (1, 150, 70, 3, 1, 64, F16, True),  # the first 80 rows see no key
    "full_d128": (1, 129, 65, 2, 2, 128, BF16, False),
    "full_gqa4_f16": (1, 65, 130, 4, 1, 64, F16, False),
    "single_token": (3, 1, 1, 2, 1, 64, BF16, True),
}


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("case", list(CUDA_ATTN_CASES))
def test_cuda_attention_tiles(backend, case):
    b, sq, sk, hq, hkv, d, dtype, causal = CUDA_ATTN_CASES[case]
    out = check_attn(backend, *qkv(b, sq, sk, hq, hkv, d, dtype), causal=causal, grads=False)
    if causal and sq > sk:
        assert torch.equal(out[:, : sq - sk].float(), torch.zeros_like(out[:, : sq - sk].float()))


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("layout", ["fused_qkv", "padded_rows", "mixed"])
def test_cuda_attention_layouts(backend, layout):
    """16-byte aligned rows go by cp.async; padded rows (misaligned) by the element-wise path."""
    q, k, v = make_layout(layout, 2, 70, 4, 2, 64, BF16)
    check_attn(backend, q, k, v, causal=True, grads=False)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_attention_varlen(backend, causal):
    """Sequences across query and key blocks, one without queries and one without keys."""
    lens_q, lens_k = [5, 130, 0, 64, 2], [9, 130, 3, 64, 0]
    hq, hkv, d, dtype = 4, 2, 128, BF16
    q = randn((sum(lens_q), hq, d), dtype)
    k, v = randn((sum(lens_k), hkv, d), dtype), randn((sum(lens_k), hkv, d), dtype)
    with llama_fast.backend(backend):
        out = llama_fast.flash_attn_varlen(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k),
                                           causal=causal)
    expected = varlen_reference(f64(q), f64(k), f64(v), lens_q, lens_k, causal, 1.0 / math.sqrt(d))
    assert_close(out, expected, dtype, "out")


CUDA_DECODE_CASES = {  # name: (hq, hkv, d, sq, dtype, num_splits, lengths, smax, pad)
    "64_rows_per_kv_head": (32, 2, 128, 4, BF16, 4, [0, 1, 64, 65, 200], 200, 0),
    "head_dim_256_f16": (8, 1, 256, 1, F16, 2, [3, 150], 150, 0),
    # Caches in padded rows, starting `pad` elements into them: K/V copies of 8, 4, 2 bytes.
    "8_byte_copies": (4, 2, 64, 2, BF16, 2, [70, 129], 140, 4),
    "4_byte_copies": (4, 1, 128, 1, F16, 3, [1, 97], 100, 2),
    "2_byte_copies": (2, 1, 64, 3, BF16, 1, [40, 5], 64, 1),
}


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("case", list(CUDA_DECODE_CASES))
def test_cuda_decode_tiles(backend, case):
    hq, hkv, d, sq, dtype, splits, lengths, smax, pad = CUDA_DECODE_CASES[case]
    q, k, v, seqlens = make_cache(len(lengths), smax, hq, hkv, d, sq, lengths, dtype)
    if pad:
        k, v = (torch.cat([t.new_zeros(*t.shape[:-1], pad), t, t.new_zeros(*t.shape[:-1], 1)], -1)[..., pad : pad + d]
                for t in (k, v))
    check_decode(backend, q, k, v, seqlens, num_splits=splits)
