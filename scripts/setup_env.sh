#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install llama_fast into
# it, editable, with the extras named in $1 (e.g. "test"). Sourced by run.sh and test.sh.
#
# torch==2.13.0 is the CPU build these machines keep on disk; on a GPU machine install the
# CUDA torch of your choice first and this leaves it alone (any torch >= 2.6 satisfies us).
# triton==3.6.0 is the release the GPU machines run, so CPU tests exercise the same Triton.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# numpy<2.4: Triton 3.6's interpreter (how these scripts run the kernels without a GPU)
# breaks on NumPy 2.4; see pyproject.toml's test extra.
# With nvcc on the machine this builds the CUDA extension llama_fast._C (2-3 minutes on 2
# cores); warnings in our CUDA/C++ sources fail the build here, as they must in CI.
LLAMA_FAST_WERROR="${LLAMA_FAST_WERROR:-1}" \
    .venv/bin/python -m pip install -q "triton==3.6.0" "numpy<2.4" -e "$spec"
