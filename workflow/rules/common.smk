# Parse-time setup shared by all rules: config validation, every experiment's params loaded and
# validated (an invalid params file stops the workflow here, before any job is submitted), the
# evaluations and ensembles the tables need, and small helpers for the rules.
import os
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from smallbig import config as sbconfig
from smallbig import plan as sbplan
from smallbig.analysis.tables import (
    TablesError,
    load_tables,
    required_ensembles,
    required_evaluations,
)

validate(config, schema="../schemas/config.schema.yaml")

RUN = config["run"]
OVERLAY = config.get("overlay") or None
RES = f"results/{RUN}"
LOGS = f"logs/{RUN}"
REPORTS = config["reports"]
OVERLAY_ARG = f"--overlay {OVERLAY}" if OVERLAY else ""


# Experiments of this checkout (paths relative to the repository root, the working directory).
EXP_DIR = "params/experiments"


def exp_file(exp):
    return f"{EXP_DIR}/{exp}.yaml"


def _load_all_params():
    """Load and validate every experiment (with the run's overlay); collect all problems."""
    ids = config.get("experiments") or sorted(p.stem for p in Path(EXP_DIR).glob("*.yaml"))
    if OVERLAY and not os.path.exists(OVERLAY):
        raise WorkflowError(f"{OVERLAY}: params overlay not found (config key `overlay`)")
    params, problems = {}, []
    for exp in ids:
        try:
            if not os.path.exists(exp_file(exp)):
                raise sbconfig.ParamsError(f"{exp_file(exp)}: no such experiment")
            params[exp] = sbconfig.load_params(exp_file(exp), overlay=OVERLAY)
        except sbconfig.ParamsError as e:
            problems.append(str(e))
    if problems:
        raise WorkflowError(
            "invalid params, nothing was run or submitted:\n  " + "\n  ".join(problems)
        )
    return params


PARAMS = _load_all_params()
EXPERIMENTS = sorted(PARAMS)
# The identity of each run: a change anywhere in an experiment's merged params (its file, the
# base, the overlay) changes the hash, which is a `params` value of the rules, so the params
# trigger re-runs exactly that experiment and what depends on it.
PHASH = {exp: sbconfig.params_hash(p) for exp, p in PARAMS.items()}

try:
    TABLES = load_tables(config["tables"])
except TablesError as e:
    raise WorkflowError(f"invalid tables file, nothing was run or submitted:\n  {e}")
TABLE_NUMBERS = [t["number"] for t in TABLES]
ENSEMBLES = required_ensembles(TABLES)


try:
    EVALUATIONS = sbplan.evaluations(PARAMS, TABLES)
    DATASETS = sbplan.datasets(PARAMS)
except sbconfig.ParamsError as e:
    raise WorkflowError(f"nothing was run or submitted:\n  {e}")
PROTOCOLS = {exp: [p for e, p in EVALUATIONS if e == exp] for exp in EXPERIMENTS}


ROOT_TO_DATASET = {v["root"]: ds for ds, v in DATASETS.items()}


def dataset_of(exp):
    return PARAMS[exp]["data"]["dataset"]


def data_ready(exp):
    """The file that says an experiment's dataset is prepared, extracted and checked."""
    return f"{DATASETS[dataset_of(exp)]['root']}/manifest.json"


def res(exp, *parts):
    return "/".join((RES, exp) + parts)


def eval_dir(exp, proto):
    return res(exp, f"eval-{proto}")


def table_inputs(number):
    """The evaluation / ensemble metrics one table needs (external rows need nothing)."""
    table = next(t for t in TABLES if t["number"] == number)
    files = []
    for row in table["rows"]:
        if row["kind"] == "experiment":
            files.append(f"{eval_dir(row['experiment'], row['protocol'])}/metrics.json")
        elif row["kind"] == "ensemble":
            files.append(f"{RES}/ensembles/{row['name']}/metrics.json")
    return sorted(set(files))


def experiment_outputs(exp):
    return [f"{eval_dir(exp, p)}/metrics.json" for p in PROTOCOLS[exp]]


def resources_of(exp):
    return PARAMS[exp]["resources"]


def table_experiments(number):
    table = next(t for t in TABLES if t["number"] == number)
    return sorted({m for row in table["rows"] for m in row.get("members", [])})


def report_table_files():
    """What `smallbig report tables` writes (file names relative to its --out)."""
    files = [f"table{n}.{ext}" for n in TABLE_NUMBERS for ext in ("md", "csv", "tex", "html")]
    return files + ["all.md", "summary.json"]


def all_outputs():
    out = [f"{REPORTS}/index.html"]
    for exp in EXPERIMENTS:
        out += experiment_outputs(exp)
    return out


# Feature-map figures (paper Fig. 3): the SmallBig and the NonLocal model compared.
FEATMAPS = {"smallbig": "k400-r23-sb-full", "nonlocal": "k400-r23-nonlocal", "videos": 2}
FEATMAPS.update(config.get("featmaps") or {})


def mem_mb(full_mb):
    """Memory of a CPU job: as given for the full run, at most 2 GB for scaled-down runs."""
    return full_mb if RUN == "full" else min(full_mb, 2048)


def gpus_of(exp):
    return resources_of(exp).get("gpus", 0)


def launch_prefix(exp):
    """How a multi-GPU training starts one process per GPU (the engine takes its rank from
    Slurm's or torchrun's environment): `srun` inside the Slurm job (the slurm profile sets
    config launcher=srun and the job has one task per GPU), `torchrun` on a workstation."""
    n = config.get("gpus") or gpus_of(exp)
    launcher = config.get("launcher")
    if n <= 1 or not launcher:
        return ""
    if launcher == "srun":
        return "srun "
    return f"torchrun --standalone --nproc_per_node {n} --no-python "


def cpus_of(exp):
    r = resources_of(exp)
    return max(1, r.get("gpus", 0)) * r.get("cpus_per_gpu", 1)


def data_params(w):
    """The resolved params the data rules of dataset root `w.root` use."""
    return f"{RES}/{DATASETS[ROOT_TO_DATASET[w.root]]['rep']}/params.yaml"
