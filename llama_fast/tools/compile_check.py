"""Compile every Triton kernel configuration for sm_80 to sm_120, no GPU needed.

Why this exists: the CPU test suite runs the kernels under the Triton interpreter, which
never lowers them to PTX, so a kernel that fails to compile for a real GPU, needs too much
shared memory, or spills registers to local memory would pass every CPU test. This tool
compiles each ``(kernel, signature, constexprs, num_warps, launch_hints)`` that a module in
``KERNEL_MODULES`` lists in its ``compile_configs()`` for each target architecture and
reports what the GPU would get: shared memory (Triton's metadata), registers and stack
frame (``cuobjdump --dump-resource-usage``) and spill bytes (the ``ptxas -v`` log Triton
writes while compiling; cuobjdump does not report spills), which tensor-core
instructions ``tl.dot`` became (``wgmma`` on Hopper, ``mma`` = mma.sync, from the PTX),
and how wide the global loads and stores are (from the PTX: a memory-bound kernel that
moves 2 bytes per instruction where it could move 16 is slow on a GPU and right on the
interpreter).

    python -m llama_fast.tools.compile_check [--arch 80 90 ...] [--all-archs] [--jobs N] [--json FILE] [--general-all]

Archs: sm_80, 86, 89, 90, 100 and 120 (``ALL_ARCHS``); the memory-bound kernels only for
sm_80 and sm_90 unless ``--all-archs`` (``MODULE_ARCHS``). A configuration may name the
archs that launch it (``config_archs``: attention tiles per GPU class).

Static cost evidence (columns ``CTAs/SM``, ``work``, ``bytes``; keys in the JSON)
----------------------------------------------------------------------------------
* ``ctas_per_sm`` / ``occupancy_limit``: resident blocks per SM from the registers,
  shared memory and warps against ``ARCH_LIMITS`` (``occupancy``).
* ``work_ratio``: tensor-core FLOPs issued over useful FLOPs. Every mma.sync / wgmma in the
  PTX is sized from its shape (m x n x k x 2, times the warps or warpgroups that issue
  it) and assigned to its innermost loop; each dot loop counts once per iteration, so a
  kernel with a masked and an unmasked copy of its loop is compared against two
  iterations of useful work (``useful_mma_flops`` of the kernel's module). 1.0: no
  duplicated work; tcgen05 (sm_100) keeps its shape in a run-time descriptor and gets no
  ratio.
* ``tma_loads`` / ``tma_stores``: TMA copies in the PTX (``cp.async.bulk.tensor``,
  global -> shared and shared -> global): proof that tensor-descriptor tiles became TMA
  (column ``tensor cores`` says ``+tma``).
* ``bytes_ratio``: bytes the global loads and stores of the code move (each instruction
  once, times the CTA's threads) over ``min_global_bytes`` of the module, the op's minimum
  for the same loop-body-once work: > 1 means replicated or wasted accesses.

Two variants of each configuration
----------------------------------
A launch does not compile the signature as written. ``JITFunction.run`` (Triton 3.6) passes
the argument values through a binder (``create_function_from_signature``, which calls
``native_specialize_impl`` per argument) and ``JITFunction._pack_args``: a pointer whose
``data_ptr()`` is a multiple of 16 and an integer that is a multiple of 16 (0 included)
get the attribute ``tt.divisibility=16`` (``ASTSource(attrs=...)``, keyed by
argument-index tuples like constexprs: ``{(0,): [["tt.divisibility", 16]]}``); an integer
equal to 1 becomes a constant (signature type ``"constexpr"``, value 1 in the constexprs);
floats are never specialised. That changes the code a lot: unit strides turn strided
gathers into vector loads (rope at head_dim 128: about 60 registers instead of 255).

* ``launch``: what a typical Llama-3 launch with contiguous tensors compiles. The fifth
  element of a configuration, ``launch_hints``, maps integer arguments to 1 (always 1 there,
  e.g. a last-dim stride) or 16 (a multiple of 16 for Llama shapes: hidden sizes, row
  strides, ...). Every pointer counts as 16-byte aligned (as ``torch`` allocations are).
  The specialisation itself is left to Triton: the configuration gets representative
  fake arguments -- Triton's ``MockTensor`` (``data_ptr() == 0``) per pointer, 1, 16 or 3
  per integer as hinted, a host-side ``TensorDescriptor`` over a ``MockTensor`` per
  ``tensordesc<...>`` argument (its box and element type are all the binder types) --
  and they go through the same binder and ``_pack_args`` that a
  launch uses, so ``signature``, ``constexprs`` and ``attrs`` are exactly the launcher's
  (a check makes sure the fake values reproduce the written types). What was specialised
  is recorded per result (``"specialized"``).
* ``general``: the signature as written, no attributes (misaligned pointers, odd sizes and
  strides). It is only reported, so to keep the check fast (the test runs it) it is
  compiled for a representative subset: each kernel's first pointer-type combination in
  ``compile_configs()`` (rms_norm bf16, rope bf16 with fp32 tables, swiglu bf16: the ones
  that span every block size) on sm_90 (or the newest arch asked for without it). ``--general-all``
  compiles it for every configuration and arch.

The table shows both variants side by side (``L/G``: launch/general; ``-``: not compiled).
Exits 1 if any compile fails, 2 if TRITON_INTERPRET is on (the interpreter replaces the
compiler, so there would be nothing to check).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

from llama_fast.backends.triton_backend import kernel_modules

KERNEL_MODULES = tuple(kernel_modules())  # every kernels/*.py: a new op's file is covered by itself
ALL_ARCHS = (80, 86, 89, 90, 100, 120)
DEFAULT_ARCHS = ALL_ARCHS
# The memory-bound kernels (no tensor cores, no arch-specific configuration) compile for
# sm_80 and sm_90 by default, the kernels with tensor-core tiles for every arch: that keeps
# the check a few minutes on 2 cores. ``--all-archs`` drops the restriction.
MODULE_ARCHS = {
    "llama_fast.kernels.rms_norm": (80, 90),
    "llama_fast.kernels.rope": (80, 90),
    "llama_fast.kernels.swiglu": (80, 90),
    "llama_fast.kernels.cross_entropy": (80, 90),
}

# What one SM of each arch offers a kernel (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): shared memory per SM and the most one block
# may opt in to (bytes), resident warps and blocks, 32-bit registers. The runtime also
# reserves RESERVED_SHARED per block. sm_86/89/120 are the consumer and workstation parts
# (A10, L4, L40S, RTX 30/40/50): 99 KiB per block, 48 warps.
ArchLimits = collections.namedtuple("ArchLimits", "smem_per_sm smem_per_block max_warps max_ctas registers")
ARCH_LIMITS = {
    80: ArchLimits(164 * 1024, 163 * 1024, 64, 32, 65536),
    86: ArchLimits(100 * 1024, 99 * 1024, 48, 16, 65536),
    89: ArchLimits(100 * 1024, 99 * 1024, 48, 24, 65536),
    90: ArchLimits(228 * 1024, 227 * 1024, 64, 32, 65536),
    100: ArchLimits(228 * 1024, 227 * 1024, 64, 32, 65536),
    120: ArchLimits(100 * 1024, 99 * 1024, 48, 32, 65536),
}
RESERVED_SHARED = 1024
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256


def occupancy(arch: int, num_warps: int, registers: int, shared: int) -> tuple[int, str]:
    """``(blocks per SM, what limits it)`` for a kernel using ``registers`` per thread and
    ``shared`` bytes per block on ``arch``, as the CUDA occupancy calculator counts them;
    0 blocks if it does not fit at all."""
    lim = ARCH_LIMITS[arch]
    per_warp = -(-registers * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    bounds = {
        "blocks": lim.max_ctas,
        "warps": lim.max_warps // num_warps,
        "registers": (lim.registers // per_warp) // num_warps if per_warp else lim.max_ctas,
        "smem": (lim.smem_per_sm // (shared + RESERVED_SHARED)) if shared <= lim.smem_per_block else 0,
    }
    limiter = min(bounds, key=lambda k: (bounds[k], k != "blocks"))
    return bounds[limiter], limiter


# Tensor-core instructions in PTX and the FLOPs one of them issues: mma.sync is per warp,
# wgmma per warpgroup (4 warps). tcgen05.mma (sm_100) keeps its shape in a runtime
# descriptor, so it is only counted, not sized.
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_WGMMA = re.compile(r"\bwgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_TCGEN05 = re.compile(r"\btcgen05\.mma\b")
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """``(first line, last line)`` of each loop in a PTX function: a label and a later
    branch back to it (LLVM lays a loop's body out between the two)."""
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:
            loops.append((labels[b.group(1)], i))
    return loops


def tensor_core_work(ptx: str, num_warps: int) -> dict:
    """MMA FLOPs the CTA issues per execution of each innermost loop holding tensor-core
    instructions (and outside any loop): each instruction's m*n*k*2 times the warps or
    warpgroups that execute it. ``loops``: those FLOPs per loop, in code order."""
    lines = ptx.splitlines()
    loops = _loops(lines)
    per_loop: dict = collections.Counter()
    outside = 0
    tcgen05 = 0
    for i, line in enumerate(lines):
        if _TCGEN05.search(line):
            tcgen05 += 1
            continue
        m, copies = _WGMMA.search(line), max(1, num_warps // 4)
        if not m:
            m, copies = _MMA_SYNC.search(line), num_warps
        if not m:
            continue
        flops = 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) * copies
        inner = [lp for lp in loops if lp[0] <= i <= lp[1]]
        if inner:
            per_loop[min(inner, key=lambda lp: lp[1] - lp[0])] += flops
        else:
            outside += flops
    return {"loops": [per_loop[k] for k in sorted(per_loop)], "outside": outside, "tcgen05": tcgen05}


def global_bytes_per_cta(ptx: str, num_warps: int) -> int:
    """Bytes the CTA's global loads and stores move if every instruction in the code runs
    once (each loop body once): instruction width x threads."""
    loads, stores = global_access_bytes(ptx)
    return sum(int(w) * n for d in (loads, stores) for w, n in d.items()) * 32 * num_warps


class InterpreterEnabledError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _configs(module: str) -> list:
    return list(importlib.import_module(module).compile_configs())


def _worker_init(cache_dir: str) -> None:
    # A private cache, always compiling: ptxas must run for every task or its log is lost.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def triton_cuobjdump() -> str:
    """The cuobjdump that Triton's wheel bundles (beside its ptxas)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def align_columns(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first the header) as left-aligned text columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _cuobjdump_usage(cubin: bytes) -> dict:
    """Registers and stack frame from ``cuobjdump --dump-resource-usage``; "?" if unavailable."""
    tool = triton_cuobjdump()
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
        return {"registers": int(regs), "stack": int(stack)}
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return {"registers": "?", "stack": "?"}


# Pointer element types of a signature -> a torch dtype for the fake launch argument.
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64", "i8": "int8",
                 "u8": "uint8", "i16": "int16", "i32": "int32", "i64": "int64", "i1": "bool"}
# Fake integer arguments: hinted 1, hinted 16, no hint (neither 1 nor a multiple of 16).
_FAKE_INT = {1: 1, 16: 16, None: 3}
# A host-side TMA descriptor argument: ``tensordesc<bf16[1, 128, 1, 64]>`` (element type, box).
_TENSORDESC = re.compile(r"tensordesc<(\w+)\[([\d, ]+)\]>")


def _fake_descriptor(ty: str):
    """A TensorDescriptor of the written type over an aligned fake tensor: the binder types
    it from its element type and box alone (shape and strides are run-time arguments)."""
    import torch
    from triton.runtime.jit import MockTensor
    from triton.tools.tensor_descriptor import TensorDescriptor

    dtype, box = _TENSORDESC.fullmatch(ty).groups()
    box = [int(b) for b in box.split(",")]
    strides = [1]
    for b in reversed(box[1:]):  # a dense tensor twice the box in every dim
        strides.insert(0, strides[0] * 2 * b)
    return TensorDescriptor(MockTensor(getattr(torch, _TORCH_DTYPES[dtype])), [2 * b for b in box], strides, box)


def unpack_config(config: tuple) -> tuple:
    """``(fn, signature, constexprs, options, launch_hints)``: the 4th element of a config is
    num_warps, or a dict of compile options (num_warps, num_stages); hints default to none.
    An optional 6th element lists the archs the configuration is launched on
    (``config_archs``)."""
    fn, signature, constexprs, options, *rest = config
    options = dict(options) if isinstance(options, dict) else {"num_warps": options}
    return fn, signature, constexprs, options, (rest[0] if rest else {})


def config_archs(config: tuple) -> tuple | None:
    """The archs whose launchers pick this configuration (arch-aware configurations, e.g.
    attention tiles per GPU class); None: every arch."""
    return tuple(config[5]) if len(config) > 5 else None


def _pointer_types(signature: dict) -> tuple:
    return tuple(t for t in signature.values() if t.startswith("*"))


def _representative(module: str, index: int) -> bool:
    """Whether the configuration has the pointer types of its kernel's first configuration
    (the general variant's subset)."""
    configs = [unpack_config(c) for c in _configs(module)]
    fn, signature = configs[index][:2]
    first = next(sig for f, sig, *_ in configs if f is fn)
    return _pointer_types(signature) == _pointer_types(first)


def _launch_specialization(fn, signature: dict, constexprs: dict, options: dict, hints: dict, arch: int):
    """``(signature, constexprs, attrs)`` exactly as Triton's launcher builds them for
    aligned tensors and integers valued as ``hints`` says (see the module docstring)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    bad = {k: v for k, v in hints.items() if signature.get(k) not in ("i32", "i64") or v not in (1, 16)}
    if bad:
        raise ValueError(f"launch_hints must map i32/i64 arguments to 1 or 16; got {bad}")

    def fake(name, ty):
        if ty.startswith("tensordesc"):
            return _fake_descriptor(ty)
        if ty.startswith("*"):
            return MockTensor(getattr(torch, _TORCH_DTYPES[ty[1:]]))  # data_ptr() == 0: aligned
        if ty in ("i32", "i64"):
            value = _FAKE_INT[hints.get(name)]
            return value + 2**32 if ty == "i64" and value != 1 else value
        if ty in ("fp32", "fp64"):
            return 0.5
        raise ValueError(f"no fake launch value for argument {name} of type {ty}")

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(constexprs, **options)
    bound_args, specialization, options = binder(**{n: fake(n, t) for n, t in signature.items()}, **kwargs)
    _, launch_sig, launch_constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    # The fake values must reproduce the written types, but for the hinted 1s.
    wrong = {n: (t, launch_sig[n]) for n, t in signature.items()
             if launch_sig[n] != t and not (launch_sig[n] == "constexpr" and hints.get(n) == 1)}
    if wrong:
        raise RuntimeError(f"fake launch arguments changed types (written, launch): {wrong}")
    return launch_sig, launch_constexprs, attrs


def element_types(signature: dict) -> str:
    """``bf16,fp32``: the element types of a signature's pointers and tensor descriptors, in
    order of first appearance."""
    types = (m.group(1) if (m := _TENSORDESC.fullmatch(t)) else t[1:] for t in signature.values()
             if t.startswith("*") or t.startswith("tensordesc"))
    return ",".join(dict.fromkeys(types))


def _compile_one(task: tuple) -> dict:
    module, index, arch, variant = task
    fn, signature, constexprs, options, hints = unpack_config(_configs(module)[index])
    result = {
        "module": module, "config": index, "variant": variant, "kernel": fn.__name__, "arch": arch,
        "constexprs": dict(constexprs), "num_warps": options["num_warps"], "num_stages": options.get("num_stages"),
        "types": element_types(signature),
        "launch_hints": dict(hints),
    }
    return dict(result, **compile_config(fn, signature, constexprs, options, hints, arch, variant))


def compile_config(fn, signature: dict, constexprs: dict, options: dict, hints: dict, arch: int,
                   variant: str = "launch") -> dict:
    """Compile one configuration for ``arch`` (in a process set up by ``_worker_init``, or
    inside ``fresh_compiles()``): what was specialised, shared memory, registers, stack,
    spills, tensor-core instructions, compile time, and the error if it failed."""
    result = {"specialized": None, "shared": None, "registers": "?", "stack": "?", "spill_stores": "?",
              "spill_loads": "?", "compile_s": None, "tensor_cores": None, "tma_loads": None, "tma_stores": None, "load_bytes": None, "store_bytes": None,
              "ctas_per_sm": None, "occupancy_limit": None, "mma_flops": None, "useful_flops": None,
              "work_ratio": None, "bytes_moved": None, "min_bytes": None, "bytes_ratio": None, "error": None}
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        if variant == "launch":
            full_signature, all_constexprs, attrs = _launch_specialization(
                fn, signature, constexprs, options, hints, arch)
            names = fn.arg_names
            result["specialized"] = {
                "equal_to_1": [n for n in signature if full_signature[n] == "constexpr"],
                "divisible_by_16": [names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v],
            }
        else:
            # Triton 3.6 wants every constexpr in the signature too, typed "constexpr".
            full_signature = dict(signature, **{name: "constexpr" for name in constexprs})
            all_constexprs, attrs = constexprs, None
        src = triton.compiler.ASTSource(fn=fn, signature=full_signature, constexprs=all_constexprs, attrs=attrs)
        ptxas_log = io.StringIO()  # Triton prints it (TRITON_DUMP_PTXAS_LOG) after ptxas runs
        start = time.perf_counter()
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        result["compile_s"] = round(time.perf_counter() - start, 3)
        result["shared"] = int(compiled.metadata.shared)
        result.update(_cuobjdump_usage(compiled.asm["cubin"]))
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log.getvalue())
        if spills:
            result["spill_stores"], result["spill_loads"] = map(int, spills.groups())
        # Which tensor-core instructions tl.dot became: Hopper's asynchronous warpgroup MMA
        # (wgmma, what sm_90 attention needs to pass FA2 speed) or Ampere's mma.sync, or
        # sm_100's tcgen05.mma (tensor memory) where Triton emits it.
        ptx = compiled.asm["ptx"]
        result["tensor_cores"] = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
                                  else "mma" if "mma.sync" in ptx else None)
        # TMA copies in the code (global -> shared loads, shared -> global stores): the
        # proof that tensor-descriptor tiles became bulk tensor copies, not pointer loads.
        result["tma_loads"], result["tma_stores"] = tma_copies(ptx)
        result["load_bytes"], result["store_bytes"] = global_access_bytes(ptx)
        result.update(static_costs(fn, constexprs, signature, options["num_warps"], arch, result, ptx))
    except Exception as e:  # noqa: BLE001 - any failure is a result to report, not a crash
        # Triton's CompilationError message already points at the kernel source line.
        result["error"] = "".join(traceback.format_exception_only(e)).strip()
    return result


def static_costs(fn, constexprs: dict, signature: dict, num_warps: int, arch: int, result: dict, ptx: str) -> dict:
    """Occupancy, tensor-core work ratio and bytes moved against the op's minimum.

    The kernel's module says what one iteration of its work needs: ``useful_mma_flops``
    (the GEMM FLOPs of one iteration of a dot loop, whole CTA) and ``min_global_bytes``
    (the bytes the code must move if each loop body ran once). The ratio compares that to
    what the compiled code issues per loop iteration, summed over every dot loop the PTX
    holds (a kernel with a masked and an unmasked copy of its loop has two)."""
    import sys as _sys

    module = _sys.modules[fn.__module__]
    costs = {}
    if isinstance(result["registers"], int):
        costs["ctas_per_sm"], costs["occupancy_limit"] = occupancy(arch, num_warps, result["registers"],
                                                                   result["shared"])
    useful = getattr(module, "useful_mma_flops", lambda *a: None)(fn.__name__, constexprs)
    if useful:
        work = tensor_core_work(ptx, num_warps)
        costs["mma_flops"] = work
        costs["useful_flops"] = useful
        if work["loops"] and not work["tcgen05"]:
            costs["work_ratio"] = round((sum(work["loops"]) + work["outside"]) / (useful * len(work["loops"])), 3)
    minimum = getattr(module, "min_global_bytes", lambda *a: None)(fn.__name__, constexprs, signature)
    if minimum:
        costs["bytes_moved"] = global_bytes_per_cta(ptx, num_warps)
        costs["min_bytes"] = minimum
        costs["bytes_ratio"] = round(costs["bytes_moved"] / minimum, 3)
    return costs


_TMA_LOAD = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global\b")
_TMA_STORE = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.global\.shared::cta\b")
def tma_copies(ptx: str) -> tuple[int, int]:
    """``(loads, stores)``: the TMA copy instructions in ``ptx`` (global -> shared and
    shared -> global ``cp.async.bulk.tensor``), counted in the code, not executed."""
    return len(_TMA_LOAD.findall(ptx)), len(_TMA_STORE.findall(ptx))


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def global_access_bytes(ptx: str) -> tuple[dict, dict]:
    """``({bytes: instructions}, {bytes: instructions})`` of the global loads and stores in
    ``ptx``, keyed by the bytes one instruction moves (``ld.global.v4.b32``: 16), counted
    in the code, not executed. Keys are strings, as they come back from the JSON."""
    found = {"ld": collections.Counter(), "st": collections.Counter()}
    for kind, modifiers in _GLOBAL_ACCESS.findall(ptx):
        parts = modifiers.split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), None)
        if bits is not None:
            found[kind][str(vector * bits // 8)] += 1
    return dict(found["ld"]), dict(found["st"])


@contextlib.contextmanager
def fresh_compiles():
    """``_worker_init``'s settings for this process, for as long as the block runs."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise InterpreterEnabledError("TRITON_INTERPRET is set: the interpreter replaces the compiler")
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_ALWAYS_COMPILE", "TRITON_DUMP_PTXAS_LOG")}
    with tempfile.TemporaryDirectory(prefix="llama_fast_compile_check_") as cache_dir:
        _worker_init(cache_dir)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def tasks(archs=DEFAULT_ARCHS, modules=KERNEL_MODULES, general_all: bool = False,
          all_archs: bool = False) -> list[tuple]:
    """``(module, config index, arch, variant)`` for everything ``check`` compiles, in order:
    ``launch`` for every configuration on each arch that launches it (``config_archs``;
    memory-bound modules only on their ``MODULE_ARCHS`` unless ``all_archs``); ``general``
    for every one with ``general_all``, else for the representative ones
    (``_representative``) on sm_90 (or the newest arch asked for without it)."""

    def launched(m, i, arch):
        only = config_archs(_configs(m)[i])
        return only is None or arch in only

    general_arch = 90 if 90 in archs else max(archs)
    module_archs = {m: [a for a in archs if all_archs or a in MODULE_ARCHS.get(m, archs)] for m in modules}
    return [(m, i, arch, v) for m in modules for i in range(len(_configs(m))) for arch in module_archs[m]
            if launched(m, i, arch) for v in ("launch", "general")
            if v == "launch" or general_all or (arch == general_arch and _representative(m, i))]


def check(archs=DEFAULT_ARCHS, jobs: int | None = None, modules=KERNEL_MODULES,
          general_all: bool = False, all_archs: bool = False) -> list[dict]:
    """Compile every configuration of ``modules`` for each arch and variant; one dict per
    task of ``tasks``, in that order. A failure's exception message is in ``"error"``."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise InterpreterEnabledError(
            "TRITON_INTERPRET is set: the Triton interpreter replaces the compiler, so nothing can be "
            "compiled. Unset it (e.g. `env -u TRITON_INTERPRET python -m llama_fast.tools.compile_check`).")
    with tempfile.TemporaryDirectory(prefix="llama_fast_compile_check_") as cache_dir:
        # spawn: a fresh interpreter per worker, no forked LLVM/CUDA state.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs or os.cpu_count() or 1, initializer=_worker_init, initargs=(cache_dir,)) as pool:
            return pool.map(_compile_one, tasks(archs, modules, general_all, all_archs), chunksize=1)


def _spill_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return "FAILED" if r["error"] else f"{r['spill_stores']}/{r['spill_loads']}"


def _access_cell(r: dict | None) -> str:
    """``16,8/16``: the widths (bytes per instruction) of the global loads / stores."""
    if r is None or r["error"] or r.get("load_bytes") is None:
        return "-"
    return "/".join(",".join(sorted(r[key], key=int, reverse=True)) or "-" for key in ("load_bytes", "store_bytes"))


def _occupancy_cell(r: dict | None) -> str:
    """``2 (smem)``: resident blocks per SM and the resource that limits them."""
    if r is None or r.get("ctas_per_sm") is None:
        return "-"
    return f"{r['ctas_per_sm']} ({r['occupancy_limit']})"


def _ratio_cell(r: dict | None, key: str) -> str:
    return "-" if r is None or r.get(key) is None else f"{r[key]:.2f}"


def _tensor_core_cell(r: dict) -> str:
    """``wgmma+tma``: the tensor-core instructions, and whether tiles move by TMA copies."""
    return str(r.get("tensor_cores") or "-") + ("+tma" if r.get("tma_loads") or r.get("tma_stores") else "")


def format_table(results: list[dict]) -> str:
    """One row per (configuration, arch); launch and general variants side by side."""
    def constexprs(r):
        return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["constexprs"].items())

    def pair(launch, general, key):
        return "/".join("-" if r is None else "FAILED" if r["error"] else str(r[key]) for r in (launch, general))

    grouped: dict = {}
    for r in results:
        grouped.setdefault((r["module"], r["config"], r["arch"]), {})[r["variant"]] = r
    header = ("kernel", "sm", "types", "constexprs", "warps", "smem L/G", "regs L/G", "stack L/G",
              "spill st/ld launch", "general", "tensor cores", "ld/st bytes launch", "CTAs/SM", "work", "bytes")
    rows = [header]
    for variants in grouped.values():
        launch, general = variants.get("launch"), variants.get("general")
        first = launch or general
        rows.append((first["kernel"], str(first["arch"]), first["types"], constexprs(first), str(first["num_warps"]),
                     pair(launch, general, "shared"), pair(launch, general, "registers"),
                     pair(launch, general, "stack"), _spill_cell(launch), _spill_cell(general),
                     _tensor_core_cell(first), _access_cell(launch), _occupancy_cell(launch),
                     _ratio_cell(launch, "work_ratio"), _ratio_cell(launch, "bytes_ratio")))
    return align_columns(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_fast.tools.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as a JSON list")
    parser.add_argument("--all-archs", action="store_true",
                        help="compile the memory-bound kernels for every arch too (see MODULE_ARCHS)")
    parser.add_argument("--general-all", action="store_true",
                        help="compile the general variant of every configuration, not just one dtype per kernel")
    args = parser.parse_args(argv)
    try:
        results = check(args.arch, args.jobs, general_all=args.general_all, all_archs=args.all_archs)
    except InterpreterEnabledError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failures = [r for r in results if r["error"]]
    for r in failures:
        print(f"\nFAILED {r['kernel']} ({r['variant']}) sm_{r['arch']} types={r['types']} {r['constexprs']} "
              f"num_warps={r['num_warps']}:\n{r['error']}", file=sys.stderr)
    spilling = {v: sum(r["variant"] == v and isinstance(r["spill_stores"], int)
                       and r["spill_stores"] + r["spill_loads"] > 0 for r in results) for v in ("launch", "general")}
    print(f"\n{len(results)} compiles (configurations x archs x variants): {len(failures)} failed; "
          f"spilling registers: {spilling['launch']} launch, {spilling['general']} general", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
