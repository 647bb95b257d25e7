"""Loading the reference Llama 3 from a Meta folder (params.json + consolidated.*.pth, sharded
too) or a Hugging Face folder (config.json of transformers 4.x or 5.x + safetensors), with
the conversion of Hugging Face's names and rotary layout to Meta's.

    model = load_checkpoint(path, device="cuda", dtype=torch.bfloat16)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from llama_fast.model import CONFIGS, ModelArgs, Transformer, llama31_scaling


def load_checkpoint(path: str | Path, device=None, dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer from a Meta folder (params.json + consolidated.*.pth) or a Hugging Face
    folder (config.json + model*.safetensors). ``dtype`` None keeps the checkpoint's."""
    path = Path(path)
    if (path / "params.json").exists():
        args, state = _load_meta(path)
    elif (path / "config.json").exists():
        args, state = _load_hf(path)
    else:
        raise FileNotFoundError(f"{path} has neither params.json (Meta) nor config.json (Hugging Face)")

    dtype = dtype or state["tok_embeddings.weight"].dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    # Build on the meta device (no memory, no random init), then adopt the loaded tensors.
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True replaced the shared Parameter by two
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# Meta's model-parallel shards split column-parallel weights (wq, wk, wv, w1, w3, output,
# and Llama 3's vocab-parallel tok_embeddings) along their output rows, dim 0, and
# row-parallel ones (wo, w2) along their input columns, dim 1. Norms are replicated.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


def _load_meta(path: Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    params = json.loads((path / "params.json").read_text())
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"no consolidated.*.pth in {path}")
    # mmap: a 70B checkpoint is not read into memory twice.
    shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    state = {}
    for key in shards[0]:
        if key.endswith("rope.freqs"):  # a precomputed table in old checkpoints; we compute it
            continue
        parts = [s[key] for s in shards]
        dim = _META_SHARD_DIM.get(key.split(".")[-2])
        state[key] = parts[0] if len(parts) == 1 or dim is None else torch.cat(parts, dim=dim)

    vocab = params.get("vocab_size", -1)
    n_heads = params["n_heads"]
    args = ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=n_heads,
        n_kv_heads=params.get("n_kv_heads") or n_heads,
        vocab_size=vocab if vocab > 0 else state["tok_embeddings.weight"].shape[0],
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 500000.0),
        max_seq_len=params.get("max_seq_len", 8192),
    )
    if params.get("use_scaled_rope"):
        # params.json says only "scaled". The factor is 8 for Llama 3.1 and 32 for 3.2 1B/3B
        # (HF's configs), which Meta's reference hard-codes as 8; take it from params.json
        # when present, else from the named config of that shape.
        factor = params.get("rope_scaling_factor") or _scaled_rope_factor(args)
        args.rope_scaling = llama31_scaling(float(factor))
        args.max_seq_len = params.get("max_seq_len", 131072)
    # Tied when there is no output matrix, or it is the embedding (Meta's 3.2 1B/3B store both).
    out_w = state.get("output.weight")
    args.tie_embeddings = out_w is None or torch.equal(out_w, state["tok_embeddings.weight"])
    if args.tie_embeddings:
        state.pop("output.weight", None)
    _check_ffn_dim(args, state)
    return args, state


def _scaled_rope_factor(args: ModelArgs) -> float:
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads")
    for name in CONFIGS:
        named = ModelArgs.from_name(name)
        if named.rope_scaling and all(getattr(named, k) == getattr(args, k) for k in shape):
            return named.rope_scaling["factor"]
    return 8.0


def _check_ffn_dim(args: ModelArgs, state: dict[str, Tensor]) -> None:
    """Trust the checkpoint's matrices over the derivation from params.json."""
    w1 = state.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.shape[0] != args.ffn_dim:
        args.ffn_hidden_dim = w1.shape[0]


_HF_NAMES = {  # Hugging Face suffix -> Meta suffix, for "model.layers.N.<suffix>"
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _hf_args(config: dict) -> ModelArgs:
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, want) != want:
            raise ValueError(f"not a Llama 3 config: {key}={config[key]!r} (expected {want!r})")
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    if head_dim * n_heads != config["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} * heads {n_heads} != hidden_size {config['hidden_size']}: not supported")
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters with both.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    elif kind == "default":
        scaling = None
    else:
        raise ValueError(f"unsupported rope type {kind!r}: only Llama 3 ('default') and Llama 3.1 ('llama3')")
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        ffn_hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta), rope_scaling=scaling, tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=config.get("max_position_embeddings", 8192),
    )


def _unpermute_qk(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's conversion permutation of wq/wk rows. HF reorders each head's rows from
    Meta's interleaved pairs (2i, 2i+1) into halves (i, i + D/2) so that its rotate_half
    rope gives the same result; Meta's order is row 2i <- HF row i, row 2i+1 <- HF row i + D/2."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_to_meta_state_dict(hf_state: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename a Hugging Face LlamaForCausalLM state dict to Meta's names, un-permuting wq/wk."""
    state = {}
    for key, value in hf_state.items():
        if key == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = value
        elif key == "model.norm.weight":
            state["norm.weight"] = value
        elif key == "lm_head.weight":
            state["output.weight"] = value
        elif key.startswith("model.layers."):
            layer, suffix = key[len("model.layers."):].split(".", 1)
            if suffix.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                continue
            if suffix not in _HF_NAMES:
                raise KeyError(f"unexpected parameter {key!r} in a Llama checkpoint")
            name = _HF_NAMES[suffix]
            if name == "attention.wq.weight":
                value = _unpermute_qk(value, args.n_heads)
            elif name == "attention.wk.weight":
                value = _unpermute_qk(value, args.n_kv_heads)
            state[f"layers.{layer}.{name}"] = value
        else:
            raise KeyError(f"unexpected parameter {key!r} in a Llama checkpoint")
    return state


def _load_hf(path: Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:  # pragma: no cover - transformers brings it
        raise ImportError("loading a Hugging Face checkpoint needs `safetensors` (pip install safetensors)") from e
    args = _hf_args(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    hf_state = {}
    for name in files:
        hf_state.update(load_file(path / name, device="cpu"))
    state = hf_to_meta_state_dict(hf_state, args)
    if args.tie_embeddings:
        state.pop("output.weight", None)
    elif "output.weight" not in state:  # some exports drop lm_head although the config unties it
        args.tie_embeddings = True
    return args, state
