"""What the CUDA extension's kernels compiled to, instruction by instruction; no GPU needed.

Why this exists: ptxas's report (``_C.ptxas.txt``) gives registers, shared memory and
spills, but not whether the source's 16-byte vector accesses, ``cp.async``, ``ldmatrix``
and ``mma.sync`` survived the compiler as such. nvcc may legally split a 16-byte store
into four 4-byte ones (it did, in the attention epilogue), and the CPU emulator cannot
see that: the result is the same, only slower. This disassembles ``llama_fast._C``
(``cuobjdump -sass``: the toolkit's beside nvcc, else the one in Triton's wheel) and
counts each kernel's instructions per architecture; tests/test_cuda_sass.py holds the
kernels to what issue #4 asks of them.

    python -m llama_fast.tools.sass_check [--all] [LIBRARY]    # default: the installed llama_fast._C

The table shows, per kernel and arch, global loads and stores and cp.async copies by
width in bytes (``16:6 4:2`` = six 16-byte and two 4-byte instructions, counted in the
code, not executed), ldmatrix, mma and local-memory instructions.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from llama_fast.tools.compile_check import align_columns, triton_cuobjdump

# An instruction line of cuobjdump -sass: "/*0a30*/  @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;"
_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
# Width suffixes of memory opcodes, in bytes; none means 4 (LDG.E, STG.E, LDGSTS.E).
_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_SHORT_TYPES = {"__nv_bfloat16": "bf16", "__half": "f16", "float": "f32"}


class DisassemblyError(RuntimeError):
    pass


def find_cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump (beside nvcc or on PATH), else the one Triton bundles."""
    candidates = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidates.append(Path(home) / "bin" / "cuobjdump")
    if found := shutil.which("cuobjdump"):
        candidates.append(Path(found))
    try:
        candidates.append(Path(triton_cuobjdump()))
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def extension_path() -> Path:
    from llama_fast import _C

    return Path(_C.__file__)


def disassemble(library: Path) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise DisassemblyError("no cuobjdump: neither the CUDA toolkit's nor Triton's was found")
    proc = subprocess.run([tool, "-sass", str(library)], capture_output=True, text=True)
    if proc.returncode != 0 or "Function :" not in proc.stdout:
        raise DisassemblyError(f"{tool} -sass {library} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short_name(demangled: str) -> str:
    """``void llama_fast::(anonymous namespace)::rope_kernel<__half, float, 8, true>(...)``
    -> ``rope_kernel<f16, f32, 8, true>``."""
    name = re.sub(r"\w+::|\(anonymous namespace\)::", "", demangled.removeprefix("void ")).split("(", 1)[0]
    return re.sub(r"\b(__nv_bfloat16|__half|float)\b", lambda m: _SHORT_TYPES[m.group(1)], name)


def split_name(name: str) -> tuple[str, list[str]]:
    """``rope_kernel<f16, f32, 8, true>`` -> ``("rope_kernel", ["f16", "f32", "8", "true"])``."""
    m = re.fullmatch(r"(\w+)<(.*)>", name)
    return (m.group(1), [a.strip() for a in m.group(2).split(",")]) if m else (name, [])


def parse(sass: str) -> dict[tuple[int, str], collections.Counter]:
    """``{(arch, kernel): Counter(opcode)}`` from ``cuobjdump -sass`` output."""
    counts: dict[tuple[int, str], collections.Counter] = {}
    arch, current, skip = None, None, False
    for line in sass.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)(a?)", line):
            # sm_90a (arch-specific) code is the same source as sm_90's: keyed apart as 90a
            # would break the int keys, merged it would double the counts, so it is skipped.
            arch, current, skip = int(m.group(1)), None, bool(m.group(2))
        elif skip:
            continue
        elif m := re.match(r"\s*Function : (\S+)", line):
            current = counts.setdefault((arch, m.group(1)), collections.Counter())
        elif current is not None and (m := _INSTRUCTION.search(line)):
            current[m.group(1)] += 1
    names = _demangle([name for _, name in counts])
    return {(arch, short_name(name)): c for ((arch, _), c), name in zip(counts.items(), names)}


def instructions(library: Path | None = None) -> dict[tuple[int, str], collections.Counter]:
    return parse(disassemble(library or extension_path()))


def widths(counts: collections.Counter, opcode: str) -> dict[int, int]:
    """``{bytes: instructions}`` of one memory opcode (``LDG``, ``STG``, ``LDGSTS``)."""
    out: dict[int, int] = collections.Counter()
    for op, n in counts.items():
        parts = op.split(".")
        if parts[0] == opcode:
            sizes = [_WIDTHS[p] for p in parts[1:] if p in _WIDTHS]
            out[sizes[0] if sizes else 4] += n
    return dict(out)


def family(counts: collections.Counter, opcode: str) -> int:
    """Instructions whose opcode is ``opcode`` with any modifiers (``HMMA``, ``LDSM``, ``LDL``)."""
    return sum(n for op, n in counts.items() if op.split(".")[0] == opcode)


def _widths_cell(counts, opcode) -> str:
    return " ".join(f"{b}:{n}" for b, n in sorted(widths(counts, opcode).items(), reverse=True)) or "-"


def format_table(counts: dict[tuple[int, str], collections.Counter]) -> str:
    header = ("sm", "kernel", "LDG bytes:n", "STG bytes:n", "cp.async bytes:n", "ldmatrix", "mma", "local")
    rows = [header]
    for (arch, name), c in sorted(counts.items()):
        rows.append((str(arch), name, _widths_cell(c, "LDG"), _widths_cell(c, "STG"), _widths_cell(c, "LDGSTS"),
                     str(family(c, "LDSM")), str(family(c, "HMMA")), str(family(c, "LDL") + family(c, "STL"))))
    return align_columns(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_fast.tools.sass_check", description=__doc__.split("\n")[0])
    parser.add_argument("library", nargs="?", help="a built extension (default: the installed llama_fast._C)")
    parser.add_argument("--all", action="store_true", help="every instantiation (default: 16-bit types only)")
    args = parser.parse_args(argv)
    try:
        counts = instructions(Path(args.library) if args.library else None)
    except (DisassemblyError, ImportError) as e:
        print(f"sass_check: {e}", file=sys.stderr)
        return 1
    if not args.all:
        counts = {k: v for k, v in counts.items() if split_name(k[1])[1][:1] != ["f32"]}
    print(format_table(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
