# Parse-time setup shared by all rules: config validation, every experiment's params loaded and
# validated (an invalid params file stops the workflow here, before any job is submitted), the
# evaluations and ensembles the tables need, and small helpers for the rules.
import os
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from smallbig import config as sbconfig
from smallbig.spec import plan as sbplan
from smallbig.spec.tables import (
    TablesError,
    load_tables,
    required_ensembles,
    required_evaluations,
)

validate(config, schema="../schemas/config.schema.yaml")

# MLflow store of every job: the slurm profile's MLFLOW_URI (config `mlflow_tracking_uri`)
# becomes MLFLOW_TRACKING_URI, inherited by the rule shells and exported to the Slurm jobs
# (sbatch --export=ALL); a cluster run left on SQLite is warned about (docs/engine.md, MLflow).
import sys

from smallbig.engine.tracking import workflow_tracking_env

_mlflow_warning = workflow_tracking_env(config.get("mlflow_tracking_uri"))
if _mlflow_warning and workflow.is_main_process:
    print(_mlflow_warning, file=sys.stderr)

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


# ---- seeds: every training, evaluation and ensemble runs config `seeds` times ----------------
# Replicate k trains with train.seed + k (smallbig.spec.plan.replicate_seed) and lives in
# results/<run>/<id>/seed-<k>/ (an ensemble's in results/<run>/ensembles/<name>/seed-<k>/, fusing
# replicate k of each member); replicate 0 is results/<run>/<id>/ itself, so a one-seed run keeps
# its paths, jobs and wildcards. In the rules, the {exp} wildcard of replicate k > 0 is
# "<id>/seed-<k>" ({name} "<name>/seed-<k>"), so its logs are logs/<run>/train/<id>/seed-<k>.log,
# logs/<run>/evaluate/<id>/seed-<k>-<protocol>.log, ...
SEEDS = int(config.get("seeds") or 1)
REPLICATES = list(range(SEEDS))
# config `paper_comparable: false` (embedded, rehearsal): every verdict reads "not comparable"
NOT_COMPARABLE_ARG = "" if config.get("paper_comparable", True) else "--not-comparable"
SEED_RE = r"(?:/seed-[1-9][0-9]*)?"
IDS_RE = "|".join(re.escape(e) for e in EXPERIMENTS)


rep = sbplan.replicate_run  # (id or ensemble name, k) -> "<id>" or "<id>/seed-<k>"
split_rep = sbplan.split_replicate  # and back


def base(run):
    return split_rep(run)[0]


def train_seed(exp, k):
    return sbplan.replicate_seed(PARAMS[exp], k)


def phash(run):
    """Identity of a replicate: its experiment's params with the replicate's train.seed."""
    exp, k = split_rep(run)
    if k == 0:
        return PHASH[exp]
    return sbconfig.params_hash(dict(PARAMS[exp], train={**PARAMS[exp]["train"], "seed": train_seed(exp, k)}))



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
    return PARAMS[base(exp)]["data"]["dataset"]


def data_ready(exp):
    """The file that says an experiment's dataset is prepared, extracted and checked."""
    return f"{DATASETS[dataset_of(exp)]['root']}/manifest.json"


def res(exp, *parts):
    return "/".join((RES, exp) + parts)


def eval_dir(exp, proto):
    return res(exp, f"eval-{proto}")


def table_inputs(number):
    """The evaluation / ensemble metrics one table needs, every seed (external rows need
    nothing)."""
    table = next(t for t in TABLES if t["number"] == number)
    files = []
    for row in table["rows"]:
        for k in REPLICATES:
            if row["kind"] == "experiment":
                files.append(f"{eval_dir(rep(row['experiment'], k), row['protocol'])}/metrics.json")
            elif row["kind"] == "ensemble":
                files.append(f"{RES}/ensembles/{rep(row['name'], k)}/metrics.json")
    return sorted(set(files))


def experiment_outputs(exp):
    return [f"{eval_dir(rep(exp, k), p)}/metrics.json" for k in REPLICATES for p in PROTOCOLS[exp]]


def resources_of(exp):
    return PARAMS[base(exp)]["resources"]


def table_experiments(number):
    table = next(t for t in TABLES if t["number"] == number)
    return sorted({m for row in table["rows"] for m in row.get("members", [])})


def report_table_files():
    """What `smallbig report tables` writes (file names relative to its --out)."""
    files = [f"table{n}.{ext}" for n in TABLE_NUMBERS for ext in ("md", "csv", "tex", "html")]
    return files + ["all.md", "summary.json"]


def all_outputs():
    out = [f"{REPORTS}/index.html", f"{REPORTS}/verdicts.json"]
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


