"""``python -m llama_fast`` (console script ``llama-fast``).

  info        versions, the GPU, and which backends are available (and why not)
  selfcheck   run every op forward and backward once on every available backend and
              compare it with the PyTorch reference; exits non-zero on a mismatch
  demo        build a Llama 3 (a checkpoint, or a random config scaled to the machine), patch
              it, check patched against unpatched logits (exits non-zero on a mismatch),
              generate, and time prefill, decoding and a training step, unpatched and patched
  bench       the benchmark suite of a source checkout's bench/ folder (bench/suite.py): ops
              and end-to-end Llama-3 against eager, torch.compile, SDPA, FlexAttention,
              Liger-Kernel and flash-attn; a markdown table, a JSON file and PNG plots.
              Other arguments go to it: --ops, --smoke, --out, --dtypes, --grid, --budget-s
"""
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


def _op_cases(device, dtype):
    """(name, function of the inputs, inputs) for each public op, at a small Llama-like shape."""
    import llama_fast

    t, hidden, heads, kv_heads, head_dim, inter = 16, 256, 8, 2, 64, 384

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    cos, sin = llama_fast.rope_cos_sin(torch.arange(t, device=device), head_dim)
    return [
        ("rms_norm", lambda x, w: llama_fast.rms_norm(x, w), [rand(t, hidden), rand(hidden)]),
        ("add_rms_norm", lambda x, r, w: llama_fast.add_rms_norm(x, r, w), [rand(t, hidden), rand(t, hidden), rand(hidden)]),
        ("apply_rope", lambda q, k: llama_fast.apply_rope(q, k, cos, sin), [rand(1, t, heads, head_dim), rand(1, t, kv_heads, head_dim)]),
        ("swiglu", lambda g, u: llama_fast.swiglu(g, u), [rand(t, inter), rand(t, inter)]),
        ("swiglu_fused", lambda gu: llama_fast.swiglu_fused(gu), [rand(t, 2 * inter)]),
    ]


def _run(fn, inputs, backend):
    import llama_fast

    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    with llama_fast.backend(backend):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [o.detach().float() for o in outs] + [x.grad.float() for x in leaves]


def selfcheck() -> int:
    _enable_interpreter_on_cpu()
    import llama_fast
    from llama_fast import backends

    print(json.dumps(llama_fast.info(), indent=2))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = [b for b in backends.BACKENDS if b != "torch" and backends.device_reason(b, device) is None]
    if not available:
        print("no kernel backend can run here: only the torch reference is checked")
    failures = 0
    print(f"\n{'op':<14}{'backend':<9}{'dtype':<10}{'max |diff| vs torch':>20}{'ms':>9}  result")
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for name, fn, inputs in _op_cases(device, dtype):
            expected = _run(fn, inputs, "torch")
            for backend in available:
                start = time.perf_counter()
                try:
                    got = _run(fn, inputs, backend)
                except llama_fast.BackendUnavailableError as exc:  # a backend without this op
                    print(f"{name:<14}{backend:<9}{str(dtype)[6:]:<10}{'':>20}{'':>9}  n/a: {exc}")
                    continue
                ms = (time.perf_counter() - start) * 1e3
                diff = max(((g - e).abs().max() / e.abs().max().clamp_min(1e-6)).item() for g, e in zip(got, expected))
                ok = diff <= tol
                failures += not ok
                print(f"{name:<14}{backend:<9}{str(dtype)[6:]:<10}{diff:>20.2e}{ms:>9.1f}  {'ok' if ok else 'MISMATCH'}")
    print("\nselfcheck:", "all ops agree with the PyTorch reference" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


def bench(argv: list[str]) -> int:
    """Run the benchmark suite (``llama_fast.bench.suite``, shipped with the package) in a child
    process: its own interpreter decides TRITON_INTERPRET before triton is imported."""
    import subprocess

    _enable_interpreter_on_cpu()
    return subprocess.run([sys.executable, "-m", "llama_fast.bench.suite", *argv]).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU and available backends")
    sub.add_parser("selfcheck", help="run every op once on every backend and compare with the reference")
    from llama_fast.demo import add_arguments  # imports torch only: triton is not imported yet

    add_arguments(sub.add_parser("demo", help="patch a Llama 3, check it, generate and time it"))
    # add_help=False: --help goes on to the suite, which lists its own options.
    sub.add_parser("bench", add_help=False, help="the benchmark suite; its arguments go to it (bench --help lists them)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        import llama_fast

        print(json.dumps(llama_fast.info(), indent=2))
        return 0
    if args.command == "demo":
        _enable_interpreter_on_cpu()
        from llama_fast.demo import run

        return run(args)
    return selfcheck()


if __name__ == "__main__":
    sys.exit(main())
