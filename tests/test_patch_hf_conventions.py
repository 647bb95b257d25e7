"""Hugging Face conventions that ``llama_fast.patch`` / ``patch_transformers`` must keep:
meta-device construction, the user's explicit attention choice, ``output_attentions``,
and only registered tensors. Each is checked on the patched and the unpatched model side
by side (CPU, the "torch" backend: these are about behaviour, not kernels)."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import llama_fast  # noqa: E402

lfp = importlib.import_module("llama_fast.patching")


def config(**overrides) -> LlamaConfig:
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def global_patch():
    llama_fast.patch_transformers()
    try:
        yield
    finally:
        llama_fast.unpatch_transformers()


@pytest.fixture(autouse=True)
def torch_backend():
    with llama_fast.backend("torch"):
        yield


def test_builds_on_the_meta_device_with_the_global_patch(global_patch):
    with torch.device("meta"):
        model = LlamaForCausalLM(config())
    report = model._llama_fast_report
    assert report.counts["swiglu"] == 2 and report.counts["rms_norm"] == 5, str(report)
    assert all(p.is_meta for p in model.parameters())
    # then materialised and initialised as FSDP2 / big-model loading do
    model.to_empty(device="cpu")
    model.init_weights() if hasattr(model, "init_weights") else model.apply(model._init_weights)
    ids = torch.randint(3, 64, (1, 5))
    assert torch.isfinite(model(ids).logits).all()


def test_patch_of_a_meta_model_touches_no_data():
    with torch.device("meta"):
        model = LlamaForCausalLM(config())
    report = llama_fast.patch(model)
    assert report.counts["swiglu"] == 2, str(report)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("how", ["config", "from_pretrained"])
@pytest.mark.parametrize("requested", ["eager", "sdpa"])
def test_an_explicit_attention_choice_wins_over_the_global_patch(global_patch, tmp_path, how, requested):
    if how == "config":
        cfg = config()
        cfg._attn_implementation = requested
        model = LlamaForCausalLM(cfg)
    else:
        llama_fast.unpatch_transformers()
        LlamaForCausalLM(config()).save_pretrained(tmp_path)
        llama_fast.patch_transformers()
        model = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=requested)
    assert model.config._attn_implementation == requested
    assert any(s.kind == "attention" and requested in s.reason for s in model._llama_fast_report.left_alone)
    assert model._llama_fast_report.counts["rms_norm"] == 5  # the other kinds are still patched
    lfp.ATTENTION_CALLS.clear()
    model(torch.randint(3, 64, (1, 6)))
    assert sum(lfp.ATTENTION_CALLS.values()) == 0


def test_without_an_explicit_choice_the_global_patch_sets_its_attention(global_patch):
    model = LlamaForCausalLM(config())
    assert model.config._attn_implementation == lfp.ATTN_IMPLEMENTATION


def test_set_attn_implementation_after_patching_wins_and_unpatch_keeps_it():
    model = LlamaForCausalLM(config()).eval()
    llama_fast.patch(model)
    assert model.config._attn_implementation == lfp.ATTN_IMPLEMENTATION
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    lfp.ATTENTION_CALLS.clear()
    model(torch.randint(3, 64, (1, 6)))
    assert sum(lfp.ATTENTION_CALLS.values()) == 0
    llama_fast.unpatch(model)
    assert model.config._attn_implementation == "eager"  # the user's last word, not what patch found


@pytest.mark.parametrize("padded", [False, True])
def test_output_attentions_returns_the_weights(padded):
    ref = LlamaForCausalLM(config()).eval()
    ref.set_attn_implementation("eager")
    model = LlamaForCausalLM(config()).eval()
    model.load_state_dict(ref.state_dict())
    llama_fast.patch(model)
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    importlib.import_module("llama_fast.attention_router")._WARNED.discard("output_attentions")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, attention_mask=mask, output_attentions=True)
    expected = ref(ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == 2
    for a, e in zip(out.attentions, expected.attentions):
        assert a is not None and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert any("output_attentions" in str(w.message) for w in caught)
    # without it, the fused path again, no weights
    lfp.ATTENTION_CALLS.clear()
    assert model(ids, attention_mask=mask).attentions is None
    assert sum(n for k, n in lfp.ATTENTION_CALLS.items() if k.startswith("flash")) == 2


def test_the_patch_creates_only_registered_tensors():
    model = LlamaForCausalLM(config())
    before = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    llama_fast.patch(model)
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers"):
                continue
            assert not isinstance(value, torch.Tensor), f"{path}.{name} is a plain tensor attribute"
    after = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert after == before  # shared, not copied
    # transformers' own check that every tensor is a parameter or buffer, and its init pass
    model.apply(model._init_weights)
