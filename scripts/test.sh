#!/usr/bin/env bash
# Install everything and run the whole test suite (slow end-to-end checks included).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -q "$@"
