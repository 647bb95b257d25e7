"""Benchmarks and the one-command GPU check (``python bench/gpu_check.py``)."""
