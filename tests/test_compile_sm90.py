"""Every shipped Triton kernel configuration compiles for sm_80 and sm_90 (no GPU needed).

Runs ``python -m llama_fast.compile_check`` once, in a subprocess without TRITON_INTERPRET
(conftest switches the interpreter on for CPU runs, and the interpreter replaces the
compiler), and checks its JSON results: coverage, shared memory and register spills.
About 75 s on 2 cores.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings

import pytest

from llama_fast.compile_check import KERNEL_MODULES

ARCHS = (80, 90)

# Shipped configurations that spill today (Triton 3.6's ptxas), each matched by kernel,
# arch (None: any), pointer types (None: any) and a subset of its constexprs. They are
# reported as warnings on every run; a spill anywhere else in the checked set fails.
KNOWN_SPILLS = [
    # Llama-3 405B hidden size: MAX_WARPS caps it at 16 warps, so 32 fp32 values per thread
    # per tensor: ~220-500 bytes each way.
    ("_rms_norm_bwd_kernel", None, None, {"BLOCK_N": 16384}),
    # head_dim 128 (Llama-3 8B/70B): 255 registers on both archs, 8-36 bytes spilled on sm_90.
    ("_rope_kernel", 90, None, {"BLOCK_HALF": 64}),
    # fp32 backward at BLOCK_N=1024: 8 bytes on sm_90.
    ("_swiglu_bwd_kernel", 90, "fp32", {"BLOCK_N": 1024}),
]


def _describe(r: dict) -> str:
    return f"{r['kernel']} sm_{r['arch']} {r['types']} {r['constexprs']} warps={r['num_warps']}"


def _is_known_spill(r: dict) -> bool:
    return any(r["kernel"] == kernel and arch in (None, r["arch"]) and types in (None, r["types"])
               and all(r["constexprs"].get(k) == v for k, v in constexprs.items())
               for kernel, arch, types, constexprs in KNOWN_SPILLS)


def _spills(r: dict) -> int:
    return r["spill_stores"] + r["spill_loads"]


@pytest.fixture(scope="module")
def compile_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "llama_fast.compile_check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout)  # the table: shown with -s, or with a failure
    print(proc.stderr, file=sys.stderr)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def results(compile_check):
    proc, results = compile_check
    assert proc.returncode == 0, f"compile_check failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}"
    return results


def test_every_config_compiles_for_sm80_and_sm90(results):
    expected_total = 0
    for name in KERNEL_MODULES:
        configs = list(importlib.import_module(name).compile_configs())
        expected_total += len(configs) * len(ARCHS)
        module_results = [r for r in results if r["module"] == name]
        assert len(module_results) == len(configs) * len(ARCHS), name
        for kernel in {fn.__name__ for fn, *_ in configs}:
            for arch in ARCHS:
                assert any(r["kernel"] == kernel and r["arch"] == arch for r in module_results), (kernel, arch)
    assert len(results) == expected_total
    for r in results:
        assert r["error"] is None, _describe(r)
        assert isinstance(r["shared"], int) and not isinstance(r["shared"], bool), _describe(r)
        # Spill bytes come from the ptxas log, which every compile writes.
        assert isinstance(r["spill_stores"], int) and isinstance(r["spill_loads"], int), _describe(r)


def test_no_register_spills(results):
    """No spills in rms_norm up to BLOCK_N=16384 nor in rope/swiglu, but for KNOWN_SPILLS
    (warned about). rms_norm at BLOCK_N >= 32768 (hidden sizes beyond Llama-3) spills by
    design of the one-row-in-registers kernel and is only reported."""
    checked = [r for r in results
               if not (r["kernel"].startswith("_rms_norm") and r["constexprs"]["BLOCK_N"] > 16384)]
    assert len(checked) > len(results) // 2
    known = [r for r in checked if _is_known_spill(r) and _spills(r)]
    unexpected = [r for r in checked if not _is_known_spill(r) and _spills(r)]
    reported = [r for r in results if r not in checked and _spills(r)]
    if known + reported:
        warnings.warn(UserWarning(f"{len(known + reported)} kernel configurations spill registers:\n" + "\n".join(
            f"  {_describe(r)}: {r['spill_stores']}/{r['spill_loads']} bytes stored/loaded, {r['registers']} registers"
            for r in known + reported)))
    assert not unexpected, "new register spills:\n" + "\n".join(
        f"{_describe(r)}: {r['spill_stores']}/{r['spill_loads']} bytes" for r in unexpected)
