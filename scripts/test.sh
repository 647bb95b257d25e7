#!/usr/bin/env bash
# The test suite: set up .venv with the test extra, then pytest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
.venv/bin/python -m pytest -q "$@"
