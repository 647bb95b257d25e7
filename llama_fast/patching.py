"""Patch existing Llama models to run on the llama_fast kernels, and undo it.

    report = patch(model, rms_norm=True, rope=True, swiglu=True, attention=True, cross_entropy=True)
    unpatch(model)                      # the original modules, function and attention back
    patch_transformers(...)             # every model of a family built from now on patches itself
    unpatch_transformers()              # ... and no longer

Tested with transformers 5.10.4 to 5.25 (tests/test_patch_hf.py, on the CPU; scripts/test.sh
runs the newest and the oldest). 5.0 and 4.x are not supported (other mask and cache APIs).
transformers is optional: it is imported only when a model holding its classes is patched,
or by ``patch_transformers``.

The table
---------
``RULES`` is the one place that says what replaces what. A row is
``Rule(family, kind, how, source, replacement, ...)``: the source is written
``"module.path:QualName"`` (transformers is optional, so its classes are named, not
imported), the replacement is ours, by reference; supporting another model family is
adding rows. ``how`` is:

``module``    instances of exactly the ``source`` class (subclasses are not matched: they may
              have changed ``forward``) are swapped for ``replacement.from_module(instance,
              **options)``, which shares the instance's Parameters (same objects). The original
              instance is kept on its parent and put back by ``unpatch``, handed the current
              Parameters. Instances with hooks or an instance-level ``forward`` (accelerate's
              offloading, other patchers) are left alone, with the reason in the report.
``function``  the module-level function ``source`` is swapped, *scoped*: the module global is
              replaced by a dispatcher that runs ``replacement(*args, fallback=original)`` only
              inside the forward of patched instances of ``scope`` (a forward pre-hook and an
              always-called forward hook count entries, per thread), and the original
              everywhere else. Why not a plain module-global swap: the global is shared by
              every model of the family in the process, so a plain swap would silently change
              models nobody asked to patch (such as the unpatched reference a test compares
              against). The dispatcher is removed when the last scope is unpatched (a deep
              copy of a patched model keeps its hooks but not that claim: once the original
              is unpatched, the copy runs HF's function again, correct but unfused).
              ``torch.compile`` traces the hooks and the dispatcher without graph breaks.
``forward``   the ``forward`` of exactly the ``source`` class is swapped, per instance: the
              class attribute becomes a dispatcher that runs ``replacement(self, *args,
              fallback=original, **kwargs)`` for the instances ``patch`` marked (and the
              original for every other instance and for subclasses), and is put back when
              the last marked instance is unpatched. For a model's own forward, which no
              module swap can reach (the model is the root, held by the user) and which is
              not a function of its module. Why not an instance attribute: an instance-level
              forward is what accelerate's hooks and other patchers set (an instance that
              already has one is left alone: it would bypass the class's), and a deep copy
              would carry it with the model bound in. Like the function rules' hooks, the
              mark travels with a deep copy (fused while the dispatcher is installed).
``attention`` the model's attention implementation becomes ``"llama_fast"`` when it holds
              instances of ``source``: ``replacement``'s module registers its attention
              and mask functions under that name (``llama_fast.hf_attention``, whose
              docstring says what they serve); ``unpatch`` restores the previous one.
``on_build``  for ``patch_transformers``: the ``post_init`` of ``source`` (the family's
              pre-trained base class, called at the end of every model's ``__init__``) is
              wrapped so that each model built patches itself with the flags given, and its
              ``__init__`` so that an attention implementation the user asked for
              explicitly (``from_pretrained(..., attn_implementation=...)`` or
              ``config._attn_implementation``) is kept: the other kinds are still patched.

The reference model (family ``llama_fast_reference``)
----------------------------------------------------
``llama_fast.model.Transformer`` is patched with ``module`` rows only (``llama_fast.nn`` and
``llama_fast.model_fused``):
TransformerBlock -> MetaTransformerBlock (residual add + ffn_norm in one ``add_rms_norm``;
under the ``rms_norm`` flag), RMSNorm -> RMSNorm, FeedForward -> SwiGLUMLP (Meta's names w1,
w3, w2), Rotary -> MetaRotary (``apply_rope(interleaved=True)``), Attention -> MetaAttention
(flash_attn for training and unpadded prefill, flash_decode for cached decoding,
flash_attn_varlen for padded batches, SDPA with a warning for anything else; see its
docstring), CrossEntropyHead -> FusedCrossEntropyHead (``forward(tokens, targets=...)``'s
loss on ``fused_linear_cross_entropy``: no logits). ``patch`` walks the tree as it changes
it, so the children of a replaced block (shared with the original block) are patched inside
the replacement; ``unpatch`` restores bottom-up, so the original block gets its original
children back.

The loss (kind ``cross_entropy``)
---------------------------------
Hugging Face's ``LlamaForCausalLM`` gets a ``forward`` row: in training mode with ``labels``
its loss is computed by ``llama_fast.hf_causal_lm.causal_lm_forward`` from the hidden
states, ``logits=None``; eval mode and calls without labels run HF's forward as before (see
that module for what it honours: shifted labels, ``num_items_in_batch``, ``logits_to_keep``,
tied embeddings). The reference model's loss head is a ``module`` row (the CrossEntropyHead
above). ``patch(model, cross_entropy=False)`` leaves both alone.
"""
from __future__ import annotations

