#!/usr/bin/env bash
# Version what the Snakemake workflow produced with DVC: record the hashes of the data,
# checkpoints, evaluations, reports and Snakemake's own records in dvc.lock (frozen stages of
# dvc.yaml: workflow-<run>, workflow-state, and `data` for the embedded run), push the contents
# to the default DVC remote, and commit dvc.lock to git.
#
#   bash workflow/scripts/dvc-snapshot.sh embedded     # after `snakemake --profile embedded`
#   bash workflow/scripts/dvc-snapshot.sh full         # after `snakemake --profile slurm`
#
# Elsewhere: `git clone ... && dvc pull <the stages below> && snakemake --profile <profile> -n`
# -> nothing to do
# (Snakemake recognises the restored files by the input checksums in .snakemake/metadata).
set -euo pipefail
cd "$(dirname "$0")/../.."
run="${1:?usage: dvc-snapshot.sh embedded|full}"
case "$run" in
  embedded) stages=(data workflow-embedded workflow-state) ;;
  full)     stages=(workflow-full workflow-state) ;;
  *) echo "dvc-snapshot: unknown run '$run' (embedded or full)" >&2; exit 2 ;;
esac
dvc commit --force "${stages[@]}"
dvc push "${stages[@]}"
git add dvc.lock
git commit -m "DVC snapshot of the $run workflow outputs" -- dvc.lock
