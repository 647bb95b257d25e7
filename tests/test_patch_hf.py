"""llama_fast.patch on Hugging Face's LlamaForCausalLM (transformers 5.x), and llama_fast.nn.

A tiny random model (hidden 64, 2 layers, 4 heads, 2 KV heads, Llama 3.1 rope scaling) in
float32 on the CPU. The patched model is compared with an unpatched deep copy of itself:
logits, loss, every gradient, greedy generate() with the KV cache, padded batches, a short
AdamW run; and the fused loss (kind "cross_entropy": in training with labels, the loss from
the hidden states and logits None) against HF's lm_head + ForCausalLMLoss. Most tests force the "torch" backend (fast); the main ones also run the default
"auto" backend, which on the CPU runs the Triton kernels under the interpreter (slow: keep
those shapes small). ``ATTENTION_CALLS`` / ``FUNCTION_CALLS`` show which path served a call,
so a test cannot pass by quietly running the original code.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("llama_fast.patch targets transformers 5.x", allow_module_level=True)

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama as ml  # noqa: E402

import llama_fast  # noqa: E402

# By module path: a package-level export named `patch` (the function) would shadow the module.
lfnn = importlib.import_module("llama_fast.nn")
lfp = importlib.import_module("llama_fast.patching")
lfha = importlib.import_module("llama_fast.hf_attention")

ORIGINAL_ROPE = ml.apply_rotary_pos_emb
ORIGINAL_FORWARD = LlamaForCausalLM.forward
FORWARD_KEY = f"{ml.__name__}:LlamaForCausalLM.forward"
# transformers 5.24 renamed the forward's past_key_values to cache (the old name is deprecated)
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
ROPE_KEY = f"{ml.__name__}:apply_rotary_pos_emb"
VOCAB = 128


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    model = LlamaForCausalLM(tiny_config(**overrides)).to(dtype)
    # post_init gives RMSNorm weights of ones; random ones test that the weight is applied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def pair():
    """(reference, patched-to-be deep copy); whatever the test patched is unpatched after."""
    made = []

    def make(dtype=torch.float32, **overrides):
        ref = tiny_model(dtype, **overrides)
        model = copy.deepcopy(ref)
        made.append(model)
        return ref, model

    lfp.ATTENTION_CALLS.clear()
    lfp.FUNCTION_CALLS.clear()
    lfp.LOSS_CALLS.clear()
    yield make
    for model in made:
        lfp.unpatch(model)


BACKENDS = {"torch": lambda: llama_fast.backend("torch"), "auto": contextlib.nullcontext}


def assert_close(actual, expected, what, rtol=1e-4, atol=1e-4):
    """Within atol * max|expected| + rtol * |expected|, elementwise."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shapes {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs()
    bound = atol * max(scale, 1e-12) + rtol * e.abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g} (scale {scale:.3g})"


def tokens(b, s, low=3):
    return torch.randint(low, VOCAB, (b, s))


def left_padded_mask(lengths, s):
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, s - n:] = 1
    return mask


# ---------------------------------------------------------------------------------------
# The report, flags, idempotence, unpatch


def test_report_lists_what_was_replaced(pair):
    _, model = pair()
    report = lfp.patch(model)
    assert report.counts == {"rms_norm": 5, "rope": 2, "swiglu": 2, "attention": 1, "cross_entropy": 1}
    assert not report.already and not report.left_alone
    paths = {(c.kind, c.path) for c in report.replaced}
    assert ("rms_norm", "model.norm") in paths and ("swiglu", "model.layers.1.mlp") in paths
    assert ("rope", "model.layers.0.self_attn") in paths
    assert ("attention", "config._attn_implementation") in paths
    assert ("cross_entropy", "") in paths  # the model's own forward
    assert "rms_norm 5" in str(report) and "model.layers.0.input_layernorm" in str(report)
    assert type(model.model.norm) is lfnn.RMSNorm
    assert type(model.model.layers[0].mlp) is lfnn.SwiGLUMLP
    assert model.config._attn_implementation == lfp.ATTN_IMPLEMENTATION
    assert ml.apply_rotary_pos_emb is not ORIGINAL_ROPE
    assert LlamaForCausalLM.forward is not ORIGINAL_FORWARD


def test_patch_shares_parameters_and_keeps_the_state_dict(pair):
    ref, model = pair()
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    lfp.patch(model)
    after = dict(model.named_parameters())
    assert list(model.state_dict()) == keys
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    model.load_state_dict(ref.state_dict())  # still loads, same names and shapes


