"""What a backend tells the dispatcher (``llama_fast.backends``): a small interface that each
backend module implements and registers, in the manner of a plugin registry.

    name            "torch", "triton", "cuda"
    OPS             the ops it implements (known without importing anything heavy)
    auto            whether ``auto`` may pick it (a test-only backend says False)
    unavailable()   None when installed and usable on some device, else why not (one line)
    cannot_run_on(device)  None when it can run on tensors of ``device``, else why not
    gap(op, args)   None when it serves this call of ``op``, else why not; the dispatcher's
                    routing rule then hands the call to the backend ``ROUTES`` names
    ops()           op name -> implementation, loaded on first use (Triton and the CUDA
                    extension are imported only then: ``import llama_fast`` stays light)

An implementation has the signature of its twin in ``llama_fast.reference``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


def load_reason(load: Callable[[], object]) -> str | None:
    """None when ``load()`` succeeds, else why not (one line)."""
    try:
        load()
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


class Backend:
    name: str = ""
    OPS: frozenset[str] = frozenset()
    auto: bool = True

    def unavailable(self) -> str | None:
        return None

    def cannot_run_on(self, device: torch.device) -> str | None:
        return None

    def gap(self, op: str, args: tuple) -> str | None:
        return None

    def load_ops(self) -> dict[str, Callable]:
        raise NotImplementedError

    @functools.cached_property
    def _ops(self) -> dict[str, Callable]:
        ops = self.load_ops()
        missing = self.OPS - set(ops)
        if missing:
            raise RuntimeError(f"backend {self.name!r} declares {sorted(missing)} but does not load them")
        return ops

    def ops(self) -> dict[str, Callable]:
        return self._ops

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
