"""Output allocation for every backend, with an optional poison for tests.

Kernels write their outputs into tensors from ``empty``/``empty_like``. With ``POISON`` on
(the tests turn it on), those tensors start as NaN, so an element a kernel forgot to write
shows up as NaN in the result instead of passing by luck with whatever memory held.
"""
from __future__ import annotations

import torch

POISON = False


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if POISON and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -(2**30))
    return t


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Like ``torch.empty_like``: keeps ``t``'s strides when ``t`` is dense, else contiguous."""
    return _poisoned(torch.empty_like(t, dtype=dtype))
