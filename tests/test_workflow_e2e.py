"""End to end: the embedded workflow (`snakemake --profile embedded`, every table and figure),
the DVC round trip on its outputs (commit -> push -> fresh clone -> pull -> Snakemake has
nothing to do), and one table through a real single-node Slurm cluster (`snakemake --profile
<the slurm profile with the test partition>`, real sbatch).

One embedded run (the session fixture `embedded_run` in tests/conftest.py) is shared by these
checks, the DVC round trip and tests/test_report_workflow.py; the Slurm test runs a smaller
target (Table 2). Each works in a scratch copy of the repository. The DVC pipeline itself
(`dvc exp run`, `dvc exp show`, the scale switch, an SSH remote): tests/test_dvc_pipeline.py."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm.cluster import SlurmCluster, make_test_profile, missing_binaries
from slurm.workspace import REPO, VENV_BIN, copy_repo, env, jobs_of, snakemake

pytestmark = pytest.mark.slow

GIT_ID = {
    "GIT_AUTHOR_NAME": "smallbig test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "smallbig test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
}


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True, **extra):
    r = subprocess.run(
        cmd, cwd=cwd, env=env(**GIT_ID, **extra), capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({r.returncode}) in {cwd}:\n"
            f"{r.stdout[-5000:]}\n{r.stderr[-5000:]}"
        )
    return r


def mlflow_env(root: Path) -> dict:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def test_embedded_workflow_makes_every_table_and_figure(embedded_run):
    root, _ = embedded_run
    from smallbig.spec.tables import load_tables

    tables = load_tables(root / "params/tables.yaml")
    for t in tables:
        for ext in ("md", "csv", "tex", "html"):
            f = root / "reports/tables" / f"table{t['number']}.{ext}"
            assert f.is_file() and f.stat().st_size > 0, f
    summary = json.loads((root / "reports/tables/summary.json").read_text())
    # every row we reproduce has a result: nothing failed, nothing missing
    for t in summary["tables"]:
        for r in t["rows"]:
            if r["kind"] != "external":
                assert r["status"] == "done", (t["number"], r["label"], r["status"], r["detail"])
    figures = json.loads((root / "reports/figures/figures.json").read_text())
    assert figures, "no figures"
    for f in figures:
        for key in ("png", "svg"):
            if key in f:
                assert (root / "reports/figures" / f[key]).is_file(), f[key]
    feat = json.loads((root / "reports/figures/featmaps.json").read_text())
    assert feat["figures"], feat
    index = (root / "reports/index.html").read_text()
    assert "embedded" in index.lower()
    for exp in (p.stem for p in (root / "params/experiments").glob("*.yaml")):
        assert (root / "results/embedded" / exp / "train/checkpoint.pt").is_file(), exp
    # re-running changes nothing
    out = snakemake(root, "--profile", "embedded", "-n", **mlflow_env(root)).stdout
    assert "Nothing to be done" in out, out[-3000:]


def test_dvc_round_trip_restores_the_workflow_outputs_up_to_date(embedded_run, tmp_path):
    root, _ = embedded_run
    remote = tmp_path / "dvc-remote"
    dvc = str(VENV_BIN / "dvc")
    # the scratch copy becomes a git repository (as the user's clone is)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "code"], root)
    run([dvc, "remote", "modify", "--local", "local", "url", str(remote)], root)
    run(["bash", "workflow/scripts/dvc-snapshot.sh", "embedded"], root, timeout=1200)
    for name in ("data-embedded", "results-embedded", "snakemake-metadata"):
        spec = yaml.safe_load((root / f"workflow/dvc/{name}.dvc").read_text())
        assert spec["outs"][0]["md5"].endswith(".dir"), spec
    assert any(remote.rglob("*")), "nothing pushed"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert not (clone / "results").exists()
    run([dvc, "remote", "modify", "--local", "local", "url", str(remote)], clone)
    run(["bash", "workflow/scripts/dvc-snapshot.sh", "--pull"], clone, timeout=1200)
    ckpt = "results/embedded/k400-r23-sb-full/train/checkpoint.pt"
    assert (clone / ckpt).read_bytes() == (root / ckpt).read_bytes()
    # the restored files are newer than their inputs in an arbitrary order: Snakemake must
    # still see every checkpoint, evaluation and report as up to date and run nothing
    out = snakemake(clone, "--profile", "embedded", "-n", **mlflow_env(clone))
    text = out.stdout + out.stderr
    assert "Nothing to be done" in text, text[-4000:]
    # ... while a real change is still noticed: one experiment's params -> only its chain
    exp = clone / "params/experiments/k400-r23-c2d.yaml"
    before = exp.read_text()  # edit the key in place: a second `description:` is refused now
    exp.write_text(re.sub(r"^description: .*$", "description: changed", before, count=1, flags=re.M))
    assert exp.read_text() != before
    text = snakemake(clone, "--profile", "embedded", "-n", "table2", **mlflow_env(clone)).stdout
    assert jobs_of(text, "train") == ["exp=k400-r23-c2d"], text[-3000:]


@pytest.fixture
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)}): run `make system-deps`")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_table2_through_a_real_slurm_cluster(slurm_cluster, tmp_path):
    root = copy_repo(tmp_path / "repo")
    profile = make_test_profile(REPO / "slurm/config.yaml", root / "slurm-test-profile")
    t0 = time.time()
    # (targets before --configfile, which takes one or more values)
    out = snakemake(
        root,
        "--profile",
        str(profile),
        "table2",
        "--configfile",
        "workflow/config/embedded.yaml",
        timeout=2400,
        **mlflow_env(root),
    )
    seconds = time.time() - t0
    print(f"\nSlurm table2: {seconds:.0f} s")
    text = out.stdout + out.stderr
    assert "executor" in text.lower() or "slurm" in text.lower()
    t2 = root / "results/embedded/tables/table2/table2.md"
    assert t2.is_file(), text[-3000:]
    for exp in ("k400-r23-c2d", "k400-r23-i3d311", "k400-r23-sb311"):
        m = json.loads((root / f"results/embedded/{exp}/eval-10x3/metrics.json").read_text())
        assert m["num_videos"] > 0
        # the job got a (fake) GPU from Slurm; without CUDA the engine trained on the CPU
        log = (root / f"logs/embedded/train/{exp}.log").read_text()
        assert "device cpu" in log
    # every non-local job was an sbatch job of this cluster
    submitted = re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S*/slurm_logs/(rule_\w+)/", text)
    assert {"rule_data_toy", "rule_data_prepare", "rule_train", "rule_evaluate", "rule_table"} <= set(
        submitted
    ), submitted
    assert submitted.count("rule_train") >= 3 and submitted.count("rule_evaluate") >= 3
    (root / "slurm-wall-seconds.txt").write_text(f"{seconds:.0f}\n")
