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
    """What the CUDA extension was built for, and what the dispatcher routes to Triton."""
    cuda = backends.get("cuda")
    why = backends.backend_status("cuda")
    if why is not None and "not built" in why:
        return {"built": False, "reason": why}
    ext = cuda.load_extension()
    return {"built": True, "cuda_archs": getattr(ext, "cuda_archs", None), "nvcc": getattr(ext, "nvcc_version", None),
            "routed_to_triton": {op: when for op, when in backends.routes()["cuda"].items() if op != "to"}}


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
        ops = sorted(backends.get(name).OPS)
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
        "routes": backends.routes(),
    }
