#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install llama_fast into
# it, editable, with the extras named in $1 (e.g. "test"). Sourced by run.sh and test.sh.
#
# torch==2.13.0 is the CPU build these machines keep on disk; on a GPU machine install the
# CUDA torch of your choice first and this leaves it alone (any torch >= 2.6 satisfies us).
# triton==3.6.0 is the release the GPU machines run, so CPU tests exercise the same Triton.
#
# pip runs quietly (-q): each step says what it does and about how long it takes, so
# minutes of set-up are never silent. The times are for a 2-core machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
start=$SECONDS
say() { echo "setup: $*"; }
took() { say "  done ($((SECONDS - $1)) s)"; }

step=$SECONDS
if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment .venv with $PY (a few seconds)"
    "$PY" -m venv .venv
    took "$step"
else
    say "reusing the virtual environment .venv"
fi
step=$SECONDS
say "upgrading pip in .venv (a few seconds)"
.venv/bin/python -m pip install -q --upgrade pip
took "$step"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    step=$SECONDS
    say "installing torch 2.13.0 (CPU build; a large download, about 1 minute)"
    .venv/bin/python -m pip install -q torch==2.13.0
    took "$step"
else
    say "torch is already installed: keeping $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
fi
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"

# setup.py builds the CUDA extension llama_fast._C whenever it finds nvcc ($CUDA_HOME/bin/nvcc,
# else nvcc on PATH) and LLAMA_FAST_NO_CUDA is unset; say which before the long quiet step.
nvcc=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    nvcc="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
fi
step=$SECONDS
say "installing llama_fast (editable${extras:+, extras: $extras}) with triton 3.6.0 and numpy<2.4 (under a minute the first time)"
if [ "${LLAMA_FAST_NO_CUDA:-0}" != "0" ]; then  # as setup.py: unset, empty or 0 build it
    say "  without the CUDA extension: LLAMA_FAST_NO_CUDA is set (the Triton kernels serve)"
elif [ -n "$nvcc" ]; then
    say "  and building the CUDA extension llama_fast._C with $nvcc: about 1.5 minutes more on 2 cores,"
    say "  quiet until it is done"
else
    say "  without the CUDA extension: no nvcc found (set CUDA_HOME or put nvcc on PATH to build it)"
fi
# numpy<2.4: Triton 3.6's interpreter (how these scripts run the kernels without a GPU)
# breaks on NumPy 2.4; see pyproject.toml's test extra.
# Warnings in our CUDA/C++ sources fail the build here, as they must in CI.
LLAMA_FAST_WERROR="${LLAMA_FAST_WERROR:-1}" \
    .venv/bin/python -m pip install -q "triton==3.6.0" "numpy<2.4" -e "$spec"
took "$step"
say "ready in $((SECONDS - start)) s: .venv/bin/python"
