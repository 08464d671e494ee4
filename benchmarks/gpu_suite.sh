#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py) with the repository's python and a hard time limit:
#   bash benchmarks/gpu_suite.sh [gpu_suite.py options]      # from anywhere; writes
#   benchmarks/results/gpu_<device>.{json,md}; then commit them.
# The suite stops starting new configurations at its own --budget-s (450 s); `timeout` ends it
# at 480 s whatever happens (results are written after every configuration, so a killed run
# leaves what it measured, marked "interrupted"). SMALLBIG_GPU_SUITE_TIMEOUT overrides the 480.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${SMALLBIG_PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=TERM --kill-after=15 "${SMALLBIG_GPU_SUITE_TIMEOUT:-480}" "$py" benchmarks/gpu_suite.py "$@"
