"""Report builders on synthetic evaluation outputs: known logits -> known accuracies -> known
cells; partial results render with statuses; a missing experiment never breaks the report."""

import csv
import io
import json
import re

import numpy as np
import pytest
import synthetic_results as S

from smallbig.analysis.collect import Results
from smallbig.analysis.figures import views_curve, write_figures
from smallbig.analysis.html import EMBEDDED_BANNER, write_index
from smallbig.analysis.report_tables import (
    build_tables,
    render_csv,
    render_html_table,
    render_latex,
    render_markdown,
    tex_escape,
    write_tables,
)
from smallbig.cli import main
from smallbig.spec.tables import load_tables

K = 10  # classes


def _table(built, n):
    return next(t for t in built if t["number"] == n)


def _row(table, experiment=None, label=None):
    for r in table["rows"]:
        if (experiment is None or r["row"].get("experiment") == experiment) and (
            label is None or r["row"]["label"] == label
        ):
            return r
    raise KeyError(experiment or label)


def _eval(run, exp_id, protocol, correct, in_top5=None, with_metrics=True, **kw):
    clips, crops = (int(x) for x in protocol.split("x"))
    labels = np.arange(len(correct)) % K
    logits = S.make_logits(labels, K, clips * crops, correct, in_top5)
    return S.write_evaluation(run, exp_id, protocol, logits, labels, with_metrics, **kw)


@pytest.fixture(scope="module")
def tables():
    return load_tables()


def build(run, tables, **kw):
    return build_tables(tables, Results(run), compute_model_info=False, **kw)


def test_known_logits_give_known_cells(tmp_path, tables):
    run = tmp_path / "results" / "full"
    # 6 of 8 right, 7 of 8 in the top 5: metrics.json written by the engine's builder
    _eval(run, "k400-r23-c2d", "10x3", [1, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 0, 1])
    # 2 of 8 right, all in the top 5, scores.npz only: metrics computed by the report
    _eval(run, "k400-r23-i3d311", "10x3", [1, 0, 0, 0, 0, 1, 0, 0], with_metrics=False)
    built = build(run, tables)
    t2 = _table(built, 2)
    c2d, i3d, sb = (r["cells"] for r in t2["rows"])
    assert (c2d["paper_top1"], c2d["ours_top1"], c2d["delta_top1"]) == ("64.1", "75.0", "+10.9")
    assert (c2d["paper_top5"], c2d["ours_top5"], c2d["delta_top5"]) == ("85.4", "87.5", "+2.1")
    assert c2d["views"] == "30 (10×3)" and c2d["status"] == "done"
    assert (i3d["ours_top1"], i3d["delta_top1"], i3d["ours_top5"]) == ("25.0", "-43.3", "100.0")
    assert i3d["status"] == "done"
    assert sb["status"] == "not run" and sb["ours_top1"] == "" and sb["delta_top1"] == ""
    # the baseline repeats in Tables 3-8, the same cells everywhere
    for n in range(3, 9):
        assert _table(built, n)["rows"][0]["cells"]["ours_top1"] == "75.0"
    # every format carries the cells
    md = render_markdown(t2)
    assert re.search(
        r"\| 64\.1 \| 75\.0 \| \[[0-9.]+, [0-9.]+\] \(bootstrap\) \| \+10\.9 \| \w[\w ]* \| 85\.4 \| 87\.5 \| \+2\.1 \|",
        md,
    )
    rows = list(csv.DictReader(io.StringIO(render_csv(t2))))
    assert float(rows[0]["ours_top1"]) == 75.0 and float(rows[1]["ours_top1"]) == 25.0
    assert rows[0]["status"] == "done" and rows[2]["status"] == "not run"
    assert float(rows[0]["delta_top1"]) == pytest.approx(10.9)
    tex = render_latex(t2)
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert re.search(r"64\.1 & 75\.0 & \[[0-9.]+, [0-9.]+\] \(bootstrap\) & \+10\.9", tex)
    html = render_html_table(t2)
    assert '<td class="num delta pos">+10.9</td>' in html and "status-not-run" in html


