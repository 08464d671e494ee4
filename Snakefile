# smallbig: one Snakemake DAG for the paper's Tables 2-11.
#
#   snakemake --profile slurm             everything on a Slurm cluster (full-scale params)
#   snakemake --profile local             the same on a workstation with GPUs
#   snakemake --profile embedded          the embedded default: CPU, toy data, scaled-down models
#
# Targets: all (default), table2 ... table11, figures, report, one per experiment id
# (e.g. `snakemake --profile embedded k400-r23-sb-full`), data_<dataset>.
# Every rule calls exactly one `smallbig` entry point; see docs/workflow.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "workflow/config/full.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    # an experiment id, or "<id>/seed-<k>" for its seed replicate k > 0 (common.smk, seeds)
    exp=f"(?:{IDS_RE}){SEED_RE}",
    proto=r"[0-9]+x[13]",
    name=f"[A-Za-z0-9][A-Za-z0-9._-]*{SEED_RE}",


include: "workflow/rules/data.smk"
include: "workflow/rules/pretrained.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
