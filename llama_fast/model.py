"""A readable Llama 3 / 3.1 / 3.2 (text) in plain PyTorch: the reference that llama_fast's
fused modules are checked against and patched into.

Nothing here calls a llama_fast kernel. The modules and their parameter names are Meta's
(``tok_embeddings``, ``layers.N.attention.wq`` ...), so Meta's ``consolidated.*.pth`` load
as they are and Hugging Face checkpoints are renamed on the way in (``load_checkpoint``).
The module boundaries are the ones a patcher swaps: ``RMSNorm``, ``Rotary``, ``Attention``,
``FeedForward``, ``KVCache``, and ``CrossEntropyHead`` (the loss).

Positions and padding. Every token has a position; a negative position marks a (left) pad
token, which no token attends to. With a KV cache, the key and value of the token at
position p live in slot p of its row (``KVCache``), so each row of a batch fills its cache
from slot 0 whatever its padding, and a row of length n attends to slots [0, n): the layout
``llama_fast.flash_decode`` reads (its ``cache_seqlens`` is ``input_pos + 1``).

    model = Transformer(ModelArgs.from_name("tiny"))
    logits = model(tokens)                          # (B, S) -> (B, S, vocab) float32
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])  # training: the mean cross-entropy
    model.setup_cache(max_batch_size=4, max_seq_len=256)
    logits = model(prompt, input_pos)               # prefill, input_pos (S,) or (B, S)
    logits = model(next_tok[:, None], pos[:, None]) # one decoding step per row

Generation is ``llama_fast.generation``, checkpoint loading and conversion
``llama_fast.checkpoint``.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

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


def llama31_scaling(factor: float) -> dict:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_L3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
_L3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_L31 = dict(rope_scaling=llama31_scaling(8.0), max_seq_len=131072)
_L32 = dict(rope_scaling=llama31_scaling(32.0), max_seq_len=131072, tie_embeddings=True)

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
                     rope_scaling=llama31_scaling(8.0)),
    "tiny-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32, max_seq_len=512,
                      rope_scaling=llama31_scaling(32.0), tie_embeddings=True),
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


class CrossEntropyHead(nn.Module):
    """The training loss: the mean cross-entropy of the output head's float32 logits against
    ``targets`` over the positions whose target is not ``ignore_index`` (NaN if none is).

    It is handed the head (an ``nn.Linear``) rather than its logits so that a replacement
    can compute the loss without materialising the (tokens x vocab) logits:
    ``llama_fast.patch`` swaps in ``llama_fast.model_fused.FusedCrossEntropyHead``.
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, h: Tensor, output: nn.Module, targets: Tensor) -> Tensor:
        logits = _at_least_f32(output(h))
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


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
        self.loss_head = CrossEntropyHead()  # no parameters: the state dict is Meta's

    @classmethod
    def from_name(cls, name: str) -> Transformer:
        return cls(ModelArgs.from_name(name))

    # -- initialisation --------------------------------------------------------------

    def init_weights(self, seed: int | None = None, *, std: float = 0.02) -> None:
        """Fill every parameter and buffer in place, the same values for the same ``seed``
        whatever the device, the dtype, the sharding (FSDP2 or tensor-parallel DTensors)
        and whether the model is patched. Used after ``to_empty`` of a model built on the
        meta device:

            with torch.device("meta"):
                model = Transformer(args)
            llama_fast.patch(model)        # optional; patched modules keep these names
            fully_shard(...)               # optional
            model.to_empty(device="cuda")
            model.init_weights(seed=0)

        The scheme (torchtitan's for Llama 3), by parameter name:

        * ``tok_embeddings.weight``: normal, std 1; std ``dim ** -0.5`` when it is also the
          output projection (``tie_embeddings``), the output's scale;
        * ``wq``, ``wk``, ``wv``, ``w1`` (gate) of layer i: normal truncated at 3 std, std ``std``;
        * ``wo``, ``w2`` (down), ``w3`` (up) of layer i: truncated normal, std
          ``std / sqrt(2 (i + 1))``, so deeper layers add smaller updates to the residual;
        * norms' weights: ones; ``output.weight``: truncated normal, std ``dim ** -0.5``;
        * buffers (the KV caches of ``setup_cache``): zeros.

        Each parameter is drawn on the CPU in float32 from a generator seeded by ``seed``
        and the parameter's name (so neither the order nor the presence of other parameters
        changes it), then copied into the parameter; a DTensor takes its own shard of the
        drawn tensor, with no communication. ``seed`` None draws one from torch's default
        generator: in a process group, seed that alike on every rank (``torch.manual_seed``)
        or pass ``seed``. Raises ValueError for a parameter the scheme does not name (a
        module added to the model), rather than leaving it uninitialised.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        dim = self.args.dim
        for name, param in _unique_named(self.named_parameters(remove_duplicate=False)):
            sampler = _init_sampler(name, dim, std, self.args.tie_embeddings)
            if sampler is None:
                raise ValueError(f"init_weights: no initialisation for parameter {name!r} "
                                 "(not a parameter of llama_fast.model.Transformer)")
            _fill(param, sampler, seed, name)
        for name, buf in self.named_buffers():
            with torch.no_grad():
                (buf.to_local() if hasattr(buf, "to_local") else buf).zero_()

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

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, *, last_only: bool = False,
                targets: Tensor | None = None) -> Tensor:
        """tokens (B, S) -> logits (B, S, vocab), or (B, 1, vocab) with ``last_only``; float32
        whatever the model's dtype (float64 for a float64 model).

        targets: (B, S) int64, the token each position should predict (for language
        modelling, the tokens shifted left by one: ``model(seq[:, :-1], targets=seq[:, 1:])``),
        -100 where a position has no loss (padding, prompts). Given, forward returns the
        scalar loss instead of the logits: ``loss_head``'s mean cross-entropy over the
        positions with a target (float32 logits unpatched; ``llama_fast.patch`` fuses the
        output head with the loss, and no logits are made).

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
        if targets is not None:
            if last_only:
                raise ValueError("forward got targets and last_only=True: the loss needs every position (drop last_only)")
            if tuple(targets.shape) != (bsz, seqlen):
                raise ValueError(f"targets must have the shape of tokens, {(bsz, seqlen)}, got {tuple(targets.shape)}")
            return self.loss_head(self.norm(h), self.output, targets)
        if last_only:
            h = h[:, -1:]
        # float32 logits, as Meta's reference: sampling and the loss want them anyway.
        return _at_least_f32(self.output(self.norm(h)))