def test_ensemble_fused_from_member_scores_and_from_engine(tmp_path, tables):
    run = tmp_path / "full"
    # member A: right on the first half with confidence, weakly wrong on the rest; B the reverse
    n, labels = 8, np.arange(8) % K
    a = np.zeros((n, 12, K), np.float32)
    b = np.zeros((n, 12, K), np.float32)
    for i, y in enumerate(labels):
        strong, weak = (a, b) if i < 4 else (b, a)
        strong[i, :, y] = 8.0
        weak[i, :, (y + 1) % K] = 1.0
    S.write_evaluation(run, "k400-r50-sb-full", "4x3", a, labels)
    S.write_evaluation(run, "k400-r101-sb-typical-32f", "4x3", b, labels)
    t10 = _table(build(run, tables), 10)
    en = _row(t10, label="SmallBig En")
    assert en["cells"]["status"] == "done"
    assert en["raw"]["ours_top1"] == 100.0 and en["cells"]["ours_top1"] == "100.0"
    assert en["cells"]["delta_top1"] == "+21.3"  # 100.0 - 78.7
    assert "fused here" in en["detail"]
    assert _row(t10, "k400-r101-sb-typical-32f")["cells"]["ours_top1"] == "50.0"
    assert _row(t10, "k400-r101-sb-typical-32f")["cells"]["views"] == "12 (4×3)"
    assert _row(t10, "k400-r50-sb-full")["status"] == "not run"  # its row is at 10x3
    # the engine's own ensemble metrics.json, when the workflow made it, is read as is
    from smallbig.engine.evaluate import ensemble

    ensemble(
        [run / "k400-r50-sb-full/eval-4x3/scores.npz", run / "k400-r101-sb-typical-32f/eval-4x3/scores.npz"],
        run / "ensembles" / en["row"]["name"],
        name=en["row"]["name"],
    )
    en2 = _row(_table(build(run, tables), 10), label="SmallBig En")
    assert en2["raw"]["ours_top1"] == 100.0 and en2["detail"] == ""


def test_partial_results_render_with_statuses(tmp_path, tables):
    run = tmp_path / "results" / "embedded"
    _eval(run, "k400-r23-c2d", "10x3", [1, 1, 0, 0])  # done
    S.write_training(
        run, "k400-r23-i3d311", 3, 10, finished=False, params={"train": {"epochs": 10}}
    )  # running, epoch 3/10
    S.write_training(run, "k400-r23-sb311", 2, 10, finished=False)
    (run / "k400-r23-sb311" / "train" / "FAILED").write_text("CUDA out of memory\n")  # failed
    S.write_training(run, "k400-r23-sb333", 10)  # trained, not evaluated
    logs = tmp_path / "logs" / "embedded" / "train"
    logs.mkdir(parents=True)
    S.write_training(run, "k400-r23-sb355", 1, 10, finished=False)
    (logs / "k400-r23-sb355.log").write_text(
        "epoch 1\nTraceback (most recent call last):\n  File x\nRuntimeError: NaN loss\n"
    )  # failed
    ev = run / "k400-r23-sb377" / "eval-10x3"
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text("{not json")  # failed (bad file)
    (run / "k400-r23-sbT33" / "eval-10x3").mkdir(parents=True)
    (run / "k400-r23-sbT33" / "eval-10x3" / "scores.npz").write_bytes(b"garbage")  # failed
    built = build(run, tables)
    t4 = _table(built, 4)
    status = {r["row"]["experiment"]: (r["status"], r["detail"]) for r in t4["rows"]}
    assert status["k400-r23-c2d"][0] == "done"
    assert status["k400-r23-sb311"] == ("failed", f"{run}/k400-r23-sb311/train/FAILED: CUDA out of memory")
    assert status["k400-r23-sb333"] == ("running", "trained, not evaluated at 10x3")
    assert status["k400-r23-sb355"][0] == "failed" and "RuntimeError: NaN loss" in status["k400-r23-sb355"][1]
    assert (
        status["k400-r23-sb377"][0] == "failed"
        and "metrics.json: not readable JSON" in status["k400-r23-sb377"][1]
    )
    assert status["k400-r23-sbT33"][0] == "failed" and "scores.npz" in status["k400-r23-sbT33"][1]
    t2 = _table(built, 2)
    assert _row(t2, "k400-r23-i3d311")["detail"] == "training (epoch 3/10)"
    assert t4["counts"] == {"done": 1, "running": 1, "not run": 0, "failed": 4, "reported": 0}
    # every status reaches every format
    paths = write_tables(built, tmp_path / "reports" / "tables", EMBEDDED_BANNER)
    assert len(paths) == 4 * 10 + 2
    md = (tmp_path / "reports/tables/table4.md").read_text()
    for s in ("| done |", "| running |", "| failed |"):
        assert s in md
    assert "NOT comparable" in md and "CUDA out of memory" in md
    summary = json.loads((tmp_path / "reports/tables/summary.json").read_text())
    assert [t["number"] for t in summary["tables"]] == list(range(2, 12))


