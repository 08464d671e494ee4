"""Seeds, intervals, verdicts and the paper's ordering claims (smallbig/analysis/verdicts.py and
the tables built on them), on synthetic results with known accuracies: every expected number
below is computed here by hand or with the standard library, not by the code under test."""

from __future__ import annotations

import copy
import csv
import io
import json
import statistics

import numpy as np
import pytest
import synthetic_results as S
import yaml

from smallbig.analysis import verdicts as V
from smallbig.analysis.collect import Results
from smallbig.analysis.report_tables import build_tables, render_csv, render_markdown, write_verdicts
from smallbig.cli import main
from smallbig.spec.plan import replicate_run, seed_subdir, split_replicate
from smallbig.spec.tables import TABLES_PATH, TablesError, load_tables

K = 10
N = 500  # validation videos: Top-1 moves in steps of 0.2


@pytest.fixture(scope="module")
def tables():
    return load_tables()


def _table(built, n):
    return next(t for t in built if t["number"] == n)


def _row(table, experiment):
    return next(r for r in table["rows"] if r["row"].get("experiment") == experiment)


def write_seed(run, exp_id, k, top1, protocol="10x3", train_seed=None, run_id=None):
    """Replicate k of an experiment with exactly `top1` % of N videos right."""
    name = replicate_run(exp_id, k)
    right = round(top1 * N / 100)
    labels = np.arange(N) % K
    clips, crops = (int(x) for x in protocol.split("x"))
    logits = S.make_logits(labels, K, clips * crops, np.arange(N) < right)
    S.write_evaluation(run, name, protocol, logits, labels)
    S.write_training(run, name, 1, params={"train": {"seed": train_seed if train_seed is not None else k}})
    if run_id:
        (run / name / "train" / "mlflow-run.json").write_text(json.dumps({"run_id": run_id}))


# Top-1 of three seeds per experiment (multiples of 0.2, i.e. exact with N = 500)
SEEDS3 = {
    "k400-r23-c2d": [64.0, 64.2, 64.4],  # paper 64.1: [64.0, 64.4] within 63.6..64.6
    "k400-r23-i3d311": [67.6, 68.0, 68.4],  # paper 68.3: [67.6, 68.4] straddles 67.8
    "k400-r23-sb311": [71.0, 71.4, 71.8],  # paper 69.0: [71.0, 71.8] above 69.5
    "k400-r23-sb-full": [60.0, 60.4, 60.8],  # Table 7: below NonLocal; Table 8: overlaps R50
    "k400-r23-nonlocal": [65.0, 65.4, 65.8],
    "k400-r50-c2d": [60.2, 60.6, 61.0],
}


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    run = tmp_path_factory.mktemp("seeds") / "results" / "full"
    for exp_id, values in SEEDS3.items():
        for k, v in enumerate(values):
            write_seed(run, exp_id, k, v, train_seed=100 + k, run_id=f"{exp_id}-run{k}")
    return run


def test_seed_paths_round_trip():
    assert seed_subdir(0) == "" and seed_subdir(3) == "seed-3"
    assert replicate_run("k400-r23-c2d", 0) == "k400-r23-c2d"
    assert replicate_run("k400-r23-c2d", 2) == "k400-r23-c2d/seed-2"
    for name in ("k400-r23-c2d", "k400-sb-en-r50-r101-4x3"):
        for k in (0, 1, 12):
            assert split_replicate(replicate_run(name, k)) == (name, k)


