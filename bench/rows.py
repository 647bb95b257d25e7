"""One benchmark row of bench/gpu_check.py: build the inputs, time the call, fill in the row.

``bench_row`` measures a memory-bound case of bench/cases.py for one provider and pass;
``attn_row`` and ``decode_row`` measure the attention cases of bench/attention_cases.py.
llama_fast is imported as installed, else straight from this working tree.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable

import torch

from bench import REPO
from bench.attention_cases import (
    SDPA_BACKENDS, AttnShape, attn_empty_row, attn_flops, attn_inputs, attn_reps, decode_bytes, decode_inputs,
    decode_plan, flex_fn, sdpa_fn,
)
from bench.cases import DTYPE, Settings, empty_row
from bench.timing import peak_mem_mb, time_ms


@functools.lru_cache(maxsize=None)
def import_llama_fast():
    """llama_fast as installed; if it is not (the install step failed), straight from this
    working tree, where setup.py's mapping of ``kernels/`` to ``llama_fast.kernels`` is
    redone by adding the repository root to the package's search path."""
    try:
        importlib.import_module("llama_fast.kernels")
    except ImportError:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        package = importlib.import_module("llama_fast")
        if str(REPO) not in package.__path__:
            package.__path__.append(str(REPO))  # llama_fast.kernels -> REPO/kernels
        importlib.import_module("llama_fast.kernels")
    return importlib.import_module("llama_fast")


def provider_fn(case: dict, provider: str, compiled: dict) -> tuple[Callable, tuple[str, ...]]:
    """The function that provider runs for ``case`` and the names of the inputs it takes."""
    if provider == "llama_fast":
        name, args = case["llama_fast"]
        return getattr(import_llama_fast(), name), args
    fn, args = case["eager"]
    if provider == "torch.compile":
        if fn not in compiled:  # one compiled wrapper per function, shared by fwd and bwd
            compiled[fn] = torch.compile(fn)
        fn = compiled[fn]
    return fn, args


def _sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (interpreter timings are tiny in GB/s)."""
    return float(f"{value:.{digits}g}")


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def make_call(fn: Callable, args: tuple[str, ...], inputs: dict, pass_: str, grad: tuple[str, ...]) -> Callable:
    """A no-argument callable running one pass of ``fn`` on one input set."""
    if pass_ == "fwd":
        tensors = [inputs[name] for name in args]
        return lambda: fn(*tensors)
    leaves = {name: t.detach().requires_grad_(name in grad) for name, t in inputs.items()}
    outputs = _as_tuple(fn(*[leaves[name] for name in args]))  # forward once, outside the timing
    upstream = tuple(torch.randn_like(o) for o in outputs)  # a fixed upstream gradient
    wrt = tuple(leaves[name] for name in grad)
    return lambda: torch.autograd.grad(outputs, wrt, upstream, retain_graph=True)


def bench_row(case: dict, pass_: str, provider: str, cfg: Settings, device, ceilings: dict, compiled: dict) -> dict:
    s = cfg.shapes
    fn, args = provider_fn(case, provider, compiled)
    input_sets = [case["inputs"](s, device) for _ in range(cfg.n_sets)]
    calls = [make_call(fn, args, inputs, pass_, case["grad"]) for inputs in input_sets]
    ms = time_ms(calls, device, cfg.warmup, cfg.reps)
    peak = peak_mem_mb(calls[0], device)
    gbps = case["bytes"][pass_](s, DTYPE.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = empty_row(case, pass_, provider, s)
    row.update(
        ms=_sig(ms),
        gbps=_sig(gbps),
        # tflops stays null: these ops are memory-bound, their few flops say nothing.
        fraction_of_ceiling=_sig(gbps / copy) if copy else None,
        peak_mem_mb=None if peak is None else _sig(peak),
    )
    return row


def llama_fast_backend(device: torch.device) -> str:
    backends = import_llama_fast().backends
    name = backends.pick("rms_norm_fwd", device)
    return f"{name} (interpreter)" if name == "triton" and device.type == "cpu" else name



def attn_row(s: AttnShape, pass_: str, provider: str, cfg: Settings, device, ceilings: dict, note: Callable) -> dict:
    """One prefill row: TFLOP/s by attn_flops, as a fraction of the matmul ceiling."""
    lf = import_llama_fast()
    input_sets = [attn_inputs(s, device) for _ in range(cfg.n_sets)]
    if provider == "llama_fast":
        fn = functools.partial(lf.flash_attn, causal=s.causal)
    elif provider == "flex_attention":
        fn = flex_fn(s, device)
    else:
        fn = sdpa_fn(SDPA_BACKENDS[provider], s.causal, expand_kv=False)
        first = input_sets[0]
        try:
            with torch.no_grad():
                fn(first["q"], first["k"], first["v"])
            note(provider, "enable_gqa")
        except RuntimeError as exc:  # the backend refuses GQA (or the shape: then this rerun raises too)
            note(provider, f"expand K/V ({str(exc).splitlines()[0][:200]})")
            fn = sdpa_fn(SDPA_BACKENDS[provider], s.causal, expand_kv=True)
    args = ("q", "k", "v")
    calls = [make_call(fn, args, inputs, pass_, args) for inputs in input_sets]
    warmup, reps = attn_reps(cfg, s, device)
    ms = time_ms(calls, device, warmup, reps)
    peak = peak_mem_mb(calls[0], device)
    tflops = attn_flops(s, pass_) / (ms * 1e9)
    ceiling = ceilings.get("bf16_tflops")
    row = attn_empty_row("attention", s, pass_, provider)
    row.update(ms=_sig(ms), tflops=_sig(tflops), fraction_of_ceiling=_sig(tflops / ceiling) if ceiling else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row


def decode_row(s: AttnShape, provider: str, cfg: Settings, device, ceilings: dict, note: Callable) -> dict:
    """One decode row: GB/s by decode_bytes, as a fraction of the copy ceiling. SDPA gets q
    as (B, Hq, 1, D) against the whole cache, non-causal (the one query is the last token)."""
    n_sets, warmup, reps = decode_plan(cfg, s, device)
    input_sets = [decode_inputs(s, device) for _ in range(n_sets)]
    if provider == "llama_fast":
        decode = import_llama_fast().flash_decode
        calls = [functools.partial(decode, i["q"], i["k_cache"], i["v_cache"], i["cache_seqlens"]) for i in input_sets]
    else:
        first = input_sets[0]
        fn = sdpa_fn(SDPA_BACKENDS[provider], False, expand_kv=False)
        try:
            fn(first["q"], first["k_cache"], first["v_cache"])
            note(provider, "enable_gqa")
        except RuntimeError as exc:
            note(provider, f"expand K/V ({str(exc).splitlines()[0][:200]})")
            fn = sdpa_fn(SDPA_BACKENDS[provider], False, expand_kv=True)
        calls = [functools.partial(fn, i["q"], i["k_cache"], i["v_cache"]) for i in input_sets]
    with torch.no_grad():
        ms = time_ms(calls, device, warmup, reps)
        peak = peak_mem_mb(calls[0], device)
    gbps = decode_bytes(s, DTYPE.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = attn_empty_row("decode", s, "fwd", provider)
    row.update(ms=_sig(ms), gbps=_sig(gbps), fraction_of_ceiling=_sig(gbps / copy) if copy else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row