def test_missing_results_never_break_the_report(tmp_path, tables):
    run = tmp_path / "nothing-here" / "full"  # does not exist at all
    results = Results(run)
    built = build_tables(tables, results, compute_model_info=False)
    assert all(r["status"] in ("not run", "reported") for t in built for r in t["rows"])
    out = tmp_path / "reports"
    write_tables(built, out / "tables")
    manifest = write_figures(built, results, out / "figures")
    index = write_index(out, built, results, None)
    text = index.read_text()
    assert "Table 11" in text and "banner" not in text.split("<body>")[1].split("<h2")[0]
    # the figures that do not need results exist, and say what is missing
    names = {m["png"] for m in manifest}
    assert {
        "summary/accuracy-vs-gflops.png",
        "summary/ablation-table3.png",
        "summary/ablation-table9.png",
    } <= names
    for m in manifest:
        assert (out / "figures" / m["png"]).stat().st_size > 0
        assert (out / "figures" / m["svg"]).stat().st_size > 0


def test_model_info_cells_and_notes(tmp_path, tables):
    run = tmp_path / "full"
    S.write_model_info(
        run,
        {
            "k400-r23-c2d": {"params": 11_349_968, "gmacs_224": 16.976},
            "k400-r23-sb-full-singlebn": {"params": 13_230_000, "gmacs_224": 21.9},
            "k400-r50-sb-full": {"params": 32_292_816, "gmacs_224": 62.657},
            "k400-r101-sb-typical-32f": {"params": 43_414_992, "gmacs_224": 416.36},
        },
    )
    built = build(run, tables)
    t6 = _table(built, 6)
    r23 = _row(t6, "k400-r23-c2d")
    assert (r23["cells"]["ours_params_m"], r23["cells"]["ours_gflops"]) == ("11.35", "17.0")
    assert r23["cells"]["ours_gflops_x_views"] == "509 = 17.0×30"
    assert not any("Params:" in n or "GFLOPs per view" in n for n in r23["notes"])  # within 1%
    sbn = _row(t6, "k400-r23-sb-full-singlebn")
    assert "GFLOPs per view: ours 21.9 vs the paper's 17." in sbn["notes"]
    t10 = _table(built, 10)
    r50 = _row(t10, "k400-r50-sb-full")
    assert r50["cells"]["ours_gflops_x_views"] == "1880 = 62.7×30"
    assert r50["cells"]["paper_gflops_x_views"] == "1710 = 57×30"
    assert any("57 GFlops" in n for n in r50["notes"])  # the experiment's own note
    assert "GFLOPs per view: ours 62.7 vs the paper's 57." in r50["notes"]
    en = _row(t10, label="SmallBig En")
    assert en["cells"]["ours_gflops_x_views"] == "5748 = 479.0×12"  # (62.657 + 416.36) × 12
    # a row without model info keeps the paper's cells and leaves ours empty
    assert _row(t6, "k400-r23-sb-full-avgpool")["cells"]["ours_params_m"] == ""
    ext = _row(t10, label="ARTNet")
    assert ext["cells"]["label"] == "ARTNet †" and ext["cells"]["status"] == "reported"
    assert ext["cells"]["paper_gflops_x_views"] == "5875 = 23.5×250"


