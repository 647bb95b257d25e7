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
import torch

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
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("| q(1,1,4,16) cache(1,64,2,16) | sdpa |"), last  # the decode table ends it


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
    rows = [r for r in rows if r["op"] not in ("attention", "decode")]
    measured = {(r["op"], r["pass"], r["provider"]) for r in rows if r["ms"] is not None and r["ms"] > 0}
    for op, pass_ in sorted(OP_PASSES):
        for provider in ("llama_fast", "eager"):
            assert (op, pass_, provider) in measured, f"no {provider} timing for {op} {pass_}"
    assert {(r["op"], r["pass"]) for r in rows} == OP_PASSES
    assert all(r["provider"] != "torch.compile" for r in rows)  # --smoke leaves torch.compile out
    assert all(r["gbps"] > 0 for r in rows)


# --smoke's attention grid: B * S = 64 tokens, 4 q / 2 kv heads, D = 16.
SMOKE_ATTN = {f"q({64 // s},{s},4,16) kv({64 // s},{s},2,16) {mask}" for s in (32, 64) for mask in ("causal", "full")}


def test_attention_rows(smoke_run):
    _, out = smoke_run
    rows = [r for r in json.loads((out / "gpu_check.json").read_text())["rows"] if r["op"] == "attention"]
    got = {(r["shape"], r["pass"], r["provider"]) for r in rows}
    want = {(shape, pass_, provider) for shape in SMOKE_ATTN for pass_ in ("fwd", "bwd")
            for provider in ("llama_fast", "sdpa")}
    assert got == want  # the CUDA-only providers (sdpa_flash, sdpa_cudnn, sdpa_efficient, flex) give no rows
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0, r
        assert r["gbps"] is None and r["fraction_of_ceiling"] is None  # no ceiling measured in --smoke
    # TFLOP/s follows the stated convention: 4*B*Hq*S*S*D forward, halved if causal, 2.5x backward.
    for r in rows:
        b, s = (int(x) for x in r["shape"][2:].split(",")[:2])
        flops = 4 * b * 4 * s * s * 16 / (2 if r["shape"].endswith("causal") else 1) * (2.5 if r["pass"] == "bwd" else 1)
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e9), rel=2e-3), r


def test_decode_rows(smoke_run):
    _, out = smoke_run
    rows = [r for r in json.loads((out / "gpu_check.json").read_text())["rows"] if r["op"] == "decode"]
    assert {(r["shape"], r["pass"], r["provider"]) for r in rows} == {
        ("q(1,1,4,16) cache(1,64,2,16)", "fwd", provider) for provider in ("llama_fast", "sdpa")}
    nbytes = (2 * 1 * 64 * 2 * 16 + 2 * 1 * 4 * 16) * 2  # K + V, q + out, bf16
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] is None, r
        assert r["gbps"] == pytest.approx(nbytes / (r["ms"] * 1e6), rel=2e-3), r


def test_markdown_written(smoke_run):
    _, out = smoke_run
    text = (out / "gpu_check.md").read_text()
    assert "| op | pass | shape | provider | ms | GB/s | % of copy |" in text
    assert "| pass | shape | provider | ms | TFLOP/s | % of matmul | vs sdpa_flash | vs sdpa_cudnn |" in text
    assert "| shape | provider | ms | GB/s | % of copy | vs sdpa |" in text
    assert "| fwd | q(1,64,4,16) kv(1,64,2,16) causal | llama_fast |" in text
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


def test_attention_grid_and_plans():
    gc = _load_script()
    prefill = gc.attn_shapes(smoke=False)
    assert len(prefill) == 2 * 2 * 5 and all(s.batch * s.seqlen == 16384 for s in prefill)
    s = gc.AttnShape(2, 4096, 32, 8, 128, True)
    assert gc.attn_flops(s, "fwd") == 4 * 2 * 32 * 4096 * 4096 * 128 / 2
    assert gc.attn_flops(s, "bwd") == 2.5 * gc.attn_flops(s, "fwd")
    cfg = gc.Settings(**gc.GPU_SETTINGS, compile=True)
    cuda = torch.device("cuda")
    reps = [gc.attn_reps(cfg, p, cuda)[1] for p in prefill[:5]]
    assert reps == sorted(reps, reverse=True) and reps[0] == cfg.reps and reps[-1] >= gc.ATTN_MIN_REPS
    decode = gc.decode_shapes(smoke=False)
    assert len(decode) == 16 and max(gc.decode_bytes(d, 2) for d in decode) < gc.DECODE_MAX_CACHE_BYTES
    small, big = decode[0], decode[-1]  # (1, 1K) and (64, 128K)
    assert gc.decode_plan(cfg, small, cuda)[0] * gc.decode_bytes(small, 2) >= gc.DECODE_ROTATE_BYTES
    assert gc.decode_plan(cfg, big, cuda)[:1] == (1,) and gc.decode_plan(cfg, big, cuda)[2] >= 10
