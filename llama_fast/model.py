"""A readable Llama 3 / 3.1 / 3.2 (text) in plain PyTorch: the reference that llama_fast's
fused modules are checked against and patched into.

Nothing here calls a llama_fast kernel. The modules and their parameter names are Meta's
(``tok_embeddings``, ``layers.N.attention.wq`` ...), so Meta's ``consolidated.*.pth`` load
as they are and Hugging Face checkpoints are renamed on the way in (``load_checkpoint``).
The module boundaries are the ones a patcher swaps: ``RMSNorm``, ``Rotary``, ``Attention``,
``FeedForward``, ``KVCache``.

Positions and padding. Every token has a position; a negative position marks a (left) pad
token, which no token attends to. With a KV cache, the key and value of the token at
position p live in slot p of its row (``KVCache``), so each row of a batch fills its cache
from slot 0 whatever its padding, and a row of length n attends to slots [0, n): the layout
``llama_fast.flash_decode`` reads (its ``cache_seqlens`` is ``input_pos + 1``).

    model = Transformer(ModelArgs.from_name("tiny"))
    logits = model(tokens)                          # training: (B, S) -> (B, S, vocab) float32
    model.setup_cache(max_batch_size=4, max_seq_len=256)
    logits = model(prompt, input_pos)               # prefill, input_pos (S,) or (B, S)
    logits = model(next_tok[:, None], pos[:, None]) # one decoding step per row
    new_tokens = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16)
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# rope_cos_sin is plain PyTorch (the float32 tables, Llama 3.1 scaling included), not a kernel.
from llama_fast.ops.rope import rope_cos_sin

# ---------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
    vocab_size: int = 128256
    # Meta derives the SwiGLU hidden size from dim, multiple_of and ffn_dim_multiplier
    # (``ffn_dim``); Hugging Face configs state it (intermediate_size): ffn_hidden_dim.
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 scaling with Hugging Face's keys (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None for Llama 3.0.
    rope_scaling: dict | None = None
    tie_embeddings: bool = False  # output.weight is tok_embeddings.weight (Llama 3.2 1B/3B)
    max_seq_len: int = 8192  # the context the model was trained for; setup_cache's default

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"the head dim ({self.dim // self.n_heads}) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU hidden size, derived as Meta's FeedForward does unless stated."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)  # SwiGLU has 3 matrices: 2/3 of a 4x MLP's width
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        key = name.lower()
        if key not in CONFIGS:
            raise KeyError(f"unknown model {name!r}; known: {sorted(CONFIGS)}")
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in CONFIGS[key].items()})

    def scaled(self, **changes) -> ModelArgs:
        """A copy with some fields changed, e.g. ``ModelArgs.from_name("llama-3.1-8b").scaled(n_layers=2)``."""
        return dataclasses.replace(self, **changes)


def _llama31_scaling(factor: float) -> dict:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_L3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
_L3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_L31 = dict(rope_scaling=_llama31_scaling(8.0), max_seq_len=131072)
_L32 = dict(rope_scaling=_llama31_scaling(32.0), max_seq_len=131072, tie_embeddings=True)

# Meta's params.json values (vocab 128256, rope_theta 500000 and norm_eps 1e-5 are the defaults).
CONFIGS: dict[str, dict] = {
    "llama-3-8b": _L3_8B,
    "llama-3-70b": _L3_70B,
    "llama-3.1-8b": {**_L3_8B, **_L31},
    "llama-3.1-70b": {**_L3_70B, **_L31},
    "llama-3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                           ffn_dim_multiplier=1.2, **_L31),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5, **_L32),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0, **_L32),
    # Tiny ones for tests (head_dim 16).
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512),
    "tiny-3.1": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512,
                     rope_scaling=_llama31_scaling(8.0)),
    "tiny-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32, max_seq_len=512,
                      rope_scaling=_llama31_scaling(32.0), tie_embeddings=True),
}


# ---------------------------------------------------------------------------------------
# Modules


def _at_least_f32(x: Tensor) -> Tensor:
    # The precision Meta computes norms and rotations in; float64 stays float64 (tests).
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, round to x's dtype, then scale: Meta's and HF's rounding points.
        xf = _at_least_f32(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary embedding of Meta's layout: the pairs (2i, 2i+1) of each head rotate by
    angle position * inv_freq[i]. q (B, S, Hq, D), k (B, S, Hkv, D), cos/sin (B, S, D/2)
    float32. The same contract as ``llama_fast.apply_rope(..., interleaved=True)``."""

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads

        def rotate(x: Tensor) -> Tensor:
            x1, x2 = _at_least_f32(x).unflatten(-1, (-1, 2)).unbind(-1)  # even and odd lanes
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            return out.flatten(-2).type_as(x)

        return rotate(q), rotate(k)


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, (max_batch, max_seq, Hkv, D): the token at
    position p of row b is in slot [b, p].

    Pad tokens (negative positions) are written to the slots counted from the end
    (Python's negative indexing: -1 is the last slot). Nothing reads those before the row's
    own tokens overwrite them, as a query at position p reads slots [0, p] only, and a row
    fits (pads + tokens <= max_seq). So the write needs no mask and no host sync.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, S, Hkv, D) at input_pos (B, S); return the B rows' whole caches."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k_cache[rows, input_pos] = k
        self.v_cache[rows, input_pos] = v
        return self.k_cache[: k.shape[0]], self.v_cache[: k.shape[0]]


