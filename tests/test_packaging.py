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
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llama-fast = llama_fast.__main__:main" in entry_points

