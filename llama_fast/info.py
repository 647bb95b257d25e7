"""``llama_fast.info()``: what is installed and which backends can run here, and why not;
``summary()`` says the same in a few lines for a person (``python -m llama_fast info``)."""
from __future__ import annotations

import importlib.metadata
import platform
import textwrap

import torch

from llama_fast import backends
from llama_fast.kernels import _autotune  # imports no triton
from llama_fast.op_names import PUBLIC_OPS, public_op_name, public_ops_served


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
    """Versions, the GPU, and for each backend whether it is available and, if not, why.
    Each backend lists its internal ops (``ops``) and the public ops they make up (``serves``)."""
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
        # A backend with a route serves the rest of every op through the backend it routes to.
        serves = public_ops_served(backends.OPS if name in backends.ROUTES else ops)
        status[name] = {"available": why is None, "reason": why, "ops": ops, "serves": serves}
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
        "autotune": _autotune_status(),
    }


def _autotune_status() -> dict:
    """The run-time autotuner of the attention launch configurations: on or off (the
    LLAMA_FAST_AUTOTUNE switch; it runs on CUDA GPUs only), its cache folder and files."""
    folder = _autotune.cache_dir()
    files = sorted(p.name for p in folder.glob("autotune-*.json")) if folder.is_dir() else []
    return {"enabled": _autotune.tuning_allowed(), "cache_dir": str(folder), "cache_files": files}


def _wrap(label: str, text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=label.ljust(indent), subsequent_indent=" " * indent)


def _serves_text(serves: list[str]) -> str:
    if list(serves) == list(PUBLIC_OPS):
        return f"serves all {len(PUBLIC_OPS)} ops"
    return "serves " + (", ".join(serves) if serves else "no op")


def summary(report: dict | None = None) -> str:
    """``info()`` for a person: versions, the GPU, and per backend whether it can run here
    (else why not) and which public ops it serves. ``python -m llama_fast info --json``
    prints the whole dict instead."""
    report = info() if report is None else report
    cuda_build = f"CUDA {report['torch_cuda']}" if report["torch_cuda"] else "CPU-only build"
    lines = [f"llama_fast {report['llama_fast']}, Python {report['python']}, torch {report['torch']} "
             f"({cuda_build}), triton {report['triton'] or 'not installed'}"]
    gpu = report["gpu"]
    if gpu:
        lines.append(f"GPU: {gpu['name']} (compute capability {gpu['capability']}, {gpu['multiprocessors']} SMs, "
                     f"{gpu['memory_gib']} GiB)")
    else:
        lines.append("GPU: none visible to torch")
    ext = report["cuda_extension"]
    if ext["built"]:
        lines.append(f"CUDA extension: built for {ext['cuda_archs']} by nvcc {ext['nvcc']}")
    interp = "on: the Triton kernels run on the CPU, slowly" if report["triton_interpret"] else "off"
    lines.append(f"Triton interpreter (TRITON_INTERPRET=1): {interp}")
    lines.append(f"backend choice: {report['backend_choice']} (llama_fast.backend() or LLAMA_FAST_BACKEND change it)")
    tune = report["autotune"]
    lines += _wrap("autotuning: ", f"{'on, on CUDA GPUs' if tune['enabled'] else 'off'} (LLAMA_FAST_AUTOTUNE=0: off); "
                   f"cache {tune['cache_dir']}, {len(tune['cache_files'])} file(s)", 12)
    lines += _wrap("public ops: ", ", ".join(PUBLIC_OPS), 12)
    lines.append("")
    lines.append("backends:")
    for name, entry in report["backends"].items():
        label = f"  {name:<8}"
        if entry["available"]:
            lines += _wrap(label, f"available, {_serves_text(entry['serves'])}", len(label))
            continue
        text = f"NOT available ({_serves_text(entry['serves'])} where it runs): {entry['reason']}"
        if name == "cuda" and not ext["built"]:
            text += "; pip builds the extension when nvcc is found (CUDA_HOME or PATH) and LLAMA_FAST_NO_CUDA is unset"
        lines += _wrap(label, text, len(label))
    routed = ext.get("routed_to_triton") or {}
    if routed:
        lines.append("")
        lines.append("the cuda backend hands these to the Triton kernels:")
        for op, when in routed.items():
            lines += _wrap(f"  {public_op_name(op)}: ", when, 4)
    return "\n".join(lines)
