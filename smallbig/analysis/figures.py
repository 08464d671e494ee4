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
import matplotlib.lines  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
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


DPI = 110
# the smallest text of a figure, in pixels of its PNG: figures.json records it per figure
# (`min_font_px`) and `smallbig report check` fails a figure whose smallest text the page shows
# below smallbig.analysis.browser.MIN_FONT_PX
MIN_FONT_PT = 9.0


def min_font_px(fig, dpi: int = DPI, draw: bool = True) -> float:
    """Pixel height (at `dpi`) of the smallest visible, non-empty text of a figure (drawn first,
    so tick labels exist; `draw=False` when it has just been saved)."""
    if draw:
        fig.canvas.draw()
    sizes = [
        t.get_fontsize()
        for t in fig.findobj(matplotlib.text.Text)
        if t.get_visible() and t.get_text().strip()
    ]
    return round(min(sizes) * dpi / 72.0, 2) if sizes else 0.0


def save_figure(fig, stem: str | Path, dpi: int = DPI, close: bool = True) -> list[Path]:
    """Save a matplotlib figure as <stem>.png and <stem>.svg (atomically); closes it unless
    `close` is false."""
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
    if close:
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


def _save(fig, stem: Path, root: Path, caption: str, category: str, wide: bool = False) -> dict:
    """Save the figure and return its figures.json entry: with `min_font_px` (its smallest
    text, measured on the saved drawing) and `wide` (the page shows it across the width)."""
    save_figure(fig, stem, close=False)
    entry = _entry(stem, root, caption, category)
    entry["min_font_px"] = min_font_px(fig, draw=False)
    if wide:
        entry["wide"] = True
    plt.close(fig)
    return entry


def _table(built: list[dict], number: int) -> dict | None:
    return next((t for t in built if t["number"] == number), None)


def _yerr(raw: dict) -> tuple[float, float] | None:
    """(below, above) our mean: the row's interval (None without one)."""
    lo, hi, mean = raw.get("ours_top1_lo"), raw.get("ours_top1_hi"), raw.get("ours_top1")
    if lo is None or hi is None or mean is None:
        return None
    return max(0.0, mean - lo), max(0.0, hi - mean)


def _interval_text(raw: dict) -> str:
    if raw.get("interval") == "seeds":
        return f" ± {raw['ours_top1_std']:.1f} ({raw['ours_n']} seeds)"
    if raw.get("interval") == "bootstrap" and raw.get("ours_top1_lo") is not None:
        return f" [{raw['ours_top1_lo']:.1f}, {raw['ours_top1_hi']:.1f}]"
    return ""


# ---------------------------------------------------------------------------- Table 10 plot
SMALLBIG_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
SOTA_MARKERS = "osv^<>pDhX*P"


def _sota_family(label: str) -> str:
    return label.split(" (")[0].strip()


