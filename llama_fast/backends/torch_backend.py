"""Backend "torch": the PyTorch reference (``llama_fast.reference``) on any device; every
op has it, so it is what the others are tested against and the last resort of ``auto``."""
from __future__ import annotations

from llama_fast import reference

from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    OPS = frozenset(reference.IMPLEMENTATIONS)

    def load_ops(self):
        return dict(reference.IMPLEMENTATIONS)
