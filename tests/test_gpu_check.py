"""bench/gpu_check.py: the smoke mode runs end to end and writes the promised report.

The script runs as the GPU session runs it, a child process from the repository root. It
inherits TRITON_INTERPRET from conftest.py on a machine without CUDA, so the llama_fast
provider runs the Triton kernels under the interpreter there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"

TOP_KEYS = {"device", "torch", "triton", "commit", "ceilings", "rows", "steps"}
CEILING_KEYS = {"copy_gbps", "bf16_tflops"}
ROW_KEYS = {"op", "shape", "dtype", "pass", "provider", "ms", "gbps", "tflops", "fraction_of_ceiling", "peak_mem_mb"}
# Written out here, not read from the script, so a case dropped from it fails the test.
OP_PASSES = {
    ("rms_norm", "fwd"), ("rms_norm", "bwd"),
    ("add_rms_norm", "fwd"), ("add_rms_norm", "bwd"),
    ("apply_rope", "fwd"), ("apply_rope", "bwd"),
    ("swiglu", "fwd"), ("swiglu", "bwd"),
    ("swiglu_fused", "fwd"),
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ)
    env.pop("OUT", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--commit", "test-commit"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150,
    )
    return done, out


def test_smoke_exits_cleanly_and_prints_the_table_last(smoke_run):
    done, _ = smoke_run
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.stdout.rstrip().splitlines()[-1].startswith("| swiglu_fused | fwd |")


def test_json_schema(smoke_run):
    _, out = smoke_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report) == TOP_KEYS
    assert report["commit"] == "test-commit"
    assert set(report["ceilings"]) == CEILING_KEYS
    assert report["ceilings"] == {"copy_gbps": None, "bf16_tflops": None}  # --smoke measures none
    for row in report["rows"]:
        assert set(row) == ROW_KEYS, row
        assert row["dtype"] == "bfloat16"
    for step in ("install", "tests", "ceilings", "bench"):
        assert report["steps"][step]["status"] in ("ok", "skipped"), report["steps"][step]
        assert isinstance(report["steps"][step]["seconds"], (int, float))
    assert report["steps"]["bench"]["errors"] == []


def test_every_op_and_pass_has_llama_fast_and_eager_rows(smoke_run):
    _, out = smoke_run
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    measured = {(r["op"], r["pass"], r["provider"]) for r in rows if r["ms"] is not None and r["ms"] > 0}
    for op, pass_ in sorted(OP_PASSES):
        for provider in ("llama_fast", "eager"):
            assert (op, pass_, provider) in measured, f"no {provider} timing for {op} {pass_}"
    assert {(r["op"], r["pass"]) for r in rows} == OP_PASSES
    assert all(r["provider"] != "torch.compile" for r in rows)  # --smoke leaves torch.compile out
    assert all(r["gbps"] > 0 for r in rows)


def test_markdown_written(smoke_run):
    _, out = smoke_run
    text = (out / "gpu_check.md").read_text()
    assert "| op | pass | shape | provider | ms | GB/s | % of copy |" in text
    assert "test-commit" in text
    assert (out / "gpu_check.log").is_file()


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_pytest_summary_parsing():
    parse = _load_script().parse_pytest
    counts = parse("....F\n!!! stopping after 1 failures !!!\n1 failed, 4 passed, 2 skipped, 1 error in 12.30s (0:00:12)\n")
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (4, 1, 2, 1)
    assert counts["summary"].startswith("1 failed")
    assert parse("===== 7 passed in 0.50s =====")["passed"] == 7
    # Killed before the summary: count the progress characters.
    killed = parse("..s.  [ 40%]\n..F\n")
    assert (killed["passed"], killed["failed"], killed["skipped"], killed["summary"]) == (5, 1, 1, None)