def test_three_seeds_give_mean_std_and_verdicts(three_seeds, tables):
    built = build_tables(tables, Results(three_seeds, seeds=3), compute_model_info=False)
    t2 = _table(built, 2)
    expected = {
        "k400-r23-c2d": "reproduced",
        "k400-r23-i3d311": "inconclusive",  # the interval straddles paper - tolerance
        "k400-r23-sb311": "not reproduced",
    }
    for exp_id, verdict in expected.items():
        r = _row(t2, exp_id)
        values = SEEDS3[exp_id]
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert r["raw"]["ours_top1"] == pytest.approx(mean)
        assert r["raw"]["ours_top1_std"] == pytest.approx(std)
        assert (r["raw"]["ours_top1_lo"], r["raw"]["ours_top1_hi"]) == pytest.approx((mean - std, mean + std))
        assert r["raw"]["ours_n"] == 3 and r["raw"]["interval"] == "seeds"
        assert r["cells"]["ours_top1"] == f"{mean:.1f}"
        assert r["cells"]["ours_top1_ci"] == f"± {std:.1f} (3 seeds)"
        assert r["verdict"] == verdict and r["cells"]["verdict"] == verdict
    assert t2["verdict_line"] == "1 of 3 rows reproduced, 1 not reproduced, 1 inconclusive"
    (claim,) = t2["claims"]
    assert claim["result"] == "held"  # [71.0, 71.8] > [67.6, 68.4] > [64.0, 64.4]
    # Table 7: SmallBig [60.0, 60.8] below NonLocal [65.0, 65.8]: not held
    assert _table(built, 7)["claims"][0]["result"] == "not held"
    # Table 8: SmallBig-R23 [60.0, 60.8] vs R50 [60.2, 61.0] overlap: inconclusive; SmallBig-R50
    # has no result: inconclusive, and the reason is given
    c8 = _table(built, 8)["claims"]
    assert [c["result"] for c in c8] == ["inconclusive", "inconclusive"]
    assert "no result" in c8[1]["detail"]
    # every format says which interval it is and what the rule is
    md = render_markdown(t2)
    assert "**Verdicts:** 1 of 3 rows reproduced, 1 not reproduced, 1 inconclusive" in md
    assert "- **held**: SmallBig 3×1×1 > 3D 3×1×1 > 2D" in md
    assert "mean over 3 seeds" in md and "tolerance ±0.5" in md
    first = next(csv.DictReader(io.StringIO(render_csv(t2))))
    assert first["ours_n"] == "3" and first["verdict"] == "reproduced" and first["interval"] == "seeds"


def test_verdicts_json_names_seeds_and_runs(three_seeds, tables, tmp_path):
    results = Results(three_seeds, seeds=3)
    built = build_tables(tables, results, compute_model_info=False)
    data = json.loads(write_verdicts(built, results, tmp_path / "verdicts.json").read_text())
    rows = [r for r in data["rows"] if r["table"] == "table2"]
    assert [r["experiment"] for r in rows] == ["k400-r23-c2d", "k400-r23-i3d311", "k400-r23-sb311"]
    c2d = rows[0]
    assert c2d["row"] == "R23, 2D (Fig. 2a)" and c2d["protocol"] == "10x3"
    assert c2d["verdict"] == "reproduced" and c2d["paper_top1"] == 64.1
    assert c2d["top1"] == pytest.approx(statistics.mean(SEEDS3["k400-r23-c2d"]))
    assert c2d["runs"] == [
        {"seed": 100 + k, "train_run_id": f"k400-r23-c2d-run{k}", "eval_run_id": None} for k in range(3)
    ]
    # rows without results have no verdict and are not listed; every claim is
    assert {r["experiment"] for r in data["rows"]} <= set(SEEDS3)
    assert len(data["claims"]) == sum(len(t["claims"]) for t in tables)
    assert data["comparable"] is True


def test_one_seed_uses_a_bootstrap_interval_over_videos(three_seeds, tables):
    built = build_tables(tables, Results(three_seeds, seeds=1), compute_model_info=False)
    r = _row(_table(built, 2), "k400-r23-c2d")
    assert r["raw"]["ours_n"] == 1 and r["raw"]["interval"] == "bootstrap"
    assert r["raw"]["ours_top1"] == 64.0
    lo, hi = r["raw"]["ours_top1_lo"], r["raw"]["ours_top1_hi"]
    # independently: resample the 500 videos (320 right) with replacement, 95 % percentiles
    rng = np.random.default_rng(12345)
    right = np.arange(N) < 320
    means = np.array([right[rng.integers(0, N, N)].mean() * 100 for _ in range(20000)])
    ref_lo, ref_hi = np.percentile(means, [2.5, 97.5])
    assert abs(lo - ref_lo) <= 0.4 and abs(hi - ref_hi) <= 0.4  # two video steps
    se = 100 * np.sqrt(0.64 * 0.36 / N)  # the normal approximation agrees too
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert r["cells"]["ours_top1_ci"] == f"[{lo:.1f}, {hi:.1f}] (bootstrap)"
    # ±4.2 points is far wider than the ±0.5 tolerance: inconclusive, whatever the mean
    assert r["verdict"] == "inconclusive"
    assert "percentile bootstrap interval over the validation videos" in _table(built, 2)["verdict_note"]


