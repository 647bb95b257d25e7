#!/usr/bin/env bash
# The test suite: set up .venv with the test extra (the newest transformers, what users
# get), then pytest; arguments go to pytest. With no arguments, the Hugging Face tests run
# a second time against the oldest transformers the README claims (HF_OLDEST), in an
# overlay environment (scripts/setup_hf_oldest.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
    echo "== the Hugging Face tests with the oldest supported transformers"
    bash scripts/setup_hf_oldest.sh
    .venv-hf-oldest/bin/python -m pytest -q -p no:cacheprovider tests/test_patch_hf.py \
        tests/test_patch_hf_conventions.py tests/test_hf_distributed.py "tests/test_packaging.py::test_the_repository_root_hides_no_other_distribution"
fi
