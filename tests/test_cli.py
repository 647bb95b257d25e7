"""python -m llama_fast info, selfcheck, --help and bench, and the progress lines of
scripts/setup_env.sh and run.sh (the demo has tests/test_demo.py)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_fast.__main__ import build_parser
from llama_fast.info import summary
from llama_fast.op_names import PUBLIC_OPS, public_op_name, public_ops_served

REPO = Path(__file__).resolve().parent.parent
INTERNAL_NAMES = ("attn_fwd", "attn_bwd", "rope_fwd", "rms_norm_fwd", "swiglu_bwd", "decode")


def _run(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "llama_fast", *args], cwd=REPO, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def _user_env():
    """The environment a user has (a subprocess never sees the tests' CPU emulator backend)."""
    return dict(os.environ)


@pytest.fixture
def user_report(installed_cuda):
    """llama_fast.info() as a subprocess sees it (the installed cuda backend, not the tests'
    emulator), without starting one."""
    import llama_fast

    return llama_fast.info()


def test_info_prints_a_short_summary_with_public_names(user_report):
    proc = _run("info", env=_user_env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert len(out.splitlines()) <= 25, out
    report = user_report
    for name, entry in report["backends"].items():
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(name + " ")), None)
        assert line is not None, out
        if entry["available"]:
            assert "available" in line and "NOT" not in line, out
        else:  # the reason is there, perhaps wrapped onto the next lines
            assert "NOT available" in line and " ".join(entry["reason"].split()) in " ".join(out.split()), out
    for op in PUBLIC_OPS:
        assert op in out, out
    for internal in INTERNAL_NAMES:
        assert not re.search(rf"\b{internal}\b", out), out
    assert f"torch {torch.__version__}" in out and "GPU:" in out


def test_info_json_is_the_whole_report():
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["backends"]) == {"torch", "triton", "cuda"}
    torch_entry = report["backends"]["torch"]
    assert "attn_fwd" in torch_entry["ops"] and torch_entry["serves"] == list(PUBLIC_OPS)


def test_summary_of_a_gpu_machine_names_routed_ops_publicly():
    ops = ["attn_bwd", "attn_fwd", "decode", "rms_norm_fwd", "rms_norm_bwd"]
    report = {
        "llama_fast": "0.1.0", "python": "3.12.0", "torch": "2.9.0+cu128", "torch_cuda": "12.8", "triton": "3.6.0",
        "triton_interpret": False, "backend_choice": "auto",
        "autotune": {"enabled": True, "cache_dir": "/home/u/.cache/llama_fast",
                     "cache_files": ["autotune-NVIDIA_H100-0.1.0-triton3.6.0.json"]},
        "gpu": {"name": "NVIDIA H100", "capability": "9.0", "multiprocessors": 132, "memory_gib": 79.1},
        "cuda_extension": {"built": True, "cuda_archs": "sm_90", "nvcc": "12.8",
                           "routed_to_triton": {"attn_bwd": "always (the backward pass runs the Triton kernels)"}},
        "backends": {
            "torch": {"available": True, "reason": None, "ops": ops, "serves": public_ops_served(ops)},
            "cuda": {"available": False, "reason": "no CUDA GPU", "ops": ops, "serves": public_ops_served(ops)},
        },
    }
    text = summary(report)
    flat = " ".join(text.split())  # the summary wraps long lines
    assert "NVIDIA H100 (compute capability 9.0, 132 SMs, 79.1 GiB)" in text
    assert "torch 2.9.0+cu128 (CUDA 12.8)" in text
    assert "flash_attn (backward): always" in text and "attn_bwd" not in text
    # a backend with some ops lists them; the extension is built, so no build hint
    assert set(public_ops_served(ops)) == {"rms_norm", "add_rms_norm", "flash_attn", "flash_decode"}
    assert f"NOT available (serves {', '.join(public_ops_served(ops))} where it runs): no CUDA GPU" in flat
    assert "pip builds the extension" not in text
    assert "autotuning: on, on CUDA GPUs (LLAMA_FAST_AUTOTUNE=0: off); cache /home/u/.cache/llama_fast, 1 file(s)" in flat


def test_public_op_names():
    assert public_op_name("attn_bwd") == "flash_attn (backward)"
    assert public_op_name("rms_norm_fwd") == "rms_norm/add_rms_norm (forward)"
    assert public_op_name("rope_fwd") == "apply_rope"
    assert public_op_name("decode") == "flash_decode"
    assert public_op_name("something_new") == "something_new"
    # swiglu needs both passes; flash_decode is one
    assert public_ops_served(["swiglu_fwd", "decode"]) == ["flash_decode"]
    # every op the backends register has a public name, so no message shows an internal one
    import llama_fast

    for entry in llama_fast.info()["backends"].values():
        for op in entry["ops"]:
            assert public_op_name(op) != op, op


