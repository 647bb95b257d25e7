"""Build script for llama_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and ship
inside the package as ``llama_fast.kernels`` (a top-level ``kernels`` module would clash
with an unrelated PyPI package of that name).

The optional CUDA C++ extension ``llama_fast._C`` (sources in ``csrc/``) is added by the
CUDA backend; until then this is a pure-Python package and installs without nvcc.
"""
from setuptools import setup

setup(
    packages=["llama_fast", "llama_fast.ops", "llama_fast.kernels"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
)
