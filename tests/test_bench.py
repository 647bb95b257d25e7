"""``python -m llama_fast bench``: the benchmark suite (bench/suite.py) runs on a CPU with
--smoke and writes the promised JSON, markdown and plots; --ops filters; a provider that
cannot run gives null rows and an "unavailable" entry, never a crash; the end-to-end rows
are there. The GPU check built on the same suite is tests/test_gpu_check.py.
"""
from __future__ import annotations

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
import llama_fast
from llama_fast.bench import end_to_end as e2e, suite

SCHEMA_TOP = {"device", "torch", "triton", "commit", "ceilings", "rows"}
ROW_KEYS = {"op", "shape", "dtype", "pass", "provider", "ms", "gbps", "tflops", "fraction_of_ceiling", "peak_mem_mb"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
OPS = "rms_norm,cross_entropy,decode,train,infer"


def _bench(*args, timeout=240):
    env = dict(os.environ)
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "llama_fast", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "x.json"
    done = _bench("--smoke", "--ops", OPS, "--dtypes", "bf16,fp16", "--out", str(out), "--commit", "test-commit")
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    return done, out, json.loads(out.read_text())


def test_json_schema(smoke):
    _, _, report = smoke
    assert SCHEMA_TOP <= set(report)
    assert report["commit"] == "test-commit"
    assert set(report["ceilings"]) == {"copy_gbps", "bf16_tflops"}
    assert report["rows"]
    for row in report["rows"]:
        assert set(row) == ROW_KEYS, row
    assert report["steps"]["bench"]["errors"] == []


def test_ops_and_dtypes_filter(smoke):
    _, _, report = smoke
    rows = report["rows"]
    assert {r["op"] for r in rows} == {"rms_norm", "cross_entropy", "decode", "train", "infer"}
    for op in ("rms_norm", "cross_entropy", "decode"):
        assert {r["dtype"] for r in rows if r["op"] == op} == {"bfloat16", "float16"}
    assert {r["dtype"] for r in rows if r["op"] in ("train", "infer")} == {"bfloat16"}  # models are bf16
    measured = {(r["pass"], r["provider"], r["dtype"]) for r in rows if r["op"] == "rms_norm" and r["ms"]}
    assert {(p, "triton", d) for p in ("fwd", "bwd", "fwd+bwd") for d in ("bfloat16", "float16")} <= measured
    # The fused linear cross-entropy is matmul-bound: TFLOP/s rows, no backward-alone pass.
    ce = [r for r in rows if r["op"] == "cross_entropy"]
    assert {r["pass"] for r in ce} == {"fwd", "fwd+bwd"}
    assert all(r["tflops"] > 0 and r["gbps"] is None for r in ce if r["provider"] in ("triton", "eager")), ce


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these providers may well run")
def test_unavailable_providers_give_null_rows(smoke):
    _, _, report = smoke
    unavailable = {u["what"]: u["why"] for u in report["steps"]["bench"]["unavailable"]}
    assert {"cuda", "liger", "flash-attn", "hf_liger"} <= set(unavailable)
    assert unavailable["cuda"]  # backend_status("cuda")'s reason
    for r in report["rows"]:
        if r["provider"] in ("cuda", "liger", "flash-attn", "hf_liger"):
            assert r["ms"] is None and r["gbps"] is None and r["tflops"] is None, r
    assert any(r["provider"] == "cuda" for r in report["rows"])


def test_end_to_end_rows(smoke):
    _, _, report = smoke
    train = [r for r in report["rows"] if r["op"] == "train"]
    assert {r["provider"] for r in train} == {"hf_eager", "hf_llama_fast", "hf_llama_fast_no_ce", "hf_liger",
                                              "ref_eager", "ref_llama_fast", "ref_llama_fast_no_ce"}
    shape = e2e.train_shapes("smoke")[0]
    args = e2e.model_args(shape.model)
    for r in train:
        if r["provider"] == "hf_liger" and not torch.cuda.is_available():
            continue
        assert r["pass"] == "fwd+bwd+adamw" and r["ms"] > 0, r
        assert r["tflops"] == pytest.approx(e2e.train_flops(args, shape) / (r["ms"] * 1e9), rel=2e-3)
    infer = {(r["pass"], r["provider"]): r for r in report["rows"] if r["op"] == "infer"}
    passes = ("prefill", "decode", "decode_graph") if torch.cuda.is_available() else ("prefill", "decode")
    assert set(infer) == {(p, q) for p in passes for q in ("ref_eager", "ref_llama_fast")}
    assert all(infer[(p, q)]["ms"] > 0 for p in ("prefill", "decode") for q in ("ref_eager", "ref_llama_fast"))
    assert infer[("prefill", "ref_eager")]["tflops"] > 0 and infer[("decode", "ref_eager")]["gbps"] > 0


def test_markdown_progress_and_plots(smoke):
    done, out, _ = smoke
    text = out.with_suffix(".md").read_text()
    assert "| op | pass | shape | dtype | provider | ms | GB/s |" in text
    assert "## Training step (end to end)" in text and "## Inference (end to end, reference model)" in text
    assert "## Fused linear cross-entropy" in text
    assert "## Attention" not in text  # --ops left it out
    assert done.stdout.endswith(text)  # the table is printed last
    assert re.search(r"^\[ *\d+/\d+\] rms_norm fwd x\(16,256\) bf16 triton", done.stderr, re.M), done.stderr[-2000:]
    pngs = sorted(p.name for p in out.parent.glob("x-*.png"))
    if HAS_MATPLOTLIB:
        assert "x-rms_norm-bfloat16.png" in pngs and "x-train-bfloat16.png" in pngs, pngs
    else:
        assert pngs == [] and "matplotlib is not installed" in done.stderr


def test_bad_arguments_are_refused(tmp_path):
    done = _bench("--smoke", "--ops", "rms_norm,bogus", "--out", str(tmp_path / "y.json"), timeout=60)
    assert done.returncode == 2 and "unknown ops ['bogus']" in done.stderr
    assert suite.canonical_ops("rope, swiglu") == ("apply_rope", "swiglu")
    with pytest.raises(ValueError, match="unknown dtypes"):
        suite.parse_dtypes("bf16,fp8")


# ---------------------------------------------------------------------------------------
# in-process: the job runner's failure handling, the plots, the end-to-end helpers


def _info():
    return {"status": "ok", "errors": [], "skipped": [], "unavailable": [], "gqa": {}}


def _empty(provider):
    return {"op": "rms_norm", "shape": "x(1,1)", "dtype": "bfloat16", "pass": "fwd", "provider": provider,
            "ms": None, "gbps": None, "tflops": None, "fraction_of_ceiling": None, "peak_mem_mb": None}


def test_runner_sorts_failures_into_unavailable_errors_and_skipped():
    def boom():
        raise RuntimeError("no kernel for this shape")

    measured = dict(_empty("eager"), ms=1.0, gbps=2.0)
    jobs = [
        suite.Job("liger raises", [_empty("liger")], 0, 0, boom, "liger"),  # a baseline: unavailable
        suite.Job("triton raises", [_empty("triton")], 0, 0, boom, "triton"),  # ours: an error
        suite.Job("not here", [_empty("cuda")], 0, 0, None, "cuda"),  # provider unavailable: null row, no call
        suite.Job("eager", [_empty("eager")], 0, 0, lambda: [measured], "eager"),
        suite.Job("too late", [_empty("torch.compile")], 3, 1e9, lambda: 1 / 0, "torch.compile"),  # over budget
    ]
    report, info, seen = {"rows": []}, _info(), []
    suite.run_jobs(jobs, report, info, deadline=1e8, log=lambda msg: None, save=lambda: None,
                   progress=lambda i, n, what: seen.append((i, n, what)))
    assert [r["provider"] for r in report["rows"]] == ["liger", "triton", "cuda", "eager", "torch.compile"]
    assert [r["ms"] for r in report["rows"]] == [None, None, None, 1.0, None]
    assert info["unavailable"] == [{"what": "liger raises", "why": "RuntimeError: no kernel for this shape"}]
    assert [e["what"] for e in info["errors"]] == ["triton raises"]
    assert info["skipped"] == ["too late"] and info["status"] == "failed"
    assert seen[0] == (1, 5, "liger raises") and len(seen) == 5


def test_build_jobs_marks_unbuilt_cuda_unavailable():
    info, cpu = _info(), torch.device("cpu")
    cfg = suite.Settings(**suite.SMOKE_SETTINGS, compile=False)
    jobs = suite.build_jobs(("rms_norm",), "smoke", [torch.bfloat16], cpu, cfg, {}, info, log=lambda msg: None)
    reasons = {u["what"]: u["why"] for u in info["unavailable"]}
    status = llama_fast.backends.backend_status("cuda")
    cuda_jobs = [j for j in jobs if j.provider == "cuda"]
    assert len(cuda_jobs) == 3  # fwd, bwd, fwd+bwd
    if status is None:
        assert "cuda" not in reasons and all(j.body for j in cuda_jobs)
    else:
        assert reasons["cuda"] == status and all(j.body is None for j in cuda_jobs)
    assert not any(j.provider == "torch.compile" for j in jobs)  # compile off


def test_plots_or_a_notice(tmp_path):
    from llama_fast.bench.plots import write_plots

    report = {"device": "test", "rows": [dict(_empty(p), shape=f"x({n},1)", ms=1.0, gbps=float(n))
                                         for p in ("triton", "eager") for n in (1, 2, 4)],
              "sizes": {"rms_norm": {"x_label": "MB moved", "shapes": {f"x({n},1)": {"group": "", "x": n} for n in (1, 2, 4)}}}}
    written = write_plots(report, tmp_path, "t")
    if HAS_MATPLOTLIB:
        assert [p.name for p in written] == ["t-rms_norm-bfloat16.png"] and written[0].stat().st_size > 1000
    else:
        assert written is None


def test_end_to_end_flop_count_matches_the_model():
    """matmul_params counts exactly the weights of the reference model's Linear layers."""
    args = e2e.model_args("tiny-1l")
    model = e2e.llama_fast.Transformer(args)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert e2e.matmul_params(args) == linear
    big = e2e.model_args("llama-3.2-1b")
    assert (big.dim, big.ffn_dim, big.n_layers) == (2048, 8192, 16)
    assert e2e.model_args("llama-3-8b-2l").ffn_dim == 14336


def test_hf_config_mirrors_the_reference_config():
    pytest.importorskip("transformers")
    args = e2e.model_args("llama-3.2-1b")
    cfg = e2e.hf_config(args)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2048, 8192, 16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 64)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 128256


