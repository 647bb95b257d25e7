#!/usr/bin/env bash
# For a GPU machine without network: download the benchmark's optional wheels into .whl/
# (repository root) on a machine with network, then copy the checkout over;
# scripts/gpu_check.py installs whatever it finds there (--target /tmp/site) first.
#
# liger-kernel 0.8.5 is pure Python (py3-none-any). Its Requires-Dist: torch>=2.1.2 and
# triton>=2.3.1, both already installed beside llama_fast, so it is fetched with --no-deps (the extras
# cutile, cutedsl, lck and dev are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl liger-kernel==0.8.5
ls -l .whl
