#!/usr/bin/env bash
# A second environment, .venv-hf-oldest, for testing the oldest transformers README claims
# ($HF_OLDEST): it sees everything in .venv (torch, triton, llama_fast editable, the test
# tools) through a .pth file, and holds only the older transformers (and whatever of its
# dependencies that version pins differently), which its own site-packages put first.
# Run after scripts/setup_env.sh test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HF_OLDEST="${HF_OLDEST:-5.10.4}"
PY="${PYTHON:-python3}"
if [ ! -x .venv-hf-oldest/bin/python ]; then
    "$PY" -m venv .venv-hf-oldest
fi
base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own=$(.venv-hf-oldest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a plain path line) so .venv's own .pth files run too: llama_fast's editable hook.
echo "import site; site.addsitedir('$base')" > "$own/zz_llama_fast_base_venv.pth"
# With the extra that pins the Hugging Face `kernels` release that version supports (the
# newest, which .venv has for the newest transformers, breaks older transformers' import),
# so the oldest run has Hugging Face's `kernels` installed too, as the newest run does. The
# extra was "hub-kernels" in 5.0 and is "kernels" since: both are asked for (pip warns
# about the one a version lacks).
.venv-hf-oldest/bin/python -m pip install -q "transformers[hub-kernels,kernels]==$HF_OLDEST"
.venv-hf-oldest/bin/python -c "import transformers, llama_fast; print('transformers', transformers.__version__, 'for the oldest-supported test run')"