def accuracy_vs_gflops(built: list[dict], out_dir: Path, banner: str | None = None) -> dict:
    """Top-1 vs GFLOPs × views (log x). Other methods (the paper's Table 10): grey, one marker
    per method, named in the legend. Each SmallBig row: its own colour, the paper's number a star,
    ours a diamond with its interval as an error bar, a dotted line from one to the other; the
    legend gives both numbers. No text inside the axes, so nothing overlaps."""
    t = _table(built, 10)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    families: dict[str, str] = {}
    n_ours, missing, sb = 0, [], 0
    for r in t["rows"] if t else []:
        raw, row = r["raw"], r["row"]
        px, py = raw.get("paper_gflops_x_views"), raw.get("paper_top1")
        name = f"{row['label']} {row.get('backbone', '')}".strip().removeprefix("SmallBig ")
        if row.get("input"):
            name += f" {row['input'].split(',')[0]}f"
        if r["kind"] == "external":
            if px is None or py is None:
                continue
            fam = _sota_family(row["label"])
            marker = families.setdefault(fam, SOTA_MARKERS[len(families) % len(SOTA_MARKERS)])
            ax.scatter(
                px, py, s=40, marker=marker, color=SOTA_COLOR, alpha=0.8, zorder=3, label=f"{fam} (paper)"
            )
            continue
        color = SMALLBIG_COLORS[sb % len(SMALLBIG_COLORS)]
        sb += 1
        ox, oy = raw.get("ours_gflops_x_views"), raw.get("ours_top1")
        x = ox if ox is not None else px
        paper_txt = f"paper {py:.1f}" if py is not None else "paper N/A"
        ours_txt = f"ours {oy:.1f}{_interval_text(raw)}" if oy is not None else f"ours: {r['status']}"
        if ox is None and oy is not None:
            ours_txt += " (x: the paper's cost)"
        label = f"SmallBig {name}: {paper_txt}, {ours_txt}"
        if px is not None and py is not None:
            ax.scatter(px, py, s=140, marker="*", color=color, edgecolor="black", linewidth=0.5, zorder=4)
        if oy is not None and x is not None:
            err = _yerr(raw)
            ax.errorbar(
                x,
                oy,
                yerr=None if err is None else [[err[0]], [err[1]]],
                fmt="D",
                ms=8,
                color=color,
                mec="black",
                mew=0.5,
                capsize=4,
                zorder=5,
            )
            if px is not None and py is not None:
                ax.plot([px, x], [py, oy], ls=":", color=color, lw=1.2, zorder=2)
            n_ours += 1
        else:
            missing.append(name)
        ax.scatter([], [], s=80, marker="D", color=color, label=label)  # legend entry
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ours_keys = [k for k in uniq if not k.endswith("(paper)")]
    other_keys = [k for k in uniq if k.endswith("(paper)")]
    if other_keys:  # other methods: a compact legend on the right
        ax.legend(
            [uniq[k] for k in other_keys],
            [k.removesuffix(" (paper)") for k in other_keys],
            fontsize=MIN_FONT_PT,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            title="other methods\n(the paper's Table 10)",
            title_fontsize=MIN_FONT_PT,
            frameon=False,
        )
    if ours_keys:  # the SmallBig rows and their numbers: below the plot
        fig.legend(
            [uniq[k] for k in ours_keys],
            ours_keys,
            fontsize=MIN_FONT_PT,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            title="★ the paper's number, ◆ ours (bar: its interval), dotted: paper → ours",
            title_fontsize=MIN_FONT_PT,
            frameon=False,
        )
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs × views (log scale)", fontsize=10)
    ax.set_ylabel("Kinetics-400 Top-1 (%)", fontsize=10)
    ax.tick_params(labelsize=MIN_FONT_PT)
    ax.set_title("Accuracy vs inference cost (Table 10)" + _short(banner), fontsize=11)
    ax.grid(alpha=0.3, which="both")
    stem = out_dir / "summary" / "accuracy-vs-gflops"
    caption = (
        f"Top-1 vs GFLOPs × views, Table 10 style: the paper's SmallBig rows (stars) and ours "
        f"(diamonds with their interval; {n_ours} of {sb} rows have a result); other methods as "
        "the paper reports them."
    )
    return _save(fig, stem, out_dir, caption, "Accuracy vs cost", wide=True)


# ---------------------------------------------------------------------------- ablations
VERDICT_COLORS = {
    "reproduced": "#1a7f37",
    "not reproduced": "#b42318",
    "inconclusive": "#9a6700",
    "not comparable": "#555555",
}


