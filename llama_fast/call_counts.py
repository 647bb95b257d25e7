"""Which path served each call: counters that the patch, the attention router and the
patched HF loss keep, so tests and ``llama_fast.info`` can show what actually ran."""
from __future__ import annotations

import collections

import torch

__all__ = ["CallCounts"]


class CallCounts(collections.Counter):
    """A Counter of calls by path. ``add`` counts nothing inside torch.compile: a traced
    count is a guard on a changing number, so a compiled block would recompile on every
    call (a compiled graph's ops show which path it took)."""

    def add(self, path) -> None:
        if not torch.compiler.is_compiling():
            self[path] += 1
