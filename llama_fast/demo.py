"""``python -m llama_fast demo``: build a Llama 3, patch it, check it, generate, time it.

Steps: build (``--checkpoint`` via ``load_checkpoint``, else a randomly initialised config,
scaled down on a CPU), compare patched and unpatched logits (training forward and a cached
decoding step; PASS/FAIL, exit 1 on FAIL), generate text with the tokenizer when one is
found (else token ids), then time prefill, decoding (tokens/s) and one training step
(forward + backward + AdamW) unpatched and patched, and print a summary table.

Without CUDA the Triton kernels run under the Triton interpreter (``__main__`` sets
TRITON_INTERPRET=1 before triton is imported): fine for the numerics check on a tiny input,
far too slow to time, so the timing part defaults to the ``torch`` backend there.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

# On a CPU without a checkpoint: a config's shape scaled to finish in well under a minute.
CPU_DIM, CPU_HEADS, CPU_LAYERS = 256, 4, 2
PROMPT = "The fastest way to run a language model is"


# The demo's --help description (plain text: argparse prints it as it is).
DESCRIPTION = (
    "Build a Llama 3 (from --checkpoint, else a random model of --config, scaled down on a CPU), "
    "compare patched and unpatched logits (PASS/FAIL, exit 1 on FAIL), generate a few tokens, and "
    "time prefill, decoding and a training step, unpatched and patched. On a CPU the timings use "
    "the torch backend and are no GPU speed: the table then has no speed-up column."
)


def _config_names() -> list[str]:
    from llama_fast.model import CONFIGS

    return sorted(CONFIGS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a Meta (params.json) or Hugging Face (config.json) checkpoint folder; "
                             "without it the model is random")
    parser.add_argument("--config", default="llama-3.2-1b", metavar="NAME",
                        help="named config of the random model, one of: " + ", ".join(_config_names())
                             + " (default: %(default)s)")
    parser.add_argument("--layers", type=int, metavar="N", help="number of layers (default: the config's; 2 on a CPU)")
    parser.add_argument("--vocab", type=int, metavar="N", help="vocabulary size of a random model (default: the config's)")
    parser.add_argument("--seq", type=int, default=64, metavar="N",
                        help="prompt / training sequence length (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=16, metavar="N",
                        help="tokens to generate and time (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="batch size of the timings (default: %(default)s)")
    parser.add_argument("--device", metavar="DEVICE", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                        help="llama_fast backend for the timings (default: auto on CUDA, torch on CPU)")
    parser.add_argument("--check-backend", choices=("auto", "torch", "triton", "cuda"), default="auto",
                        help="backend of the numerics check (default: %(default)s, the kernels; "
                             "the Triton interpreter on a CPU)")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="path of Llama 3's tokenizer.model (default: llama-models' if installed, "
                             "else the demo prints token ids)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the random model's weights (default: %(default)s)")


def usage_error(args) -> str | None:
    """Why these arguments cannot work, in one line, or None. Checked before anything is
    built, so a typo costs a line on stderr instead of a traceback after minutes of work."""
    from pathlib import Path

    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_dir():
            return f"--checkpoint {args.checkpoint}: no such folder"
        if not (path / "params.json").exists() and not (path / "config.json").exists():
            return f"--checkpoint {args.checkpoint}: neither params.json (Meta) nor config.json (Hugging Face) in it"
    elif args.config.lower() not in _config_names():
        return f"unknown --config {args.config!r}; valid names: {', '.join(_config_names())}"
    for flag, value in (("--seq", args.seq), ("--new-tokens", args.new_tokens), ("--batch", args.batch),
                        ("--layers", args.layers), ("--vocab", args.vocab)):
        if value is not None and value < 1:
            return f"{flag} must be >= 1, got {value}"
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            return f"--device must be cpu, cuda or cuda:N, got {args.device!r}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return f"--device {args.device} but no CUDA GPU is available"
    return None


def report_usage_error(error: str) -> int:
    """One line on stderr, as argparse words its own errors; the exit status argparse uses (2)."""
    print(f"llama-fast demo: error: {error}", file=sys.stderr)
    return 2


class Progress:
    """A progress bar: tqdm when importable, else plain text lines (no dependency)."""

    def __init__(self, total: int, desc: str = "demo"):
        self.total, self.n, self.desc = total, 0, desc
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stdout, leave=True)

    def step(self, what: str) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            self._bar.update(1)
            return
        width = 24
        done = width * self.n // self.total
        print(f"[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {what}", flush=True)

    def log(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args, device: torch.device, dtype: torch.dtype):
    from llama_fast.checkpoint import load_checkpoint
    from llama_fast.model import ModelArgs, Transformer

    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
        if args.layers is not None and args.layers < len(model.layers):
            model.layers = model.layers[: args.layers]
            model.args = model.args.scaled(n_layers=args.layers)
        return model, f"checkpoint {args.checkpoint}"
    margs = ModelArgs.from_name(args.config)
    changes = {}
    if device.type != "cuda":
        # Same head-count ratio (GQA) and FFN ratio as the config, at dim 256.
        heads = CPU_HEADS
        kv = max(1, heads * margs.n_kv_heads // margs.n_heads)
        ffn = CPU_DIM * margs.ffn_dim // margs.dim
        changes.update(dim=CPU_DIM, n_heads=heads, n_kv_heads=kv, ffn_hidden_dim=ffn, n_layers=CPU_LAYERS)
    if args.layers is not None:
        changes["n_layers"] = args.layers
    if args.vocab is not None:
        changes["vocab_size"] = args.vocab
    margs = margs.scaled(**changes)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Transformer(margs)
    with torch.no_grad():  # a small init keeps random logits moderate; norms away from 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.02)
    shape = (f"dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads ({margs.n_kv_heads} KV), "
             f"FFN {margs.ffn_dim}, vocab {margs.vocab_size}")
    scaled = " scaled down for the CPU" if device.type != "cuda" else ""
    return model.to(dtype), f"random {args.config}{scaled}: {shape}"


def load_tokenizer(args, vocab_size: int):
    from llama_fast.tokenizer import Tokenizer

    try:
        tok = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer.from_llama_models()
    except (FileNotFoundError, ImportError) as e:
        return None, f"no tokenizer found ({e}); generating token ids"
    if tok.n_words > vocab_size:
        return None, f"tokenizer has {tok.n_words} tokens, more than the model's vocab {vocab_size}; generating token ids"
    return tok, "tokenizer: Llama 3 (tiktoken)"


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def check_numerics(model, device, backend: str, tol: float) -> tuple[float, bool]:
    """Patched vs unpatched logits on a tiny input: the training forward, and a left-padded
    prefill + one decoding step with the KV cache. Returns (max relative diff, passed)."""
    import llama_fast

    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 8), generator=gen).to(device)
    pos = (torch.arange(8)[None] - torch.tensor([[0], [3]])).to(device)  # row 1 left-padded by 3
    step_tok = torch.randint(0, vocab, (2, 1), generator=gen).to(device)
    step_pos = pos[:, -1:] + 1

    def run():
        with torch.no_grad():
            train = model(tokens)
            model.setup_cache(2, 16)
            try:
                prefill = model(tokens, pos)
                step = model(step_tok, step_pos)
            finally:
                model.drop_cache()
        return train, prefill[pos >= 0], step

    want = run()
    llama_fast.patch(model)
    try:
        with llama_fast.backend(backend):
            got = run()
    finally:
        llama_fast.unpatch(model)
    diff = max(_max_rel_diff(g, w) for g, w in zip(got, want))
    return diff, diff <= tol


def time_variant(model, device, backend: str, batch: int, seq: int, new_tokens: int, progress: Progress,
                 name: str) -> dict:
    """Prefill ms, decoding tokens/s and training step ms, after one warm-up of each."""
    import llama_fast

    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    out = {}
    with llama_fast.backend(backend):
        model.eval()
        model.setup_cache(batch, seq + new_tokens + 1)
        try:
            with torch.no_grad():
                pos = torch.arange(seq, device=device)
                for warm in (True, False):
                    _sync(device)
                    t0 = time.perf_counter()
                    logits = model(prompt, pos, last_only=True)
                    _sync(device)
                    if not warm:
                        out["prefill_ms"] = (time.perf_counter() - t0) * 1e3
                progress.step(f"{name}: prefill")
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                # warm-up step, then the timed ones (each writes its own cache slot)
                model(nxt, torch.full((batch, 1), seq, device=device))
                _sync(device)
                t0 = time.perf_counter()
                for i in range(new_tokens):
                    logits = model(nxt, torch.full((batch, 1), seq + 1 + i, device=device))
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                _sync(device)
                out["decode_tok_s"] = batch * new_tokens / max(time.perf_counter() - t0, 1e-9)
                progress.step(f"{name}: decode")
        finally:
            model.drop_cache()

        # Training on a copy, so both variants start from the same weights.
        train_model = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
        for warm in (True, False):
            _sync(device)
            t0 = time.perf_counter()
            loss = train_model(tokens[:, :-1], targets=tokens[:, 1:])  # the fused loss head when patched
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            if not warm:
                out["train_ms"] = (time.perf_counter() - t0) * 1e3
        out["loss"] = loss.item()
        del train_model, opt
        progress.step(f"{name}: training step")
    return out


def generate_sample(model, tokenizer, device, backend: str, new_tokens: int) -> str:
    import llama_fast
    from llama_fast.generation import generate

    if tokenizer is not None:
        prompt = tokenizer.encode(PROMPT, bos=True)
        stops = tokenizer.stop_tokens
    else:
        prompt = torch.randint(0, model.args.vocab_size, (8,), generator=torch.Generator().manual_seed(3)).tolist()
        stops = ()
    with llama_fast.backend(backend):
        new = generate(model, [prompt], max_new_tokens=new_tokens, stop_tokens=stops)[0]
    if tokenizer is not None:
        return f"{PROMPT!r} -> {tokenizer.decode(new)!r}"
    return f"prompt ids {prompt} -> new ids {new}"


def summary_table(rows: list[tuple[str, float, float, bool]], speedup: bool = True) -> str:
    """rows: (metric, unpatched, patched, higher is better). ``speedup`` False leaves out the
    ratio column: on a CPU both variants run the same PyTorch code once each, so their ratio
    is timing noise (1.9x one run, 0.9x the next), not a speed-up."""
    width = 60 if speedup else 50
    lines = [f"{'metric':<22}{'unpatched':>14}{'patched':>14}" + (f"{'speedup':>10}" if speedup else ""), "-" * width]
    for metric, base, fast, higher in rows:
        line = f"{metric:<22}{base:>14.2f}{fast:>14.2f}"
        if speedup:
            ratio = (fast / base if higher else base / fast) if base > 0 and fast > 0 else float("nan")
            line += f"{ratio:>9.2f}x"
        lines.append(line)
    return "\n".join(lines)


def run(args) -> int:
    import llama_fast

    error = usage_error(args)
    if error:
        return report_usage_error(error)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    backend = args.backend or ("auto" if on_gpu else "torch")

    print(f"llama_fast {llama_fast.__version__} demo on {device} ({torch.cuda.get_device_name(device) if on_gpu else 'CPU'}), "
          f"dtype {str(dtype)[6:]}")
    if not on_gpu and args.backend is None:
        print("no GPU: the timings use the 'torch' backend (the Triton kernels would run under the Triton "
              "interpreter, far too slow to time); the numerics check uses the kernels on a tiny input")
    progress = Progress(8, "demo")
    try:
        model, what = build_model(args, device, dtype)
    except FileNotFoundError as exc:  # a checkpoint folder without its weight files
        progress.close()
        return report_usage_error(str(exc))
    progress.log(f"model: {what}")
    progress.step("model built")

    tol = 2e-3 if dtype == torch.float32 else 6e-2
    diff, ok = check_numerics(model, device, args.check_backend, tol)
    progress.step("numerics checked")
    verdict = "PASS" if ok else "FAIL"
    progress.log(f"numerics: patched vs unpatched logits (training forward, padded prefill, cached decoding step; "
          f"backend {args.check_backend}): max relative |diff| {diff:.2e} (tolerance {tol:.0e}): {verdict}")

    results = {"unpatched": time_variant(model, device, backend, args.batch, args.seq, args.new_tokens, progress,
                                         "unpatched")}
    report = llama_fast.patch(model)
    try:
        progress.log(f"patched: {', '.join(f'{k} {n}' for k, n in report.counts.items())} modules replaced")
        results["patched"] = time_variant(model, device, backend, args.batch, args.seq, args.new_tokens, progress,
                                          "patched")
        tokenizer, tok_note = load_tokenizer(args, model.args.vocab_size)
        progress.log(tok_note)
        sample = generate_sample(model, tokenizer, device, backend, args.new_tokens)
    finally:
        llama_fast.unpatch(model)
    progress.close()
    print(f"generated (patched, greedy, random weights unless a checkpoint was given): {sample}")

    base, fast = results["unpatched"], results["patched"]
    print(f"\nsummary (backend {backend}, batch {args.batch}, prompt {args.seq} tokens, {args.new_tokens} new tokens)")
    if not on_gpu:
        print("CPU timings, one run each: not a GPU speed, and no speed-up (run the demo on a GPU for that)")
    print(summary_table([
        ("prefill (ms)", base["prefill_ms"], fast["prefill_ms"], False),
        ("decode (tokens/s)", base["decode_tok_s"], fast["decode_tok_s"], True),
        ("train step (ms)", base["train_ms"], fast["train_ms"], False),
    ], speedup=on_gpu))
    print(f"numerics: {verdict} (max relative |diff| {diff:.2e})")
    return 0 if ok else 1
