#!/usr/bin/env bash
# The embedded default end to end (the README's main command calls this after setup).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Until the workflow issue lands, the main job prints the model table of all 25 experiments.
smallbig model-info --all
