#!/usr/bin/env bash
# Every method for a few training steps on CUDA (embedded model, then SD-1.5 at 512 px; random weights),
# each in a fresh process: CUDA peak memory, s/step, it/s, UNet passes -> OUT/gpu_check.json (+ .log).
#   scripts/gpu_check.sh --out results/gpu                      # on a GPU machine (default budget 540 s)
#   scripts/gpu_check.sh --device cpu --dry-run --out /tmp/chk  # the same plan on CPU, tiny stand-ins
# Options: python -m quantdream.bench.gpu_check --help. PYTHON picks the interpreter (default python3).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m quantdream.bench.gpu_check "$@"
