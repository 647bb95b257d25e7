"""python -m llama_fast (console script llama-fast): a command-line front end.

  info        versions, the GPU, each backend (available, or why not) and the ops it serves
  selfcheck   run every public op forward and backward (flash_decode: forward) once on every
              available backend and compare it with the PyTorch reference; exits 1 on a mismatch
  demo        build a Llama 3 (a checkpoint, or a random config scaled to the machine), patch
              it, check patched against unpatched logits (exits 1 on a mismatch), generate, and
              time prefill, decoding and a training step, unpatched and patched
  train       train the reference Llama 3 with the patch, in one process or under torchrun
              (FSDP2 or DDP, bf16, activation checkpointing, distributed checkpoints). Its
              arguments go to it (train --help lists them); the same as python -m llama_fast.train
  bench       the benchmark suite (llama_fast.bench): ops and end-to-end Llama-3 against eager,
              torch.compile, SDPA, FlexAttention, Liger-Kernel and flash-attn; a markdown table,
              a JSON file and PNG plots. Its arguments go to it (bench --help lists them)
"""
# The docstring above is also the --help text, so it is plain text, not reStructuredText.
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _enable_interpreter_on_cpu() -> None:
    # Without a GPU the Triton kernels can still run, slowly, under Triton's interpreter,
    # which must be switched on before triton is imported (llama_fast imports it lazily).
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        print("no CUDA GPU: running the Triton kernels under the Triton interpreter (TRITON_INTERPRET=1)")


# A row passes when, for every output and gradient, max|kernel - torch| <= tol * max|torch|:
# relative to the tensor's largest magnitude, so one bound serves activations and gradients
# of any scale. bfloat16 keeps 8 bits of mantissa (a rounding step of 2^-8 = 4e-3 relative):
# the kernels and the reference round at different points, hence 5e-2.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _op_cases(device, dtype):
    """(name, function of the inputs, inputs, has a backward) for each public op, at a small
    Llama-like shape: small because on a CPU the Triton interpreter runs the kernels, slowly."""
    import llama_fast

    t, hidden, heads, kv_heads, head_dim, inter = 16, 256, 8, 2, 64, 384

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def int32(*values):
        return torch.tensor(values, device=device, dtype=torch.int32)

    cos, sin = llama_fast.rope_cos_sin(torch.arange(t, device=device), head_dim)
    # Two packed sequences of 5 and 11 tokens; two cached sequences of 7 and 20 entries.
    cu = int32(0, 5, t)
    cache_len, seqlens = 32, int32(7, 20)
    vocab = 1000  # not a multiple of the kernel's vocabulary tile
    targets = torch.randint(0, vocab, (t,), device=device)
    return [
        ("rms_norm", lambda x, w: llama_fast.rms_norm(x, w), [rand(t, hidden), rand(hidden)], True),
        ("add_rms_norm", lambda x, r, w: llama_fast.add_rms_norm(x, r, w),
         [rand(t, hidden), rand(t, hidden), rand(hidden)], True),
        ("apply_rope", lambda q, k: llama_fast.apply_rope(q, k, cos, sin),
         [rand(1, t, heads, head_dim), rand(1, t, kv_heads, head_dim)], True),
        ("swiglu", lambda g, u: llama_fast.swiglu(g, u), [rand(t, inter), rand(t, inter)], True),
        ("swiglu_fused", lambda gu: llama_fast.swiglu_fused(gu), [rand(t, 2 * inter)], True),
        ("flash_attn", lambda q, k, v: llama_fast.flash_attn(q, k, v, causal=True),
         [rand(1, t, heads, head_dim), rand(1, t, kv_heads, head_dim), rand(1, t, kv_heads, head_dim)], True),
        ("flash_attn_varlen", lambda q, k, v: llama_fast.flash_attn_varlen(q, k, v, cu, cu, 11, 11, causal=True),
         [rand(t, heads, head_dim), rand(t, kv_heads, head_dim), rand(t, kv_heads, head_dim)], True),
        ("flash_decode", lambda q, kc, vc: llama_fast.flash_decode(q, kc, vc, seqlens),
         [rand(2, 1, heads, head_dim), rand(2, cache_len, kv_heads, head_dim), rand(2, cache_len, kv_heads, head_dim)],
         False),  # inference only: no backward
        ("fused_linear_cross_entropy", lambda h, w: llama_fast.fused_linear_cross_entropy(h, w, targets),
         [rand(t, hidden), rand(vocab, hidden) / hidden**0.5], True),
    ]


def _run(fn, inputs, backend, backward: bool):
    import llama_fast

    leaves = [x.detach().clone().requires_grad_(backward) for x in inputs]
    with llama_fast.backend(backend):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        if backward:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [o.detach().float() for o in outs] + ([x.grad.float() for x in leaves] if backward else [])


