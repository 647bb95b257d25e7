"""fused_linear_cross_entropy, every backend, against a float64 F.linear + F.cross_entropy:
the loss and the gradients of hidden, weight and bias; odd sizes, ignored tokens, every
reduction, label smoothing, each dtype, non-contiguous inputs, tied weights, torch.compile,
bad inputs; and the memory it saves (measured in fresh processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_fast
from llama_fast import reference
from _helpers import BACKENDS, DEVICE, DTYPES, TOLERANCE, assert_close, f64, randn

CE = llama_fast.fused_linear_cross_entropy


def make_target(shape, vocab, ignore_frac=0.2, ignore_index=-100):
    target = torch.randint(0, vocab, shape, device=DEVICE)
    if ignore_frac:
        target[torch.rand(shape, device=DEVICE) < ignore_frac] = ignore_index
    return target


def check_ce(backend, hidden, weight, target, *, bias=None, reduction="mean", label_smoothing=0.0,
             ignore_index=-100, chunk_size=None, dtype=None, grad_accumulation="auto"):
    """Loss and the three gradients, for a random upstream gradient, against float64."""
    dtype = dtype or hidden.dtype
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    if bias is not None:
        bias = bias.detach().requires_grad_()
    with llama_fast.backend(backend):
        loss = CE(hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, chunk_size=chunk_size, grad_accumulation=grad_accumulation)
    h64, w64 = f64(hidden, True), f64(weight, True)
    b64 = f64(bias, True) if bias is not None else None
    logits64 = F.linear(h64, w64, b64)
    # flatten(0, -2) as the op's definition reads, written so that 1-d hidden works too
    loss64 = F.cross_entropy(logits64.reshape(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        loss64 = loss64.view(target.shape)
    assert loss.dtype == hidden.dtype and loss.shape == loss64.shape
    # The loss is a log-sum-exp of logits: its error is relative to the logits' size.
    logit_scale = logits64.detach().abs().max().item() if logits64.numel() else 1.0
    if loss64.isnan().all() and loss64.numel():
        assert loss.isnan().all(), "mean over no tokens must be NaN, as in PyTorch"
    else:
        assert_close(loss, loss64, dtype, "loss", scale=max(logit_scale, loss64.detach().abs().max().item()))
    upstream = torch.randn_like(loss) if loss.numel() else torch.ones_like(loss)
    loss.backward(upstream)
    loss64.backward(f64(upstream))
    # The float32 softmax of logits of size L has a relative error of about eps * L in each
    # probability; the gradients, probabilities times the other operand times each token's
    # weight in the loss, inherit it. It dominates when the logits are in the hundreds.
    valid = max(1, int((target != ignore_index).sum()))
    per_token = (upstream.abs().max().item() if upstream.numel() else 1.0) / (valid if reduction == "mean" else 1)
    softmax_error = torch.finfo(torch.float32).eps * logit_scale * per_token / TOLERANCE[dtype][1]

    def grad_scale(expected, bound_of_sum):
        return max(expected.abs().max().item() if expected.numel() else 0.0, softmax_error * bound_of_sum)

    rows = hidden.reshape(-1, hidden.shape[-1]).shape[0]  # a vocabulary row's gradient sums over the tokens
    assert_close(hidden.grad, h64.grad, dtype, "grad hidden", scale=grad_scale(h64.grad, w64.abs().max().item()))
    assert_close(weight.grad, w64.grad, dtype, "grad weight",
                 scale=grad_scale(w64.grad, rows * h64.abs().max().item()))
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    if bias is not None:
        assert_close(bias.grad, b64.grad, dtype, "grad bias", scale=grad_scale(b64.grad, rows))
        assert bias.grad.dtype == bias.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reductions_and_smoothing(backend, reduction, label_smoothing):
    n, h, v = 23, 8, 77  # V not a multiple of any block; 6 chunks of 4 (the last one short)
    check_ce(backend, randn((n, h), torch.float32), randn((v, h), torch.float32), make_target((n,), v),
             bias=randn((v,), torch.float32), reduction=reduction, label_smoothing=label_smoothing, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_dtypes(backend, dtype, bias):
    """Logits are rounded to the dtype by the matmul, as F.linear rounds them; gradients come
    back in each tensor's dtype. 16-bit weights sum their gradient over chunks in float32."""
    n, h, v = 2 * 3 * 4, 16, 300
    check_ce(backend, randn((2, 3 * 4, h), dtype), randn((v, h), dtype) * 0.5, make_target((2, 3 * 4), v),
             bias=randn((v,), dtype) if bias else None, label_smoothing=0.05, chunk_size=5)
    assert n % 5  # a short last chunk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_accumulation", ["auto", "float32", "weight_dtype"])