@pytest.mark.parametrize("off", lfp.KINDS)
def test_patch_with_one_kind_off(pair, off):
    ref, model = pair()
    report = lfp.patch(model, **{off: False})
    assert report.counts[off] == 0
    assert any(s.kind == off and "disabled" in s.reason for s in report.left_alone)
    assert all(n > 0 for k, n in report.counts.items() if k != off)
    assert (type(model.model.norm) is ml.LlamaRMSNorm) == (off == "rms_norm")
    assert (type(model.model.layers[0].mlp) is ml.LlamaMLP) == (off == "swiglu")
    assert (model.config._attn_implementation == "sdpa") == (off == "attention")
    ids = tokens(2, 8)
    with llama_fast.backend("torch"), torch.no_grad():
        assert_close(model(ids).logits, ref(ids).logits, f"logits with {off}=False")
    fused_rope = lfp.FUNCTION_CALLS[ROPE_KEY, "llama_fast"]
    assert (fused_rope == 0) == (off == "rope")
    assert (sum(lfp.ATTENTION_CALLS.values()) == 0) == (off == "attention")


def test_patching_twice_is_idempotent(pair):
    _, model = pair()
    first = lfp.patch(model)
    modules = {name: m for name, m in model.named_modules()}
    second = lfp.patch(model)
    assert sum(second.counts.values()) == 0
    assert second.counts_already == first.counts
    assert {name: m for name, m in model.named_modules()} == modules
    assert len(model.model.layers[0].self_attn._forward_pre_hooks) == 1
    # enabling a kind later patches just that kind
    _, other = pair()
    assert lfp.patch(other, swiglu=False).counts["swiglu"] == 0
    again = lfp.patch(other)
    assert again.counts == {"rms_norm": 0, "rope": 0, "swiglu": 2, "attention": 0, "cross_entropy": 0}


def test_unpatch_restores_modules_function_and_outputs_exactly(pair):
    _, model = pair()
    ids = tokens(2, 8)
    with torch.no_grad():
        before = model(ids).logits
    originals = {name: m for name, m in model.named_modules()}
    attn_before = model.config._attn_implementation
    lfp.patch(model)
    with llama_fast.backend("torch"), torch.no_grad():
        model(ids)
    restored = lfp.unpatch(model)
    assert sum(restored.counts.values()) == 5 + 2 + 2 + 1 + 1
    assert {name: m for name, m in model.named_modules()} == originals  # the same objects
    assert all(type(m) is type(originals[n]) for n, m in model.named_modules())
    assert model.config._attn_implementation == attn_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_llama_fast") for m in model.modules() for k in vars(m))
    gc.collect()
    assert ml.apply_rotary_pos_emb is ORIGINAL_ROPE
    assert LlamaForCausalLM.forward is ORIGINAL_FORWARD
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        model.train()
        assert model(ids, labels=ids).logits is not None  # HF's forward again: logits in training
        model.eval()
    assert sum(lfp.unpatch(model).counts.values()) == 0  # nothing left to undo


def test_unpatch_hands_the_originals_the_current_parameters(pair):
    ref, model = pair()
    lfp.patch(model)
    model.load_state_dict(ref.state_dict(), assign=True)  # new Parameter objects, on the patched modules
    lfp.unpatch(model)
    assert model.model.norm.weight is dict(model.named_parameters())["model.norm.weight"]
    assert all(p is q for p, q in zip(model.parameters(), dict(model.named_parameters()).values()))
    with torch.no_grad():
        ids = tokens(1, 6)
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_rope_swap_is_scoped_to_patched_models(pair):
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(1, 6)
    with llama_fast.backend("torch"), torch.no_grad():
        ref(ids)
        assert lfp.FUNCTION_CALLS[ROPE_KEY, "llama_fast"] == 0
        assert lfp.FUNCTION_CALLS[ROPE_KEY, "original"] == 2  # one per layer of the unpatched model
        model(ids)
        assert lfp.FUNCTION_CALLS[ROPE_KEY, "llama_fast"] == 2


def test_models_with_nothing_to_patch_are_reported():
    report = lfp.patch(nn.Sequential(nn.Linear(4, 4)))
    assert sum(report.counts.values()) == 0
    assert any("nothing" in s.reason for s in report.left_alone)


