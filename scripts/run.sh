#!/usr/bin/env bash
# The main job: set up .venv, check every op on every backend this machine has (on a
# CPU-only machine the Triton kernels run under the Triton interpreter), then the demo:
# build a small Llama-3, patch it, check patched == unpatched, generate and time it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m llama_fast selfcheck
.venv/bin/python -m llama_fast demo "$@"
