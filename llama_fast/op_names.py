"""The public API names of the backends' internal ops.

The backends implement ops under internal names (``rms_norm_fwd``, ``attn_bwd``,
``decode``) that split an op into its passes and share one kernel between two public ops
(``rms_norm`` and ``add_rms_norm`` run the same kernel). A user only knows the public
functions, so ``info`` and error messages speak of those. This module imports nothing of the
package, so the dispatcher itself can use it.
"""
from __future__ import annotations

from typing import Iterable

# Filled by the op modules as they are imported (``describe``), in ``llama_fast.ops``'s order:
# each op's file names its own internal ops, so adding an op touches no table here.
PUBLIC_OPS: list[str] = []
# internal op -> (the public ops it serves, which pass of them; "" when it is the whole op).
INTERNAL_OPS: dict[str, tuple[tuple[str, ...], str]] = {}


def describe(internal: str, public: str | tuple[str, ...], which: str = "") -> None:
    """Name internal op ``internal`` to users: it is ``which`` pass ("forward", "backward"; ""
    for the whole op) of the public op(s) ``public``."""
    public = (public,) if isinstance(public, str) else tuple(public)
    INTERNAL_OPS[internal] = (public, which)
    PUBLIC_OPS.extend(name for name in public if name not in PUBLIC_OPS)


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
