#!/usr/bin/env bash
# The main job: set up .venv, then check every op on every backend this machine has
# (on a CPU-only machine, the Triton kernels run under the Triton interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m llama_fast selfcheck "$@"
