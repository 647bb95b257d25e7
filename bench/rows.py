"""One benchmark row: build the inputs, time the call, fill in the row.

``bench_row`` measures a memory-bound case of bench/cases.py for one provider, pass, shape
and dtype; ``attn_row`` and ``decode_row`` measure the attention cases of
bench/attention_cases.py. The providers are described in bench/providers.py. Passes:
``fwd``, ``bwd`` (the backward alone, see bench/timing.py) and ``fwd+bwd`` (forward and
backward in one timed call, as a training step runs them).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from llama_fast.bench.attention_cases import (
    SDPA_BACKENDS, AttnShape, _raise_recompile_limit, attn_empty_row, attn_flops, attn_inputs, attn_reps, decode_bytes, decode_inputs,
    decode_plan, flex_fn, sdpa_fn,
)
from llama_fast.bench.cases import Settings, Shapes, empty_row
import llama_fast
from llama_fast.bench.providers import (
    LLAMA_FAST, STATIC, flash_attn_decode_fn, flash_attn_fn, liger_fn, static_configs, under_backend,
)
from llama_fast.kernels import _autotune
from llama_fast.bench.timing import peak_mem_mb, time_ms


def provider_fn(case: dict, provider: str, compiled: dict) -> tuple[Callable, tuple[str, ...]]:
    """The function that provider runs for ``case`` and the names of the inputs it takes."""
    if provider in LLAMA_FAST:
        name, args = case["llama_fast"]
        return under_backend(getattr(llama_fast, name), provider), args
    if provider == "liger":
        return liger_fn(case["op"])
    fn, args = case["eager"]
    if provider == "torch.compile":
        if fn not in compiled:  # one compiled wrapper per function, shared by every pass and shape
            _raise_recompile_limit()  # every dtype and pass is a graph of its own
            compiled[fn] = torch.compile(fn)
        fn = compiled[fn]
    elif provider != "eager":
        raise ValueError(f"no provider {provider!r} for {case['op']}")
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
    wrt = tuple(leaves[name] for name in grad)
    if pass_ == "fwd+bwd":  # a fresh graph on every call
        upstream: list = []  # drawn on the first call (a warm-up one on a GPU), then fixed

        def forward_backward():
            outputs = _as_tuple(fn(*[leaves[name] for name in args]))
            if not upstream:
                upstream.extend(torch.randn_like(o) for o in outputs)
            return torch.autograd.grad(outputs, wrt, upstream)

        return forward_backward
    if pass_ != "bwd":
        raise ValueError(f"unknown pass {pass_!r}")
    outputs = _as_tuple(fn(*[leaves[name] for name in args]))  # forward once, outside the timing
    upstream = tuple(torch.randn_like(o) for o in outputs)  # a fixed upstream gradient
    return lambda: torch.autograd.grad(outputs, wrt, upstream, retain_graph=True)


def _pass_bytes(case: dict, s: Shapes, pass_: str, e: int) -> int:
    """Minimum bytes of a pass; fwd+bwd is the two passes' traffic added."""
    passes = ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)
    return sum(case["bytes"][p](s, e) for p in passes)


def bench_row(case: dict, s: Shapes, dtype: torch.dtype, pass_: str, provider: str, cfg: Settings, device,
              ceilings: dict, compiled: dict) -> dict:
    fn, args = provider_fn(case, provider, compiled)
    input_sets = [case["inputs"](s, device, dtype) for _ in range(cfg.n_sets)]
    calls = [make_call(fn, args, inputs, pass_, case["grad"]) for inputs in input_sets]
    ms = time_ms(calls, device, cfg.warmup, cfg.reps)
    peak = peak_mem_mb(calls[0], device)
    gbps = _pass_bytes(case, s, pass_, dtype.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = empty_row(case, pass_, provider, s, dtype)
    if "flops" in case:  # matmul-bound (cross_entropy): TFLOP/s against the matmul ceiling
        passes = ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)
        tflops = sum(case["flops"][p](s) for p in passes) / (ms * 1e9)
        matmul = ceilings.get("bf16_tflops")
        row.update(ms=_sig(ms), tflops=_sig(tflops), fraction_of_ceiling=_sig(tflops / matmul) if matmul else None,
                   peak_mem_mb=None if peak is None else _sig(peak))
        return row
    row.update(
        ms=_sig(ms),
        gbps=_sig(gbps),
        # tflops stays null: these ops are memory-bound, their few flops say nothing.
        fraction_of_ceiling=_sig(gbps / copy) if copy else None,
        peak_mem_mb=None if peak is None else _sig(peak),
    )
    return row


