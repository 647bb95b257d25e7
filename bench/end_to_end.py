"""End-to-end rows: a Llama-3 training step and inference, whole models with random weights.

Training (op "train", pass "fwd+bwd+adamw"): one step = forward, cross-entropy loss,
backward, AdamW step, in bf16 (weights, gradients and optimizer state; no float32 master
copy, the same for every provider). Providers:

  hf_eager        transformers' LlamaForCausalLM built from a LlamaConfig, attention "sdpa"
  hf_compile      the same under torch.compile (first steps compile; scheduled last)
  hf_liger        the same after Liger-Kernel's ``apply_liger_kernel_to_llama(model=...)``
                  with its defaults (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)
  hf_llama_fast   the same after ``llama_fast.patch(model)``, the fused linear cross-entropy
                  included (no logits in the training step)
  hf_llama_fast_no_ce
                  after ``llama_fast.patch(model, cross_entropy=False)``: HF's lm_head and loss
  ref_eager       llama_fast's reference model (``llama_fast.model.Transformer``) unpatched;
                  its loss is ``model(tokens, targets=...)``: float32 logits, F.cross_entropy
  ref_llama_fast  the reference model after ``llama_fast.patch(model)`` (fused loss head)
  ref_llama_fast_no_ce
                  after ``llama_fast.patch(model, cross_entropy=False)``: the eager loss head

The _no_ce rows against the plain ones show what the fused loss does to the step's time
and peak memory, the rest of the patch being the same.

ms is the median step time; tokens/s = batch * seq / ms (the markdown shows it); tflops is
the model FLOPs per step over ms (6 x matmul parameters x tokens, plus causal attention at
3.5 x its forward 2·B·Hq·S²·D per layer, the convention of the attention rows), and
fraction_of_ceiling is that over the measured matmul ceiling (a model FLOPs utilisation);
peak_mem_mb is the largest memory allocated during the steps, weights and optimizer
state included.

Inference (op "infer", providers ref_eager and ref_llama_fast, with a KV cache):
  pass "prefill"       the prompt's forward (last-token logits): ms, tflops as above (2 x)
  pass "decode"        one decoding step for the batch, called eagerly
  pass "decode_graph"  the same step replayed from a CUDA graph (captured after two warm-up
                       steps; GPU only). A step that cannot be captured (a host
                       synchronisation inside it) gives a null row and an "unavailable"
                       entry with the capture error.
  decode: ms per step; tokens/s = batch / ms; gbps = (weights + the K/V cache of the
  context, read once) / ms, as a fraction of the copy ceiling. The steps feed a fixed token
  (sampling is not timed) at advancing positions.

No downloads: every model is built from a config, so the GPU machine needs no network.
Models are bf16 whatever --dtypes says (fp16 training would need loss scaling).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass

import torch

import llama_fast

TRAIN_PROVIDERS = ("hf_eager", "hf_llama_fast", "hf_llama_fast_no_ce", "hf_liger", "ref_eager", "ref_llama_fast",
                   "ref_llama_fast_no_ce", "hf_compile")
INFER_PROVIDERS = ("ref_eager", "ref_llama_fast")
# The providers that run llama_fast.patch, with its flags.
PATCHED = {"hf_llama_fast": {}, "hf_llama_fast_no_ce": {"cross_entropy": False},
           "ref_llama_fast": {}, "ref_llama_fast_no_ce": {"cross_entropy": False}}
E2E_DTYPE = torch.bfloat16
DECODE_STEPS = {"smoke": 2, "headline": 32, "full": 64}
# (warm-up, timed) steps; the interpreter has no JIT to warm up, and one step is plenty there.
STEPS = {"smoke": (0, 1), "headline": (2, 5), "full": (2, 5)}


@dataclass(frozen=True)
class E2EShape:
    model: str  # a name model_args knows
    batch: int
    seqlen: int  # training sequence, or the prompt length for inference

    def label(self) -> str:
        return f"{self.model} B{self.batch}xS{self.seqlen}"


def model_args(name: str):
    """The reference ModelArgs of a benchmark model: Llama-3.2-1B as it is, Llama-3-8B's
    layer shape with 2 layers (so it fits any GPU next to its optimizer), and a tiny one
    layer model for --smoke (the Triton interpreter's cost grows with every kernel call)."""
    ModelArgs = llama_fast.ModelArgs
    if name == "llama-3-8b-2l":
        return ModelArgs.from_name("llama-3-8b").scaled(n_layers=2)
    if name == "tiny-1l":
        return ModelArgs.from_name("tiny").scaled(n_layers=1)
    return ModelArgs.from_name(name)


def train_shapes(grid: str) -> list[E2EShape]:
    if grid == "smoke":
        return [E2EShape("tiny-1l", 1, 16)]
    if grid == "headline":
        return [E2EShape("llama-3.2-1b", 1, 4096)]
    return [E2EShape(m, 1, s) for m in ("llama-3.2-1b", "llama-3-8b-2l") for s in (2048, 4096, 8192)]


def infer_shapes(grid: str) -> list[E2EShape]:
    if grid == "smoke":
        return [E2EShape("tiny-1l", 1, 16)]
    if grid == "headline":
        return [E2EShape("llama-3.2-1b", 1, 4096)]
    return [E2EShape(m, b, s) for m in ("llama-3.2-1b", "llama-3-8b-2l") for b, s in ((1, 2048), (1, 8192), (16, 2048))]


# ---------------------------------------------------------------------------------------
# FLOPs and bytes


def matmul_params(args) -> int:
    """Weights that multiply activations: the layers' projections and the output head."""
    d, hd = args.dim, args.head_dim
    per_layer = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2 + 3 * d * args.ffn_dim
    return args.n_layers * per_layer + d * args.vocab_size


def attention_fwd_flops(args, shape: E2EShape) -> float:
    """Causal attention forward over all layers: 4·B·Hq·S²·D halved."""
    return args.n_layers * 2 * shape.batch * args.n_heads * shape.seqlen ** 2 * args.head_dim


def train_flops(args, shape: E2EShape) -> float:
    tokens = shape.batch * shape.seqlen
    return 6 * matmul_params(args) * tokens + 3.5 * attention_fwd_flops(args, shape)


def prefill_flops(args, shape: E2EShape) -> float:
    return 2 * matmul_params(args) * shape.batch * shape.seqlen + attention_fwd_flops(args, shape)


def decode_bytes(args, shape: E2EShape, e: int) -> int:
    """What one decoding step must read: every weight (the embedding row aside) and the K/V
    cache of the context."""
    weights = matmul_params(args) + 2 * args.n_layers * args.dim + args.dim  # + the norms
    kv = 2 * args.n_layers * shape.batch * shape.seqlen * args.n_kv_heads * args.head_dim
    return (weights + kv) * e


# ---------------------------------------------------------------------------------------
# models


def hf_config(args):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, **args.rope_scaling}
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings, rope_parameters=rope, attn_implementation="sdpa",
    )