def _diffs(got, expected) -> tuple[float, float]:
    """(largest absolute difference, largest difference relative to its tensor's largest
    reference magnitude), each the worst over the outputs and gradients."""
    abs_diff = max((g - e).abs().max().item() for g, e in zip(got, expected))
    rel_diff = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-6)).item() for g, e in zip(got, expected))
    return abs_diff, rel_diff


def selfcheck() -> int:
    _enable_interpreter_on_cpu()
    import llama_fast
    from llama_fast.info import summary

    report = llama_fast.info()
    print(summary(report))
    print()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # info() calls a backend available when it can run here: on a CPU, triton under the
    # interpreter (switched on above).
    kernels = {name: entry for name, entry in report["backends"].items() if name != "torch"}
    available = [name for name, entry in kernels.items() if entry["available"]]
    for name, entry in kernels.items():
        if not entry["available"]:
            print(f"not checked: the {name} backend is not available here: {entry['reason']}")
    if not available:
        print("no kernel backend can run here: nothing to compare with the torch reference")
        return 0
    interpreted = device.type == "cpu"
    ms_head = "ms (CPU, not GPU)" if interpreted else "ms (1st call)"
    print(f"checking {', '.join(available)} against the torch reference on {device.type}, forward and backward:")
    width = 2 + max(len(name) for name, *_ in _op_cases(device, torch.float32))
    header = f"{'op':<{width}}{'backend':<9}{'dtype':<10}{'abs diff':>10}{'rel diff':>10}{'tol':>9}{ms_head:>19}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        tol = TOLERANCE[dtype]
        for name, fn, inputs, backward in _op_cases(device, dtype):
            expected = _run(fn, inputs, "torch", backward)
            for backend in available:
                row = f"{name:<{width}}{backend:<9}{str(dtype)[6:]:<10}"
                start = time.perf_counter()
                try:
                    got = _run(fn, inputs, backend, backward)
                except llama_fast.BackendUnavailableError as exc:  # a backend without this op
                    print(f"{row}{'':>48}  n/a: {exc}")
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1e3
                abs_diff, rel_diff = _diffs(got, expected)
                ok = rel_diff <= tol
                failures += not ok
                print(f"{row}{abs_diff:>10.1e}{rel_diff:>10.1e}{tol:>9.0e}{ms:>19.1f}  {'ok' if ok else 'MISMATCH'}")
    print()
    print("abs diff: the largest |kernel - torch| over the op's outputs and input gradients (flash_decode:")
    print("  outputs only); rel diff: the same divided by that tensor's largest |torch|, worst tensor; a row")
    print("  passes when rel diff <= tol.")
    if interpreted:
        print("ms: one call (forward, and backward where the op has one) under the Triton interpreter on the CPU:")
        print("  not a GPU speed.")
    else:
        print("ms: one call (forward, and backward where the op has one), its first, so it includes compiling the")
        print("  kernels: not a benchmark (python -m llama_fast bench measures speed).")
    print("\nselfcheck:", "all ops agree with the PyTorch reference" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


def bench(argv: list[str]) -> int:
    """Run the benchmark suite (llama_fast.bench.suite, shipped with the package) in a child
    process: its own interpreter decides TRITON_INTERPRET before triton is imported."""
    import subprocess

    _enable_interpreter_on_cpu()
    return subprocess.run([sys.executable, "-m", "llama_fast.bench.suite", *argv]).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,selfcheck,demo,train,bench}")
    what = "versions, the GPU, and each backend: available or why not, and the ops it serves"
    info = sub.add_parser("info", help=what, description=what)
    info.add_argument("--json", action="store_true",
                      help="print the whole report as JSON (internal op names included) instead of the summary")
    what = ("run every op forward and backward once on every available backend and compare it with the "
            "PyTorch reference; exits 1 on a mismatch")
    sub.add_parser("selfcheck", help=what, description=what)
    from llama_fast.demo import DESCRIPTION, add_arguments  # imports torch only: triton is not imported yet

    add_arguments(sub.add_parser("demo", help="patch a Llama 3, check it, generate and time it", description=DESCRIPTION))
    # add_help=False: --help goes on to llama_fast.train, which lists its own options.
    sub.add_parser("train", add_help=False, help="train the reference Llama 3 with the patch (also under torchrun); "
                   "its arguments go to it (train --help lists them)")
    # add_help=False: --help goes on to the suite, which lists its own options.
    sub.add_parser("bench", add_help=False, help="the benchmark suite; its arguments go to it (bench --help lists them)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(rest)
    if args.command == "train":
        from llama_fast.train import main as train_main

        return train_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        import llama_fast
        from llama_fast.info import summary

        report = llama_fast.info()
        print(json.dumps(report, indent=2) if args.json else summary(report))
        return 0
    if args.command == "demo":
        from llama_fast.demo import report_usage_error, run, usage_error

        # Refuse bad arguments before anything else is printed or imported.
        if usage_error(args):
            return report_usage_error(usage_error(args))
        _enable_interpreter_on_cpu()
        return run(args)
    return selfcheck()


if __name__ == "__main__":
    sys.exit(main())
