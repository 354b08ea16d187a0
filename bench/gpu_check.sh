#!/usr/bin/env bash
# The GPU check: training speed, accuracy and time to accuracy, inference speed, DALI serving.
# Usage: bench/gpu_check.sh [STAGE ...] [options]; --help explains (python -m bench.gpu_check).
# Runs with the repository's .venv/bin/python when there is one, else python3 (PY=... overrides).
# Relative paths in the options are taken from the current directory, as usual.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PY:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check "$@"