def _small_init(model) -> None:
    # Random weights at a moderate scale (std 0.02, norms near 1): finite losses and logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.02)


def build_model(provider: str, args, device):
    """The model a provider trains or runs, on ``device`` in bf16, and whether it is HF's."""
    lf = llama_fast
    hf = provider.startswith("hf_")
    with torch.device(device):
        if hf:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(hf_config(args))
        else:
            model = lf.Transformer(args)
    _small_init(model)
    model = model.to(E2E_DTYPE)
    if provider in PATCHED:
        lf.patch(model, **PATCHED[provider])
    elif provider == "hf_liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    elif provider == "hf_compile":
        model = torch.compile(model)
    return model, hf


@contextlib.contextmanager
def restore_transformers_llama():
    """Liger patches transformers' Llama module globals and LlamaForCausalLM.forward, not
    only the model it is given: put them back so later rows run Hugging Face's code."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forwards = {cls: cls.__dict__.get("forward") for cls in vars(modeling_llama).values()
                if isinstance(cls, type) and "forward" in cls.__dict__}
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(modeling_llama).get(name) is not value:
                setattr(modeling_llama, name, value)
        for cls, forward in forwards.items():
            if cls.__dict__.get("forward") is not forward:
                cls.forward = forward


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _median_ms(step, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _start_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _row(op: str, shape: E2EShape, pass_: str, provider: str) -> dict:
    return {"op": op, "shape": shape.label(), "dtype": "bfloat16", "pass": pass_, "provider": provider,
            "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None, "peak_mem_mb": None}


def empty_train_row(shape: E2EShape, provider: str) -> dict:
    return _row("train", shape, "fwd+bwd+adamw", provider)


def empty_infer_row(shape: E2EShape, pass_: str, provider: str) -> dict:
    return _row("infer", shape, pass_, provider)


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


# ---------------------------------------------------------------------------------------
# training


def _measure_train(shape: E2EShape, provider: str, args, device, warmup: int, reps: int) -> tuple[float, float | None]:
    """(median step ms, peak MiB); the model and optimizer die with this frame."""
    model, hf = build_model(provider, args, device)
    model.train()  # HF's fused loss serves training mode only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (shape.batch, shape.seqlen + 1), generator=gen).to(device)

    def step():
        if hf:  # HF shifts the labels itself (Liger and llama_fast fuse the head with the loss)
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        else:  # the reference's loss entry point (its loss head, fused when patched)
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _start_peak(device)
    ms = _median_ms(step, device, warmup, reps)
    return ms, _peak_mb(device)


def train_row(shape: E2EShape, provider: str, device, ceilings: dict, warmup: int, reps: int) -> dict:
    args = model_args(shape.model)
    guard = restore_transformers_llama() if provider == "hf_liger" else contextlib.nullcontext()
    try:
        with guard:
            ms, peak = _measure_train(shape, provider, args, device, warmup, reps)
    finally:
        _release(device)
    flops = train_flops(args, shape) / (ms * 1e9)
    ceiling = ceilings.get("bf16_tflops")
    row = empty_train_row(shape, provider)
    row.update(ms=_sig(ms), tflops=_sig(flops), fraction_of_ceiling=_sig(flops / ceiling) if ceiling else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row


# ---------------------------------------------------------------------------------------
# inference


def infer_passes(device) -> tuple[str, ...]:
    """The inference rows of one model and provider: decode_graph only on a GPU."""
    return ("prefill", "decode", "decode_graph") if device.type == "cuda" else ("prefill", "decode")


def _graphed(step, device):
    """``step`` captured in a CUDA graph (two warm-up runs on a side stream first: Triton's
    JIT and cuBLAS's workspaces must not happen during capture); returns the replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _decode_ms(run, pos, start: int, steps: int, warmup: int, device) -> float:
    """Milliseconds per decoding step: ``steps`` calls of ``run``, the position advancing."""
    for i in range(warmup):
        pos.fill_(start + i)
        run()
    _sync(device)
    begin = time.perf_counter()
    for i in range(steps):
        pos.fill_(start + i)  # in place: a captured graph reads this very tensor
        run()
    _sync(device)
    return (time.perf_counter() - begin) * 1e3 / steps


def _measure_infer(shape: E2EShape, provider: str, args, device, warmup: int, reps: int, decode_steps: int,
                   note_unavailable) -> dict:
    """{pass: (ms, peak MiB)} for prefill, decode and (on a GPU, if capturable) decode_graph."""
    model, _ = build_model(provider, args, device)
    model.eval()
    b, s = shape.batch, shape.seqlen
    out = {}
    with torch.no_grad():
        model.setup_cache(b, s + decode_steps + 8)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, args.vocab_size, (b, s), generator=gen).to(device)
        positions = torch.arange(s, device=device)
        _start_peak(device)
        out["prefill"] = (_median_ms(lambda: model(prompt, positions, last_only=True), device, warmup, reps),
                          _peak_mb(device))
        token = torch.zeros(b, 1, dtype=torch.long, device=device)
        pos = torch.full((b, 1), s, dtype=torch.long, device=device)

        def step():
            return model(token, pos)

        _start_peak(device)
        out["decode"] = (_decode_ms(step, pos, s, decode_steps, warmup, device), _peak_mb(device))
        if device.type == "cuda":
            try:
                replay = _graphed(step, device)
            except Exception as exc:  # e.g. a host synchronisation inside the step
                note_unavailable(f"infer decode_graph {shape.label()} {provider}",
                                 f"CUDA graph capture failed: {type(exc).__name__}: {exc}".splitlines()[0])
                torch.cuda.synchronize(device)
            else:
                _start_peak(device)
                out["decode_graph"] = (_decode_ms(replay, pos, s, decode_steps, warmup, device), _peak_mb(device))
    return out