def test_model_info_missed_without_computing_is_computed_when_asked(tmp_path):
    # the figures build Tables 2-9 without computing model info and Table 10 with: an
    # experiment of both (SmallBig-R50: Tables 8, 9, 10) must still get its numbers in Table 10
    calls = []
    results = Results(
        tmp_path / "full", model_info=lambda p: calls.append(p["id"]) or {"params": 1, "gmacs_224": 2.0}
    )
    assert results.model_info("k400-r50-sb-full", compute=False) is None
    assert results.model_info("k400-r50-sb-full", compute=True) == {"params": 1, "gmacs_224": 2.0}
    assert results.model_info("k400-r50-sb-full", compute=True) is results.model_info("k400-r50-sb-full")
    assert calls == ["k400-r50-sb-full"]


def test_views_curve_from_saved_logits():
    # 4 videos, 10 clips x 3 crops; videos 0-1: only the centre crop is right (the side crops
    # confidently wrong), videos 2-3: every view right
    labels = np.arange(4)
    clip_idx, crop_idx = S.view_index(10, 3)
    logits = np.zeros((4, 30, K), np.float32)
    for i, y in enumerate(labels):
        for v in range(30):
            cls = y if (i >= 2 or crop_idx[v] == 1) else (y + 1) % K
            logits[i, v, cls] = 5.0
    scores = {
        "logits": logits,
        "labels": labels,
        "clip_idx": clip_idx,
        "crop_idx": crop_idx,
        "num_clips": 10,
        "num_crops": 3,
    }
    curve = views_curve(scores)
    assert sorted(curve) == [1, 3]
    assert [c for c, _ in curve[1]] == list(range(1, 11))
    assert all(acc == 100.0 for _, acc in curve[1])
    assert all(acc == 50.0 for _, acc in curve[3])


