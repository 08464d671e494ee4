"""The workflow's structure, without running any job: the full-scale DAG (25 trainings, their
evaluations, ensembles and tables), lint, params validation before submission, the profiles,
`smallbig plan`, and dvc.yaml. Each test works in a scratch copy of the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm.cluster import make_test_profile
from slurm.workspace import REPO, VENV_BIN, copy_repo, env, job_counts, jobs_of, snakemake

from smallbig import config
from smallbig.spec.plan import make_plan
from smallbig.spec.tables import load_tables, required_ensembles


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("wf") / "repo")


@pytest.fixture(scope="module")
def full_dry_run(repo_copy) -> str:
    r = snakemake(repo_copy, "-n", "all", timeout=300)
    return r.stdout + r.stderr


def test_full_dry_run_schedules_every_training_evaluation_ensemble_and_table(full_dry_run):
    ids = config.experiment_ids()
    assert len(ids) == 25
    counts = job_counts(full_dry_run)
    assert counts["train"] == 25
    trained = sorted(w.removeprefix("exp=") for w in jobs_of(full_dry_run, "train"))
    assert trained == ids
    # every protocol of every experiment's test.protocols, plus what the tables need
    expected_evals = set()
    for i in ids:
        p = config.load_params(config.experiment_path(i))
        expected_evals |= {(i, proto) for proto in p["test"]["protocols"]}
    tables = load_tables()
    for t in tables:
        for r in t["rows"]:
            expected_evals |= {(m, r["protocol"]) for m in r["members"]}
    evals = set()
    for w in jobs_of(full_dry_run, "evaluate"):
        d = dict(kv.split("=") for kv in w.split(", "))
        evals.add((d["exp"], d["proto"]))
    assert evals == expected_evals
    assert counts["evaluate"] == len(expected_evals) == 51
    ens = sorted(w.removeprefix("name=") for w in jobs_of(full_dry_run, "ensemble"))
    assert ens == sorted(required_ensembles(tables)) and len(ens) == 5
    for rule in ("tables", "figures", "featmaps", "report"):
        assert counts[rule] == 1, rule
    assert counts["data_prepare"] == 3  # kinetics400, sthv1, sthv2
    assert "data_toy" not in counts  # the full run uses the real datasets
    assert "results/full/k400-r23-sb-full/train/checkpoint.pt" in full_dry_run


def test_resources_come_from_params(full_dry_run):
    block = next(
        b
        for b in re.split(r"\n(?=\[)", full_dry_run)
        if "rule train:" in b and "exp=k400-r101-sb-typical-32f" in b
    )
    p = config.load_params(config.experiment_path("k400-r101-sb-typical-32f"))["resources"]
    assert f"gpu={p['gpus']}" in block
    assert f"cpus_per_gpu={p['cpus_per_gpu']}" in block
    assert f"mem_mb={p['mem_gb'] * 1024}" in block
    assert f"runtime={p['train_runtime_min']}" in block


@pytest.mark.parametrize("target, n_train", [("table2", 3), ("table9", 2), ("k400-r23-sb-full", 1)])
def test_targets_build_only_what_they_need(repo_copy, target, n_train):
    out = snakemake(repo_copy, "-n", target, timeout=300).stdout
    counts = job_counts(out)
    assert counts["train"] == n_train
    assert "tables" not in counts and "report" not in counts


def test_plan_agrees_with_the_dag(repo_copy, full_dry_run):
    r = subprocess.run(
        [str(VENV_BIN / "smallbig"), "plan", "--json"],
        cwd=repo_copy,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    plan = json.loads(r.stdout)
    counts = job_counts(full_dry_run)
    assert plan["total"]["jobs"] == counts["total"] - 1  # minus the `all` target itself
    assert plan["total"]["train_jobs"] == 25 and plan["total"]["eval_jobs"] == 51
    table2 = job_counts(snakemake(repo_copy, "-n", "table2", timeout=300).stdout)
    assert plan["tables"]["2"]["jobs"] == table2["total"] - 1
    # GPU-hours from params: epochs x train clips / clips_per_sec_per_gpu
    p = config.load_params(config.experiment_path("k400-r23-c2d"))
    one = (
        p["train"]["epochs"]
        * plan["datasets"]["kinetics400"]["train"]["videos"]
        / p["train"]["clips_per_sec_per_gpu"]
        / 3600
    )
    assert plan["tables"]["2"]["gpu_hours_train"] == pytest.approx(3 * one)
    text = subprocess.run(
        [str(VENV_BIN / "smallbig"), "plan"],
        cwd=repo_copy,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "table11" in text and "total" in text and "GPU-h" in text


def test_seeds_multiply_the_runs_and_keep_replicate_zero_where_it_was(repo_copy, tmp_path):
    """config `seeds: 3`: every training, evaluation and ensemble three times, replicate k > 0
    in <id>/seed-<k>/ with train.seed + k; the plan counts the same jobs."""
    ids = ["k400-r23-c2d", "k400-r23-i3d311", "k400-r23-sb311"]
    out = snakemake(repo_copy, "-n", "-p", "table2", "--config", "seeds=3", timeout=300).stdout
    counts = job_counts(out)
    assert (counts["train"], counts["evaluate"], counts["resolve_seed_params"]) == (9, 9, 6)
    assert "seed_overlay" not in counts  # every rule is one smallbig command
    runs = sorted(w.removeprefix("exp=") for w in jobs_of(out, "train"))
    assert runs == sorted([*ids, *(f"{i}/seed-{k}" for i in ids for k in (1, 2))])
    assert (
        "smallbig params resolve results/full/k400-r23-c2d/params.yaml --set train.seed=2 "
        "--out results/full/k400-r23-c2d/seed-2/params.yaml" in out
    )
    assert "--out results/full/k400-r23-sb311/seed-1/train --resume" in out  # its own run directory
    assert "> logs/full/train/k400-r23-sb311/seed-1.log" in out
    assert "smallbig report tables --results results --run full --seeds 3 " in out
    assert counts["total"] - 1 == make_plan(None, None, memory=False, seeds=3)["tables"][2]["jobs"]
    # ensembles: replicate k fuses replicate k of each member
    out = snakemake(repo_copy, "-n", "-p", "table10", "--config", "seeds=2", timeout=300).stdout
    assert job_counts(out)["ensemble"] == 2
    assert (
        "smallbig ensemble results/full/k400-r50-sb-full/seed-1/eval-4x3/scores.npz "
        "results/full/k400-r101-sb-typical-32f/seed-1/eval-4x3/scores.npz --name k400-sb-en-r50-r101-4x3 "
        "--out results/full/ensembles/k400-sb-en-r50-r101-4x3/seed-1" in out
    )
    # --set train.seed on replicate 0's resolved params gives its params with the new seed
    resolved = tmp_path / "p.yaml"
    subprocess.run(
        [str(VENV_BIN / "smallbig"), "params", "resolve", "k400-r23-c2d", "--out", str(resolved)],
        cwd=repo_copy,
        env=env(),
        check=True,
    )
    r = subprocess.run(
        [
            str(VENV_BIN / "smallbig"),
            "params",
            "resolve",
            str(resolved),
            "--set",
            "train.seed=2",
        ],
        cwd=repo_copy,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    p0, p2 = yaml.safe_load(resolved.read_text()), yaml.safe_load(r.stdout)
    assert p2["train"]["seed"] == 2 and p0["train"]["seed"] == 0
    assert {**p2, "train": {**p2["train"], "seed": 0}} == p0


def test_embedded_seeds_config_is_the_embedded_one_with_three_seeds():
    # a --configfile replaces the profile's configfile list: the variant must repeat embedded.yaml
    cfg = REPO / "workflow/config"
    embedded = yaml.safe_load((cfg / "embedded.yaml").read_text())
    assert yaml.safe_load((cfg / "embedded-seeds.yaml").read_text()) == {**embedded, "seeds": 3}


def test_lint_is_clean(repo_copy):
    r = snakemake(repo_copy, "--lint", timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _fake_sbatch(tmp_path: Path) -> tuple[Path, Path]:
    """A `sbatch` that only records that it was called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch-calls"
    for name in ("sbatch", "sinfo", "squeue", "sacct", "scontrol"):
        f = bindir / name
        record = f'echo "$0 $*" >> {calls}\n' if name == "sbatch" else ""
        f.write_text(f"#!/bin/sh\n{record}exit 1\n")
        f.chmod(0o755)
    return bindir, calls


