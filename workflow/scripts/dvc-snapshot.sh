#!/usr/bin/env bash
# Version what the Snakemake workflow produced with DVC: record the hashes of the datasets,
# checkpoints and evaluations (results/<run>) and of Snakemake's own records
# (.snakemake/metadata: the input checksums that let a fresh clone see restored files as up to
# date) in workflow/dvc/*.dvc (and, for the embedded data, the `data` stage of dvc.lock), push
# the contents to the default DVC remote, and commit the hashes to git.
#
#   bash workflow/scripts/dvc-snapshot.sh embedded     # after `snakemake --profile embedded`
#   bash workflow/scripts/dvc-snapshot.sh full         # after `snakemake --profile slurm`
#
# Elsewhere:  git clone ... && cd ... && bash workflow/scripts/dvc-snapshot.sh --pull
#             snakemake --profile <profile> -n       -> nothing to be done
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:?usage: dvc-snapshot.sh embedded|full|--pull}"
dir=workflow/dvc

track() {  # track NAME PATH: write workflow/dvc/NAME.dvc for PATH (relative to the root)
  mkdir -p "$dir"
  printf 'outs:\n- path: ../../%s\n' "$2" > "$dir/$1.dvc"
  files+=("$dir/$1.dvc")
}

if [ "$mode" = --pull ]; then
  targets=("$dir"/*.dvc)
  grep -q '^  data:' dvc.lock 2>/dev/null && targets+=(data)
  exec dvc pull "${targets[@]}"
fi

files=()
targets=()
case "$mode" in
  embedded)
    for d in source kinetics400 sthv1 sthv2; do
      if [ ! -d "data/embedded/$d" ]; then
        echo "dvc-snapshot: data/embedded/$d is missing; the embedded data is versioned as a" \
             "whole: snakemake --profile embedded data_kinetics400 data_sthv1 data_sthv2" >&2
        exit 1
      fi
    done
    track results-embedded results/embedded
    targets+=(data) ;;
  full)
    for ds in kinetics400 sthv1 sthv2; do
      [ -d "data/$ds" ] && track "data-$ds" "data/$ds"
    done
    track results-full results/full ;;
  *) echo "dvc-snapshot: unknown run '$mode' (embedded, full or --pull)" >&2; exit 2 ;;
esac
track snakemake-metadata .snakemake/metadata
targets+=("${files[@]}")
dvc commit --force "${targets[@]}"
dvc push "${targets[@]}"
git add "${files[@]}"
[ -f dvc.lock ] && git add dvc.lock
git commit -m "DVC snapshot of the $mode workflow outputs" -- "${files[@]}" $( [ -f dvc.lock ] && echo dvc.lock )