def test_missing_seed_keeps_the_verdict_back(three_seeds, tables, tmp_path):
    import shutil

    run = tmp_path / "full"
    shutil.copytree(three_seeds, run)
    shutil.rmtree(run / "k400-r23-c2d" / "seed-2")
    built = build_tables(tables, Results(run, seeds=3), compute_model_info=False)
    t2 = _table(built, 2)
    r = _row(t2, "k400-r23-c2d")
    assert r["status"] == "running" and r["detail"].startswith("2 of 3 seeds done")
    assert r["raw"]["ours_n"] == 2 and r["verdict"] is None
    assert t2["verdict_line"].endswith("1 row without a complete result")
    # without --seeds the report reads what exists: 2 seeds, a complete row
    r = _row(_table(build_tables(tables, Results(run), compute_model_info=False), 2), "k400-r23-c2d")
    assert r["status"] == "done" and r["raw"]["ours_n"] == 2


def test_scaled_down_run_is_not_comparable_but_checks_its_claims(three_seeds, tables):
    built = build_tables(tables, Results(three_seeds, seeds=3), compute_model_info=False, comparable=False)
    t2 = _table(built, 2)
    assert {r["verdict"] for r in t2["rows"]} == {"not comparable"}
    assert t2["verdict_line"] == "3 of 3 rows not comparable (scaled-down run)"
    assert t2["claims"][0]["result"] == "held"  # on the run's own numbers
    # a claim against another paper's number is not comparable on a scaled-down run; on a
    # comparable one, one seed's [72.2, 79.8]-ish interval around 76.0 overlaps NL I3D's 74.9
    run = three_seeds.parent / "t10"
    write_seed(run, "k400-r50-sb-full", 0, 76.0)
    for comparable, expected in ((False, "not comparable"), (True, "inconclusive")):
        built = build_tables(tables, Results(run, seeds=1), compute_model_info=False, comparable=comparable)
        claim = _table(built, 10)["claims"][0]
        assert claim["text"] == "SmallBig-R50 8f > NL I3D-R50 32f"
        assert claim["result"] == expected, claim


def test_the_rules_on_their_boundaries():
    est = V.Estimate
    # paper 71.0, tolerance 0.5: the band is [70.5, 71.5], both ends inclusive
    assert V.verdict(est(71.0, 70.5, 71.5, "seeds", 3), 71.0, 0.5) == "reproduced"
    assert V.verdict(est(71.0, 70.4, 71.5, "seeds", 3), 71.0, 0.5) == "inconclusive"
    assert V.verdict(est(69.8, 69.6, 70.0, "seeds", 3), 71.0, 0.5) == "not reproduced"
    assert V.verdict(est(72.0, 71.6, 72.4, "seeds", 3), 71.0, 0.5) == "not reproduced"
    assert V.verdict(est(71.0, 69.0, 73.0, "bootstrap", 1), 71.0, 0.5) == "inconclusive"
    assert V.verdict(est(71.0, None, None, "bootstrap", 1), 71.0, 0.5) == "inconclusive"
    assert V.verdict(est(71.0, 70.9, 71.1, "seeds", 3), 71.0, 0.5, comparable=False) == "not comparable"
    assert V.verdict(est(71.0, 70.9, 71.1, "seeds", 3), None, 0.5) is None
    a, b = est(70, 69, 71, "seeds", 3), est(67, 66, 68, "seeds", 3)
    assert V.compare(a, b) == "held" and V.compare(b, a) == "not held"
    assert V.compare(a, est(70.5, 70, 71, "seeds", 3)) == "inconclusive"
    assert V.compare(a, None) == "inconclusive"
    assert V.combine(["held", "held"]) == "held"
    assert V.combine(["held", "inconclusive"]) == "inconclusive"
    assert V.combine(["inconclusive", "not held"]) == "not held"
    # the bootstrap is reproducible (fixed seed) and centred on the estimate
    assert V.bootstrap_interval(30, 40, seed=0) == V.bootstrap_interval(30, 40, seed=0)
    lo, hi = V.bootstrap_interval(30, 40)
    assert lo < 75.0 < hi


