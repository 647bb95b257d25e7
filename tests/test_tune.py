"""``python -m llama_fast.bench.tune``: the attention configuration candidates compute what the
current configurations compute (the interpreter, tiny shapes), compile for Hopper, and a
wrong or non-finite result is caught, never timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
from llama_fast.bench import tune


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU `python -m llama_fast.bench.tune` itself is the check: compiling "
                    "every candidate here would spend minutes of the GPU test run")
def test_every_candidate_matches_the_current_configuration(tmp_path):
    out = tmp_path / "tune.json"
    assert tune.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["role"], r["head_dim"]) for r in rows} == set(tune.CANDIDATES)
    assert sum(r["current"] for r in rows) == len(tune.CANDIDATES)  # one baseline per kernel and head dim
    assert len(rows) == len(tune.CANDIDATES) + sum(len(c) for c in tune.CANDIDATES.values())
    assert [r for r in rows if r["error"]] == []
    assert "matches the current configuration" in out.with_suffix(".md").read_text()


def test_override_changes_one_kernel_and_restores():
    fa = tune._flash_attn_module()
    before = (fa.forward_config(128), fa.backward_configs(128))
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1}
    with tune.override("dq", cfg):
        assert fa.backward_configs(128) == (before[1][0], cfg)
        assert fa.forward_config(128) == before[0]
        assert fa.backward_configs(128, torch.float32) != (before[1][0], cfg)  # float32 keeps its own
    assert (fa.forward_config(128), fa.backward_configs(128)) == before

    fd = tune._flash_decode_module()
    current = fd.launch_config(tune.DECODE_GROUP, 1, 128)
    wide = fd.launch_config(16, 4, 128)  # 64 rows: another row tile, not the candidate's
    cfg = {"BLOCK_M": current["BLOCK_M"], "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}
    with tune.override("decode", cfg):
        got = fd.launch_config(tune.DECODE_GROUP, 1, 128)
        assert (got["BLOCK_N"], got["num_warps"], got["num_stages"]) == (16, 2, 1)
        assert got["BLOCK_M"] == current["BLOCK_M"] and got["BLOCK_D"] == current["BLOCK_D"]
        assert fd.launch_config(16, 4, 128) == wide
        assert fa.forward_config(128) == before[0]
    assert fd.launch_config(tune.DECODE_GROUP, 1, 128) == current


def test_a_wrong_or_non_finite_result_is_a_mismatch():
    want = [torch.ones(4, 4), torch.ones(4, 4), torch.ones(4, 4)]
    assert tune._mismatch([w.clone() for w in want], want) is None
    off = [want[0], want[1] * 1.1, want[2]]
    assert "dk: max error" in tune._mismatch(off, want)
    nan = [want[0].clone(), want[1], want[2]]
    nan[0][1, 2] = float("nan")
    assert tune._mismatch(nan, want) == "out/dq: not finite"


def test_compile_only_reports_the_candidates_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, "-m", "llama_fast.bench.tune", "--compile-only", "90", "--roles", "dq",
                           "--head-dims", "64", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 + len(tune.CANDIDATES[("dq", 64)])
    for r in rows:
        assert r["error"] is None and r["tensor_cores"] == "wgmma", r
        assert r["shared"] <= 227 * 1024 and isinstance(r["registers"], int)


def test_the_autotuners_hopper_candidates_compile_clean_for_sm90(tmp_path):
    """Every candidate the run-time autotuner offers a Hopper GPU (kernels/_autotune.py)
    compiles for sm_90 with wgmma, fits 227 KiB, spills nothing and repeats no MMA work, so
    none costs a compile on the device only to be dropped (a kernel change that breaks one
    fails here)."""
    from llama_fast.kernels import _autotune

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, "-m", "llama_fast.bench.tune", "--compile-only", "90", "--autotuner", "hopper",
                           "--roles", "fwd,dkdv,dq", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    want = sum(1 + len(_autotune.candidates(role, d, torch.bfloat16, "hopper")) for role in ("fwd", "dkdv", "dq")
               for d in (64, 128))
    assert len(rows) == want  # no candidate equals its default
    for r in rows:
        assert r["error"] is None and r["tensor_cores"] == "wgmma", r
        assert r["shared"] <= 227 * 1024 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["work_ratio"] is not None and r["work_ratio"] <= 1.05, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run; on a GPU tests/test_autotune.py tunes for real")
def test_every_autotuner_candidate_computes_what_the_default_does(tmp_path):
    """Every candidate of the run-time autotuner, of every GPU class, put in place of the
    default under the interpreter: the forward, the whole backward and a decode step match
    the default's results (so a fastest candidate never changes what a call computes)."""
    from llama_fast.kernels import _autotune

    out = tmp_path / "tune.json"
    assert tune.main(["--smoke", "--autotuner", "all", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r for r in rows if r["error"]] == []
    for role in tune.ROLES:
        for d in (64, 128):
            offered = {tune._label(dict(tune.current_config(role, d), **c)) for gpu in tune.AUTOTUNER_CLASSES
                       for c in _autotune.candidates(role, d, torch.bfloat16, gpu)}
            assert offered <= {r["label"] for r in rows if (r["role"], r["head_dim"]) == (role, d)}, (role, d)
