"""The wheel: the Triton kernels ship as llama_fast.kernels, never as a top-level module
named ``kernels`` (an unrelated PyPI package owns that name)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300, env=dict(os.environ, LLAMA_FAST_NO_CUDA="1"),  # the CUDA build has its own tests
    )
    (wheel,) = tmp_path.glob("llama_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"llama_fast"}
    for module in ("rms_norm", "rope", "swiglu"):
        assert f"llama_fast/kernels/{module}.py" in names
        assert f"llama_fast/ops/{module if module != 'rms_norm' else 'norm'}.py" in names
    # The autotuner ships beside the attention kernels whose sources it fingerprints.
    assert {"llama_fast/kernels/_autotune.py", "llama_fast/kernels/flash_attn.py",
            "llama_fast/kernels/flash_decode.py", "llama_fast/kernels/_common.py"} <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llama-fast = llama_fast.__main__:main" in entry_points



def test_wheel_ships_the_benchmarks_as_llama_fast_bench(tmp_path):
    """``llama-fast bench`` works from a plain install, far from any checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300, env=dict(os.environ, LLAMA_FAST_NO_CUDA="1"),
    )
    (wheel,) = tmp_path.glob("llama_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llama_fast/bench/suite.py" in names and not any(n.startswith("bench/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-m", "llama_fast", "bench", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--ops" in done.stdout
    code = "import llama_fast.bench.suite as s, sys; sys.exit(0 if s.__file__.startswith(sys.argv[1]) else 1)"
    assert subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, timeout=120).returncode == 0


def test_the_repository_root_hides_no_other_distribution():
    """From the root (``python -m ...``, ``python -c`` and scripts put it on sys.path) no folder
    of the checkout is a regular top-level package but llama_fast: the others are at most
    namespace portions, which an installed package of the same name wins over. So
    ``kernels`` is Hugging Face's (transformers imports it) and transformers' Llama builds."""
    code = (
        "import importlib.util, pathlib\n"
        "root = pathlib.Path.cwd().resolve()\n"
        "for name in ('kernels', 'bench', 'tests', 'scripts', 'csrc'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    assert spec is None or spec.origin is None or pathlib.Path(spec.origin).resolve().parent != root / name, spec\n"
        "import kernels\n"
        "assert hasattr(kernels, 'get_kernel'), kernels.__file__  # Hugging Face's API\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,\n"
        "                  num_key_value_heads=2, vocab_size=64)\n"
        "LlamaForCausalLM(cfg)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
