"""Figures of the report (matplotlib, Agg backend, PNG + SVG under reports/figures/):

  accuracy-vs-gflops       Table 10 style: Top-1 vs GFLOPs × views, the paper's SOTA points + ours
  ablation-table{3,4,5,6,9} paper vs ours Top-1, side by side, per row
  training/<id>            loss, learning rate and validation Top-1 per epoch (history.json)
  views/<id>-<protocol>    Top-1 vs number of clips (1..N) × 1 or all crops, from saved logits

Every function draws what exists and says what does not (a figure is never skipped because an
experiment is missing). `write_figures` also writes `figures.json`, the list of figures with
captions, read by the HTML report.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm import tqdm  # noqa: E402

from smallbig.analysis.collect import DONE, ReportInputError, Results  # noqa: E402
from smallbig.analysis.report_tables import experiment_ids_in  # noqa: E402
from smallbig.engine import metrics as M  # noqa: E402
from smallbig.fsutil import atomic_write, atomic_write_text  # noqa: E402

ABLATION_TABLES = (3, 4, 5, 6, 9)
PAPER_COLOR, OURS_COLOR, SOTA_COLOR = "#d62728", "#1f77b4", "#7f7f7f"
plt.rcParams.update({"svg.hashsalt": "smallbig", "font.size": 9})


def save_figure(fig, stem: str | Path, dpi: int = 110) -> list[Path]:
    """Save a matplotlib figure as <stem>.png and <stem>.svg (atomically); closes it."""
    stem = Path(stem)
    out = []
    for ext in ("png", "svg"):
        out.append(
            atomic_write(
                stem.with_name(f"{stem.name}.{ext}"),
                lambda tmp, ext=ext: fig.savefig(
                    tmp,
                    format=ext,
                    dpi=dpi,
                    bbox_inches="tight",
                    metadata={"Date": None} if ext == "svg" else None,
                ),
                what=f"the {ext.upper()} figure",
            )
        )
    plt.close(fig)
    return out


def _short(banner: str | None) -> str:
    """A figure-title-sized version of the report banner."""
    if not banner:
        return ""
    return "\nEMBEDDED DEFAULT: not comparable to the paper" if "mbedded" in banner else f"\n{banner[:80]}"


def _entry(stem: Path, root: Path, caption: str, category: str) -> dict:
    rel = stem.relative_to(root).as_posix()
    return {"png": f"{rel}.png", "svg": f"{rel}.svg", "caption": caption, "category": category}


def _table(built: list[dict], number: int) -> dict | None:
    return next((t for t in built if t["number"] == number), None)


# ---------------------------------------------------------------------------- Table 10 plot
def accuracy_vs_gflops(built: list[dict], out_dir: Path, banner: str | None = None) -> dict:
    t = _table(built, 10)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    n_ours = 0
    missing = []
    for r in t["rows"] if t else []:
        raw, row = r["raw"], r["row"]
        name = f"{row['label']} {row.get('backbone', '')}".strip()
        if row.get("input"):
            name += f" ({row['input'].split(',')[0]}f)"
        px, py = raw.get("paper_gflops_x_views"), raw.get("paper_top1")
        smallbig = r["kind"] != "external"
        if px is not None and py is not None:
            ax.scatter(
                px,
                py,
                s=36 if smallbig else 22,
                marker="*" if smallbig else "o",
                color=PAPER_COLOR if smallbig else SOTA_COLOR,
                zorder=3,
                label=("SmallBig (paper)" if smallbig else "other methods (paper)"),
            )
            ax.annotate(
                name,
                (px, py),
                fontsize=6.5,
                xytext=(3, 3),
                textcoords="offset points",
                color=PAPER_COLOR if smallbig else "#555",
            )
        if smallbig:
            ox, oy = raw.get("ours_gflops_x_views"), raw.get("ours_top1")
            if oy is not None:
                x = ox if ox is not None else px
                if x is not None:
                    ax.scatter(
                        x,
                        oy,
                        s=60,
                        marker="D",
                        color=OURS_COLOR,
                        zorder=4,
                        label="SmallBig (ours)" if ox is not None else "ours (x = paper's cost)",
                    )
                    ax.annotate(
                        f"{name}: {oy:.1f}",
                        (x, oy),
                        fontsize=7,
                        xytext=(4, -10),
                        textcoords="offset points",
                        color=OURS_COLOR,
                    )
                    if px is not None and py is not None:
                        ax.plot([px, x], [py, oy], ls=":", color=OURS_COLOR, lw=0.8)
                    n_ours += 1
            else:
                missing.append(f"{name}: {r['status']}")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs × views (log scale)")
    ax.set_ylabel("Kinetics-400 Top-1 (%)")
    title = "Accuracy vs inference cost (Table 10)"
    ax.set_title(title + _short(banner), fontsize=9)
    if missing:
        fig.text(
            0.01,
            -0.02,
            "not plotted (ours): " + "; ".join(missing),
            fontsize=7,
            va="top",
            color="#444",
            wrap=True,
        )
    ax.grid(alpha=0.3, which="both")
    stem = out_dir / "summary" / "accuracy-vs-gflops"
    save_figure(fig, stem)
    return _entry(
        stem,
        out_dir,
        f"Top-1 vs GFLOPs × views, Table 10 style: the paper's points and ours ({n_ours} reproduced).",
        "Accuracy vs cost",
    )


# ---------------------------------------------------------------------------- ablations
def ablation(built: list[dict], number: int, out_dir: Path, banner: str | None = None) -> dict | None:
    t = _table(built, number)
    if t is None:
        return None
    rows = t["rows"]
    labels = [r["row"]["label"] for r in rows]
    paper = [r["raw"].get("paper_top1") for r in rows]
    ours = [r["raw"].get("ours_top1") for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.4))
    h = 0.38
    ax.barh(
        y - h / 2, [p if p is not None else 0 for p in paper], h, color=PAPER_COLOR, alpha=0.8, label="paper"
    )
    ax.barh(
        y + h / 2, [o if o is not None else 0 for o in ours], h, color=OURS_COLOR, alpha=0.8, label="ours"
    )
    vals = [v for v in paper + ours if v is not None]
    lo = max(0.0, min(vals) - 5) if vals else 0
    hi = max(vals) + 4 if vals else 100
    for i, r in enumerate(rows):
        if paper[i] is not None:
            ax.text(paper[i], y[i] - h / 2, f" {paper[i]:.1f}", va="center", fontsize=7)
        if ours[i] is not None:
            ax.text(ours[i], y[i] + h / 2, f" {ours[i]:.1f}", va="center", fontsize=7)
        else:
            ax.text(
                lo,
                y[i] + h / 2,
                f"  ours: {r['status']}",
                va="center",
                fontsize=7,
                color="#555",
                style="italic",
            )
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlim(lo, hi)
    ax.set_xlabel("Top-1 (%)")
    ax.set_title(f"Table {number}: {t['title']}" + _short(banner), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    stem = out_dir / "summary" / f"ablation-table{number}"
    save_figure(fig, stem)
    done = sum(o is not None for o in ours)
    return _entry(
        stem,
        out_dir,
        f"Table {number} ablation, paper vs ours Top-1 ({done}/{len(rows)} rows reproduced).",
        "Ablations",
    )


# ---------------------------------------------------------------------------- training curves
def training_curves(results: Results, exp_id: str, out_dir: Path) -> dict | None:
    hist = results.experiment(exp_id)["history"]
    if not hist:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, key, title in zip(
        axes, ("loss", "lr", "val_top1"), ("training loss", "learning rate", "validation Top-1 (%)")
    ):
        pts = [(e["epoch"], e.get(key)) for e in hist if isinstance(e.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3)
        else:
            ax.text(
                0.5, 0.5, f"no {key} recorded", ha="center", va="center", transform=ax.transAxes, color="#666"
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{exp_id} ({results.run})", fontsize=10)
    fig.tight_layout()
    stem = out_dir / "training" / exp_id
    save_figure(fig, stem)
    return _entry(
        stem,
        out_dir,
        f"Training curves of {exp_id}: loss, LR and validation Top-1 per epoch ({len(hist)} epochs).",
        "Training curves",
    )


# ---------------------------------------------------------------------------- views vs accuracy
def views_curve(scores: dict) -> dict:
    """{crops: [(clips, top1), ...]} for clips 1..N and crops 1 / all, from saved logits."""
    n_clips = int(scores.get("num_clips", scores["clip_idx"].max() + 1))
    n_crops = int(scores.get("num_crops", scores["crop_idx"].max() + 1))
    out = {}
    for crops in sorted({1, n_crops}):
        out[crops] = [
            (c, M.subset_metrics(scores, clips=c, crops=crops)["top1"]) for c in range(1, n_clips + 1)
        ]
    return out


def views_vs_accuracy(results: Results, exp_id: str, protocol: str, out_dir: Path) -> dict | None:
    try:
        scores = results.scores(exp_id, protocol)
    except (FileNotFoundError, ReportInputError):
        return None
    if scores["logits"].shape[1] < 2 or len(scores["labels"]) == 0:
        return None
    curve = views_curve(scores)
    fig, ax = plt.subplots(figsize=(5, 3.3))
    for crops, pts in curve.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=f"{crops} crop{'s' if crops > 1 else ''}")
    ax.set_xlabel("clips per video")
    ax.set_ylabel("Top-1 (%)")
    ax.set_xticks(range(1, max(len(p) for p in curve.values()) + 1))
    ax.set_title(
        f"{exp_id}: views vs accuracy (saved {protocol} logits, {len(scores['labels'])} videos)", fontsize=8.5
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    stem = out_dir / "views" / f"{exp_id}-{protocol}"
    save_figure(fig, stem)
    return _entry(
        stem,
        out_dir,
        f"Views vs accuracy of {exp_id}: 1..N clips × 1 or "
        f"all crops, from the saved {protocol} per-view logits.",
        "Views vs accuracy",
    )


# ---------------------------------------------------------------------------- all
def _eval_protocols(results: Results, exp_id: str) -> list[str]:
    d = results.dir / exp_id
    if not d.is_dir():
        return []
    return sorted(p.name[len("eval-") :] for p in d.glob("eval-*") if (p / "scores.npz").is_file())


def write_figures(
    built: list[dict], results: Results, out_dir: str | Path, banner: str | None = None
) -> list[dict]:
    """All figures; returns the manifest (also written to <out_dir>/figures.json)."""
    out = Path(out_dir)
    for sub in ("summary", "training", "views"):  # always there (Snakemake directory() outputs)
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest = [accuracy_vs_gflops(built, out, banner)]
    manifest += [e for n in ABLATION_TABLES if (e := ablation(built, n, out, banner))]
    ids = experiment_ids_in(built)
    for exp_id in tqdm(ids, desc="figures", unit="exp", leave=False):
        e = training_curves(results, exp_id, out)
        if e:
            manifest.append(e)
        for proto in _eval_protocols(results, exp_id):
            if results.evaluation(exp_id, proto)["status"] == DONE:
                e = views_vs_accuracy(results, exp_id, proto, out)
                if e:
                    manifest.append(e)
    atomic_write_text(out / "figures.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