def test_liger_guard_restores_transformers_llama():
    pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    rope, forward = ml.apply_rotary_pos_emb, ml.LlamaForCausalLM.forward
    with e2e.restore_transformers_llama():
        ml.apply_rotary_pos_emb = lambda *a: None  # what Liger's patching does to the module
        ml.LlamaForCausalLM.forward = lambda self: None
    assert ml.apply_rotary_pos_emb is rope and ml.LlamaForCausalLM.forward is forward


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    import io
    import time

    from llama_fast.bench.suite import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress(time.monotonic(), tty)
    bar(1, 4, "rms_norm fwd a triton")
    bar.echo.write("[  0.1s] a log line")
    bar.echo.write("\n")
    bar(3, 4, "rms_norm fwd b triton")
    bar.close()
    text = tty.getvalue()
    assert text.startswith("[" + "." * 24 + "] 1/4")
    # the log line clears the bar, then the bar comes back under it
    assert "\r\x1b[K[  0.1s] a log line\n[" + "." * 24 + "] 1/4" in text
    assert "[" + "#" * 12 + "." * 12 + "] 3/4" in text and text.endswith("triton\n")

    plain = io.StringIO()
    lines = Progress(time.monotonic(), plain)
    lines(3, 12, "rope fwd c cuda")
    lines.echo.write("log\n")
    lines.close()
    assert plain.getvalue().startswith("[ 3/12] rope fwd c cuda  (0 s)\nlog\n")
    assert "\r" not in plain.getvalue()