def infer_rows(shape: E2EShape, provider: str, device, ceilings: dict, warmup: int, reps: int,
               decode_steps: int, note_unavailable) -> list[dict]:
    """The rows of ``infer_passes`` for one model and provider (a null decode_graph row
    where the step could not be captured)."""
    args = model_args(shape.model)
    try:
        measured = _measure_infer(shape, provider, args, device, warmup, reps, decode_steps, note_unavailable)
    finally:
        _release(device)
    ceiling, copy = ceilings.get("bf16_tflops"), ceilings.get("copy_gbps")
    rows = []
    for pass_ in infer_passes(device):
        row = empty_infer_row(shape, pass_, provider)
        if pass_ in measured:
            ms, peak = measured[pass_]
            row.update(ms=_sig(ms), peak_mem_mb=None if peak is None else _sig(peak))
            if pass_ == "prefill":
                tflops = prefill_flops(args, shape) / (ms * 1e9)
                row.update(tflops=_sig(tflops), fraction_of_ceiling=_sig(tflops / ceiling) if ceiling else None)
            else:
                gbps = decode_bytes(args, shape, E2E_DTYPE.itemsize) / (ms * 1e6)
                row.update(gbps=_sig(gbps), fraction_of_ceiling=_sig(gbps / copy) if copy else None)
        rows.append(row)
    return rows
