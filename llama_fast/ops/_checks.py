"""Argument validation shared by the ops: errors name the argument and the rule."""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dims: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")


def check_same(kind: str, names: tuple[str, ...], values: tuple) -> None:
    if any(v != values[0] for v in values[1:]):
        listed = ", ".join(f"{n}={v}" for n, v in zip(names, values))
        raise (TypeError if kind == "dtype" else ValueError)(f"{' and '.join(names)} must have the same {kind}: {listed}")
