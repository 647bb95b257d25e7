"""Triton kernels, one file per op (installed as ``llama_fast.kernels``).

Each file holds its ``@triton.jit`` kernels, the launch heuristics beside them, thin
launchers that take tensors and return tensors, and ``compile_configs()`` listing every
configuration the launchers use, so the sm_80/sm_90 compile check covers exactly what runs.
No autograd and no dispatch here: that is ``llama_fast.ops`` and ``llama_fast.backends``.
"""