@pytest.mark.parametrize("chunk", [2, 7], ids=["12-chunks", "4-chunks"])
def test_weight_grad_accumulation(backend, dtype, grad_accumulation, chunk):
    """The weight gradient summed over chunks in float32 or in the weight's dtype ("auto":
    the weight's up to 8 chunks, float32 beyond): within the dtype's tolerance of float64
    either way, with a bias and label smoothing."""
    n, h, v = 23, 16, 300
    check_ce(backend, randn((n, h), dtype), randn((v, h), dtype) * 0.5, make_target((n,), v),
             bias=randn((v,), dtype), label_smoothing=0.1, chunk_size=chunk, grad_accumulation=grad_accumulation)


def test_weight_grad_accumulator_rule():
    """Where the weight gradient is summed: the weight's dtype for one chunk, a float32
    weight, "weight_dtype", "auto" up to WEIGHT_DTYPE_MAX_CHUNKS chunks; float32 otherwise."""
    limit = reference.WEIGHT_DTYPE_MAX_CHUNKS
    assert limit == 8
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = torch.empty(3, 2, dtype=dtype)
        for chunks in (1, 2, limit, limit + 1, 64):
            for mode in reference.GRAD_ACCUMULATIONS:
                buf = reference.weight_grad_accumulator(w, chunks, mode)
                in_weight_dtype = (chunks == 1 or dtype == torch.float32 or mode == "weight_dtype"
                                   or (mode == "auto" and chunks <= limit))
                assert buf.shape == w.shape and buf.dtype == (dtype if in_weight_dtype else torch.float32), (
                    dtype, chunks, mode, buf.dtype)