# ---------------------------------------------------------------------------------------
# Numerics against the unpatched model


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_logits_loss_and_every_gradient(pair, backend):
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(2, 8)
    ref.train(), model.train()
    out_ref = ref(ids, labels=ids)
    with BACKENDS[backend]():
        out = model(ids, labels=ids)
        out.loss.backward()
        with torch.no_grad():
            logits = model(ids).logits  # without labels: HF's head, the logits
    out_ref.loss.backward()
    assert lfp.ATTENTION_CALLS["flash_attn"] == 4 and lfp.FUNCTION_CALLS[ROPE_KEY, "llama_fast"] == 4
    assert out.logits is None and lfp.LOSS_CALLS["fused"] == 1  # the fused loss made no logits
    assert_close(logits, out_ref.logits, "logits")
    assert_close(out.loss, out_ref.loss, "loss")
    grads_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, grads_ref[name].grad, f"grad of {name}", rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_left_padded_batch(pair, backend):
    ref, model = pair()
    lfp.patch(model)
    s, lengths = (8, [8, 3]) if backend == "auto" else (12, [12, 9, 2])
    ids = tokens(len(lengths), s)
    mask = left_padded_mask(lengths, s)
    labels = ids.masked_fill(mask == 0, -100)
    ref.train(), model.train()
    out_ref = ref(ids, attention_mask=mask, labels=labels)
    with BACKENDS[backend]():
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
    out_ref.loss.backward()
    assert lfp.ATTENTION_CALLS["flash_attn_varlen"] == 4 and not lfp.ATTENTION_CALLS["flash_attn"]
    assert out.logits is None
    valid = mask.bool()
    assert_close(logits[valid], out_ref.logits[valid], "logits at non-pad positions")
    assert_close(out.loss, out_ref.loss, "loss")
    grads_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, grads_ref[name].grad, f"grad of {name}", rtol=1e-3, atol=1e-4)


def test_padding_anywhere_and_an_all_ones_mask(pair):
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[1, 3:5] = 0  # a hole
    with llama_fast.backend("torch"), torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        ref_out = ref(ids, attention_mask=mask).logits
        valid = mask.bool()
        assert_close(out[valid], ref_out[valid], "logits at non-pad positions")
        lfp.ATTENTION_CALLS.clear()
        ones = torch.ones_like(mask)
        assert_close(model(ids, attention_mask=ones).logits, ref(ids, attention_mask=ones).logits, "all-ones mask")
        assert lfp.ATTENTION_CALLS == {"flash_attn": 2}  # no padding: the plain kernel, not varlen


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_kv_cache_with_queries_shorter_than_keys(pair, padded):
    """A prefix, then 3 tokens over the cache: bottom-right causal, with and without padding."""
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(2, 10)
    mask = left_padded_mask([10, 6] if padded else [10, 10], 10)
    results = []
    with llama_fast.backend("torch"), torch.no_grad():
        for m in (ref, model):
            cache = DynamicCache(config=m.config)
            m(ids[:, :7], attention_mask=mask[:, :7], use_cache=True, **{CACHE_ARG: cache})
            lfp.ATTENTION_CALLS.clear()
            results.append(m(ids[:, 7:], attention_mask=mask, use_cache=True, **{CACHE_ARG: cache}).logits)
    assert_close(results[1], results[0], "logits of the 3 tokens after the cached prefix")
    assert lfp.ATTENTION_CALLS == {"flash_attn_varlen" if padded else "flash_decode": 2}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_greedy_generate_is_identical(pair, backend, padded):
    ref, model = pair()
    lfp.patch(model)
    s, new = (6, 4) if backend == "auto" else (10, 8)
    ids = tokens(2, s)
    mask = left_padded_mask([s, s - 3] if padded else [s, s], s)
    if padded:
        ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    expected = ref.generate(ids, **kw)
    with BACKENDS[backend]():
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected), f"{got[:, s:]} != {expected[:, s:]}"
    decode = "flash_attn_varlen" if padded else "flash_decode"
    assert lfp.ATTENTION_CALLS[decode] >= 2 * (new - 1), lfp.ATTENTION_CALLS  # every decoding step, every layer
    assert not any(k.startswith("sdpa") for k in lfp.ATTENTION_CALLS)


def test_bfloat16_within_bfloat16_tolerance(pair):
    ref, model = pair(torch.bfloat16)
    lfp.patch(model)
    ids = tokens(2, 8)
    mask = left_padded_mask([8, 5], 8)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        with llama_fast.backend("torch"):
            got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert got.dtype == torch.bfloat16
    assert_close(got[valid], expected[valid], "bf16 logits", rtol=3e-2, atol=3e-2)


def test_twenty_adamw_steps_follow_the_unpatched_loss_curve(pair):
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()
    data = [tokens(2, 8) for _ in range(4)]
    curves = []
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
        losses = []
        with llama_fast.backend("torch"):
            for step in range(20):
                ids = data[step % len(data)]
                loss = m(ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        curves.append(torch.tensor(losses))
    expected, got = curves
    assert lfp.LOSS_CALLS == {"fused": 20}  # every step's loss from the fused head
    assert expected[-1] < expected[0] - 0.1, "the run should learn something"
    assert_close(got, expected, "loss curve", rtol=1e-3, atol=1e-3)


def test_gradient_checkpointing(pair):
    ref, model = pair()
    lfp.patch(model)
    for m in (ref, model):
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()  # renamed in 5.x
        m.train()
    ids = tokens(2, 8)
    with llama_fast.backend("torch"):
        model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    assert lfp.FUNCTION_CALLS[ROPE_KEY, "llama_fast"] == 4  # 2 layers, forward and recomputation
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name}", rtol=1e-3, atol=1e-4)


