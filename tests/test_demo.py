"""python -m llama_fast demo end to end, in a subprocess, with tiny settings; and its refusals
of bad arguments."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_fast.demo import summary_table

REPO = Path(__file__).resolve().parents[1]


def _demo(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "llama_fast", "demo", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_demo_runs_and_prints_the_summary():
    done = _demo("--layers", "1", "--vocab", "512", "--seq", "16", "--new-tokens", "4", "--device", "cpu",
                 "--dtype", "float32")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "numerics:" in out and "PASS" in out and "FAIL" not in out, out
    assert "'torch' backend" in out  # says the CPU timings do not use the interpreted kernels
    assert "no tokenizer found" in out or "tokenizer: Llama 3" in out
    table = out[out.index("summary ("):]
    for row in ("metric", "unpatched", "patched", "prefill (ms)", "decode (tokens/s)", "train step (ms)"):
        assert row in table, out
    # On a CPU both variants run the same PyTorch code once: a ratio would be noise.
    assert "speedup" not in table and "x\n" not in table, table
    assert "not a GPU speed" in table, table


def test_summary_table_speedups():
    text = summary_table([("prefill (ms)", 10.0, 5.0, False), ("decode (tokens/s)", 10.0, 30.0, True)])
    assert "speedup" in text and "2.00x" in text and "3.00x" in text


def test_summary_table_without_speedups():
    text = summary_table([("prefill (ms)", 10.0, 5.0, False)], speedup=False)
    assert "speedup" not in text and "2.00x" not in text and "10.00" in text and "5.00" in text


def test_a_bad_config_ends_the_process_with_one_line_and_exit_2():
    done = _demo("--config", "bogus")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "llama-fast demo: error: unknown --config 'bogus'; valid names: llama-3-70b, llama-3-8b, llama-3.1-405b, "
        "llama-3.1-70b, llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, tiny, tiny-3.1, tiny-tied"]
    assert done.stdout == ""  # refused before anything else is printed


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/missing/llama"], "--checkpoint /missing/llama: no such folder"),
    (["--checkpoint", "."], "--checkpoint .: neither params.json (Meta) nor config.json (Hugging Face) in it"),
    (["--seq", "0"], "--seq must be >= 1, got 0"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    # In-process (main() is what the console script runs): a subprocess per case would
    # spend seconds importing torch to print one line.
    from llama_fast.__main__ import main

    assert main(["demo", *args]) == 2
    out, err = capsys.readouterr()
    assert err == f"llama-fast demo: error: {message}\n" and out == ""


def test_a_checkpoint_folder_without_weights_gives_one_line(tmp_path):
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, '
                                          '"vocab_size": 256, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0}')
    done = _demo("--checkpoint", str(tmp_path), "--device", "cpu")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"llama-fast demo: error: no consolidated.*.pth in {tmp_path}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys):
    from llama_fast.__main__ import main

    assert main(["demo", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "llama-fast demo: error: --device cuda but no CUDA GPU is available\n"