def test_weight_dtype_sum_error_against_float64():
    """The numerics behind "auto" (bf16, torch backend, against float64 of the same bf16
    inputs; relative Frobenius error of the weight gradient): the float32 sum's error does
    not depend on the chunk count (one rounding at the end); the weight-dtype sum's grows
    with it, stays within 2x of the float32 sum's up to WEIGHT_DTYPE_MAX_CHUNKS chunks, and
    passes 2x well before 64."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 4096, 64, 512
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5 * 2).bfloat16()
    target = torch.randint(0, v, (n,), generator=g)
    w64 = f64(weight, True)
    F.cross_entropy(F.linear(f64(hidden), w64), target).backward()

    def error(chunks, mode):
        w = weight.clone().requires_grad_()
        with llama_fast.backend("torch"):
            CE(hidden, w, target, chunk_size=n // chunks, grad_accumulation=mode).backward()
        return ((w.grad.double() - w64.grad).norm() / w64.grad.norm()).item()

    float32 = [error(c, "float32") for c in (1, 8, 64)]
    assert max(float32) <= 1.05 * min(float32), float32
    ratios = {c: error(c, "weight_dtype") / float32[0] for c in (2, reference.WEIGHT_DTYPE_MAX_CHUNKS, 64)}
    print("weight-dtype sum error / float32 sum error:", ratios)
    assert ratios[2] <= ratios[reference.WEIGHT_DTYPE_MAX_CHUNKS] <= 2.0 < ratios[64], ratios


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,chunk", [(1, 1, 1, None), (1, 5, 3, None), (7, 1, 2, 3), (5, 3, 4097, 2),
                                         (3, 4, 8192, None), (9, 2, 5, 1)])
def test_odd_sizes(backend, n, h, v, chunk):
    """A single token, H = 1, V = 1 (the loss is 0), V just past a tile and a multiple of it,
    one-token chunks."""
    check_ce(backend, randn((n, h), torch.float32), randn((v, h), torch.float32), make_target((n,), v, 0.0),
             chunk_size=chunk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_whole_chunks(backend, reduction):
    """Chunks where every token is ignored (the gradient rows must be zeros, not NaN), and a
    custom ignore_index (any value; here a valid class id is never ignored by accident)."""
    n, h, v = 12, 6, 19
    target = make_target((n,), v, 0.0)
    target[0:4] = -7  # chunk 0 entirely ignored
    target[8:12] = -7  # and chunk 2
    check_ce(backend, randn((n, h), torch.float32), randn((v, h), torch.float32), target, ignore_index=-7,
             reduction=reduction, label_smoothing=0.2, chunk_size=4, bias=randn((v,), torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_token_ignored(backend, reduction):
    """As PyTorch: "mean" over no tokens is NaN (0 / 0), "sum" 0, "none" zeros; every gradient is 0."""
    n, h, v = 6, 4, 9
    check_ce(backend, randn((n, h), torch.float32), randn((v, h), torch.float32),
             torch.full((n,), -100, device=DEVICE), reduction=reduction, label_smoothing=0.1, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_padded", "transposed", "strided_last_dim", "weight_transposed"])
def test_non_contiguous(backend, layout):
    b, t, h, v = 2, 5, 12, 33
    weight = randn((v, h), torch.float32)
    if layout == "row_padded":
        hidden = randn((b, t, h + 3), torch.float32)[..., 1 : h + 1]
    elif layout == "transposed":
        hidden = randn((t, b, h), torch.float32).transpose(0, 1)
    elif layout == "strided_last_dim":
        hidden = randn((b, t, h), torch.float32, strided=True)
    else:
        hidden = randn((b, t, h), torch.float32)
        weight = randn((h, v), torch.float32).t()
    assert not (hidden.is_contiguous() and weight.is_contiguous())
    target = make_target((t, b), v).t()  # a non-contiguous target too
    check_ce(backend, hidden, weight, target, reduction="none", chunk_size=3)


def test_large_logits_are_stable():
    """Logits in the hundreds: the float32 softmax must not overflow."""
    for backend in BACKENDS:
        hidden = randn((6, 4), torch.float32) * 30
        check_ce(backend, hidden, randn((50, 4), torch.float32) * 10, make_target((6,), 50), chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weights(backend):
    """The weight is the embedding's Parameter (Llama 3.2 1B/3B): its gradient is the sum
    of the embedding's and the loss head's."""
    v, h, n = 40, 8, 10
    emb = torch.nn.Embedding(v, h).to(DEVICE)
    tokens = torch.randint(0, v, (2, n), device=DEVICE)
    target = make_target((2, n), v)
    with llama_fast.backend(backend):
        loss = CE(torch.tanh(emb(tokens)), emb.weight, target, chunk_size=6)
    loss.backward()
    w64 = f64(emb.weight, True)
    logits = F.linear(torch.tanh(F.embedding(tokens, w64)), w64)
    F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    assert_close(emb.weight.grad, w64.grad, torch.float32, "tied weight grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    """Only what requires a gradient gets one (a frozen lm_head, LoRA-style); under no_grad
    the loss is the same and no gradient is computed."""
    n, h, v = 9, 5, 21
    hidden, weight = randn((n, h), torch.float32), randn((v, h), torch.float32)
    target = make_target((n,), v)
    expected = F.cross_entropy(F.linear(f64(hidden), f64(weight)), target)
    x = hidden.clone().requires_grad_()
    with llama_fast.backend(backend):
        with torch.no_grad():
            assert_close(CE(hidden, weight, target, chunk_size=4), expected, torch.float32, "no_grad loss")
        loss = CE(x, weight, target, chunk_size=4)
    loss.backward()
    x64 = f64(hidden, True)
    F.cross_entropy(F.linear(x64, f64(weight)), target).backward()
    assert weight.grad is None
    assert_close(x.grad, x64.grad, torch.float32, "grad hidden")


def test_a_second_backward_raises_instead_of_scaling_twice():
    """The backward scales the gradients the forward saved in place (a copy would add a
    weight's worth of memory at the peak): backwarding the same graph twice must raise, not
    return gradients scaled twice."""
    hidden = randn((4, 3), torch.float32).requires_grad_()
    with llama_fast.backend("torch"):
        loss = CE(hidden, randn((5, 3), torch.float32), make_target((4,), 5, 0.0), reduction="sum")
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backends_agree_and_default_chunk():
    """The default chunk size comes from the shapes; every backend gives the same loss."""
    assert reference.linear_ce_chunk_rows(16384, 4096, 128256) == 1024  # the minimum
    assert reference.linear_ce_chunk_rows(65536, 4096, 128256) == 4096  # ~N * H / V, a power of two
    assert reference.linear_ce_chunk_rows(100, 4096, 128256) == 100  # never past N
    assert reference.linear_ce_chunk_rows(4096, 1024, 32000) == 1024
    n, h, v = 30, 6, 45
    hidden, weight, target = randn((n, h), torch.float32), randn((v, h), torch.float32), make_target((n,), v)
    losses = []
    for backend in BACKENDS:
        with llama_fast.backend(backend):
            losses.append(CE(hidden, weight, target, reduction="none"))
    for other in losses[1:]:
        torch.testing.assert_close(other, losses[0], rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    h=st.integers(1, 9),
    v=st.integers(1, 90),
    chunk=st.one_of(st.none(), st.integers(1, 7)),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.3, 1.0]),
    with_bias=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_random_shapes(lead, h, v, chunk, reduction, smoothing, with_bias, backend):
    shape = tuple(lead)
    check_ce(backend, randn(shape + (h,), torch.float32), randn((v, h), torch.float32), make_target(shape, v),
             bias=randn((v,), torch.float32) if with_bias else None, reduction=reduction,
             label_smoothing=smoothing, chunk_size=chunk)


def test_out_of_range_target_raises_on_cpu():
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 5\)"):
        CE(torch.randn(3, 2), torch.randn(5, 2), torch.tensor([0, 5, 1]))


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def _ids(*shape, dtype=torch.int64):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


BAD_INPUTS = [
    ("hidden not a tensor", lambda: CE([1.0], _t(3, 1), _ids()), TypeError, "hidden must be a torch.Tensor"),
    ("hidden float64", lambda: CE(_t(2, 4, dtype=torch.float64), _t(3, 4), _ids(2)), TypeError, "hidden must be float32"),
    ("hidden scalar", lambda: CE(_t(), _t(3, 1), _ids()), ValueError, "at least 1 dimension"),
    ("weight 1-d", lambda: CE(_t(2, 4), _t(4), _ids(2)), ValueError, "weight must have 2 dimensions"),
    ("hidden/weight size", lambda: CE(_t(2, 4), _t(3, 5), _ids(2)), ValueError, r"weight must be \(V, H\) with H"),
    ("weight (H, V) by mistake", lambda: CE(_t(2, 4), _t(4, 3), _ids(2)), ValueError, r"weight must be \(V, H\)"),
    ("dtype mix", lambda: CE(_t(2, 4, dtype=torch.bfloat16), _t(3, 4), _ids(2)), TypeError,
     "hidden and weight must have the same dtype"),
    ("target float", lambda: CE(_t(2, 4), _t(3, 4), _t(2)), TypeError, "target must be int64"),
    ("target int32", lambda: CE(_t(2, 4), _t(3, 4), _ids(2, dtype=torch.int32)), TypeError, "target must be int64"),
    ("target not a tensor", lambda: CE(_t(2, 4), _t(3, 4), [0, 1]), TypeError, "target must be a torch.Tensor"),
    ("target shape", lambda: CE(_t(2, 4), _t(3, 4), _ids(3)), ValueError, "target must have hidden's shape"),
    ("target not broadcast", lambda: CE(_t(2, 5, 4), _t(3, 4), _ids(5)), ValueError, "target must have hidden's shape"),
    ("target flattened", lambda: CE(_t(2, 5, 4), _t(3, 4), _ids(10)), ValueError, "target must have hidden's shape"),
    ("bias size", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), bias=_t(4)), ValueError, "bias must have V"),
    ("bias 2-d", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), bias=_t(1, 3)), ValueError, "bias must have 1 dimensions"),
    ("bias dtype", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), bias=_t(3, dtype=torch.float16)), TypeError,
     "hidden and bias must have the same dtype"),
    ("reduction", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), reduction="avg"), ValueError, "reduction must be one of"),
    ("label_smoothing > 1", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), label_smoothing=1.5), ValueError,
     "label_smoothing must be"),
    ("label_smoothing < 0", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), label_smoothing=-0.1), ValueError,
     "label_smoothing must be"),
    ("label_smoothing nan", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), label_smoothing=float("nan")), ValueError,
     "label_smoothing must be"),
    ("ignore_index float", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), ignore_index=-1.0), TypeError,
     "ignore_index must be an int"),
    ("chunk_size 0", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), chunk_size=0), ValueError, "chunk_size must be"),
    ("empty vocabulary", lambda: CE(_t(2, 4), _t(0, 4), _ids(2)), ValueError, "vocabulary must be at least 1"),
    ("grad_accumulation", lambda: CE(_t(2, 4), _t(3, 4), _ids(2), grad_accumulation="bf16"), ValueError,
     "grad_accumulation must be one of"),
]


@pytest.mark.parametrize("call,exc,pattern", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ---------------------------------------------------------------------------------------
# torch.compile


def _train_step(emb, norm_w, tokens, target, fused):
    """A tied-embedding model's loss head: embed, a norm, then the loss on the embedding's weight."""
    hidden = llama_fast.rms_norm(emb(tokens), norm_w)
    if fused:
        return CE(hidden, emb.weight, target, chunk_size=8, label_smoothing=0.1)
    logits = F.linear(hidden, emb.weight)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=0.1)


def test_fullgraph_compile_of_a_training_step():
    torch._dynamo.reset()
    v, h = 64, 16
    tokens = torch.randint(0, v, (2, 9), device=DEVICE)
    target = make_target((2, 9), v)
    results = []
    for fused, compiled in ((False, False), (True, True)):
        torch.manual_seed(1)
        emb = torch.nn.Embedding(v, h).to(DEVICE)
        norm_w = torch.nn.Parameter(1 + 0.1 * torch.randn(h, device=DEVICE))
        step = torch.compile(_train_step, fullgraph=True) if compiled else _train_step
        loss = step(emb, norm_w, tokens, target, fused)
        loss.backward()
        results.append((loss, emb.weight.grad, norm_w.grad))
    for (a, b, what) in zip(results[1], results[0], ("loss", "grad weight", "grad norm")):
        assert_close(a, b.to(torch.float64), torch.float32, what)


def test_fullgraph_compile_reduction_none_with_bias():
    """reduction="none": the backward is a custom op of its own (it recomputes), compiled too."""
    torch._dynamo.reset()
    v, h = 30, 8

    def step(hidden, weight, bias, target, upstream):
        losses = CE(hidden, weight, target, bias=bias, reduction="none", chunk_size=4)
        return (losses * upstream).sum()

    inputs = [randn((2, 5, h), torch.float32), randn((v, h), torch.float32), randn((v,), torch.float32)]
    target, upstream = make_target((2, 5), v), torch.randn(2, 5, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = torch.compile(step, fullgraph=True)(*leaves, target, upstream)
    loss.backward()
    h64, w64, b64 = (f64(t, True) for t in inputs)
    losses64 = F.cross_entropy(F.linear(h64, w64, b64).flatten(0, 1), target.flatten(), reduction="none")
    loss64 = (losses64.view(2, 5) * f64(upstream)).sum()
    loss64.backward()
    assert_close(loss, loss64, torch.float32, "loss")
    for leaf, ref, what in zip(leaves, (h64, w64, b64), ("hidden", "weight", "bias")):
        assert_close(leaf.grad, ref.grad, torch.float32, f"grad {what}")


# ---------------------------------------------------------------------------------------
# memory: peak resident memory of forward + backward, each in a fresh process

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    import llama_fast
    torch.set_num_threads(2)
    T, H, V = 4096, 1024, 32000
    torch.manual_seed(0)
    hidden = torch.randn(T, H, requires_grad=True)
    weight = torch.randn(V, H).mul_(0.02).requires_grad_()
    target = torch.randint(0, V, (T,))
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    def step(hidden, weight, target):
        if sys.argv[1] == "fused":
            with llama_fast.backend("torch"):
                loss = llama_fast.fused_linear_cross_entropy(hidden, weight, target)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight), target)
        loss.backward()
        return loss
    # A tiny call first: the first custom-op call imports parts of torch (over 100 MB of
    # resident memory that has nothing to do with tensors).
    step(torch.randn(2, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True), torch.tensor([0, 2]))
    before = rss()
    loss = step(hidden, weight, target)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - before, "loss": loss.item(), "gw": weight.grad.double().norm().item()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_is_a_fraction_of_eager():
    """T=4096, H=1024, V=32000 float32 on the CPU: the unfused code holds the logits, their
    log-softmax and their gradient (0.5 GB each); the fused op one chunk. Measured as peak
    resident memory above what the inputs take, in a fresh process per variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = {}
    for variant in ("eager", "fused"):
        done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, variant], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = out["fused"]["extra"] / out["eager"]["extra"]
    print(f"peak extra memory: eager {out['eager']['extra'] / 2**20:.0f} MiB, "
          f"fused {out['fused']['extra'] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert out["fused"]["loss"] == pytest.approx(out["eager"]["loss"], rel=1e-4)
    assert out["fused"]["gw"] == pytest.approx(out["eager"]["gw"], rel=1e-3)
    assert ratio <= 0.25
