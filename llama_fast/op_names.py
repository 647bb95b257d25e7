"""The public API names of the backends' internal ops.

The backends register implementations under internal names (``rms_norm_fwd``, ``attn_bwd``,
``decode``) that split an op into its passes and share one kernel between two public ops
(``rms_norm`` and ``add_rms_norm`` run the same kernel). A user only knows the public
functions, so ``info`` and error messages speak of those. This module imports nothing of the
package, so the dispatcher itself can use it.
"""
from __future__ import annotations

from typing import Iterable

# The public ops, in the order the README and ``llama_fast.__all__`` present them.
PUBLIC_OPS = ("rms_norm", "add_rms_norm", "apply_rope", "swiglu", "swiglu_fused",
              "flash_attn", "flash_attn_varlen", "flash_decode", "fused_linear_cross_entropy")

# internal op -> (the public ops it serves, which pass of them; "" when it is the whole op).
INTERNAL_OPS: dict[str, tuple[tuple[str, ...], str]] = {
    "rms_norm_fwd": (("rms_norm", "add_rms_norm"), "forward"),
    "rms_norm_bwd": (("rms_norm", "add_rms_norm"), "backward"),
    # The backward of a rotation is the inverse rotation: one kernel, both passes.
    "rope_fwd": (("apply_rope",), ""),
    "swiglu_fwd": (("swiglu", "swiglu_fused"), "forward"),
    "swiglu_bwd": (("swiglu", "swiglu_fused"), "backward"),
    "attn_fwd": (("flash_attn",), "forward"),
    "attn_bwd": (("flash_attn",), "backward"),
    "attn_varlen_fwd": (("flash_attn_varlen",), "forward"),
    "attn_varlen_bwd": (("flash_attn_varlen",), "backward"),
    "decode": (("flash_decode",), ""),  # inference only: no backward
    # One op computes the loss and the gradients (in the forward; the backward scales them).
    "linear_cross_entropy": (("fused_linear_cross_entropy",), ""),
}


def public_op_name(internal: str) -> str:
    """How to name internal op ``internal`` to a user, e.g. ``attn_bwd`` -> "flash_attn
    (backward)", ``rms_norm_fwd`` -> "rms_norm/add_rms_norm (forward)". A name missing from
    the table comes back unchanged rather than failing inside an error message."""
    if internal not in INTERNAL_OPS:
        return internal
    public, which = INTERNAL_OPS[internal]
    name = "/".join(public)
    return f"{name} ({which})" if which else name


def public_ops_served(internal_ops: Iterable[str]) -> list[str]:
    """The public ops whose every pass is among ``internal_ops``, in ``PUBLIC_OPS`` order."""
    have = set(internal_ops)
    needed: dict[str, set[str]] = {name: set() for name in PUBLIC_OPS}
    for internal, (public, _) in INTERNAL_OPS.items():
        for name in public:
            needed[name].add(internal)
    return [name for name in PUBLIC_OPS if needed[name] <= have]
