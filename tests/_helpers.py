"""Shared by the op tests: the device, the backends to run, dtypes, tolerances and inputs."""
from __future__ import annotations

import torch

from llama_fast import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every backend that can run on this machine's test device; one parametrisation per op.
BACKENDS = [name for name in backends.BACKENDS if backends.device_reason(name, DEVICE) is None]

# (rtol, atol relative to the reference's largest magnitude) against a float64 reference.
# Outputs carry one or two roundings to their dtype; the Triton interpreter truncates
# float32 -> bfloat16 instead of rounding (one more ulp).
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2.5e-2, 2.5e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale: float | None = None) -> None:
    """``actual`` (any dtype) against a float64 ``expected``: no NaN, and within tolerance.

    The absolute part of the tolerance is relative to ``scale``, by default the largest
    magnitude in ``expected``; pass the magnitude of the terms a result is computed from
    when it comes out of a cancellation (it is then much smaller than its inputs).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN in the result (an element was not written?)"
    rtol, atol = TOLERANCE[dtype]
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs()
    bound = atol * max(scale, 1e-30) + rtol * e.abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (
        f"{what}: max error {err.max().item():.3g} (scale {scale:.3g}, dtype {dtype}); "
        f"worst at flat index {worst.item()}: got {a.flatten()[worst].item()}, expected {e.flatten()[worst].item()}"
    )


def randn(shape, dtype: torch.dtype, *, strided: bool = False, device=DEVICE) -> torch.Tensor:
    """Fresh random values; ``strided`` returns a non-contiguous view with the same values
    layout-wise (every other element of a larger buffer along the last dim)."""
    if not strided:
        return torch.randn(shape, dtype=dtype, device=device)
    big = torch.randn(*shape[:-1], shape[-1] * 2, dtype=dtype, device=device) if len(shape) else None
    return big[..., ::2] if big is not None else torch.randn((), dtype=dtype, device=device)


def row_strided(shape, dtype: torch.dtype, device=DEVICE) -> torch.Tensor:
    """A view with unit last stride but padded rows (as a slice of a wider tensor is)."""
    big = torch.randn(*shape[:-1], shape[-1] + 3, dtype=dtype, device=device)
    return big[..., 1 : shape[-1] + 1]


def f64(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    return t.detach().to(torch.float64).requires_grad_(requires_grad)
