#!/usr/bin/env bash
# The README's main command (`make embedded`, after setup): the whole DAG on the embedded
# default — toy data, scaled-down models, this machine's CPUs — then the DAG's timing.
# Tables 2-11 land in reports/tables/, figures in reports/figures/, the report in
# reports/index.html; checkpoints and evaluations in results/embedded/.
set -euo pipefail
cd "$(dirname "$0")/../.."
# jobs and (nominal) GPU-hours; --no-memory: the GPU-memory section is meaningless for this CPU
# run and measuring it for 25 scaled-down models cost ~10 s of CPU before the DAG could start
smallbig plan --overlay params/embedded.yaml --no-memory
start=$(date +%s)
snakemake --profile embedded "$@"
echo "embedded workflow: $(( $(date +%s) - start )) s; open reports/index.html"
