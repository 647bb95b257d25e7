"""Benchmarks: the suite (``python -m llama_fast bench``, bench/suite.py) and the one-command
GPU check built on it (``python bench/gpu_check.py``). Module map: bench/gpu_check.py's docstring."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root