def test_selfcheck_checks_every_op_and_labels_its_columns(user_report):
    proc = _run("selfcheck", env=_user_env(), timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    report = user_report
    lines = out.splitlines()
    top = next(i for i, ln in enumerate(lines) if ln.startswith("op "))
    table = lines[top + 2: lines.index("", top)]  # after the header and its rule, up to a blank line
    rows = [ln.split() for ln in table]
    assert all(r[0] in PUBLIC_OPS and len(r) == 8 for r in rows), table
    checked = {(r[0], r[1], r[2]) for r in rows}
    # The tests switch the interpreter on (conftest.py), so info's availability is selfcheck's.
    kernels = [b for b in ("triton", "cuda") if report["backends"][b]["available"]]
    assert "triton" in kernels
    for backend in kernels:
        for dtype in ("float32", "bfloat16"):
            for op in PUBLIC_OPS:
                assert (op, backend, dtype) in checked, out
    header = lines[top]
    assert "abs diff" in header and "rel diff" in header and "tol" in header
    for r in rows:  # op backend dtype abs rel tol ms result
        assert r[-1] == "ok" and float(r[4]) <= float(r[5]), r
        assert float(r[5]) == (1e-4 if r[2] == "float32" else 5e-2), r
    if not torch.cuda.is_available():
        assert "ms (CPU, not GPU)" in header and "not a GPU speed" in out
        why = report["backends"]["cuda"]["reason"]  # not built, or built but no GPU
        assert f"not checked: the cuda backend is not available here: {why}" in out
    assert "{" not in out  # the summary, not the JSON report


def test_help_is_plain_text_and_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("llama-fast", parser)] + list(subparsers.choices.items()):
        text = sub.format_help()
        assert "``" not in text, (name, text)
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (name, action.option_strings)
    demo = subparsers.choices["demo"]
    config = next(a for a in demo._actions if "--config" in a.option_strings)
    from llama_fast.model import CONFIGS

    for config_name in CONFIGS:
        assert config_name in config.help


def test_bench_hands_over_to_the_benchmark_script(tmp_path):
    proc = _run("bench", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["rows"] and "install" not in {k for k, v in report["steps"].items() if v.get("status") == "ok"}


def test_unknown_arguments_are_refused():
    proc = _run("info", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


# -- scripts/setup_env.sh ---------------------------------------------------------------

# A stand-in python: "-m venv DIR" makes DIR/bin/python (this same script); "-c ..." fails
# (so torch counts as missing); anything else (pip) succeeds. Each call is logged.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$0 $*" >> "$SETUP_LOG"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
[ "$1" = "-c" ] && exit 1
exit 0
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("cuda", ["nvcc", "no nvcc", "LLAMA_FAST_NO_CUDA"])
def test_setup_env_says_what_it_does(tmp_path, cuda):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup_env.sh", tmp_path / "scripts")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(fake), "SETUP_LOG": str(tmp_path / "calls.log")}
    if cuda == "nvcc":
        cuda_home = tmp_path / "cuda"
        (cuda_home / "bin").mkdir(parents=True)
        (cuda_home / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (cuda_home / "bin" / "nvcc").chmod(0o755)
        env["CUDA_HOME"] = str(cuda_home)
    elif cuda == "LLAMA_FAST_NO_CUDA":
        env["LLAMA_FAST_NO_CUDA"] = "1"
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "setup_env.sh"), "test"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert all(ln.startswith("setup: ") for ln in lines), lines
    text = proc.stdout
    order = ["creating the virtual environment", "upgrading pip", "installing torch", "installing llama_fast",
             "ready in"]
    positions = [text.index(step) for step in order]
    assert positions == sorted(positions), text
    assert "extras: test" in text
    expected = {"nvcc": "building the CUDA extension llama_fast._C with " + env.get("CUDA_HOME", "") + "/bin/nvcc",
                "no nvcc": "without the CUDA extension: no nvcc found",
                "LLAMA_FAST_NO_CUDA": "without the CUDA extension: LLAMA_FAST_NO_CUDA is set"}[cuda]
    assert expected in text, text
    calls = (tmp_path / "calls.log").read_text()
    assert "-m pip install -q torch==2.13.0" in calls and "-e .[test]" in calls


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_announces_each_step_before_it_runs(tmp_path):
    (tmp_path / "scripts").mkdir()
    for name in ("run.sh", "setup_env.sh"):
        shutil.copy(REPO / "scripts" / name, tmp_path / "scripts")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "SETUP_LOG": str(log), "LLAMA_FAST_NO_CUDA": "1"}
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "run.sh"), "--seq", "8"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    order = ["run: step 1/3, set-up", "setup: creating the virtual environment", "setup: ready in",
             "run: step 2/3, selfcheck", "run: step 3/3, demo"]
    positions = [text.index(step) for step in order]
    assert positions == sorted(positions), text
    calls = log.read_text().splitlines()
    assert calls[-2].endswith("-m llama_fast selfcheck") and calls[-1].endswith("-m llama_fast demo --seq 8"), calls
