"""The CPU emulator of the CUDA kernels as a test-only "cuda" backend.

The installed package knows nothing of it: tests/conftest.py builds the emulator (the same
csrc/ sources compiled as host C++, build.py) and registers an ``EmulatedCudaBackend`` in
place of the real cuda backend, so the op tests' cuda parameter runs the CUDA kernels'
code on CPU tensors. It is never picked by ``auto``, only when forced.
"""
from __future__ import annotations

import functools
import importlib.util

from llama_fast.backends.cuda_backend import CudaBackend


@functools.lru_cache(maxsize=None)
def load_emulator(path: str):
    """The emulator module built at ``path``, imported from that file as ``_C_emu``."""
    spec = importlib.util.spec_from_file_location("_C_emu", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path!r} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emulated_kernels(ext, device_type):
    """CudaKernels whose launches name one device and no stream (the emulator has neither).
    Made on first use: the wrappers import Triton's helpers, which must wait for conftest to
    set TRITON_INTERPRET."""
    from llama_fast.backends.cuda_kernels import CudaKernels

    class EmulatedKernels(CudaKernels):
        def launch(self, t):
            return {"device": 0, "stream": 0}

    return EmulatedKernels(ext, device_type)


class EmulatedCudaBackend(CudaBackend):
    auto = False

    def __init__(self, path: str) -> None:
        super().__init__(load_extension=functools.partial(load_emulator, path), device_type="cpu",
                         kernels_class=emulated_kernels)
        self.path = path