def graph_ops_backend():
    """A torch.compile backend that runs the graph as traced (like "eager") and records the
    ops each graph calls, in order."""
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return backend, ops


def test_torch_compile_traces_the_patched_model(pair):
    """Dynamo traces the scoping hooks and the mask function; under tracing, transformers'
    packed-sequence detection cannot look at the position_ids, and the mask function still
    gives plain causal (None), so the compiled model runs flash_attn, not SDPA."""
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(1, 6)
    backend, ops = graph_ops_backend()
    compiled = torch.compile(model, backend=backend)
    with llama_fast.backend("torch"), torch.no_grad():
        got = compiled(ids, use_cache=False).logits
        expected = ref(ids, use_cache=False).logits
    torch._dynamo.reset()
    assert_close(got, expected, "compiled logits")
    # (the call counters stay out of compiled code: the graph says which path it took)
    assert ops.count("llama_fast.flash_attn.default") == 2 and ops.count("llama_fast.rope.default") == 2, ops
    assert not any("scaled_dot_product" in op for op in ops), ops


# ---------------------------------------------------------------------------------------
# The fused loss (kind "cross_entropy"): LlamaForCausalLM's forward for patched instances


def assert_same_grads(model, ref, what=""):
    grads_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, grads_ref[name].grad, f"{what}grad of {name}", rtol=1e-3, atol=1e-4)