import collections
import functools
import importlib
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from llama_fast import hf_attention, hf_causal_lm, nn as lfnn
from llama_fast.call_counts import CallCounts
from llama_fast.attention_router import ATTENTION_CALLS, DECODE_MAX_QUERIES  # noqa: F401  (re-exported)
from llama_fast.hf_attention import ATTN_IMPLEMENTATION
from llama_fast.hf_causal_lm import LOSS_CALLS  # noqa: F401  (re-exported)
from llama_fast.model_fused import FusedCrossEntropyHead, MetaAttention, MetaRotary, MetaTransformerBlock

__all__ = [
    "ATTENTION_CALLS",
    "ATTN_IMPLEMENTATION",
    "FUNCTION_CALLS",
    "LOSS_CALLS",
    "PatchReport",
    "RULES",
    "Rule",
    "patch",
    "patch_transformers",
    "unpatch",
    "unpatch_transformers",
]

KINDS = ("rms_norm", "rope", "swiglu", "attention", "cross_entropy")


@dataclass(frozen=True)
class Rule:
    """One row of the table; see the module docstring. Contracts of ``replacement``:

    module     a class with ``from_module(instance, **dict(options))`` returning a module that
               shares the instance's Parameters, or raising TypeError/ValueError (why not).
    function   a callable taking the original's arguments plus ``fallback=`` (the original),
               which it calls for inputs it does not serve.
    forward    the same, for a forward: ``replacement(self, *args, fallback=original, **kwargs)``.
    attention  the module whose ``register()`` registers the attention and mask functions
               under ATTN_IMPLEMENTATION (``llama_fast.hf_attention``).
    """

    family: str
    kind: str  # one of KINDS (the patch() flag that enables it), or "build"
    how: str  # "module" | "function" | "forward" | "attention" | "on_build"
    source: str  # "module.path:QualName" of what is replaced
    replacement: object = None  # what replaces it
    options: tuple = ()  # (name, value) pairs passed to replacement.from_module
    scope: str | None = None  # function rules: the class inside whose forward the swap is active
    requires: Callable | None = None  # f(model) -> reason to leave this alone, or None (function, forward rules)


_HF_LLAMA = "transformers.models.llama.modeling_llama"
_REF = "llama_fast.model"


def _hf_llama_rope_tables(model: nn.Module) -> str | None:
    """The fused rope reads only the first half of cos/sin: fine for LlamaRotaryEmbedding,
    which always builds cat((freqs, freqs)); anything else, we cannot vouch for."""
    for path, m in model.named_modules():
        name = type(m).__qualname__
        if name.endswith("RotaryEmbedding") and _qualname(type(m)) != f"{_HF_LLAMA}:LlamaRotaryEmbedding":
            return f"{path or '<model>'} is a {_qualname(type(m))}, not LlamaRotaryEmbedding (halves of cos/sin not known equal)"
    return None


