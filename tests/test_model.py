"""The plain-PyTorch Llama 3 model (llama_fast.model) and tokenizer (llama_fast.tokenizer).

On tiny configs, CPU: the named configs' sizes; checkpoints of a tiny random Hugging Face
LlamaForCausalLM, loaded from HF folders (single file, shards, 4.x and 5.x config.json)
and from Meta folders (one and two shards), give HF's logits; the KV cache, padding and
generation agree with the plain forward; generation agrees with HF's greedy generate; the
loss entry point (forward's targets) is eager cross-entropy and HF's loss.
"""
from __future__ import annotations

import base64
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from llama_fast.checkpoint import _scaled_rope_factor, load_checkpoint
from llama_fast.generation import generate
from llama_fast.model import CONFIGS, ModelArgs, Transformer

transformers = pytest.importorskip("transformers")

# float32 logits of the same weights through two implementations: a few ulps of |logits|.
LOGIT_TOL = dict(rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "name, dim, n_layers, n_heads, n_kv_heads, ffn_dim, factor, tied",
    [
        ("llama-3-8b", 4096, 32, 32, 8, 14336, None, False),
        ("llama-3-70b", 8192, 80, 64, 8, 28672, None, False),
        ("llama-3.1-8b", 4096, 32, 32, 8, 14336, 8.0, False),
        ("llama-3.1-70b", 8192, 80, 64, 8, 28672, 8.0, False),
        ("llama-3.1-405b", 16384, 126, 128, 8, 53248, 8.0, False),
        ("llama-3.2-1b", 2048, 16, 32, 8, 8192, 32.0, True),
        ("llama-3.2-3b", 3072, 28, 24, 8, 8192, 32.0, True),
    ],
)
def test_named_configs(name, dim, n_layers, n_heads, n_kv_heads, ffn_dim, factor, tied):
    args = ModelArgs.from_name(name)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (dim, n_layers, n_heads, n_kv_heads)
    assert args.ffn_dim == ffn_dim  # derived from dim, multiple_of, ffn_dim_multiplier as Meta does
    assert (args.vocab_size, args.rope_theta, args.norm_eps) == (128256, 500000.0, 1e-5)
    assert args.tie_embeddings is tied
    if factor is None:
        assert args.rope_scaling is None
    else:
        assert args.rope_scaling == {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
        # A Meta params.json says only use_scaled_rope: the factor comes from the shape.
        assert _scaled_rope_factor(args) == factor


def test_config_helpers():
    args = ModelArgs.from_name("llama-3.1-8b")
    small = args.scaled(n_layers=2)
    assert small.n_layers == 2 and small.ffn_dim == 14336 and args.n_layers == 32
    args.rope_scaling["factor"] = 1.0  # from_name hands out copies, never the table's dicts
    assert ModelArgs.from_name("llama-3.1-8b").rope_scaling["factor"] == 8.0
    assert ModelArgs(dim=64, n_heads=4, ffn_hidden_dim=100).ffn_dim == 100
    with pytest.raises(KeyError, match="unknown model"):
        ModelArgs.from_name("llama-9")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    assert set(CONFIGS) >= {"tiny", "tiny-3.1", "tiny-tied"}


# ---------------------------------------------------------------------------------------
# Checkpoints: a tiny random HF model, saved and loaded back


def hf_model(tied: bool = False, factor: float = 8.0):
    """A tiny random LlamaForCausalLM with GQA and Llama 3.1 rope scaling, float32. Its sizes
    are tiny's (ModelArgs.from_name("tiny")): intermediate 192 is what Meta's derivation
    gives for dim 64 and multiple_of 32, so a Meta params.json can describe it."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=tied, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(model, tokens, input_pos=None):
    with torch.no_grad():
        return model(tokens, input_pos)


@pytest.mark.parametrize("layout", ["single", "sharded", "config-4.x", "tied"])
def test_hf_checkpoint_gives_hf_logits(tmp_path, layout):
    hf = hf_model(tied=layout == "tied", factor=32.0 if layout == "tied" else 8.0)
    kwargs = {"max_shard_size": "40KB"} if layout == "sharded" else {}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    if layout == "config-4.x":
        # transformers 4.x wrote rope_theta and rope_scaling at the top level.
        config = json.loads((tmp_path / "config.json").read_text())
        rope = config.pop("rope_parameters", None) or config["rope_scaling"]
        config["rope_theta"] = rope.pop("rope_theta", 500000.0)
        config["rope_scaling"] = rope
        (tmp_path / "config.json").write_text(json.dumps(config))

    model = load_checkpoint(tmp_path)
    assert model.args.ffn_dim == 192 and model.args.n_kv_heads == 2
    assert model.args.rope_scaling["factor"] == (32.0 if layout == "tied" else 8.0)
    if layout == "tied":
        assert model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, 256, (2, 33))
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf, tokens), **LOGIT_TOL)


def test_load_checkpoint_dtype_and_errors(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randint(0, 256, (1, 5))).dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="neither params.json"):
        load_checkpoint(tmp_path / "nowhere")


# Meta's model-parallel split, restated here independently of the loader: column-parallel
# weights split their rows (dim 0), row-parallel wo and w2 their columns; norms replicated.
def meta_shards(state: dict, n: int) -> list[dict]:
    def split_dim(key):
        name = key.split(".")[-2]
        if name in ("wo", "w2"):
            return 1
        return 0 if name in ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings") else None

    shards = [{} for _ in range(n)]
    for key, value in state.items():
        dim = split_dim(key)
        parts = [value] * n if dim is None else value.chunk(n, dim=dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_gives_hf_logits(tmp_path, n_shards):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    state = load_checkpoint(tmp_path / "hf").state_dict()  # Meta's names and row order
    meta = tmp_path / "meta"
    meta.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
              "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (meta / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(meta_shards(state, n_shards)):
        torch.save(shard, meta / f"consolidated.{i:02d}.pth")

    model = load_checkpoint(meta)
    assert not model.args.tie_embeddings and model.args.rope_scaling["factor"] == 8.0
    tokens = torch.randint(0, 256, (2, 21))
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf, tokens), **LOGIT_TOL)


def test_meta_checkpoint_tied_when_output_is_the_embedding(tmp_path):
    # Meta's 3.2 1B/3B files hold output.weight too, equal to tok_embeddings.weight.
    original = tiny("tiny-tied")
    torch.save(dict(original.state_dict()), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, "vocab_size": 256, "multiple_of": 32,
         "use_scaled_rope": True, "rope_scaling_factor": 32}))
    model = load_checkpoint(tmp_path)
    assert model.args.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    assert model.args.rope_scaling["factor"] == 32.0
    tokens = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(our_logits(model, tokens), our_logits(original, tokens), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# KV cache, padding, generation


def tiny(name="tiny-3.1", dtype=torch.float32):
    return Transformer.from_name(name).to(dtype).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-3.1", "tiny-tied"])
def test_incremental_decoding_equals_full_forward(name):
    model = tiny(name)
    tokens = torch.randint(0, 256, (3, 24))
    full = our_logits(model, tokens)
    model.setup_cache(max_batch_size=4, max_seq_len=40)
    with torch.no_grad():
        # a prefill, a chunk of 5 more tokens, then one token at a time
        steps = [model(tokens[:, :10], torch.arange(10)), model(tokens[:, 10:15], torch.arange(10, 15))]
        steps += [model(tokens[:, p : p + 1], torch.tensor([p])) for p in range(15, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def left_pad(prompts: list[list[int]]):
    longest = max(map(len, prompts))
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    input_pos = torch.stack([torch.arange(longest) - (longest - len(p)) for p in prompts])
    return tokens, input_pos


@pytest.mark.parametrize("with_cache", [False, True])
def test_left_padded_forward_equals_per_row_forward(with_cache):
    model = tiny()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (7, 12, 1)]
    tokens, input_pos = left_pad(prompts)
    if with_cache:
        model.setup_cache(3, 16)
    padded = our_logits(model, tokens, input_pos)
    model.drop_cache()
    for row, p in enumerate(prompts):
        alone = our_logits(model, torch.tensor([p]))[0]
        torch.testing.assert_close(padded[row, -len(p):], alone, rtol=1e-5, atol=1e-5)
    assert padded.isfinite().all()  # pad rows too: they attend to something, not nothing


def test_left_padded_generation_equals_per_prompt_generation():
    # float64: no near-ties between the top two logits to make greedy choices differ.
    model = tiny(dtype=torch.float64)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 11, 1, 8)]
    alone = [generate(model, [p], 12)[0] for p in prompts]
    assert all(len(a) == 12 for a in alone)
    assert generate(model, prompts, 12) == alone
    assert model.cache is None  # generate dropped the cache it made

    # Per-row stops: each row stops at its first emission of a stop token (row 0 by step 4).
    stop = (alone[0][3],)
    expected = []
    for a in alone:
        cut = next((i for i, t in enumerate(a) if t in stop), None)
        expected.append(a if cut is None else a[: cut + 1])
    assert generate(model, prompts, 12, stop_tokens=stop) == expected
    assert len(expected[0]) <= 4 and expected[0][-1] == stop[0]

    # A cache set up beforehand (big enough) is used and kept.
    model.setup_cache(8, 64)
    assert generate(model, prompts, 12) == alone and model.cache is not None


def test_sampling():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5]]
    g = lambda: torch.Generator().manual_seed(1234)  # noqa: E731
    a = generate(model, prompts, 10, temperature=1.0, generator=g())
    assert a == generate(model, prompts, 10, temperature=1.0, generator=g())
    assert all(0 <= t < 256 for row in a for t in row)
    # A nucleus that only ever holds the most likely token is greedy decoding.
    assert generate(model, prompts, 10, temperature=0.7, top_p=1e-6, generator=g()) == generate(model, prompts, 10)


def assert_greedy_equal(model, prompt, ours, theirs, tol=1e-4):
    """The two greedy continuations are equal, or part only where our top two logits are
    within ``tol`` of each other: a tie that float rounding may break either way."""
    if ours == theirs:
        return
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    assert n < min(len(ours), len(theirs)), f"same tokens, different lengths: {ours} vs {theirs}"
    top2 = our_logits(model, torch.tensor([prompt + ours[:n]]))[0, -1].topk(2).values
    assert top2[0] - top2[1] < tol, f"greedy outputs differ at step {n} without a tie: {ours} vs {theirs}"


def test_generate_matches_hf_greedy_generate(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (4, 9)]
    ours = generate(model, prompts, 16)

    def hf_generate(prompt, **kw):
        # An explicit all-ones mask: without one, HF takes every prompt token equal to
        # pad_token_id (0, which random prompts hold now and then) for padding and masks it.
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          pad_token_id=0, **kw)
        return out[0, len(prompt):].tolist()

    for prompt, mine in zip(prompts, ours):
        assert_greedy_equal(model, prompt, mine, hf_generate(prompt))
    # HF's eos_token_id and our stop_tokens: both stop after emitting it.
    stop = ours[0][5]
    mine = generate(model, [prompts[0]], 16, stop_tokens=[stop])[0]
    theirs = hf_generate(prompts[0], eos_token_id=stop)
    assert mine[-1] == stop and len(mine) <= 6
    assert_greedy_equal(model, prompts[0], mine, theirs)


def test_cache_errors():
    model = tiny()
    model.setup_cache(2, 16)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="larger than the cache"):
        model(torch.zeros(3, 3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_training_forward_backward(name):
    model = Transformer.from_name(name).train()
    tokens = torch.randint(0, 256, (2, 17))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 16, 256) and logits.dtype == torch.float32
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name_, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name_
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0


def test_loss_entry_point_is_eager_cross_entropy_of_the_logits():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 9))
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    targets[0, :3] = -100
    loss = model(tokens, targets=targets)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100))
    with pytest.raises(ValueError, match="targets and last_only"):
        model(tokens, targets=targets, last_only=True)
    with pytest.raises(ValueError, match="targets must have the shape of tokens"):
        model(tokens, targets=targets[:, 1:])


def test_loss_entry_point_equals_hf_loss(tmp_path):
    """The same checkpoint: HF's labels (it shifts them) and our targets (shifted by the caller)."""
    hf = hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_checkpoint(tmp_path)
    tokens = torch.randint(0, 256, (2, 17))
    labels = tokens.clone()
    labels[1, :5] = -100
    with torch.no_grad():
        want = hf(tokens, labels=labels).loss
        got = model(tokens[:, :-1], targets=labels[:, 1:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Tokenizer


def write_tokenizer_model(path):
    """A small tokenizer.model in tiktoken's format: the 256 bytes, then a few merges."""
    merges = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"\n\n"]
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({m: 256 + i for i, m in enumerate(merges)})
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tokenizer(tmp_path):
    pytest.importorskip("tiktoken", reason="the tokenizer needs the optional tiktoken (pip install tiktoken)")
    from llama_fast.tokenizer import Tokenizer

    ranks = write_tokenizer_model(tmp_path / "tokenizer.model")
    tok = Tokenizer(tmp_path / "tokenizer.model")
    base = len(ranks)
    assert tok.n_words == base + 256
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id) == (base, base + 1, base + 9, base + 8)
    assert tok.special_tokens["<|start_header_id|>"] == base + 6
    assert tok.special_tokens["<|reserved_special_token_247|>"] == base + 255
    assert sorted(tok.stop_tokens) == [base + 1, base + 8, base + 9]

    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" world"]]
    assert tok.encode("hello", bos=True, eos=True) == [tok.bos_id, ranks[b"hello"], tok.eos_id]
    # Special-token text is plain text unless allowed.
    assert tok.eot_id not in tok.encode("<|eot_id|>")
    assert tok.encode("<|eot_id|>", allowed_special="all") == [tok.eot_id]
    assert tok.decode([tok.bos_id, ranks[b"hello"]]) == "<|begin_of_text|>hello"
    for text in ["", "Hello, wörld! 123456 \n\n\tthere's 日本語 🦙", "a" * 30_000 + " " * 30_000 + "b"]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_needs_tiktoken(tmp_path, monkeypatch):
    from llama_fast.tokenizer import Tokenizer

    write_tokenizer_model(tmp_path / "tokenizer.model")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install tiktoken"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_find_llama_models_tokenizer(tmp_path, monkeypatch):
    import importlib

    from llama_fast.tokenizer import find_llama_models_tokenizer

    pkg = tmp_path / "llama_models"
    for folder in ("llama4", "llama3/api", "llama3"):
        (pkg / folder).mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for f in ("llama4/tokenizer.model", "llama3/api/tokenizer.model", "llama3/tokenizer.model"):
        (pkg / f).write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llama_models", raising=False)
    importlib.invalidate_caches()
    assert find_llama_models_tokenizer() == pkg / "llama3" / "tokenizer.model"
    (pkg / "llama3" / "tokenizer.model").unlink()
    assert find_llama_models_tokenizer() == pkg / "llama3" / "api" / "tokenizer.model"
