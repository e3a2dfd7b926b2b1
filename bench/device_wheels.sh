#!/usr/bin/env bash
# Download the pure-Python benchmark peers as wheels for the GPU machine (Python 3.12, no network there) into DIR
# (default .whl, ignored by git): bench/device.sh --wheels DIR installs them there with --no-index --no-deps.
# Their dependencies (torch, triton, transformers, ...) are already on that machine.
#
#   bash bench/device_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
# the versions CI tests against (pyproject.toml's `peers` extra)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
  --platform any -d "$DIR" liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l "$DIR"
