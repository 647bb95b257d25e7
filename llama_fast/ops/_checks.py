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


def check_class_indices(target: Tensor, vocab: int, ignore_index: int) -> None:
    """On the CPU a target outside [0, V) raises here, as F.cross_entropy does; on a GPU that
    check would stall the stream, so the loss of such a token is NaN instead."""
    if target.device.type == "cpu" and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            raise ValueError(f"target must hold class indices in [0, {vocab}) or ignore_index={ignore_index}, "
                             f"got {target[bad][0].item()}")
