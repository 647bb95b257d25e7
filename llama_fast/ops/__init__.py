"""The public ops.

Each public function validates its arguments once (``ValueError``/``TypeError`` naming the
argument and the rule), then calls a ``torch.ops.llama_fast`` custom op. The custom op asks
the registry (``llama_fast.backends``) which backend serves the tensors' device, so the
same code runs the Triton kernels, the CUDA extension or the PyTorch reference. Custom ops
are opaque to ``torch.compile``: with their fake impls it compiles callers with no graph
break, and the backend is chosen at run time. Backward passes are custom ops too, so
compiled training graphs keep the fused kernels.
"""
import importlib
import pkgutil

# The limits the modules above the ops check inputs against.
from ._checks import SUPPORTED_DTYPES  # noqa: F401
from .attention import MAX_HEAD_DIM  # noqa: F401
from .norm import MAX_NORM_SIZE  # noqa: F401

# Every op module of this package (one file per op) is imported here and its ``__all__``
# re-exported, so adding an op is adding its file; llama_fast re-exports the same names.
__all__: list[str] = []
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _ops = importlib.import_module(f"{__name__}.{_module.name}")
        globals().update({name: getattr(_ops, name) for name in _ops.__all__})
        __all__ += _ops.__all__