def test_figures_from_partial_results(tmp_path, tables):
    run = tmp_path / "full"
    _eval(run, "k400-r23-c2d", "10x3", [1, 0, 1, 1])
    _eval(run, "k400-r50-sb-full", "10x3", [1, 1, 1, 0])
    S.write_training(run, "k400-r23-c2d", 5)
    results = Results(run)
    built = build_tables(tables, results, compute_model_info=False)
    manifest = write_figures(built, results, tmp_path / "figs", banner=None)
    names = {m["png"] for m in manifest}
    assert "training/k400-r23-c2d.png" in names
    assert "views/k400-r23-c2d-10x3.png" in names and "views/k400-r50-sb-full-10x3.png" in names
    assert {f"summary/ablation-table{n}.png" for n in (3, 4, 5, 6, 9)} <= names
    for m in manifest:
        png = (tmp_path / "figs" / m["png"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "figs" / m["svg"]).read_text().lstrip().startswith(("<?xml", "<svg"))
    assert json.loads((tmp_path / "figs" / "figures.json").read_text()) == manifest


def test_tex_escape():
    assert tex_escape("a_b & 5% #1 ×2 Δ") == r"a\_b \& 5\% \#1 $\times$2 $\Delta$"


def test_cli_build_and_single_table(tmp_path, capsys):
    run = tmp_path / "results" / "embedded"
    _eval(run, "k400-r23-c2d", "10x3", [1, 1, 1, 1])
    out = tmp_path / "reports"
    assert (
        main(
            [
                "report",
                "table",
                "7",
                "--results",
                str(run),
                "--out",
                str(out / "tables"),
                "--no-compute-model-info",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "tables").iterdir()) == [
        "table7.csv",
        "table7.html",
        "table7.md",
        "table7.tex",
    ]
    assert main(["report", "build", "--results", str(run), "--out", str(out), "--no-compute-model-info"]) == 0
    index = (out / "index.html").read_text()
    assert 'id="embedded-banner"' in index  # run named `embedded`
    for n in range(2, 12):
        assert f'href="tables/table{n}.csv"' in index and f'id="table{n}"' in index
    assert '<img src="figures/summary/accuracy-vs-gflops.png"' in index
    meta = json.loads((out / "metadata.json").read_text())
    assert len(meta["git"]["commit"]) == 40
    assert (
        main(
            [
                "report",
                "table",
                "12",
                "--results",
                str(run),
                "--out",
                str(out / "tables"),
                "--no-compute-model-info",
            ]
        )
        == 2
    )
    assert "no table [12]" in capsys.readouterr().err


def test_results_dir_forms_and_embedded_size_notes(tmp_path, tables):
    from smallbig.analysis.cli import run_dir

    assert (
        run_dir("results", "embedded")
        == run_dir("results/embedded", None)
        == run_dir("results/embedded", "embedded")
    )
    run = tmp_path / "results" / "embedded"
    _eval(run, "k400-r23-c2d", "10x3", [1, 0])
    (run / "model-info").mkdir(parents=True)
    (run / "model-info" / "k400-r23-nonlocal.json").write_text(
        json.dumps({"id": "k400-r23-nonlocal", "params": 400_000, "gmacs_224": 0.2})
    )
    out = tmp_path / "t"
    assert (
        main(
            [
                "report",
                "tables",
                "--results",
                str(tmp_path / "results"),
                "--run",
                "embedded",
                "--out",
                str(out),
                "--no-compute-model-info",
            ]
        )
        == 0
    )
    md = (out / "table7.md").read_text()
    assert "| 50.0 |" in md and "NOT comparable" in md
    assert "| 0.40 |" in md and "Params: ours" not in md  # scaled-down by design: no size notes
    built = build_tables(tables, Results(run), compute_model_info=False, size_notes=True)
    nl = _row(_table(built, 7), "k400-r23-nonlocal")
    assert "Params: ours 0.40M vs the paper's 18.7M." in nl["notes"]


def test_run_metadata_gpu_hours_dates_and_manifest(tmp_path, monkeypatch):
    from smallbig.analysis.html import manifest_summary, run_metadata

    monkeypatch.chdir(tmp_path)  # data roots are relative to the working directory
    root = tmp_path / "data" / "k400"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "format": "video",
                "num_classes": 8,
                "splits": {
                    "val": {
                        "count": 47,
                        "usable": 46,
                        "quarantined": 1,
                        "num_missing": 2,
                        "sha256": "4c6f3c90bace3ef4",
                    }
                },
            }
        )
    )
    run = tmp_path / "results" / "full"
    params = {"data": {"dataset": "kinetics400", "root": "data/k400"}, "train": {"epochs": 3}}
    for exp_id in ("a", "b"):
        S.write_training(run, exp_id, 3, params=params)  # 1800 s x 2 GPUs each
    meta = run_metadata(Results(run), ["a", "b", "never-run"])
    assert meta["gpu_hours"] == 2.0 and meta["gpu_hours_runs"] == 2
    assert meta["hardware"] == ["cuda:0 × 2"] and meta["trained_runs"] == 2
    assert meta["first_start"] and meta["last_finish"] >= meta["first_start"]
    assert meta["datasets"] == [
        {
            "dataset": "kinetics400",
            "root": "data/k400",
            "manifest": "format video, num_classes 8; val: 47 videos (46 usable, "
            "1 quarantined, 2 missing, list sha256 4c6f3c90bace)",
        }
    ]
    assert manifest_summary([]) == "not a mapping"