def test_invalid_params_fail_before_any_job_is_submitted(repo_copy, tmp_path):
    bindir, calls = _fake_sbatch(tmp_path)
    e = {"PATH": f"{bindir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    # an overlay that breaks one experiment: 3x7x7 pooling on 64-pixel crops does not fit res5
    bad = repo_copy / "bad-overlay.yaml"
    bad.write_text(yaml.safe_dump({"all": {"data": {"crop_size": 64}}}))
    r = snakemake(
        repo_copy, "--profile", "slurm", "--config", f"overlay={bad.name}", timeout=300, check=False, **e
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "invalid params, nothing was run or submitted" in out
    assert "k400-r23-sb377.yaml" in out and re.search(r"model\.stages\.res\d\.smallbig", out)
    assert not calls.exists(), calls.read_text()
    # a broken experiment file: the message names the file and the key
    exp = repo_copy / "params/experiments/k400-r23-c2d.yaml"
    original = exp.read_text()
    try:
        exp.write_text(original + "train: {epochs: -3}\n")
        r = snakemake(repo_copy, "--profile", "slurm", timeout=300, check=False, **e)
        out = r.stdout + r.stderr
        assert r.returncode != 0
        assert "params/experiments/k400-r23-c2d.yaml" in out and "train.epochs" in out
        assert not calls.exists()
    finally:
        exp.write_text(original)


def test_invalid_config_is_rejected(repo_copy):
    r = snakemake(repo_copy, "-n", "--config", "run=Bad Name", timeout=300, check=False)
    assert r.returncode != 0 and "run" in (r.stdout + r.stderr)


def test_profiles_are_found_from_the_root_and_set_partitions(repo_copy):
    for name in ("slurm", "embedded", "local"):
        assert (repo_copy / name / "config.yaml").is_file(), name
    # the slurm profile: GPU rules to the GPU partition, the rest to the CPU partition
    out = snakemake(repo_copy, "--profile", "slurm", "-n", "table2", timeout=300).stdout
    for block in re.split(r"\n(?=\[)", out):
        if re.search(r"^rule (train|evaluate):", block, re.M):
            assert "slurm_partition=gpu" in block
        elif re.search(r"^rule (data_prepare|table):", block, re.M):
            assert "slurm_partition=cpu" in block
    out = snakemake(repo_copy, "--profile", "embedded", "-n", timeout=300).stdout
    counts = job_counts(out)
    assert counts["train"] == 25 and counts["data_toy"] == 1
    assert "results/embedded/" in out


def test_the_slurm_test_profile_differs_only_in_cluster_definitions(tmp_path):
    src = REPO / "workflow/profiles/slurm/config.yaml"
    made = make_test_profile(src, tmp_path / "p") / "config.yaml"
    a, b = src.read_text().splitlines(), made.read_text().splitlines()
    assert len(a) == len(b)
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert diff and all(
        re.match(r"^\s*- (GPU_PARTITION|CPU_PARTITION|ACCOUNT|GPUS_PER_NODE) =", x) for x, _ in diff
    )


def _train_job(out: str, exp: str) -> str:
    for block in re.split(r"\n(?=\[)", out):
        if re.search(r"^rule train:", block, re.M) and re.search(rf"exp={exp}$", block, re.M):
            return block
    raise AssertionError(f"no train job for {exp}")


def test_slurm_launchers_follow_the_plugin_conventions(repo_copy):
    """1 GPU: batch step (mpi ""); 2..GPUS_PER_NODE: torchrun (mpi, tasks = GPUs); more: srun
    over several nodes with --kill-on-bad-exit; runtime capped by MAX_RUNTIME_MIN."""
    out = snakemake(
        repo_copy,
        "--profile",
        "slurm",
        "-n",
        "--config",
        "max_runtime_min=1440",
        "gpus_per_node=4",
        timeout=300,
    ).stdout
    job = _train_job(out, "k400-r50-sb-full")  # 8 GPUs on nodes of 4: srun, 2 nodes
    assert re.search(r"gpu=8\b.*tasks=8\b.*mpi=srun, nodes=2", job), job
    assert "srun -n 8 --kill-on-bad-exit=1 --cpus-per-task=8 smallbig train" in job
    assert "runtime=1440" in job and "--stop-before-limit 300" in job
    out = snakemake(repo_copy, "--profile", "slurm", "-n", timeout=300).stdout
    job = _train_job(out, "k400-r50-sb-full")  # 8 GPUs on nodes of 8: torchrun, 1 node
    assert "tasks=8, mpi=torchrun, nodes=1" in job
    assert "torchrun --standalone --nnodes 1 --nproc_per_node 8 --no-python smallbig train" in job
    out = snakemake(
        repo_copy, "--profile", "slurm", "-n", "--config", "overlay=params/embedded.yaml", timeout=300
    ).stdout
    job = _train_job(out, "k400-r23-c2d")  # 1 GPU: in the batch step
    assert "gpu=1," in job and "tasks=1, mpi=, nodes=1" in job
    assert re.search(r"^Shell command: smallbig train ", job, re.M), job
    r = snakemake(
        repo_copy, "--profile", "slurm", "-n", "--config", "gpus_per_node=3", timeout=300, check=False
    )
    assert r.returncode != 0 and "multiple of 3" in r.stdout + r.stderr


def test_a_plan_that_does_not_fit_the_gpus_is_refused_before_submission(repo_copy):
    """The slurm profile's GPU_MEM_GB (config gpu_mem_gb): 80 GiB fits every training as
    configured; on 12 GiB GPUs SmallBig-R101 x 32 frames (4 clips per GPU: 15 GiB) is refused at
    parse time with the per_gpu_batch x accumulation to use instead."""
    out = snakemake(repo_copy, "--profile", "slurm", "-n", timeout=300).stdout
    assert job_counts(out)["train"] == 25
    r = snakemake(
        repo_copy, "--profile", "slurm", "-n", "--config", "gpu_mem_gb=12", timeout=300, check=False
    )
    text = r.stdout + r.stderr
    assert r.returncode != 0 and "nothing was run or submitted" in text
    assert "k400-r101-sb-typical-32f" in text and "per_gpu_batch" in text
    assert "submitted with SLURM jobid" not in text


def test_dvc_pipeline_is_parametrised_by_experiment(repo_copy):
    dvc = str(VENV_BIN / "dvc")
    r = subprocess.run([dvc, "stage", "list"], cwd=REPO, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    for stage in ("params", "data", "train", "evaluate", "metrics", "report"):
        assert re.search(rf"^{stage}\s", r.stdout, re.M), stage
    assert "results/dvc/embedded/k400-r23-sb-full/" in r.stdout
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["experiment"] in config.experiment_ids()
    cfg = (REPO / ".dvc/config").read_text()
    assert "remote = local" in cfg and "smallbig-dvc-remote" in cfg
