"""``python -m llama_fast info`` and ``bench`` (the demo has tests/test_demo.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "llama_fast", *args], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def test_info_prints_the_report():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["backends"]) == {"torch", "triton", "cuda"}


def test_bench_hands_over_to_the_benchmark_script(tmp_path):
    proc = _run("bench", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["rows"] and "install" not in {k for k, v in report["steps"].items() if v.get("status") == "ok"}


def test_unknown_arguments_are_refused():
    proc = _run("info", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