def _unique_named(named):
    # A tied weight appears under two names; it is drawn once, under its first name
    # (tok_embeddings.weight, which comes first in the module order).
    seen = set()
    for name, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _init_sampler(name: str, dim: int, std: float, tied: bool):
    """(generator, shape) -> float32 CPU tensor for the parameter ``name``; None if unknown."""
    parts = name.split(".")
    leaf = parts[-2] if len(parts) >= 2 else ""

    def trunc(s):
        return lambda g, shape: nn.init.trunc_normal_(torch.empty(shape), 0.0, s, -3 * s, 3 * s, generator=g)

    if name == "tok_embeddings.weight":
        s = dim ** -0.5 if tied else 1.0
        return lambda g, shape: torch.empty(shape).normal_(0.0, s, generator=g)
    if name == "output.weight":
        return trunc(dim ** -0.5)
    if leaf in ("attention_norm", "ffn_norm", "norm") and parts[-1] == "weight":
        return lambda g, shape: torch.ones(shape)
    if parts[0] == "layers" and len(parts) == 5 and parts[-1] == "weight":
        depth_std = std / (2 * (int(parts[1]) + 1)) ** 0.5
        if leaf in ("wq", "wk", "wv", "w1"):
            return trunc(std)
        if leaf in ("wo", "w2", "w3"):
            return trunc(depth_std)
    return None


def _fill(param: Tensor, sampler, seed: int, name: str) -> None:
    """Draw ``param``'s full value on the CPU from (seed, name) and copy it in; a DTensor
    copies its own shard of it."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    full = sampler(g, tuple(param.shape))
    with torch.no_grad():
        if hasattr(param, "device_mesh") and hasattr(param, "to_local"):  # a DTensor
            from torch.distributed.tensor import distribute_tensor

            local = param.to_local()
            # Every rank drew the same full tensor: each takes its shard locally (no scatter).
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local.copy_(shard.to(local.device))
        else:
            param.copy_(full)


def _attention_mask(q_pos: Tensor, key_pos: Tensor) -> Tensor:
    """(B, 1, Sq, Sk) boolean: a query at position p attends to the keys at positions
    [0, p]. A pad query (p < 0) would then attend to nothing and SDPA would give NaN; it
    attends to everything instead (its output is never used, and nothing attends to it)."""
    q = q_pos[:, :, None]
    kp = key_pos[:, None, :]
    mask = ((kp >= 0) & (kp <= q)) | (q < 0)
    return mask[:, None]
