"""``llama_fast.info()``: what is installed and which backends can run here, and why not."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from llama_fast import backends


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_extension() -> dict:
    """What the CUDA extension was built for, and what its backend routes to Triton."""
    try:
        from llama_fast import _C
    except ImportError as exc:
        return {"built": False, "reason": str(exc).splitlines()[0]}
    from llama_fast import cuda_ops

    return {"built": True, "cuda_archs": _C.cuda_archs, "nvcc": _C.nvcc_version,
            "routed_to_triton": dict(cuda_ops.ROUTED)}


def info() -> dict:
    """Versions, the GPU, and for each backend whether it is available and, if not, why."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    status = {}
    for name in backends.BACKENDS:
        why = backends.backend_status(name)
        ops = sorted(op for op, impls in backends.REGISTRY.items() if name in impls)
        status[name] = {"available": why is None, "reason": why, "ops": ops}
    return {
        "llama_fast": _version("llama_fast"),
        "cuda_extension": _cuda_extension(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "triton_interpret": backends.triton_interpreter_on(),
        "gpu": gpu,
        "backend_choice": backends.current_backend(),
        "backends": status,
    }
