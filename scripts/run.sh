#!/usr/bin/env bash
# The main job: set up .venv, check every op on every backend this machine has (on a
# CPU-only machine the Triton kernels run under the Triton interpreter), then the demo:
# build a small Llama-3, patch it, check patched == unpatched, generate and time it.
# Each step announces itself first, so the minutes of a first set-up are never silent.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "run: step 1/3, set-up of .venv: about 2 minutes the first time (plus about 1.5 minutes on 2 cores"
echo "run:   when nvcc is found and the CUDA extension is built), seconds after that"
bash scripts/setup_env.sh
echo "run: step 2/3, selfcheck: every op on every available backend against the PyTorch reference"
echo "run:   (about 10 s on an idle 2-core CPU, where the Triton interpreter runs the kernels)"
.venv/bin/python -m llama_fast selfcheck
echo "run: step 3/3, demo: patch a Llama 3, check it, generate and time it (under a minute on a CPU)"
.venv/bin/python -m llama_fast demo "$@"