class Attention(nn.Module):
    """Grouped-query attention with rotary embedding and an optional KV cache.

    A replacement (llama_fast's fused module) keeps the parameters wq/wk/wv/wo, the
    attributes n_heads, n_kv_heads, head_dim and kv_cache (Transformer.setup_cache sets
    it), and forward's contract below.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.rotary = Rotary()
        self.kv_cache: KVCache | None = None  # set by Transformer.setup_cache

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        """x (B, S, dim); cos/sin (B, S, D/2); input_pos (B, S), needed with a cache.

        ``mask`` None means plain causal attention of x's tokens among themselves (the
        training forward: no cache, no padding). Otherwise it is a boolean (B, 1, S, keys)
        mask, True where a query may attend, keys being x's tokens (no cache) or the cache
        slots [0, max_seq) (with a cache).
        """
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = self.rotary(q, k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, S, D)
        if mask is None:
            # The flash backend does GQA itself (enable_gqa) but takes no mask.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # With a mask, a GQA call falls back to the math backend, which materialises
            # the (B, H, S, keys) scores: repeat the kv heads instead, as HF does.
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @classmethod
    def from_name(cls, name: str) -> Transformer:
        return cls(ModelArgs.from_name(name))

    # -- KV cache --------------------------------------------------------------------

    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                    device=None) -> None:
        """Give every layer a zeroed KV cache; from then on forward needs input_pos.
        Defaults: the context length of the config, the embeddings' dtype and device."""
        weight = self.tok_embeddings.weight
        max_seq_len = max_seq_len or self.args.max_seq_len
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim,
                                    dtype or weight.dtype, device or weight.device)

    def drop_cache(self) -> None:
        """Back to the cache-free (training) forward."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    @property
    def cache(self) -> KVCache | None:
        return self.layers[0].attention.kv_cache if len(self.layers) else None

    # -- forward ---------------------------------------------------------------------

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, last_only: bool = False) -> Tensor:
        """tokens (B, S) -> logits (B, S, vocab), or (B, 1, vocab) with ``last_only``; float32
        whatever the model's dtype (float64 for a float64 model).

        input_pos: the position of each token, (S,) or (B, S); a negative position marks a
        pad token. None means 0..S-1 for every row (needs no cache). With a cache
        (``setup_cache``) it is required: the new tokens' keys and values go to those slots
        and each token attends to the slots up to its own position.
        """
        bsz, seqlen = tokens.shape
        cache = self.cache
        if cache is None and input_pos is None:
            # Training forward: all rows at 0..S-1, causal, no mask tensor (flash path).
            positions = torch.arange(seqlen, device=tokens.device).expand(bsz, seqlen)
            mask = None
        else:
            if input_pos is None:
                raise ValueError("with a KV cache, forward needs input_pos (the positions of the new tokens)")
            positions = input_pos.to(device=tokens.device, dtype=torch.long).expand(bsz, seqlen)
            if cache is not None and bsz > cache.k_cache.shape[0]:
                raise ValueError(f"batch {bsz} is larger than the cache's max_batch_size {cache.k_cache.shape[0]}")
            # Keys are identified by their positions: x's own tokens, or the cache's slots.
            key_pos = positions if cache is None else torch.arange(cache.k_cache.shape[1], device=tokens.device)[None]
            mask = _attention_mask(positions, key_pos)

        cos, sin = rope_cos_sin(positions.clamp(min=0), self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask)
        if last_only:
            h = h[:, -1:]
        # float32 logits, as Meta's reference: sampling and the loss want them anyway.
        return _at_least_f32(self.output(self.norm(h)))


def _attention_mask(q_pos: Tensor, key_pos: Tensor) -> Tensor:
    """(B, 1, Sq, Sk) boolean: a query at position p attends to the keys at positions
    [0, p]. A pad query (p < 0) would then attend to nothing and SDPA would give NaN; it
    attends to everything instead (its output is never used, and nothing attends to it)."""
    q = q_pos[:, :, None]
    kp = key_pos[:, None, :]
    mask = ((kp >= 0) & (kp <= q)) | (q < 0)
    return mask[:, None]


# ---------------------------------------------------------------------------------------
# Generation


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits (B, vocab) float32 -> (B,) token ids."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus: keep the most likely tokens whose mass before them is below top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before > top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises itself
        return order.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Transformer, prompt_tokens: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue a batch of prompts of any lengths; returns the new tokens of each.

    Prompts are left-padded into one batch; each row keeps its own positions (0 at its
    first token), so a row's tokens do not depend on what it is batched with. Greedy at
    ``temperature=0``, else sampling with nucleus ``top_p``. A row stops after emitting one
    of ``stop_tokens`` (which is included in its output), or after ``max_new_tokens``.
    Uses the model's cache if it is big enough, otherwise makes one and drops it after.
    """
    if isinstance(prompt_tokens, Tensor):
        prompt_tokens = [prompt_tokens.tolist()] if prompt_tokens.dim() == 1 else prompt_tokens.tolist()
    prompts = [list(map(int, p)) for p in prompt_tokens]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]

    device = model.tok_embeddings.weight.device
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = longest + max_new_tokens
    cache = model.cache
    own_cache = cache is None or cache.k_cache.shape[0] < bsz or cache.k_cache.shape[1] < total
    if own_cache:
        model.setup_cache(bsz, total)
    try:
        # Left padding: row b's prompt ends at column `longest - 1`; its pads get negative
        # positions. The pad id is arbitrary (0): nothing attends to pads.
        tokens = torch.zeros(bsz, longest, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, longest - len(p):] = torch.tensor(p, device=device)
        input_pos = torch.arange(longest, device=device)[None] - (longest - lengths)[:, None]
        logits = model(tokens, input_pos, last_only=True)[:, -1]

        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        out = []
        pos = lengths.clone()  # the position of the token about to be fed
        for step in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, generator)
            out.append(torch.where(done, -1, nxt))  # -1: the row had already stopped
            done |= torch.isin(nxt, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = model(nxt[:, None], pos[:, None])[:, -1]
            pos += 1
    finally:
        if own_cache:
            model.drop_cache()
    new = torch.stack(out, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in new]


# ---------------------------------------------------------------------------------------
# Checkpoints


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
        args.rope_scaling = _llama31_scaling(float(factor))
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
