"""The embedded workflow's reports: `snakemake --report` holds all ten tables and every figure,
and the static reports/index.html passes the Chromium check.

Uses the shared embedded run: the `embedded_run` fixture ((repository copy, seconds) after
`snakemake --profile embedded`), which must be session-scoped in tests/conftest.py so that one
embedded run serves this module and tests/test_workflow_e2e.py."""

from __future__ import annotations

import json
import re

import pytest
from slurm.workspace import snakemake

from smallbig.analysis.browser import check_report
from smallbig.spec.tables import load_tables

pytestmark = pytest.mark.slow


def test_snakemake_report_has_every_table_and_figure(embedded_run, tmp_path):
    root, _ = embedded_run
    out = tmp_path / "report.html"
    snakemake(
        root,
        "--profile",
        "embedded",
        "--report",
        str(out),
        timeout=900,
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
    )
    text = out.read_text(errors="replace")
    for t in load_tables(root / "params/tables.yaml"):
        n = t["number"]
        assert re.search(rf"table{n}\.(html|csv)", text), f"Table {n} is not in the Snakemake report"
    figs = json.loads((root / "reports/figures/figures.json").read_text())
    feat = json.loads((root / "reports/figures/featmaps.json").read_text())
    assert feat["figures"], feat["missing"]
    names = [f["png"].rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in figs + feat["figures"]]
    missing = [n for n in names if not re.search(re.escape(n) + r"\.(png|svg)", text)]
    assert not missing, f"figures not in the Snakemake report: {missing}"


def test_embedded_index_html_in_chromium(embedded_run):
    root, _ = embedded_run
    index = root / "reports/index.html"
    r = check_report(index, root / "reports/screenshot.png")
    assert r["problems"] == [], "\n".join(r["problems"])
    assert "NOT comparable to the paper" in r["text"]
    for n in range(2, 12):
        assert f"Table {n}:" in r["text"]
    figs = json.loads((root / "reports/figures/figures.json").read_text())
    feat = json.loads((root / "reports/figures/featmaps.json").read_text())
    assert r["images"] == len(figs) + len(feat["figures"])


def test_embedded_verdicts_json_has_intervals_runs_and_claims(embedded_run):
    """The embedded default (one seed): every row we reproduce has a bootstrap interval over its
    validation videos, reads "not comparable", and names its MLflow training run; the paper's
    claims are checked on the run's own numbers."""
    root, _ = embedded_run
    data = json.loads((root / "reports/verdicts.json").read_text())
    assert data["comparable"] is False
    expected_rows = sum(
        1 for t in load_tables(root / "params/tables.yaml") for r in t["rows"] if r["kind"] != "external"
    )
    assert len(data["rows"]) == expected_rows
    for r in data["rows"]:
        assert r["verdict"] == "not comparable" and r["interval_kind"] == "bootstrap" and r["n"] == 1
        lo, hi = r["interval"]
        assert lo <= r["top1"] <= hi
        if r["experiment"]:
            (run,) = r["runs"]
            assert run["seed"] == 0 and re.fullmatch(r"[0-9a-f]{32}", run["train_run_id"] or ""), r
    results = {c["result"] for c in data["claims"]}
    assert results <= {"held", "not held", "inconclusive", "not comparable"}
    # claims against other papers' numbers are not comparable; those among our rows are checked
    assert "not comparable" in results and results - {"not comparable"}
    md = (root / "reports/tables/table2.md").read_text()
    assert "(bootstrap) |" in md and "**Verdicts:** 3 of 3 rows not comparable" in md
