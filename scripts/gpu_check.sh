#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): about 8 minutes on one CUDA GPU, one JSON.
#   scripts/gpu_check.sh [--output gpu_check.json] [--budget_s 450]
#   scripts/gpu_check.sh --mode cpu --output cpu_check.json     the tiny CPU mode that the tests run
# PYTHON picks the interpreter (default: .venv/bin/python when it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
