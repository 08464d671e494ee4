#!/usr/bin/env bash
# The `data` stage of dvc.yaml: the prepared dataset one experiment trains on.
#
#   bash workflow/scripts/dvc-data.sh SCALE PARAMS OUT
#
# SCALE embedded: the workflow's own rules make the toy dataset of the experiment (Snakemake
#   does nothing when data/embedded/<dataset> is there and up to date).
# Any other scale (full): nothing is made or downloaded. data.root of PARAMS must hold a dataset
#   prepared beforehand (`smallbig data prepare PARAMS`, or the workflow's data_<dataset> rule).
# Then `smallbig dvc data` checks data.root against its manifest.json and writes OUT, the small
# fingerprint the training stage depends on (never the videos or frames themselves).
set -euo pipefail
usage="usage: dvc-data.sh SCALE PARAMS OUT"
scale="${1:?$usage}"
params="${2:?$usage}"
out="${3:?$usage}"
if [ "$scale" = embedded ]; then
  dataset=$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["dataset"])' "$params")
  snakemake --profile embedded "data_$dataset"
fi
exec smallbig dvc data "$params" --out "$out"
