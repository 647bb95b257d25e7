"""scripts/gpu_check.py: the smoke mode runs end to end and writes the promised report
(the suite's own command, ``python -m llama_fast bench``, is tested in tests/test_bench.py).

The script runs as a user runs it, a child process from the repository root. It
inherits TRITON_INTERPRET from conftest.py on a machine without CUDA, so the llama_fast
provider runs the Triton kernels under the interpreter there.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"

TOP_KEYS = {"device", "torch", "triton", "commit", "ceilings", "rows", "steps", "sizes"}
CEILING_KEYS = {"copy_gbps", "bf16_tflops"}
ROW_KEYS = {"op", "shape", "dtype", "pass", "provider", "ms", "gbps", "tflops", "fraction_of_ceiling", "peak_mem_mb"}
# Written out here, not read from the script, so a case dropped from it fails the test.
OP_PASSES = {
    ("rms_norm", "fwd"), ("rms_norm", "bwd"), ("rms_norm", "fwd+bwd"),
    ("add_rms_norm", "fwd"), ("add_rms_norm", "bwd"), ("add_rms_norm", "fwd+bwd"),
    ("apply_rope", "fwd"), ("apply_rope", "bwd"), ("apply_rope", "fwd+bwd"),
    ("swiglu", "fwd"), ("swiglu", "bwd"), ("swiglu", "fwd+bwd"),
    ("swiglu_fused", "fwd"),
    ("cross_entropy", "fwd"), ("cross_entropy", "fwd+bwd"),  # the loss and its gradients come from one pass
}
E2E_OPS = {"train", "infer"}
# Providers that cannot run on a CPU: present with null rows (and listed as unavailable).
NULL_ON_CPU = {"cuda", "liger", "flash-attn", "hf_liger"}


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


def test_smoke_exits_cleanly_and_prints_the_summary_last(smoke_run):
    done, _ = smoke_run
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    table, summary = done.stdout.rsplit("== summary\n", 1)
    assert re.search(r"^\| decode(_graph)? \| tiny-1l B1xS16 \| ref_llama_fast \|", table, re.M)  # the tables
    assert summary.splitlines()[1].startswith("steps: wheels ")
    assert re.search(r"^rms_norm fwd x\(16,256\) bfloat16: triton [0-9.e+-]+ ms \| fastest other eager ", summary, re.M), summary
    last = summary.rstrip().splitlines()[-1]
    assert last.startswith("infer decode") and "ref_llama_fast" in last, last


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
    for step in ("wheels", "install", "tests", "ceilings", "bench", "plots"):
        assert report["steps"][step]["status"] in ("ok", "skipped"), report["steps"][step]
        assert isinstance(report["steps"][step]["seconds"], (int, float))
    assert report["steps"]["bench"]["errors"] == []
    unavailable = {u["what"] for u in report["steps"]["bench"]["unavailable"]}
    if not torch.cuda.is_available():
        assert NULL_ON_CPU <= unavailable


def test_every_op_and_pass_has_llama_fast_and_eager_rows(smoke_run):
    _, out = smoke_run
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    rows = [r for r in rows if r["op"] not in ("attention", "decode") and r["op"] not in E2E_OPS]
    measured = {(r["op"], r["pass"], r["provider"]) for r in rows if r["ms"] is not None and r["ms"] > 0}
    for op, pass_ in sorted(OP_PASSES):
        for provider in ("triton", "eager"):
            assert (op, pass_, provider) in measured, f"no {provider} timing for {op} {pass_}"
    assert {(r["op"], r["pass"]) for r in rows} == OP_PASSES
    assert all(r["provider"] != "torch.compile" for r in rows)  # --smoke leaves torch.compile out
    for r in rows:
        # The fused cross-entropy is matmul-bound: TFLOP/s, not GB/s.
        rate = "tflops" if r["op"] == "cross_entropy" else "gbps"
        if r["provider"] in NULL_ON_CPU and not torch.cuda.is_available():
            assert r["ms"] is None and r[rate] is None, r
        else:
            assert r[rate] > 0, r


# --smoke's attention grid: B * S = 64 tokens, 4 q / 2 kv heads, D = 16, one causal, one full.
SMOKE_ATTN = {"q(2,32,4,16) kv(2,32,2,16) causal", "q(1,64,4,16) kv(1,64,2,16) full"}


def test_attention_rows(smoke_run):
    _, out = smoke_run
    rows = [r for r in json.loads((out / "gpu_check.json").read_text())["rows"] if r["op"] == "attention"]
    got = {(r["shape"], r["pass"], r["provider"]) for r in rows}
    want = {(shape, pass_, provider) for shape in SMOKE_ATTN for pass_ in ("fwd", "bwd", "fwd+bwd")
            for provider in ("triton", "triton_static", "cuda", "sdpa", "flash-attn")}
    if torch.cuda.is_available():
        assert want <= got  # and the CUDA-only providers
    else:
        assert got == want  # the CUDA-only providers (sdpa_flash, sdpa_cudnn, sdpa_efficient, flex) give no rows
    measured = [r for r in rows if r["provider"] in ("triton", "triton_static", "sdpa")]
    for r in measured:
        assert r["ms"] > 0 and r["tflops"] > 0, r
        assert r["gbps"] is None and r["fraction_of_ceiling"] is None  # no ceiling measured in --smoke
    if not torch.cuda.is_available():
        assert all(r["ms"] is None for r in rows if r["provider"] in ("cuda", "flash-attn"))  # unavailable
    # TFLOP/s follows the stated convention: 4*B*Hq*S*S*D forward, halved if causal, 2.5x backward, 3.5x both.
    for r in measured:
        b, s = (int(x) for x in r["shape"][2:].split(",")[:2])
        factor = {"fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[r["pass"]]
        flops = 4 * b * 4 * s * s * 16 / (2 if r["shape"].endswith("causal") else 1) * factor
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e9), rel=2e-3), r


def test_decode_rows(smoke_run):
    _, out = smoke_run
    rows = [r for r in json.loads((out / "gpu_check.json").read_text())["rows"] if r["op"] == "decode"]
    assert {(r["shape"], r["pass"], r["provider"]) for r in rows} == {
        ("q(1,1,4,16) cache(1,64,2,16)", "fwd", provider)
        for provider in ("triton", "triton_static", "cuda", "sdpa", "flash-attn")}
    nbytes = (2 * 1 * 64 * 2 * 16 + 2 * 1 * 4 * 16) * 2  # K + V, q + out, bf16
    for r in (r for r in rows if r["provider"] in ("triton", "triton_static", "sdpa")):
        assert r["ms"] > 0 and r["tflops"] is None, r
        assert r["gbps"] == pytest.approx(nbytes / (r["ms"] * 1e6), rel=2e-3), r


def test_markdown_written(smoke_run):
    _, out = smoke_run
    text = (out / "gpu_check.md").read_text()
    assert "| op | pass | shape | dtype | provider | ms | GB/s | % of copy |" in text
    assert ("| pass | shape | dtype | provider | ms | TFLOP/s | % of matmul | vs sdpa_flash | vs sdpa_cudnn | vs flash-attn "
            "| vs triton_static |") in text
    assert "| fwd | q(2,32,4,16) kv(2,32,2,16) causal | bfloat16 | triton_static |" in text
    assert "| shape | dtype | provider | ms | GB/s | % of copy | vs sdpa |" in text
    assert "| shape | provider | ms / step | tokens/s | TFLOP/s |" in text
    assert "| fwd | q(2,32,4,16) kv(2,32,2,16) causal | bfloat16 | triton |" in text
    assert "test-commit" in text
    assert (out / "gpu_check.log").is_file()


def _load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
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


def test_tests_step_runs_the_cuda_part_first_and_sums_the_parts(tmp_path, monkeypatch):
    script = _load_script()
    calls = []

    def fake_run(cmd, log_path, timeout_s, env=None):
        calls.append((cmd[cmd.index("-k") + 1], timeout_s))
        if len(calls) == 1:
            log_path.write_text("3 failed, 40 passed, 2 skipped in 9.1s\n")
            return 1, False
        log_path.write_text("..s.\n")  # killed before its summary
        return None, True

    monkeypatch.setattr(script, "run_logged", fake_run)
    result = script.step_tests(tmp_path, 100.0, on_gpu=False)
    assert [keyword for keyword, _ in calls] == ["cuda and not emulator", "not cuda"]
    assert calls[1][1] <= calls[0][1] <= 100.0  # one deadline shared by the parts
    assert [p["status"] for p in result["parts"]] == ["failed", "timeout"]
    assert result["status"] == "failed"
    assert (result["passed"], result["failed"], result["skipped"]) == (43, 3, 3)
    assert (tmp_path / "tests-cuda.log").is_file() and (tmp_path / "tests-rest.log").is_file()


def test_attention_grid_and_plans():
    from llama_fast.bench import attention_cases as ac, grid
    from llama_fast.bench.cases import GPU_SETTINGS, Settings

    prefill = grid.attention_shapes("full")
    assert len(prefill) == 3 * 2 * 5 and all(s.batch * s.seqlen == 16384 for s in prefill)
    s = ac.AttnShape(2, 4096, 32, 8, 128, True)
    assert ac.attn_flops(s, "fwd") == 4 * 2 * 32 * 4096 * 4096 * 128 / 2
    assert ac.attn_flops(s, "bwd") == 2.5 * ac.attn_flops(s, "fwd")
    assert ac.attn_flops(s, "fwd+bwd") == 3.5 * ac.attn_flops(s, "fwd")
    cfg = Settings(**GPU_SETTINGS, compile=True)
    cuda = torch.device("cuda")
    reps = [ac.attn_reps(cfg, p, cuda)[1] for p in prefill[:5]]
    assert reps == sorted(reps, reverse=True) and reps[0] == cfg.reps and reps[-1] >= ac.ATTN_MIN_REPS
    decode = grid.decode_shapes("full")
    assert len(decode) == 16 and max(ac.decode_bytes(d, 2) for d in decode) < ac.DECODE_MAX_CACHE_BYTES
    small, big = decode[0], decode[-1]  # (1, 1K) and (64, 128K)
    assert ac.decode_plan(cfg, small, cuda)[0] * ac.decode_bytes(small, 2) >= ac.DECODE_ROTATE_BYTES
    assert ac.decode_plan(cfg, big, cuda)[:1] == (1,) and ac.decode_plan(cfg, big, cuda)[2] >= 10
    # The headline grid (what gpu_check runs) is a subset of the full one's kinds of shapes.
    assert len(grid.attention_shapes("headline")) == 4 and len(grid.decode_shapes("headline")) == 4
    assert {(s.tokens, s.hidden, s.inter) for s in grid.memory_shapes("headline")} == {(8192, 4096, 14336)}
    assert len(grid.memory_shapes("full")) == 6 * 3


def test_carried_wheels_are_installed_and_put_on_the_path(tmp_path, monkeypatch):
    """Step 0: wheels in <repo>/.whl go to a --target folder that later steps import from."""
    import zipfile

    gc = _load_script()
    wheel_dir = tmp_path / "repo" / ".whl"
    wheel_dir.mkdir(parents=True)
    files = {
        "lf_carried_demo/__init__.py": "VALUE = 42\n",
        "lf_carried_demo-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: lf-carried-demo\nVersion: 0.1\n",
        "lf_carried_demo-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files["lf_carried_demo-0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "lf_carried_demo-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel_dir / "lf_carried_demo-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    site_dir = tmp_path / "site"
    monkeypatch.setattr(gc, "REPO", tmp_path / "repo")
    monkeypatch.setattr(gc, "WHEEL_SITE", site_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    result = gc.step_wheels(tmp_path, 120.0)
    assert result["status"] == "ok", (tmp_path / "wheels.log").read_text()
    assert result["wheels"] == ["lf_carried_demo-0.1-py3-none-any.whl"]
    assert sys.path[0] == str(site_dir) and os.environ["PYTHONPATH"] == str(site_dir)
    assert importlib.import_module("lf_carried_demo").VALUE == 42
    sys.modules.pop("lf_carried_demo", None)


def test_json_records_the_autotuner(smoke_run):
    _, out = smoke_run
    history = json.loads((out / "gpu_check.json").read_text())["steps"]["bench"]["autotune"]
    # Never on the CPU; on a GPU the smoke shapes' head dim 16 has no candidates either (the
    # records' contents are test_summary_reports_the_tuned_configs_against_the_static_ones's).
    assert history == []


def test_summary_reports_the_tuned_configs_against_the_static_ones():
    from llama_fast.bench.report import autotune_lines

    default, chosen = ({"BLOCK_M": 128, "BLOCK_N": n, "num_warps": 8, "num_stages": s} for n, s in ((128, 2), (64, 3)))
    history = [{"key": "fwd sm90 bf16 d128 causal dense S4096", "role": "fwd", "source": "tuned", "config": chosen,
                "default": default, "ms": {"M128 N128 w8 s2": 2.0, "M128 N64 w8 s3": 1.6, "M64 N64 w4 s3": 1.8},
                "dropped": {"M128 N64 w8 s2": "spills 16 bytes (255 registers)"}, "seconds": 4.25},
               {"key": "dq sm90 bf16 d128 causal dense S4096", "role": "dq", "source": "cache", "config": default,
                "default": default}]

    def row(op, pass_, shape, provider, ms):
        return {"op": op, "pass": pass_, "shape": shape, "dtype": "bfloat16", "provider": provider, "ms": ms}

    rows = [row("attention", "fwd", "a", "triton", 1.6), row("attention", "fwd", "a", "triton_static", 2.0),
            row("attention", "bwd", "a", "triton", 4.0), row("attention", "bwd", "a", "triton_static", 3.6),
            row("attention", "fwd", "b", "triton", 1.0), row("attention", "fwd", "b", "triton_static", None),
            row("decode", "fwd", "c", "triton", 0.5), row("decode", "fwd", "c", "triton_static", 0.5),
            row("attention", "fwd", "a", "sdpa_flash", 1.0)]
    assert autotune_lines(history, rows) == [
        "autotune fwd sm90 bf16 d128 causal dense S4096: M128 N64 w8 s3 (default M128 N128 w8 s2; 3 timed, 1 dropped, "
        "4.2 s, 1.25x the default)",
        "autotune dq sm90 bf16 d128 causal dense S4096: M128 N128 w8 s2 (default M128 N128 w8 s2; from the cache)",
        "triton (tuned) vs triton_static, attention: tuned faster in 1/2 cases, geomean 1.06x",
        "triton (tuned) vs triton_static, decode: tuned faster in 0/1 cases, geomean 1.00x",
    ]


def test_summary_compares_cuda_with_triton_per_op():
    from llama_fast.bench.report import cuda_against_triton

    def row(op, shape, provider, ms):
        return {"op": op, "pass": "fwd", "shape": shape, "dtype": "bfloat16", "provider": provider, "ms": ms}

    rows = [row("rms_norm", "a", "triton", 2.0), row("rms_norm", "a", "cuda", 1.0),
            row("rms_norm", "b", "triton", 1.0), row("rms_norm", "b", "cuda", 2.0),
            row("rms_norm", "c", "triton", 3.0), row("rms_norm", "c", "cuda", None),  # cuda unavailable: no pair
            row("rope", "a", "triton", 1.0), row("rope", "a", "eager", 0.5)]
    assert cuda_against_triton(rows) == ["cuda vs triton, rms_norm: cuda faster in 1/2 cases, geomean 1.00x"]


def test_readme_section_is_written_from_a_results_json(tmp_path):
    readme = _load_script(REPO / "scripts" / "bench_readme.py")

    folder = tmp_path / "bench" / "results" / "nvidia-h100-80gb-hbm3-2026-12-01"
    folder.mkdir(parents=True)
    row = {"op": "rms_norm", "pass": "fwd", "shape": "x(8192,4096)", "dtype": "bfloat16", "gbps": None, "tflops": None,
           "peak_mem_mb": None}
    report = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "abc123def4567",
              "ceilings": {"copy_gbps": 3000.0, "bf16_tflops": 780.0},
              "rows": [dict(row, provider="triton", ms=0.05, fraction_of_ceiling=0.9),
                       dict(row, provider="cuda", ms=0.04, fraction_of_ceiling=0.95),
                       dict(row, provider="liger", ms=0.06, fraction_of_ceiling=0.8),
                       dict(row, provider="eager", ms=None, fraction_of_ceiling=None)]}
    (folder / "gpu_check.json").write_text(json.dumps(report))
    (folder / "gpu_check-rms_norm-bfloat16.png").write_bytes(b"png")
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n\n{readme.START}\nold text\n{readme.END}\n\nafter\n")
    assert readme.main([str(folder), "--readme", str(doc)]) == 0
    text = doc.read_text()
    assert "old text" not in text and text.endswith(f"{readme.END}\n\nafter\n")
    assert "**NVIDIA H100 80GB HBM3**" in text and "`abc123def456`" in text and "copy 3000 GB/s" in text
    assert "| rms_norm | fwd | x(8192,4096) | bfloat16 | cuda | 0.0400 | 95% | liger | 0.0600 | 1.50x |" in text
    assert "![gpu_check-rms_norm-bfloat16](bench/results/nvidia-h100-80gb-hbm3-2026-12-01/gpu_check-rms_norm-bfloat16.png)" in text
    assert readme.newest_results(tmp_path / "bench" / "results") == folder / "gpu_check.json"

    report["device"] = "cpu (x86_64)"
    (folder / "gpu_check.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="not measured on a GPU"):
        readme.main([str(folder), "--readme", str(doc)])


def test_the_readme_has_the_results_markers():
    readme = _load_script(REPO / "scripts" / "bench_readme.py")

    text = (REPO / "README.md").read_text()
    assert text.count(readme.START) == 1 and text.count(readme.END) == 1


def test_install_step_keeps_the_ptxas_report(tmp_path):
    script = _load_script()
    report = tmp_path / "_C.ptxas.txt"
    assert script.ptxas_summary(report, tmp_path / "out") == {"cuda_build": None}
    report.write_text("# llama_fast._C built by ninja 1.11, nvcc 13.0, archs 80;90\n# rope.cu\n"
                      "ptxas info    : Function properties for k1\n    0 bytes stack frame, 8 bytes spill stores, 4 bytes "
                      "spill loads\nptxas info    : Used 96 registers\n"
                      "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\nptxas info    : Used 255 registers\n")
    out = tmp_path / "out"
    out.mkdir()
    got = script.ptxas_summary(report, out)
    assert got == {"cuda_build": "# llama_fast._C built by ninja 1.11, nvcc 13.0, archs 80;90", "cuda_max_registers": 255,
                   "cuda_spill_bytes": 12, "ptxas_report": "_C.ptxas.txt"}
    assert (out / "_C.ptxas.txt").read_text() == report.read_text()