def with_ignored(ids):
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt without loss
    labels[-1, -2:] = -100
    return labels


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_loss_every_gradient_and_no_logits(pair, backend, tied):
    """Training with labels: HF's loss (shifted labels, -100 ignored) and every gradient, from
    the fused head; logits None. Tied: lm_head.weight is the embedding, one Parameter."""
    ref, model = pair(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    lfp.patch(model, **({"attention": False, "rope": False} if backend == "auto" else {}))  # the loss's kernels
    ids = tokens(2, 9)
    labels = with_ignored(ids)
    ref.train(), model.train()
    expected = ref(ids, labels=labels)
    expected.loss.backward()
    with BACKENDS[backend]():
        out = model(ids, labels=labels)
        out.loss.backward()
    assert out.logits is None and lfp.LOSS_CALLS == {"fused": 1}
    assert lfp.FUNCTION_CALLS[FORWARD_KEY, "llama_fast"] == 1
    assert out.loss.dtype == torch.float32 and out.loss.shape == expected.loss.shape
    assert_close(out.loss, expected.loss, "loss", rtol=1e-5, atol=1e-6)
    assert_same_grads(model, ref)
    assert set(out.keys()) == set(expected.keys()) - {"logits"}  # loss and the base model's cache


def test_no_tensor_of_logits_outside_the_op(pair):
    """Forward and backward of the patched model create no (…, vocab) tensor: the only op
    that sees the vocabulary dimension is llama_fast's fused one (whose chunked memory is
    tests/test_cross_entropy.py's). The unpatched model makes the logits and their grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    ref, model = pair(intermediate_size=96)  # no other dimension is the vocabulary's (128)
    lfp.patch(model, rms_norm=False, rope=False, swiglu=False, attention=False)  # only the loss
    ref.train(), model.train()
    ids = tokens(2, 16)
    logits_like = {}
    for m, name in ((ref, "unpatched"), (model, "patched")):
        with llama_fast.backend("torch"), Shapes() as shapes:
            m(ids, labels=ids, use_cache=False).loss.backward()
        logits_like[name] = [(f, shape) for f, shape in shapes.seen
                             if shape[-1:] == (VOCAB,) and "linear_cross_entropy" not in f]
    assert logits_like["unpatched"], "the unpatched model should make (…, vocab) logits"
    assert logits_like["patched"] == []


def test_eval_mode_and_calls_without_labels_give_hf_logits(pair):
    ref, model = pair()
    lfp.patch(model, rms_norm=False, rope=False, swiglu=False, attention=False)  # only the loss
    ids = tokens(2, 8)
    with torch.no_grad():
        out, expected = model(ids, labels=ids), ref(ids, labels=ids)  # eval mode: HF's forward
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
        model.train(), ref.train()
        assert torch.equal(model(ids).logits, ref(ids).logits)  # training, no labels
    assert lfp.LOSS_CALLS == {"transformers: eval mode": 1, "transformers: no labels": 1}


def test_num_items_in_batch_gradient_accumulation(pair):
    """Two micro-batches, each loss summed over the labelled tokens and divided by the count
    of the whole batch (a tensor, as Trainer passes it, and an int), accumulated."""
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()
    micro = [tokens(2, 8), tokens(1, 6)]
    labels = [with_ignored(ids) for ids in micro]
    total = sum(int((lab[:, 1:] != -100).sum()) for lab in labels)
    for num_items in (torch.tensor(total), total):
        for m in (ref, model):
            m.zero_grad()
        losses = {}
        for m, name in ((ref, "ref"), (model, "patched")):
            with llama_fast.backend("torch"):
                losses[name] = [m(ids, labels=lab, num_items_in_batch=num_items).loss for ids, lab in zip(micro, labels)]
                sum(losses[name]).backward()
        for got, want in zip(losses["patched"], losses["ref"]):
            assert_close(got, want, f"micro-batch loss, num_items_in_batch={num_items!r}", rtol=1e-5, atol=1e-6)
        assert_same_grads(model, ref, f"num_items_in_batch={num_items!r}: ")
    assert lfp.LOSS_CALLS == {"fused": 4}


def test_shift_labels_and_ignore_index_from_the_kwargs(pair):
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()
    ids = tokens(2, 8)
    shift = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], 7)], 1)
    with torch.no_grad(), llama_fast.backend("torch"):
        for kw in ({"shift_labels": shift}, {"ignore_index": 7}, {"shift_labels": shift, "ignore_index": 7}):
            out, expected = model(ids, labels=ids, **kw), ref(ids, labels=ids, **kw)
            assert out.logits is None
            assert_close(out.loss, expected.loss, f"loss with {sorted(kw)}", rtol=1e-5, atol=1e-6)


def test_logits_to_keep(pair):
    """Labels for the kept positions only, an int and (a tensor of) positions, as HF's forward."""
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()
    ids = tokens(2, 9)
    for keep in (4, torch.tensor([0, 2, 3, 7])):
        for m in (ref, model):
            m.zero_grad()
        labels = ids[:, -4:] if isinstance(keep, int) else ids[:, keep]
        expected = ref(ids, labels=labels, logits_to_keep=keep)
        expected.loss.backward()
        with llama_fast.backend("torch"):
            out = model(ids, labels=labels, logits_to_keep=keep)
            out.loss.backward()
        assert out.logits is None
        assert_close(out.loss, expected.loss, f"loss with logits_to_keep={keep!r}", rtol=1e-5, atol=1e-6)
        assert_same_grads(model, ref, f"logits_to_keep={keep!r}: ")
    with pytest.raises(ValueError, match="labels"), llama_fast.backend("torch"):
        model(ids, labels=ids, logits_to_keep=4)  # 9 labels for 4 positions


def test_return_dict_false_and_positional_arguments(pair):
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()
    ids = tokens(2, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad(), llama_fast.backend("torch"):
        out = model(ids, labels=ids, return_dict=False, use_cache=False)
        expected = ref(ids, labels=ids, return_dict=False, use_cache=False)
        assert isinstance(out, tuple) and len(out) == 1  # the loss; no logits (None is left out)
        assert_close(out[0], expected[0], "loss of the tuple")
        positional = model(ids, mask, None, None, None, ids)  # labels is the 6th, as in HF's signature
        assert positional.logits is None
        assert_close(positional.loss, expected[0], "loss with positional arguments")
    assert lfp.LOSS_CALLS == {"fused": 2}


@pytest.mark.parametrize("model_dtype, autocast, loss_tol", [(torch.bfloat16, False, 1e-2), (torch.float32, True, 2e-2)],
                         ids=["bf16 model", "fp32 model under bf16 autocast"])
def test_fused_loss_with_bfloat16(pair, model_dtype, autocast, loss_tol):
    """A bf16 model: HF upcasts the bf16 logits to float32 for the loss; the op computes in
    float32 and rounds the loss to bf16 (then float32). Under CPU autocast the head's inputs
    are cast to bfloat16 as F.linear's would be. Either way the same loss within bf16
    rounding, and each Parameter's gradient in the Parameter's dtype, as HF's are."""
    ref, model = pair(model_dtype)
    lfp.patch(model)
    ref.train(), model.train()
    ids = tokens(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = ref(ids, labels=ids)
        with llama_fast.backend("torch"):
            out = model(ids, labels=ids)
    expected.loss.backward()
    out.loss.backward()
    assert out.logits is None and out.loss.dtype == torch.float32
    assert_close(out.loss, expected.loss, "loss", rtol=loss_tol, atol=loss_tol)
    assert model.lm_head.weight.grad.dtype == model_dtype
    assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, "lm_head grad", rtol=5e-2, atol=5e-2)


def test_unserved_loss_functions_run_hf_forward_with_a_warning(pair):
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()

    def doubled(logits, labels, vocab_size, **kwargs):
        return 2 * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

    model.loss_function = ref.loss_function = doubled
    ids = tokens(2, 8)
    importlib.import_module("llama_fast.hf_causal_lm")._WARNED.clear()
    with torch.no_grad(), llama_fast.backend("torch"), pytest.warns(UserWarning, match="loss function other than"):
        out = model(ids, labels=ids)
    with torch.no_grad():
        expected = ref(ids, labels=ids)
    assert out.logits is not None
    assert_close(out.loss, expected.loss, "loss of a custom loss function")


@pytest.mark.parametrize("change", ["forward hook", "instance forward"])
def test_unfused_lm_heads_run_hf_forward_with_a_warning_naming_them(pair, change):
    """An lm_head the fused loss does not take (a forward hook on it, or a forward set on the
    instance, which may do anything) runs HF's forward, its logits and loss as the reference
    model's with the same change; the warning and LOSS_CALLS name what was seen, by name."""
    ref, model = pair()
    lfp.patch(model)
    ref.train(), model.train()

    def halve_logits(module, args, output):
        return output * 0.5

    def halved_forward(x, head):
        return torch.nn.Linear.forward(head, x) * 0.5

    for m in (ref, model):
        if change == "forward hook":
            m.lm_head.register_forward_hook(halve_logits)
        else:
            m.lm_head.forward = functools.partial(halved_forward, head=m.lm_head)
    seen = ("Linear, forward hooks test_patch_hf.test_unfused_lm_heads_run_hf_forward_with_a_warning_naming_them."
            "<locals>.halve_logits" if change == "forward hook" else
            "Linear, its forward replaced by test_patch_hf.test_unfused_lm_heads_run_hf_forward_with_a_warning_"
            "naming_them.<locals>.halved_forward")
    ids = tokens(2, 8)
    importlib.import_module("llama_fast.hf_causal_lm")._WARNED.clear()
    with torch.no_grad(), llama_fast.backend("torch"), pytest.warns(UserWarning) as caught:
        out = model(ids, labels=ids)
    with torch.no_grad():
        expected = ref(ids, labels=ids)
    why = f"an lm_head the fused loss does not take ({seen})"
    assert [str(w.message) for w in caught if "llama_fast" in str(w.message)] == [
        f"llama_fast: the loss of LlamaForCausalLM runs Hugging Face's forward (with logits) for {why}"]
    assert lfp.LOSS_CALLS == {f"transformers: {why}": 1}, lfp.LOSS_CALLS
    assert out.logits is not None
    assert_close(out.logits, expected.logits, "logits")
    assert_close(out.loss, expected.loss, "loss")


def test_cross_entropy_off_keeps_hf_forward(pair):
    ref, model = pair()
    report = lfp.patch(model, cross_entropy=False)
    assert report.counts["cross_entropy"] == 0 and report.counts["rms_norm"] == 5
    assert any(s.kind == "cross_entropy" and "disabled" in s.reason for s in report.left_alone)
    ref.train(), model.train()
    ids = tokens(2, 8)
    with torch.no_grad(), llama_fast.backend("torch"):
        out = model(ids, labels=ids)
        expected = ref(ids, labels=ids)
    assert out.logits is not None and not lfp.LOSS_CALLS
    assert not lfp.FUNCTION_CALLS[FORWARD_KEY, "llama_fast"]
    assert_close(out.logits, expected.logits, "logits")
    assert_close(out.loss, expected.loss, "loss")
    assert lfp.patch(model).counts["cross_entropy"] == 1  # enabled later: patched then


def test_torch_compile_fullgraph_training_step_with_the_fused_loss(pair):
    """Dynamo traces the forward dispatcher, the argument binding and the fused loss in one
    graph (attention left to SDPA: the mask function's packed-sequence check reads data)."""
    ref, model = pair()
    lfp.patch(model, attention=False)
    ref.train(), model.train()
    ids = tokens(2, 8)
    labels = with_ignored(ids)
    backend, ops = graph_ops_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with llama_fast.backend("torch"):
        out = compiled(ids, labels=labels, use_cache=False)
        out.loss.backward()
    torch._dynamo.reset()
    expected = ref(ids, labels=labels, use_cache=False)
    expected.loss.backward()
    assert out.logits is None and ops.count("llama_fast.linear_cross_entropy.default") == 1, ops
    assert_close(out.loss, expected.loss, "compiled loss", rtol=1e-5, atol=1e-6)
    assert_same_grads(model, ref, "compiled: ")


def test_patch_transformers_with_cross_entropy_off():
    try:
        lfp.patch_transformers(cross_entropy=False)
        model = LlamaForCausalLM(tiny_config())
    finally:
        lfp.unpatch_transformers()
    try:
        report = model._llama_fast_report
        assert report.counts["cross_entropy"] == 0 and report.counts["swiglu"] == 2, str(report)
        assert LlamaForCausalLM.forward is ORIGINAL_FORWARD
        model.train()
        ids = tokens(1, 6)
        with torch.no_grad(), llama_fast.backend("torch"):
            assert model(ids, labels=ids).logits is not None
    finally:
        lfp.unpatch(model)


def test_the_forward_swap_is_per_instance(pair):
    """The class's forward is a dispatcher while a model is patched: unpatched instances (and
    one with an instance-level forward, as accelerate's hooks set) run HF's forward."""
    ref, model = pair()
    _, hooked = pair()
    hooked.forward = functools.partial(ORIGINAL_FORWARD, hooked)
    lfp.patch(model)
    report = lfp.patch(hooked)
    assert any(s.kind == "cross_entropy" and "overridden on the instance" in s.reason for s in report.left_alone)
    ref.train(), model.train(), hooked.train()
    ids = tokens(1, 6)
    with torch.no_grad(), llama_fast.backend("torch"):
        assert ref(ids, labels=ids).logits is not None and hooked(ids, labels=ids).logits is not None
        assert model(ids, labels=ids).logits is None
    assert lfp.FUNCTION_CALLS[FORWARD_KEY, "original"] == 1 and lfp.FUNCTION_CALLS[FORWARD_KEY, "llama_fast"] == 1
    assert inspect.signature(model.forward) == inspect.signature(ORIGINAL_FORWARD.__get__(model))


# ---------------------------------------------------------------------------------------
# What the attention function does not serve


def test_custom_4d_mask_falls_back_to_sdpa(pair):
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(2, 8)
    allowed = torch.rand(2, 1, 8, 8) > 0.3
    allowed |= torch.eye(8, dtype=torch.bool)  # every query sees itself
    with llama_fast.backend("torch"), torch.no_grad(), pytest.warns(UserWarning, match="SDPA"):
        importlib.import_module("llama_fast.attention_router")._WARNED.clear()
        got = model(ids, attention_mask=allowed).logits
    with torch.no_grad():
        expected = ref(ids, attention_mask=allowed).logits
    assert_close(got, expected, "logits with a custom 4-D mask")
    assert sum(n for k, n in lfp.ATTENTION_CALLS.items() if k.startswith("sdpa")) == 2


def test_packed_sequences(pair):
    """position_ids restarting within a row (packing; no mask, no cache): transformers masks
    each sequence off; the mask function reads the segments off that mask and attention runs
    them through flash_attn_varlen."""
    ref, model = pair()
    lfp.patch(model)
    ids = tokens(2, 10)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    ref.train(), model.train()
    with llama_fast.backend("torch"):
        out = model(ids, position_ids=pos, labels=ids, use_cache=False)
        out.loss.backward()
        with torch.no_grad():
            logits = model(ids, position_ids=pos, use_cache=False).logits
    expected = ref(ids, position_ids=pos, labels=ids, use_cache=False)
    expected.loss.backward()
    with torch.no_grad():
        unpacked = ref(ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
    assert not torch.allclose(unpacked[:, 4:], expected.logits[:, 4:], atol=1e-3), "the packing was not detected"
    assert lfp.ATTENTION_CALLS == {"flash_attn_varlen (packed)": 4}
    assert out.logits is None
    assert_close(out.loss, expected.loss, "loss of packed sequences")
    assert_close(logits, expected.logits, "logits of packed sequences")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name}", rtol=1e-3, atol=1e-4)


def test_dropout_raises_in_training_only(pair):
    _, model = pair(attention_dropout=0.1)
    lfp.patch(model)
    ids = tokens(1, 6)
    with llama_fast.backend("torch"):
        with torch.no_grad():
            model(ids)  # eval: dropout is 0
        model.train()
        with pytest.raises(ValueError, match="dropout"):
            model(ids)


@contextlib.contextmanager
def warnings_ignored():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------
# patch_transformers: every model built while it is on patches itself


def test_patch_transformers_before_building(tmp_path):
    ref = tiny_model()
    ref.save_pretrained(tmp_path)
    ids = tokens(2, 8)
    with torch.no_grad():
        expected = ref(ids).logits
    built = []
    try:
        assert lfp.patch_transformers(swiglu=False) == [f"{ml.__name__}:LlamaPreTrainedModel"]
        model = LlamaForCausalLM(tiny_config())
        loaded = LlamaForCausalLM.from_pretrained(tmp_path)
        built += [model, loaded]
    finally:
        lfp.unpatch_transformers()
    for m in built:
        assert type(m.model.norm) is lfnn.RMSNorm
        assert type(m.model.layers[0].mlp) is ml.LlamaMLP  # swiglu=False
        assert m.config._attn_implementation == lfp.ATTN_IMPLEMENTATION
        report = m._llama_fast_report
        assert report.counts == {"rms_norm": 5, "rope": 2, "swiglu": 0, "attention": 1, "cross_entropy": 1}, str(report)
        assert not report.already
    assert "post_init" not in ml.LlamaPreTrainedModel.__dict__
    with llama_fast.backend("torch"), torch.no_grad():
        assert_close(built[1](ids).logits, expected, "from_pretrained under patch_transformers")
    after = LlamaForCausalLM(tiny_config())
    assert type(after.model.norm) is ml.LlamaRMSNorm and after.config._attn_implementation == "sdpa"
    for m in built:
        lfp.unpatch(m)
        assert type(m.model.norm) is ml.LlamaRMSNorm and m.config._attn_implementation == "sdpa"
    gc.collect()
    assert ml.apply_rotary_pos_emb is ORIGINAL_ROPE
    assert LlamaForCausalLM.forward is ORIGINAL_FORWARD


def test_patch_transformers_rejects_unknown_families():
    with pytest.raises(ValueError, match="unknown families"):
        lfp.patch_transformers(families=("no_such_family",))
    assert "post_init" not in ml.LlamaPreTrainedModel.__dict__


# ---------------------------------------------------------------------------------------
# llama_fast.nn on its own


def test_rms_norm_module():
    hf = ml.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    ours = lfnn.RMSNorm.from_module(hf)
    assert ours.weight is hf.weight and ours.eps == 1e-5 and ours.variance_epsilon == 1e-5
    assert list(ours.state_dict()) == list(hf.state_dict())
    for dtype in (torch.float32, torch.float64):  # float64: the eager formula, not the op
        x = torch.randn(2, 5, 64, dtype=dtype)
        with llama_fast.backend("torch"):
            assert_close(ours(x), hf(x), f"RMSNorm {dtype}", rtol=1e-5, atol=1e-6)
    fresh = lfnn.RMSNorm(64, eps=1e-6)
    assert fresh.weight.shape == (64,) and torch.equal(fresh.weight, torch.ones(64))


def test_swiglu_mlp_module():
    hf = ml.LlamaMLP(tiny_config())
    ours = lfnn.SwiGLUMLP.from_module(hf)
    assert ours.gate_proj is hf.gate_proj and ours.down_proj is hf.down_proj
    assert list(ours.state_dict()) == list(hf.state_dict())
    x = torch.randn(2, 5, 64)
    with llama_fast.backend("torch"):
        assert_close(ours(x), hf(x), "SwiGLU MLP", rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="not SiLU"):
        lfnn.SwiGLUMLP.from_module(ml.LlamaMLP(tiny_config(hidden_act="gelu")))
    meta = lfnn.SwiGLUMLP(64, 128, names=lfnn.META_MLP_NAMES)
    assert sorted(meta.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]
    with llama_fast.backend("torch"):
        assert_close(meta(x), meta.w2(F.silu(meta.w1(x)) * meta.w3(x)), "Meta-named MLP", rtol=1e-5, atol=1e-6)


def test_apply_rotary_pos_emb_matches_hf_layouts():
    b, s, d = 2, 5, 16
    rot = ml.LlamaRotaryEmbedding(tiny_config())
    q, k = torch.randn(b, 4, s, d), torch.randn(b, 2, s, d)
    for pos in (torch.arange(s)[None], torch.arange(b * s).view(b, s)):  # one table for the batch, one each
        cos, sin = rot(q, pos)
        expected = ORIGINAL_ROPE(q, k, cos, sin)
        with llama_fast.backend("torch"):
            got = lfnn.apply_rotary_pos_emb(q, k, cos, sin)
            got_bshd = lfnn.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
        for g, e, t in zip(got, expected, got_bshd):
            assert_close(g, e, "rope (B, H, S, D)", rtol=1e-5, atol=1e-6)
            assert_close(t.transpose(1, 2), e, "rope (B, S, H, D)", rtol=1e-5, atol=1e-6)
    q64 = q.double()
    with pytest.raises(ValueError, match="unsupported"):
        lfnn.apply_rotary_pos_emb(q64, k.double(), cos, sin)
    out = lfnn.apply_rotary_pos_emb(q64, k.double(), cos.double(), sin.double(), fallback=ORIGINAL_ROPE)
    assert out[0].dtype == torch.float64