RULES: tuple[Rule, ...] = (
    Rule("hf_llama", "rms_norm", "module", f"{_HF_LLAMA}:LlamaRMSNorm", lfnn.RMSNorm),
    Rule("hf_llama", "swiglu", "module", f"{_HF_LLAMA}:LlamaMLP", lfnn.SwiGLUMLP,
         options=(("names", ("gate_proj", "up_proj", "down_proj")), ("act", "act_fn"))),
    Rule("hf_llama", "rope", "function", f"{_HF_LLAMA}:apply_rotary_pos_emb", lfnn.apply_rotary_pos_emb,
         scope=f"{_HF_LLAMA}:LlamaAttention", requires=_hf_llama_rope_tables),
    Rule("hf_llama", "attention", "attention", f"{_HF_LLAMA}:LlamaAttention", hf_attention),
    Rule("hf_llama", "cross_entropy", "forward", f"{_HF_LLAMA}:LlamaForCausalLM", hf_causal_lm.causal_lm_forward),
    Rule("hf_llama", "build", "on_build", f"{_HF_LLAMA}:LlamaPreTrainedModel"),
    # llama_fast's own reference Llama 3 (llama_fast.model). The block is matched first and
    # its children after, inside the replacement block (patch walks the tree as it changes).
    # The block's swap is what fuses the residual add with ffn_norm (add_rms_norm): a norm kind.
    Rule("llama_fast_reference", "rms_norm", "module", f"{_REF}:TransformerBlock", MetaTransformerBlock),
    Rule("llama_fast_reference", "rms_norm", "module", f"{_REF}:RMSNorm", lfnn.RMSNorm),
    Rule("llama_fast_reference", "swiglu", "module", f"{_REF}:FeedForward", lfnn.SwiGLUMLP,
         options=(("names", ("w1", "w3", "w2")), ("act", None))),
    Rule("llama_fast_reference", "rope", "module", f"{_REF}:Rotary", MetaRotary),
    Rule("llama_fast_reference", "attention", "module", f"{_REF}:Attention", MetaAttention),
    Rule("llama_fast_reference", "cross_entropy", "module", f"{_REF}:CrossEntropyHead", FusedCrossEntropyHead),
)


# ---------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Change:
    kind: str
    path: str  # module path in the model ("" is the model), or what was changed
    before: str
    after: str


@dataclass(frozen=True)
class Skip:
    kind: str
    path: str
    reason: str