# ---- how a training starts its processes (one per GPU) and what it asks of Slurm -----------
# By the GPUs of the training (params resources.gpus, or config `gpus` of the local profile):
#   1 GPU                   `smallbig train` directly (on Slurm: in the job's batch step);
#   2..gpus_per_node GPUs   `torchrun --standalone --nproc_per_node N`, one process per GPU;
#   more (several nodes)    `srun -n N --kill-on-bad-exit=1`, one task per GPU, `nodes` set.
# config `launcher: none` forces one process. On Slurm every training carries the plugin's
# `mpi` resource: it tells the job step not to wrap the job in its own `srun -n1` step. That
# wrapper holds the job's CPUs and GPUs, and its srun client turns a SIGTERM (preemption,
# `scancel --signal=TERM --full`, the time limit) into SIGKILL for everything inside it, so a
# training there could never checkpoint; in the batch step it gets the SIGTERM itself. For a
# 1-GPU training the value is "" (the submit side's MPI checks need >= 2 tasks), for one node
# "torchrun" with `tasks` = GPUs, for several nodes "srun". An srun client kills its step on
# SIGTERM too, so multi-node trainings rely on the engine's own stop before the time limit
# (`--stop-before-limit`) and on periodic checkpoints for preemption (docs/workflow.md).
# The profiles set these keys in their `config:` section; a `--config ...` on the command line
# REPLACES that section (Snakemake treats the profile's entry as the option's default), so
# every key has a safe default here.
LAUNCHER = config.get("launcher") or "auto"
GPUS_PER_NODE = int(config.get("gpus_per_node") or 8)
MAX_RUNTIME_MIN = config.get("max_runtime_min")  # the GPU partition's MaxTime (minutes), or none
STOP_BEFORE_LIMIT_S = int(config.get("stop_before_limit_s", 300))


def launch_of(exp):
    """-> dict(prefix, mpi, tasks, nodes): how `smallbig train` of `exp` is started."""
    n = int(config.get("gpus") or gpus_of(exp))
    cpus = resources_of(exp).get("cpus_per_gpu", 1)
    if n <= 1 or LAUNCHER == "none":
        return {"prefix": "", "mpi": "", "tasks": 1, "nodes": 1}
    if n <= GPUS_PER_NODE:
        return {"prefix": f"torchrun --standalone --nnodes 1 --nproc_per_node {n} --no-python ",
                "mpi": "torchrun", "tasks": n, "nodes": 1}
    if n % GPUS_PER_NODE:
        raise WorkflowError(
            f"{exp_file(base(exp))}: resources.gpus: {n} GPUs span several nodes of {GPUS_PER_NODE} "
            f"GPUs (config gpus_per_node); use a multiple of {GPUS_PER_NODE}")
    return {"prefix": f"srun -n {n} --kill-on-bad-exit=1 --cpus-per-task={cpus} ",
            "mpi": "srun", "tasks": n, "nodes": n // GPUS_PER_NODE}


# Memory plan (smallbig/spec/memory_plan.py, params/memory.json): with config `gpu_mem_gb` (the
# slurm and local profiles' GPU_MEM_GB) a training whose per_gpu_batch does not fit its GPUs is
# refused here, before anything is submitted. torch is imported only if an experiment has no
# current entry in params/memory.json and must be measured (smallbig/engine/memory.py).
def _measure_memory(params, **kwargs):
    from smallbig.engine.memory import measure

    return measure(params, **kwargs)


if config.get("gpu_mem_gb") and EXPERIMENTS and workflow.is_main_process:
    from smallbig.spec.memory_plan import check_memory, set_measurer

    set_measurer(_measure_memory)
    try:
        check_memory(PARAMS, float(config["gpu_mem_gb"]))
    except sbconfig.ParamsError as e:
        raise WorkflowError(f"nothing was run or submitted:\n  {e}")


def train_runtime(exp):
    """Minutes of one training job: the params' train_runtime_min, capped by the partition's
    MaxTime; a longer training continues in the next job (--resume, rule retries)."""
    want = resources_of(exp).get("train_runtime_min", 60)
    return min(want, int(MAX_RUNTIME_MIN)) if MAX_RUNTIME_MIN else want


def train_retries():
    """Retries of the train rule: as many jobs as the longest training needs under the runtime
    cap, plus `preemption_retries` (default 3) for preemptions and node failures."""
    jobs = max([-(-resources_of(e).get("train_runtime_min", 60) // train_runtime(e))
                for e in EXPERIMENTS] or [1])
    return jobs - 1 + int(config.get("preemption_retries", 3))


def cpus_of(exp):
    r = resources_of(exp)
    return max(1, r.get("gpus", 0)) * r.get("cpus_per_gpu", 1)


def data_params(w):
    """The resolved params the data rules of dataset root `w.root` use."""
    return f"{RES}/{DATASETS[ROOT_TO_DATASET[w.root]]['rep']}/params.yaml"
