"""Seeds end to end: a real Snakemake run of a cut-down embedded DAG (two experiments of Table 2,
two seeds, one epoch on a few toy videos, single-clip evaluation) produces per-seed trainings
with distinct recorded seeds, and a table with mean ± std over the seeds, verdicts and the
claim, and verdicts.json with each seed's runs. The expected numbers come from the
per-seed metrics.json files the engine wrote, not from the report code."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from slurm.workspace import copy_repo, snakemake

pytestmark = pytest.mark.slow

RUN = "seedtest"
EXPS = ("k400-r23-c2d", "k400-r23-sb311")


def _overlay(root):
    """params/embedded.yaml, cut: one epoch, the test's own data directory."""
    o = yaml.safe_load((root / "params/embedded.yaml").read_text())
    o["all"]["train"]["epochs"] = 1
    o["all"]["train"]["val_every_epochs"] = 1
    o["all"]["data"]["limit_val"] = 8
    o["kinetics400"]["data"]["root"] = f"data/{RUN}/kinetics400"
    o["kinetics400"]["data"]["source"] = {"base_url": f"data/{RUN}/source/kinetics400"}
    return o


TABLES = {
    "tables": [
        {
            "number": 2,
            "title": "Effectiveness of SmallBig (cut down: two rows, single clip)",
            "dataset": "kinetics400",
            "claims": [{"text": "SmallBig 3×1×1 > 2D", "order": ["sb", "2d"]}],
            "rows": [
                {
                    "label": "R23, 2D",
                    "key": "2d",
                    "paper": {"top1": 64.1},
                    "experiment": EXPS[0],
                    "protocol": "1x1",
                },
                {
                    "label": "SmallBig 3×1×1",
                    "key": "sb",
                    "paper": {"top1": 69.0},
                    "experiment": EXPS[1],
                    "protocol": "1x1",
                },
            ],
        }
    ]
}


def test_two_seeds_through_the_embedded_dag(tmp_path):
    root = copy_repo(tmp_path / "repo")
    (root / "seedtest-overlay.yaml").write_text(yaml.safe_dump(_overlay(root), allow_unicode=True))
    (root / "seedtest-tables.yaml").write_text(yaml.safe_dump(TABLES, allow_unicode=True))
    (root / "seedtest.yaml").write_text(
        yaml.safe_dump(
            {
                "run": RUN,
                "overlay": "seedtest-overlay.yaml",
                "tables": "seedtest-tables.yaml",
                "reports": f"results/{RUN}/reports",
                "toy_data": f"data/{RUN}/source",
                "toy_args": "--datasets kinetics400 --per-class train=3 val=1 test=1",
                "seeds": 2,
                "paper_comparable": False,
            }
        )
    )
    target = f"results/{RUN}/tables/table2"
    snakemake(
        root,
        target,  # before --configfile, which takes every file name after it
        "--cores",
        "2",
        "--configfile",
        "seedtest.yaml",
        timeout=900,
        # no MLflow here (its imports and store cost more than the trainings); the shared
        # embedded run checks the MLflow run ids in reports/verdicts.json
        SMALLBIG_NO_MLFLOW="1",
        OMP_NUM_THREADS="1",
    )
    res = root / "results" / RUN
    top1 = {}
    for exp in EXPS:
        dirs = [res / exp, res / exp / "seed-1"]
        seeds = [yaml.safe_load((d / "params.yaml").read_text())["train"]["seed"] for d in dirs]
        assert seeds == [0, 1], (exp, seeds)  # distinct, recorded in the resolved params
        ckpts = [(d / "train" / "checkpoint.pt").read_bytes() for d in dirs]
        assert ckpts[0] != ckpts[1]  # two different trainings
        top1[exp] = [json.loads((d / "eval-1x1" / "metrics.json").read_text())["top1"] for d in dirs]
    out = res / "tables" / "table2"
    md = (out / "table2.md").read_text()
    summary = json.loads((out / "verdicts.json").read_text())
    assert summary["comparable"] is False
    rows = {r["experiment"]: r for r in summary["rows"]}
    for exp in EXPS:
        r = rows[exp]
        mean, std = statistics.mean(top1[exp]), statistics.stdev(top1[exp])
        assert r["top1"] == pytest.approx(mean) and r["std"] == pytest.approx(std)
        assert r["n"] == 2 and r["interval_kind"] == "seeds" and r["verdict"] == "not comparable"
        assert r["runs"] == [{"seed": k, "train_run_id": None, "eval_run_id": None} for k in (0, 1)]
        assert f"| {mean:.1f} | ± {std:.1f} (2 seeds) |" in md
    assert "**Verdicts:** 2 of 2 rows not comparable (scaled-down run)" in md
    (claim,) = summary["claims"]
    assert claim["result"] in ("held", "not held", "inconclusive")
    assert f"- **{claim['result']}**: SmallBig 3×1×1 > 2D" in md
    # a second run has nothing to do
    dry = snakemake(root, target, "-n", "--configfile", "seedtest.yaml")
    assert "Nothing to be done" in dry.stdout + dry.stderr