@dataclass
class PatchReport:
    """What ``patch`` replaced, found already patched, and left alone (with the reason)."""

    replaced: list[Change] = field(default_factory=list)
    already: list[Change] = field(default_factory=list)
    left_alone: list[Skip] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Replacements made by this call, per kind (every kind present, 0 if none)."""
        counts = dict.fromkeys(KINDS, 0)
        for c in self.replaced:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        return counts

    @property
    def counts_already(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for c in self.already:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        return counts

    def absorb(self, prefix: str, other: "PatchReport") -> None:
        """Fold in the report of the submodule at ``prefix``, patched earlier: its replacements
        become this report's instead of showing here as "already patched"."""
        def pre(p):
            return p if p == "*" or not prefix else (f"{prefix}.{p}" if p else prefix)

        moved = [Change(c.kind, pre(c.path), c.before, c.after) for c in other.replaced]

        def explained(c):  # same path; or the same config, which a model shares with its backbone
            return any(m.kind == c.kind and (m.path == c.path or (m.after == c.after and m.path.endswith("." + c.path)))
                       for m in moved)

        self.already = [c for c in self.already if not explained(c)]
        self.replaced = moved + self.replaced
        for s in other.left_alone:
            skip = Skip(s.kind, pre(s.path), s.reason)
            if skip not in self.left_alone:
                self.left_alone.append(skip)

    def __str__(self) -> str:
        lines = ["llama_fast.patch: " + ", ".join(f"{k} {n}" for k, n in self.counts.items()) + " replaced"]
        lines += [f"  replaced  {c.kind:13s} {c.path or '<model>'}: {c.before} -> {c.after}" for c in self.replaced]
        lines += [f"  already   {c.kind:13s} {c.path or '<model>'}: {c.after}" for c in self.already]
        lines += [f"  left      {s.kind:13s} {s.path or '<model>'}: {s.reason}" for s in self.left_alone]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Helpers


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _name(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _load(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _why_not_swappable(m: nn.Module) -> str | None:
    if "forward" in m.__dict__:
        return "its forward is overridden on the instance (accelerate offloading or another patcher?)"
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return "it has hooks, which a swapped module would not carry"
    return None


# ---------------------------------------------------------------------------------------
# Scoped function swaps

_ACTIVE = threading.local()  # _flag(function key) -> how many scoped forwards this thread is inside
_SCOPES: dict[str, "weakref.WeakSet[nn.Module]"] = collections.defaultdict(weakref.WeakSet)
_DISPATCHERS: dict[str, object] = {}  # function key -> the dispatcher installed in its module (or class)
# (function key, "llama_fast" | "original") -> calls; forward rules' keys are "module:Class.forward"
FUNCTION_CALLS = CallCounts()
_FORWARDS = "_llama_fast_forwards"  # an instance's __dict__ entry: the forward keys it is patched for


def _flag(key: str) -> str:
    """The attribute of ``_ACTIVE`` counting entries for a function key (an identifier:
    torch.compile traces plain attribute access on it)."""
    return "depth_" + "".join(ch if ch.isalnum() else "_" for ch in key)


def _enter(flag: str, *_args) -> None:
    setattr(_ACTIVE, flag, getattr(_ACTIVE, flag, 0) + 1)


def _exit(flag: str, *_args) -> None:
    setattr(_ACTIVE, flag, max(0, getattr(_ACTIVE, flag, 0) - 1))


def _install_function(rule: Rule) -> None:
    key = rule.source
    module_name, _, name = key.partition(":")
    module = importlib.import_module(module_name)
    current = getattr(module, name)
    if current is _DISPATCHERS.get(key):
        return
    original, fused = current, rule.replacement
    flag = _flag(key)

    def dispatcher(*args, **kwargs):
        if getattr(_ACTIVE, flag, 0) > 0:
            FUNCTION_CALLS.add((key, "llama_fast"))
            return fused(*args, fallback=original, **kwargs)
        FUNCTION_CALLS.add((key, "original"))
        return original(*args, **kwargs)

    _put_dispatcher(key, module, name, original, dispatcher)


def _put_dispatcher(key: str, owner, name: str, original, dispatcher) -> None:
    """Install ``dispatcher`` as ``owner.name`` in place of ``original``; it keeps the
    original's name and signature (generate() and Trainer inspect forward's) and remembers
    what to put back."""
    functools.update_wrapper(dispatcher, original)
    dispatcher.__llama_fast_original__ = original
    dispatcher.__llama_fast_owner__ = (owner, name)
    _DISPATCHERS[key] = dispatcher
    setattr(owner, name, dispatcher)


def _forward_key(rule: Rule) -> str:
    return f"{rule.source}.forward"


def _install_forward(rule: Rule) -> None:
    """The class's forward becomes a dispatcher: the replacement for the instances marked
    with this key, the original for the rest."""
    key = _forward_key(rule)
    cls = _load(rule.source)
    current = cls.__dict__["forward"]
    if current is _DISPATCHERS.get(key):
        return
    original, fused = current, rule.replacement

    def forward(self, *args, **kwargs):
        if key in self.__dict__.get(_FORWARDS, ()):
            FUNCTION_CALLS.add((key, "llama_fast"))
            return fused(self, *args, fallback=original, **kwargs)
        FUNCTION_CALLS.add((key, "original"))
        return original(self, *args, **kwargs)

    _put_dispatcher(key, cls, "forward", original, forward)


def _maybe_uninstall_function(key: str) -> None:
    """Put the original function (or class forward) back once no patched model needs it."""
    if len(_SCOPES[key]) or key not in _DISPATCHERS:
        return
    dispatcher = _DISPATCHERS.pop(key)
    owner, name = dispatcher.__llama_fast_owner__
    if vars(owner).get(name) is dispatcher:
        setattr(owner, name, dispatcher.__llama_fast_original__)
    else:  # someone swapped it after us: theirs stays
        warnings.warn(f"llama_fast.unpatch: {key} was replaced after llama_fast patched it; left as it is")


# ---------------------------------------------------------------------------------------
# patch / unpatch


def _rules(families) -> list[Rule]:
    if isinstance(families, str):
        families = (families,)
    known = {r.family for r in RULES}
    if families is not None and set(families) - known:
        raise ValueError(f"unknown families {sorted(set(families) - known)}; known: {sorted(known)}")
    return [r for r in RULES if families is None or r.family in families]


def patch(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          attention: bool = True, cross_entropy: bool = True, families=None) -> PatchReport:
    """Patch ``model`` in place to run on the llama_fast ops, sharing its Parameters.

    Applies every row of ``RULES`` (of ``families``, default all) whose source it finds in
    the model and whose kind is enabled (``cross_entropy``: the training loss computed without
    the logits; see the module docstring). Patching again is idempotent: what is patched is
    reported under ``already`` and left as is (a kind enabled only now is patched now).
    Returns a ``PatchReport``; ``unpatch(model)`` undoes everything.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    enabled = {"rms_norm": rms_norm, "rope": rope, "swiglu": swiglu, "attention": attention,
               "cross_entropy": cross_entropy}
    for kind, on in enabled.items():
        if not isinstance(on, bool):
            raise TypeError(f"{kind} must be a bool, got {type(on).__name__}")
    rules = [r for r in _rules(families) if r.how != "on_build"]
    report = PatchReport()
    for kind, on in enabled.items():
        if not on:
            report.left_alone.append(Skip(kind, "*", f"disabled ({kind}=False)"))

    named = list(model.named_modules())
    present = {_qualname(type(m)) for _, m in named}
    matched = False

    # module rules: swap instances, keeping the originals on their parents
    module_rules = {r.source: r for r in rules if r.how == "module"}
    made: dict[int, nn.Module] = {}  # a module shared at several paths gets one replacement
    root_rule = module_rules.get(_qualname(type(model)))
    if root_rule is not None:
        matched = True
        report.left_alone.append(Skip(root_rule.kind, "", "the model itself is a module to replace; patch its parent"))
    visited: set[int] = set()

    def walk(parent_path: str, parent: nn.Module) -> None:
        # Top-down over the tree as it is being changed: a replacement that shares the
        # original's children (a decoder block) has its children patched in its own
        # _modules. The originals kept aside are not children, so they are not visited.
        nonlocal matched
        if id(parent) in visited:
            return
        visited.add(id(parent))
        originals = parent.__dict__.get("_llama_fast_originals", {})
        for name, child in list(parent._modules.items()):
            path = _join(parent_path, name)
            if name in originals:
                kind, original = originals[name]
                matched = True
                report.already.append(Change(kind, path, type(original).__name__, type(child).__name__))
            elif child is not None and (rule := module_rules.get(_qualname(type(child)))) is not None:
                matched = True
                if enabled[rule.kind]:
                    why = _why_not_swappable(child)
                    if why is None and id(child) not in made:
                        try:
                            made[id(child)] = rule.replacement.from_module(child, **dict(rule.options))
                        except (TypeError, ValueError) as e:
                            why = str(e)
                    if why is not None:
                        report.left_alone.append(Skip(rule.kind, path, why))
                    else:
                        new = made[id(child)]
                        parent._modules[name] = new
                        originals[name] = (rule.kind, child)
                        parent.__dict__["_llama_fast_originals"] = originals
                        report.replaced.append(Change(rule.kind, path, type(child).__name__, _qualname(type(new))))
                        child = new
            if child is not None:
                walk(path, child)

    walk("", model)
    named = list(model.named_modules())

    # function rules: a scoped swap of a module global
    for rule in (r for r in rules if r.how == "function"):
        scopes = [(p, m) for p, m in named if _qualname(type(m)) == rule.scope]
        if not scopes:
            continue
        matched = True
        if not enabled[rule.kind]:
            continue
        why = rule.requires(model) if rule.requires else None
        if why is not None:
            report.left_alone.append(Skip(rule.kind, rule.source, why))
            continue
        _install_function(rule)
        fn = rule.source.partition(":")[2]
        for path, m in scopes:
            handles = m.__dict__.setdefault("_llama_fast_scopes", {})
            if rule.source in handles:
                report.already.append(Change(rule.kind, path, fn, _name(rule.replacement)))
                continue
            handles[rule.source] = (
                m.register_forward_pre_hook(functools.partial(_enter, _flag(rule.source))),
                m.register_forward_hook(functools.partial(_exit, _flag(rule.source)), always_call=True),
            )
            _SCOPES[rule.source].add(m)
            report.replaced.append(Change(rule.kind, path, fn, f"{_name(rule.replacement)} (inside this module's forward)"))

    # forward rules: the class's forward dispatches on a mark in the instance
    for rule in (r for r in rules if r.how == "forward"):
        targets = [(p, m) for p, m in named if _qualname(type(m)) == rule.source]
        if not targets:
            continue
        matched = True
        if not enabled[rule.kind]:
            continue
        key = _forward_key(rule)
        for path, m in targets:
            if key in m.__dict__.get(_FORWARDS, ()):
                report.already.append(Change(rule.kind, path, "forward", _name(rule.replacement)))
                continue
            why = ("its forward is overridden on the instance (accelerate offloading or another patcher?)"
                   if "forward" in m.__dict__ else rule.requires(m) if rule.requires else None)
            if why is not None:
                report.left_alone.append(Skip(rule.kind, path, why))
                continue
            _install_forward(rule)
            m.__dict__[_FORWARDS] = m.__dict__.get(_FORWARDS, frozenset()) | {key}
            _SCOPES[key].add(m)
            report.replaced.append(Change(rule.kind, path, f"{type(m).__name__}.forward",
                                          f"{_name(rule.replacement)} (this instance)"))

    # attention rules: select the registered attention implementation
    for rule in (r for r in rules if r.how == "attention"):
        if rule.source not in present:
            continue
        matched = True
        if not enabled[rule.kind]:
            continue
        config = getattr(model, "config", None)
        if not hasattr(model, "set_attn_implementation") or config is None:
            report.left_alone.append(Skip(rule.kind, "", "not a transformers PreTrainedModel (patch the model that owns the config)"))
            continue
        rule.replacement.register()
        current = config._attn_implementation
        if current == ATTN_IMPLEMENTATION:
            report.already.append(Change(rule.kind, "config._attn_implementation", str(current), ATTN_IMPLEMENTATION))
            continue
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            report.left_alone.append(Skip(rule.kind, "config._attn_implementation",
                                          f"set_attn_implementation kept {config._attn_implementation!r}"))
            continue
        model.__dict__["_llama_fast_prev_attn"] = current
        report.replaced.append(Change(rule.kind, "config._attn_implementation", str(current), ATTN_IMPLEMENTATION))

    if not matched:
        report.left_alone.append(Skip("*", "", f"nothing in {type(model).__name__} matches a row of llama_fast.patching.RULES "
                                                f"(families: {sorted({r.family for r in rules})})"))
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo every ``patch`` of ``model`` and of its submodules: the original module objects
    (handed the current Parameters), no hooks or forward marks, the original function (or
    class forward) once no patched model needs it, and the previous attention implementation. Returns what was restored (as
    ``replaced``, before = patched, after = original)."""
    report = PatchReport()
    keys = set()
    # Bottom-up: a replaced module's own replaced children are restored before it is, so the
    # original handed its children back (share_into) gets the original children.
    for path, m in reversed(list(model.named_modules())):
        prev = m.__dict__.pop("_llama_fast_prev_attn", None)
        # Only while ours is in force: a choice the user made since (set_attn_implementation) stays.
        if prev is not None and m.config._attn_implementation == ATTN_IMPLEMENTATION:
            m.set_attn_implementation(prev)
            report.replaced.append(Change("attention", "config._attn_implementation", ATTN_IMPLEMENTATION, prev))
        for key, handles in m.__dict__.pop("_llama_fast_scopes", {}).items():
            for h in handles:
                h.remove()
            _SCOPES[key].discard(m)
            keys.add(key)
            kind = next((r.kind for r in RULES if r.source == key), "?")
            report.replaced.append(Change(kind, path, "llama_fast", key.partition(":")[2]))
        for key in m.__dict__.pop(_FORWARDS, ()):
            _SCOPES[key].discard(m)
            keys.add(key)
            kind = next((r.kind for r in RULES if r.how == "forward" and _forward_key(r) == key), "?")
            report.replaced.append(Change(kind, path, "llama_fast", key.partition(":")[2]))
        for name, (kind, original) in m.__dict__.pop("_llama_fast_originals", {}).items():
            current = m._modules.get(name)
            if current is not None:
                lfnn.share_into(original, current)
            m._modules[name] = original
            report.replaced.append(Change(kind, _join(path, name), type(current).__name__, type(original).__name__))
        m.__dict__.pop("_llama_fast_report", None)
    for key in keys:
        _maybe_uninstall_function(key)
    return report


# ---------------------------------------------------------------------------------------
# Module-level: patch every model of a family when it is built

_BUILD: dict[str, dict] = {}  # on_build rule source -> {"cls", "own", "flags"}
_MISSING = object()


def _make_init(base_init):
    """Records the attention implementation the config asked for before transformers fills in
    its default: an explicit choice (``attn_implementation=`` of from_pretrained, or
    ``config._attn_implementation`` set by the user) wins over ``patch_transformers``."""
    def __init__(self, config, *args, **kwargs):
        self.__dict__["_llama_fast_requested_attn"] = getattr(config, "_attn_implementation_internal", None)
        base_init(self, config, *args, **kwargs)

    __init__.__llama_fast_wrapper__ = True
    return __init__


def _make_post_init(source: str, base_post_init):
    def post_init(self, *args, **kwargs):
        result = base_post_init(self, *args, **kwargs)
        state = _BUILD.get(source)
        if state is not None:
            flags = dict(state["flags"])
            requested = self.__dict__.pop("_llama_fast_requested_attn", None)
            chosen = flags["attention"] and requested not in (None, ATTN_IMPLEMENTATION)
            if chosen:
                flags["attention"] = False
            report = patch(self, **flags)
            if chosen:
                report.left_alone = [s for s in report.left_alone if s.kind != "attention"]
                report.left_alone.append(Skip("attention", "config._attn_implementation",
                                              f"the model was built with attn_implementation={requested!r}, an "
                                              "explicit choice, which wins over patch_transformers"))
            for path, sub in self.named_modules():
                sub_report = sub.__dict__.pop("_llama_fast_report", None) if sub is not self else None
                if sub_report is not None:
                    report.absorb(path, sub_report)
            self.__dict__["_llama_fast_report"] = report
        return result

    post_init.__llama_fast_wrapper__ = True
    return post_init


def patch_transformers(*, rms_norm: bool = True, rope: bool = True, swiglu: bool = True, attention: bool = True,
                       cross_entropy: bool = True, families=None) -> list[str]:
    """From now on, every model of ``families`` (default all with an ``on_build`` row:
    Hugging Face Llama) patches itself with these flags at the end of its construction
    (``from_pretrained`` included); its report is ``model._llama_fast_report``, and
    ``unpatch(model)`` works on it as on any patched model. Models built before are not
    touched. Calling it again replaces the flags. Returns the wrapped classes.

    Raises ImportError if transformers is not installed.
    """
    flags = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy)
    wrapped = []
    for rule in (r for r in _rules(families) if r.how == "on_build"):
        if rule.source in _BUILD:
            _BUILD[rule.source]["flags"] = flags
        else:
            cls = _load(rule.source)
            own = {name: cls.__dict__.get(name, _MISSING) for name in ("post_init", "__init__")}
            _BUILD[rule.source] = {"cls": cls, "own": own, "flags": flags}
            cls.post_init = _make_post_init(rule.source, cls.post_init)
            cls.__init__ = _make_init(cls.__init__)
        wrapped.append(rule.source)
    return wrapped


def unpatch_transformers() -> list[str]:
    """Undo ``patch_transformers``: models built from now on are not patched. Models built
    while it was on stay patched (``unpatch`` them one by one). Returns the classes restored."""
    restored = []
    for source, state in list(_BUILD.items()):
        cls = state["cls"]
        for name, own in state["own"].items():
            if own is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, own)
        del _BUILD[source]
        restored.append(source)
    return restored