def llama_fast_backend(device: torch.device) -> str:
    """The backend llama_fast's auto choice picks here (for the report's header)."""
    backends = llama_fast.backends
    name = backends.pick("rms_norm_fwd", device)
    return f"{name} (interpreter)" if name == "triton" and device.type == "cpu" else name


def _sdpa_with_gqa_fallback(provider: str, causal: bool, q, k, v, note: Callable) -> Callable:
    """SDPA with GQA by ``enable_gqa``, or with K/V expanded where the backend refuses it."""
    fn = sdpa_fn(SDPA_BACKENDS[provider], causal, expand_kv=False)
    try:
        with torch.no_grad():
            fn(q, k, v)
        note(provider, "enable_gqa")
    except RuntimeError as exc:  # the backend refuses GQA (or the shape: then the rerun raises too)
        note(provider, f"expand K/V ({str(exc).splitlines()[0][:200]})")
        fn = sdpa_fn(SDPA_BACKENDS[provider], causal, expand_kv=True)
    return fn


def attn_row(s: AttnShape, dtype: torch.dtype, pass_: str, provider: str, cfg: Settings, device, ceilings: dict,
             note: Callable) -> dict:
    """One prefill row: TFLOP/s by attn_flops, as a fraction of the matmul ceiling."""
    input_sets = [attn_inputs(s, device, dtype) for _ in range(cfg.n_sets)]
    if provider in LLAMA_FAST or provider == STATIC:
        fn = under_backend(functools.partial(llama_fast.flash_attn, causal=s.causal),
                           "triton" if provider == STATIC else provider)
    elif provider == "flash-attn":
        fn = flash_attn_fn(s.causal)
    elif provider == "flex_attention":
        fn = flex_fn(s, device)
    else:
        first = input_sets[0]
        fn = _sdpa_with_gqa_fallback(provider, s.causal, first["q"], first["k"], first["v"], note)
    args = ("q", "k", "v")
    with _autotune.static_configs() if provider == STATIC else contextlib.nullcontext():  # bwd: its recorded forward
        calls = [make_call(fn, args, inputs, pass_, args) for inputs in input_sets]
    if provider == STATIC:
        calls = static_configs(calls)
    warmup, reps = attn_reps(cfg, s, device)
    ms = time_ms(calls, device, warmup, reps)
    peak = peak_mem_mb(calls[0], device)
    tflops = attn_flops(s, pass_) / (ms * 1e9)
    ceiling = ceilings.get("bf16_tflops")
    row = attn_empty_row("attention", s, pass_, provider, dtype)
    row.update(ms=_sig(ms), tflops=_sig(tflops), fraction_of_ceiling=_sig(tflops / ceiling) if ceiling else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row


def decode_row(s: AttnShape, dtype: torch.dtype, provider: str, cfg: Settings, device, ceilings: dict,
               note: Callable) -> dict:
    """One decode row: GB/s by decode_bytes, as a fraction of the copy ceiling. SDPA gets q
    as (B, Hq, 1, D) against the whole cache, non-causal (the one query is the last token)."""
    n_sets, warmup, reps = decode_plan(cfg, s, device)
    input_sets = [decode_inputs(s, device, dtype) for _ in range(n_sets)]
    if provider in LLAMA_FAST or provider in (STATIC, "flash-attn"):
        fn = flash_attn_decode_fn() if provider == "flash-attn" else under_backend(
            llama_fast.flash_decode, "triton" if provider == STATIC else provider)
        calls = [functools.partial(fn, i["q"], i["k_cache"], i["v_cache"], i["cache_seqlens"]) for i in input_sets]
        if provider == STATIC:
            calls = static_configs(calls)
    else:
        first = input_sets[0]
        fn = _sdpa_with_gqa_fallback(provider, False, first["q"], first["k_cache"], first["v_cache"], note)
        calls = [functools.partial(fn, i["q"], i["k_cache"], i["v_cache"]) for i in input_sets]
    with torch.no_grad():
        ms = time_ms(calls, device, warmup, reps)
        peak = peak_mem_mb(calls[0], device)
    gbps = decode_bytes(s, dtype.itemsize) / (ms * 1e6)
    copy = ceilings.get("copy_gbps")
    row = attn_empty_row("decode", s, "fwd", provider, dtype)
    row.update(ms=_sig(ms), gbps=_sig(gbps), fraction_of_ceiling=_sig(gbps / copy) if copy else None,
               peak_mem_mb=None if peak is None else _sig(peak))
    return row