def test_the_papers_own_numbers_hold_every_claim(tables):
    for t in tables:
        for c in t["claims"]:
            for i, j in c["pairs"]:
                a, b = t["rows"][i]["paper"]["top1"], t["rows"][j]["paper"]["top1"]
                assert a > b, (t["number"], c["text"], a, b)


def _doc():
    return yaml.safe_load(TABLES_PATH.read_text())


@pytest.mark.parametrize(
    "mutate, key, problem",
    [
        (
            lambda d: d["tables"][0]["claims"][0].update(order=["sb", "nope"]),
            "tables[0].claims[0].order",
            "no row",
        ),
        (
            lambda d: d["tables"][8]["claims"][0].update(order=["SmallBig", "TSM"]),
            "tables[8].claims[0].order",
            "2 rows are labelled so",
        ),
        (lambda d: d["tables"][0]["claims"][0].update(better="sb"), "tables[0].claims[0]", "either `order"),
        (
            lambda d: d["tables"][0]["claims"][0].update(order=["sb", "sb"]),
            "tables[0].claims[0].order",
            "twice",
        ),
        (lambda d: d["tables"][0]["rows"][1].update(key="2d"), "tables[0].rows[0].key", "more than one row"),
        (lambda d: d["tables"][0].update(tolerance=0), "tables[0].tolerance", "0"),
        (lambda d: d["verdicts"].update(tolerance="half"), "verdicts.tolerance", "half"),
    ],
)
def test_bad_claims_and_tolerances_name_file_and_key(tmp_path, mutate, key, problem):
    d = copy.deepcopy(_doc())
    mutate(d)
    p = tmp_path / "tables.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    with pytest.raises(TablesError) as e:
        load_tables(p)
    assert str(p) in str(e.value) and key + ":" in str(e.value) and problem in str(e.value)


def test_per_table_tolerance(tmp_path, three_seeds):
    d = copy.deepcopy(_doc())
    d["tables"][0]["tolerance"] = 1.0  # Table 2: the 3D row's [67.6, 68.4] is within 68.3 ± 1
    p = tmp_path / "tables.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    built = build_tables(load_tables(p), Results(three_seeds, seeds=3), compute_model_info=False)
    t2 = _table(built, 2)
    assert _row(t2, "k400-r23-i3d311")["verdict"] == "reproduced" and t2["tolerance"] == 1.0
    assert _table(built, 3)["tolerance"] == 0.5


def test_cli_writes_verdicts_and_reads_seeds(three_seeds, tmp_path, capsys):
    out = tmp_path / "reports"
    args = ["--results", str(three_seeds), "--no-compute-model-info", "--seeds", "3"]
    assert (
        main(["report", "tables", *args, "--out", str(out / "tables"), "--verdicts", str(out / "v.json")])
        == 0
    )
    # c2d is in 7 tables; sb311 in 3, SmallBig-R23 full in 6 rows, NonLocal and R50 in 1 each
    assert "verdicts: 7 reproduced, 11 not reproduced, 1 inconclusive" in capsys.readouterr().out
    assert json.loads((out / "v.json").read_text())["comparable"] is True
    assert main(["report", "tables", *args, "--out", str(out / "t2"), "--not-comparable"]) == 0
    assert "| not comparable |" in (out / "t2" / "table2.md").read_text()
    assert main(["report", "tables", "--results", str(three_seeds), "--seeds", "0", "--out", str(out)]) == 2
