#!/usr/bin/env bash
# Version what the Snakemake workflow produced with DVC: record the hashes of the data, the
# checkpoints and evaluations (results/<run>) and Snakemake's own records (.snakemake/metadata:
# the input checksums that let a fresh clone see restored files as up to date) in
# workflow/dvc/*.dvc, push the contents to the default DVC remote, and commit the hashes to git.
#
#   bash workflow/scripts/dvc-snapshot.sh embedded     # after `snakemake --profile embedded`
#   bash workflow/scripts/dvc-snapshot.sh full         # after `snakemake --profile slurm`
#
# Data: embedded, the whole toy data (data/embedded: ~30 MB, a few thousand files). Full, per
# dataset (workflow/dvc/data-<dataset>.dvc), only what a lab shares: the verified source
# archives, the lists, manifest and quarantine report (`smallbig dvc shared-data`), never the
# extracted videos or the frames (tens of millions of files at Kinetics scale), which
# `smallbig data prepare` rebuilds from them (docs/workflow.md, "DVC").
#
# Elsewhere:  git clone ... && cd ... && bash workflow/scripts/dvc-snapshot.sh --pull
#             snakemake --profile <profile> -n       -> nothing to be done
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:?usage: dvc-snapshot.sh embedded|full|--pull}"
dir=workflow/dvc

track() {  # track NAME PATH...: write workflow/dvc/NAME.dvc with one out per PATH (from the root)
  local name="$1"
  shift
  mkdir -p "$dir"
  { echo "outs:"; for p in "$@"; do echo "- path: ../../$p"; done; } > "$dir/$name.dvc"
  files+=("$dir/$name.dvc")
}

if [ "$mode" = --pull ]; then
  exec dvc pull "$dir"/*.dvc
fi

files=()
case "$mode" in
  embedded)
    for d in source kinetics400 sthv1 sthv2; do
      if [ ! -d "data/embedded/$d" ]; then
        echo "dvc-snapshot: data/embedded/$d is missing; the embedded data is versioned as a" \
             "whole: snakemake --profile embedded data_kinetics400 data_sthv1 data_sthv2" >&2
        exit 1
      fi
    done
    track data-embedded data/embedded
    track results-embedded results/embedded ;;
  full)
    listing=$(smallbig dvc shared-data)
    for ds in $(cut -f1 <<< "$listing" | sort -u); do
      mapfile -t paths < <(awk -F'\t' -v ds="$ds" '$1 == ds {print $2}' <<< "$listing")
      track "data-$ds" "${paths[@]}"
    done
    track results-full results/full ;;
  *) echo "dvc-snapshot: unknown run '$mode' (embedded, full or --pull)" >&2; exit 2 ;;
esac
track snakemake-metadata .snakemake/metadata
dvc commit --force "${files[@]}"
dvc push "${files[@]}"
git add "${files[@]}"
git commit -m "DVC snapshot of the $mode workflow outputs" -- "${files[@]}"