def ablation(built: list[dict], number: int, out_dir: Path, banner: str | None = None) -> dict | None:
    """One row per table row: the paper's number (red tick) inside its tolerance band (the
    verdict's paper ± tolerance, shaded), ours (blue dot) with its interval; on the right our
    number and the row's verdict."""
    t = _table(built, number)
    if t is None:
        return None
    rows = t["rows"]
    tol = t.get("tolerance", 0.5)
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(rows) + 1.6))
    vals: list[float] = []
    for i, r in enumerate(rows):
        raw = r["raw"]
        p, o = raw.get("paper_top1"), raw.get("ours_top1")
        if p is not None:
            ax.fill_betweenx([i - 0.32, i + 0.32], p - tol, p + tol, color=PAPER_COLOR, alpha=0.18, lw=0)
            ax.plot([p, p], [i - 0.32, i + 0.32], color=PAPER_COLOR, lw=2.2)
            vals += [p - tol, p + tol]
        if o is not None:
            err = _yerr(raw)
            ax.errorbar(
                o,
                i,
                xerr=None if err is None else [[err[0]], [err[1]]],
                fmt="o",
                ms=6,
                color=OURS_COLOR,
                capsize=4,
                zorder=4,
            )
            vals += [o - (err[0] if err else 0), o + (err[1] if err else 0)]
    lo = min(vals) - 1 if vals else 0.0
    hi = max(vals) + 1 if vals else 100.0
    ax.set_xlim(lo, hi)
    for i, r in enumerate(rows):
        raw = r["raw"]
        if raw.get("ours_top1") is not None:
            text = f"{raw['ours_top1']:.1f}{_interval_text(raw)}"
            verdict = r.get("verdict") or r["status"]
        else:
            text, verdict = "—", f"ours: {r['status']}"
        ax.annotate(
            f"{text}  {verdict}",
            (1.01, i),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=MIN_FONT_PT,
            color=VERDICT_COLORS.get(verdict, "#444"),
        )
    ax.set_yticks(y, [r["row"]["label"] for r in rows], fontsize=MIN_FONT_PT)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("Top-1 (%)", fontsize=10)
    ax.tick_params(axis="x", labelsize=MIN_FONT_PT)
    ax.set_title(f"Table {number}: {t['title']}" + _short(banner), fontsize=10)
    handles = [
        matplotlib.patches.Patch(color=PAPER_COLOR, alpha=0.3, label=f"paper ± {tol:g} (tolerance)"),
        matplotlib.lines.Line2D([], [], color=OURS_COLOR, marker="o", label="ours, with its interval"),
    ]
    ax.legend(handles=handles, fontsize=MIN_FONT_PT, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax.grid(axis="x", alpha=0.3)
    stem = out_dir / "summary" / f"ablation-table{number}"
    done = sum(r["raw"].get("ours_top1") is not None for r in rows)
    caption = (
        f"Table {number}, paper vs ours Top-1 ({done}/{len(rows)} rows have a result): "
        f"the paper's number in its ±{tol:g} tolerance band, ours with its interval, the verdict on the right."
    )
    return _save(fig, stem, out_dir, caption, "Ablations", wide=True)


# ---------------------------------------------------------------------------- training curves
def training_curves(results: Results, exp_id: str, out_dir: Path) -> dict | None:
    """Loss, LR and validation Top-1 per epoch; one line per seed replicate."""
    hists = [(k, results.experiment(exp_id, k)["history"]) for k in results.experiment_seeds([exp_id])]
    hists = [(k, h) for k, h in hists if h]
    if not hists:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(7.8, 2.7))
    for ax, key, title in zip(
        axes, ("loss", "lr", "val_top1"), ("training loss", "learning rate", "validation Top-1 (%)")
    ):
        drawn = False
        for k, hist in hists:
            pts = [(e["epoch"], e.get(key)) for e in hist if isinstance(e.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, lw=1.2, label=f"seed {k}")
                drawn = True
        if not drawn:
            ax.text(
                0.5,
                0.5,
                f"no {key} recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#666",
                fontsize=MIN_FONT_PT,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=MIN_FONT_PT)
        ax.tick_params(labelsize=MIN_FONT_PT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.grid(alpha=0.3)
    if len(hists) > 1:
        axes[-1].legend(fontsize=MIN_FONT_PT)
    fig.suptitle(f"{exp_id} ({results.run})", fontsize=10)
    fig.tight_layout()
    stem = out_dir / "training" / exp_id
    epochs = max(len(h) for _, h in hists)
    seeds = f", {len(hists)} seeds" if len(hists) > 1 else ""
    return _save(
        fig,
        stem,
        out_dir,
        f"Training curves of {exp_id}: loss, LR and validation Top-1 per epoch ({epochs} epochs{seeds}).",
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
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for crops, pts in curve.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=f"{crops} crop{'s' if crops > 1 else ''}")
    ax.set_xlabel("clips per video", fontsize=MIN_FONT_PT)
    ax.set_ylabel("Top-1 (%)", fontsize=MIN_FONT_PT)
    ax.set_xticks(range(1, max(len(p) for p in curve.values()) + 1))
    ax.tick_params(labelsize=MIN_FONT_PT)
    ax.set_title(
        f"{exp_id}: views vs accuracy\n(saved {protocol} logits, {len(scores['labels'])} videos)", fontsize=10
    )
    ax.legend(fontsize=MIN_FONT_PT)
    ax.grid(alpha=0.3)
    stem = out_dir / "views" / f"{exp_id}-{protocol}"
    return _save(
        fig,
        stem,
        out_dir,
        f"Views vs accuracy of {exp_id}: 1..N clips × 1 or "
        f"all crops, from the saved {protocol} per-view logits (seed 0).",
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
