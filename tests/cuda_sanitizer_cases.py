"""Every CUDA-backend kernel once on small, odd, strided shapes: the program that
tests/test_cuda_backend.py runs under compute-sanitizer (memcheck, racecheck). It also
checks results against the torch backend, so a sanitizer-clean wrong answer fails too."""
from __future__ import annotations

import sys

import torch

import llama_fast

DEVICE = "cuda"


def both(fn):
    with llama_fast.backend("cuda"):
        got = fn()
    with llama_fast.backend("torch"):
        expected = fn()
    return got, expected


def close(name, got, expected, tol):
    got, expected = (t if isinstance(t, (tuple, list)) else (t,) for t in (got, expected))
    for g, e in zip(got, expected):
        if g is None:
            continue
        err = (g.float() - e.float()).abs().max().item() / max(e.float().abs().max().item(), 1e-6)
        if not err <= tol:
            print(f"{name}: relative error {err:.3g} > {tol}")
            return False
    return True


def main() -> int:
    torch.manual_seed(0)
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
        r = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype)  # noqa: E731
        x, res, w = r(7, 3, 133)[:, 1], r(7, 133), r(133)
        ok &= close("rms_norm", *both(lambda: llama_fast.rms_norm(x, w)), tol)
        ok &= close("add_rms_norm", *both(lambda: llama_fast.add_rms_norm(x, res, w)), tol)
        xg = x.detach().requires_grad_()
        wg = w.detach().requires_grad_()

        def norm_grads():
            xg.grad = wg.grad = None
            llama_fast.rms_norm(xg, wg).square().sum().backward()
            return xg.grad, wg.grad

        ok &= close("rms_norm backward", *both(norm_grads), tol * 4)
        gate_up = r(5, 2 * 77)
        ok &= close("swiglu", *both(lambda: llama_fast.swiglu(gate_up[:, :77], gate_up[:, 77:])), tol)
        gu = gate_up.detach().requires_grad_()

        def swiglu_grads():
            gu.grad = None
            llama_fast.swiglu(gu[:, :77], gu[:, 77:]).square().sum().backward()
            return gu.grad

        ok &= close("swiglu backward", *both(swiglu_grads), tol * 4)
        q, k = r(2, 5, 4, 34), r(2, 5, 2, 34)
        cos, sin = torch.randn(5, 17, device=DEVICE).cos(), torch.randn(5, 17, device=DEVICE).sin()
        for interleaved in (False, True):
            ok &= close("rope", *both(lambda: llama_fast.apply_rope(q, k, cos, sin, interleaved=interleaved)), tol)
    for dtype, head_dim in ((torch.bfloat16, 64), (torch.float16, 128)):
        r = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype)  # noqa: E731
        q, k, v = r(2, 77, 4, head_dim), r(2, 93, 2, head_dim), r(2, 93, 2, head_dim)
        for causal in (True, False):
            ok &= close("flash_attn", *both(lambda: llama_fast.flash_attn(q, k, v, causal=causal)), 3e-2)
        cu_q = torch.tensor([0, 30, 77], device=DEVICE, dtype=torch.int32)
        cu_k = torch.tensor([0, 50, 93], device=DEVICE, dtype=torch.int32)
        ok &= close("flash_attn_varlen", *both(lambda: llama_fast.flash_attn_varlen(
            q[0], k[0], v[0], cu_q, cu_k, 47, 50)), 3e-2)
        kc, vc = r(3, 200, 2, head_dim), r(3, 200, 2, head_dim)
        lengths = torch.tensor([1, 137, 200], device=DEVICE, dtype=torch.int32)
        qd = r(3, 1, 8, head_dim)
        with torch.no_grad():
            for splits in (1, 3):
                ok &= close("flash_decode", *both(lambda: llama_fast.flash_decode(qd, kc, vc, lengths, num_splits=splits)), 3e-2)
    torch.cuda.synchronize()
    print("all CUDA kernels ran" + ("" if ok else " (with mismatches)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
