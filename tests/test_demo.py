"""``python -m llama_fast demo`` end to end, in a subprocess, with tiny settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llama_fast.demo import summary_table

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_prints_the_summary():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "llama_fast", "demo", "--layers", "1", "--vocab", "512", "--seq", "16",
           "--new-tokens", "4", "--device", "cpu", "--dtype", "float32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "numerics:" in out and "PASS" in out and "FAIL" not in out, out
    assert "'torch' backend" in out  # says the CPU timings do not use the interpreted kernels
    assert "no tokenizer found" in out or "tokenizer: Llama 3" in out
    table = out[out.index("summary ("):]
    for row in ("metric", "unpatched", "patched", "speedup", "prefill (ms)", "decode (tokens/s)", "train step (ms)"):
        assert row in table, out


def test_summary_table_speedups():
    text = summary_table([("prefill (ms)", 10.0, 5.0, False), ("decode (tokens/s)", 10.0, 30.0, True)])
    assert "2.00x" in text and "3.00x" in text
