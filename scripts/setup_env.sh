#!/usr/bin/env bash
# Create .venv (if needed) and install quantdream into it: CPU torch 2.13.0 first, so that the
# project's `torch` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e '.[test,eval,bnb,serve,batch]'
