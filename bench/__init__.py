"""Benchmarks and the one-command GPU check (``python bench/gpu_check.py``)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root
