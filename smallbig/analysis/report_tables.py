"""Tables 2-11, paper vs ours: cells from params/tables.yaml + results/<run>/, rendered as
Markdown, CSV, LaTeX (booktabs) and HTML under reports/tables/.

Each row: the paper's Top-1/Top-5 (and Params/GFLOPs where it gives them), ours (the mean over
seeds), its interval (± std over seeds, or with one seed a bootstrap interval over validation
videos), Δ = ours − paper, a verdict (reproduced / not reproduced / inconclusive / not
comparable, smallbig/analysis/verdicts.py), the views used, GFLOPs × views, a status (not run /
running / done / failed; "reported" for other papers' rows) and notes (footnotes: the
experiment's `notes:`, the row's own note, and a note wherever our Params/GFLOPs differ from the
paper's). Under each table: a summary of its verdicts and the paper's ordering claims checked on
our numbers (held / not held / inconclusive). `write_verdicts` writes reports/verdicts.json.

Our Params/GFLOPs are `smallbig model-info` of the configuration the run used (the workflow's
results/<run>/model-info/<id>.json from results/<run>/<id>/params.yaml; for the full run that is
the paper-size params/experiments/<id>.yaml), GFLOPs = multiply-accumulates per 224² view as the
paper counts them; GFLOPs × views = that × the views of the row's protocol.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from smallbig.analysis import verdicts as V
from smallbig.analysis.collect import DONE, FAILED, NOT_RUN, RUNNING, Results
from smallbig.analysis.templates import markup, render, tex_escape  # noqa: F401 (tex_escape: API)
from smallbig.config import ParamsError, experiment_path
from smallbig.fsutil import atomic_write_text
from smallbig.spec import params as spec_params
from smallbig.spec.protocol import Protocol
from smallbig.spec.tables import DEFAULT_BOOTSTRAP, DEFAULT_TOLERANCE

EXTERNAL_MARK = "†"
REPORTED = "reported"

# (key, header); `always` columns are kept even when empty
COLUMNS = [
    ("label", "Model / setting"),
    ("backbone", "Backbone"),
    ("input", "Frames, size"),
    ("dataset", "Dataset"),
    ("section", "Test"),
    ("source", "Our run"),
    ("paper_top1", "Top-1 paper"),
    ("ours_top1", "Top-1 ours"),
    ("ours_top1_ci", "Top-1 ours interval"),
    ("delta_top1", "Δ Top-1"),
    ("verdict", "Verdict"),
    ("paper_top5", "Top-5 paper"),
    ("ours_top5", "Top-5 ours"),
    ("delta_top5", "Δ Top-5"),
    ("paper_params_m", "Params (M) paper"),
    ("ours_params_m", "Params (M) ours"),
    ("paper_gflops", "GFLOPs paper"),
    ("ours_gflops", "GFLOPs ours"),
    ("views", "Views"),
    ("paper_gflops_x_views", "GFLOPs×views paper"),
    ("ours_gflops_x_views", "GFLOPs×views ours"),
    ("status", "Status"),
    ("notes", "Notes"),
]
ALWAYS = {
    "label",
    "paper_top1",
    "ours_top1",
    "ours_top1_ci",
    "delta_top1",
    "verdict",
    "paper_top5",
    "ours_top5",
    "delta_top5",
    "views",
    "paper_gflops_x_views",
    "ours_gflops_x_views",
    "status",
    "notes",
}
DATASET_NAMES = {"kinetics400": "K400", "sthv1": "SS-V1", "sthv2": "SS-V2"}


# ---------------------------------------------------------------------------- formatting
def fmt_num(v: Any, digits: int | None = None) -> str:
    """Numbers as the paper writes them: ints stay ints, floats keep their decimals (>= 1)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if digits is not None:
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return str(v)
    s = f"{v:.2f}"
    return s[:-1] if s.endswith("0") else s


def fmt_delta(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None:
        return ""
    d = round(ours - paper, 1)
    return "±0.0" if d == 0 else f"{d:+.1f}"


def fmt_g(v: float) -> str:
    """Our GFLOPs: one decimal (as 31.5 next to the paper's 31), two below 10 (scaled-down models)."""
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def fmt_gxv(total: float | None, per_view: float | None, views: int | None) -> str:
    """'1710 = 57×30' (or just the total / the per-view figure when the other is missing)."""
    if total is not None and per_view is not None and views:
        head = fmt_num(round(total)) if abs(total) >= 100 else fmt_g(total)
        return f"{head} = {per_view if isinstance(per_view, str) else fmt_num(per_view)}×{views}"
    if total is not None:
        return fmt_num(total)
    if per_view is not None:
        return f"{fmt_num(per_view)}×N/A"
    return ""


@functools.cache
def _experiment_notes(exp_id: str) -> tuple[str, ...]:
    """The `notes:` of params/experiments/<id>.yaml (typed params)."""
    try:
        return spec_params.load(experiment_path(exp_id)).notes
    except (ParamsError, OSError):
        return ()


def _differs(ours: float, paper: float) -> bool:
    """Beyond 1% and beyond the rounding of the paper's figure."""
    decimals = 0 if float(paper).is_integer() else len(repr(float(paper)).split(".")[1])
    return abs(ours - paper) > max(0.01 * abs(paper), 0.5 * 10**-decimals)


# ---------------------------------------------------------------------------- building
def _replicates(row: dict, results: Results) -> list[tuple[int, dict]]:
    """(seed replicate, evaluation or ensemble result) of every replicate of a row."""
    proto = row["protocol"]
    seeds = results.experiment_seeds(row["members"])
    if row["kind"] == "experiment":
        return [(k, results.evaluation(row["experiment"], proto, k)) for k in seeds]
    return [(k, results.ensemble(row["name"], row["ensemble"], proto, k)) for k in seeds]


def _combined_status(reps: list[tuple[int, dict]]) -> tuple[str, str]:
    """A row's status over its seeds: done when every seed is, failed when any failed, running
    while some are done or running, else not run (one seed: that seed's)."""
    if len(reps) == 1:
        return reps[0][1]["status"], reps[0][1].get("detail", "")
    statuses = [ev["status"] for _, ev in reps]
    done = statuses.count(DONE)
    if done == len(reps):
        return DONE, "; ".join(f"seed {k}: {ev['detail']}" for k, ev in reps if ev.get("detail"))
    failed = [f"seed {k}: {ev['detail']}" for k, ev in reps if ev["status"] == FAILED]
    if failed:
        return FAILED, "; ".join(failed)
    if any(st in (RUNNING, DONE) for st in statuses):
        waiting = [f"seed {k}: {ev.get('detail') or ev['status']}" for k, ev in reps if ev["status"] != DONE]
        return RUNNING, f"{done} of {len(reps)} seeds done; " + "; ".join(waiting)
    return NOT_RUN, ""


def build_row(
    row: dict,
    results: Results,
    model_info_dirs=None,
    compute_model_info=False,
    size_notes: bool = True,
    bootstrap: dict | None = None,
) -> dict:
    """Cells of one row (raw numbers under `raw`, display strings under the column keys);
    `estimate`: our Top-1 with its interval (verdicts.Estimate; another paper's number for an
    external row), `replicates`: the seeds behind it."""
    paper = row["paper"]
    raw: dict[str, Any] = {
        k: paper.get(k) for k in ("top1", "top5", "params_m", "gflops", "views", "gflops_x_views")
    }
    raw = {f"paper_{k}": v for k, v in raw.items()}
    notes: list[str] = []
    if row.get("note"):
        notes.append(row["note"])
    kind = row["kind"]
    ours: dict[str, Any] = {
        "top1": None,
        "top5": None,
        "params_m": None,
        "gflops": None,
        "views": None,
        "gflops_x_views": None,
    }
    detail = ""
    est: V.Estimate | None = None
    reps: list[tuple[int, dict]] = []
    done: list[tuple[int, dict]] = []
    if kind == "external":
        status = REPORTED
        source = "reported"
        if paper.get("top1") is not None:
            est = V.reported(float(paper["top1"]))
    else:
        proto = row["protocol"]
        ours["views"] = Protocol.parse(proto).views
        source = row["experiment"] if kind == "experiment" else "ensemble: " + " + ".join(row["ensemble"])
        reps = _replicates(row, results)
        status, detail = _combined_status(reps)
        done = [(k, ev) for k, ev in reps if ev["status"] == DONE and ev.get("top1") is not None]
        if done:
            top1s = [ev["top1"] for _, ev in done]
            top5s = [ev["top5"] for _, ev in done if ev.get("top5") is not None]
            ours["top1"] = sum(top1s) / len(top1s)
            ours["top5"] = sum(top5s) / len(top5s) if top5s else None
            est = V.estimate(top1s, done[0][1].get("num_videos"), bootstrap or DEFAULT_BOOTSTRAP)
            if done[0][1].get("views"):
                ours["views"] = done[0][1]["views"]
            for k, ev in done:
                if ev.get("skipped"):
                    who = f" (seed {k})" if len(reps) > 1 else ""
                    notes.append(
                        f"{ev['skipped']} validation video(s) could not be decoded and are not counted{who}."
                    )
        for exp_id in row["members"]:
            notes.extend(_experiment_notes(exp_id))
        # the embedded run (size_notes off) computes model info only for what it ran
        infos = [
            results.model_info(i, model_info_dirs, compute_model_info, paper_size=size_notes)
            for i in row["members"]
        ]
        errors = [i["error"] for i in infos if isinstance(i, dict) and "error" in i]
        notes.extend(errors)
        good = [i for i in infos if isinstance(i, dict) and "error" not in i]
        if len(good) == len(infos):
            try:
                ours["params_m"] = sum(float(i["params"]) for i in good) / 1e6
                ours["gflops"] = sum(float(i["gmacs_224"]) for i in good)
                ours["gflops_x_views"] = ours["gflops"] * ours["views"]
            except (KeyError, TypeError, ValueError) as e:
                notes.append(f"model-info of {source} lacks {e}")
                ours["params_m"] = ours["gflops"] = ours["gflops_x_views"] = None
        if size_notes and ours["params_m"] is not None and kind == "experiment":
            pp, pg = paper.get("params_m"), paper.get("gflops")
            if pp is not None and _differs(ours["params_m"], pp):
                notes.append(f"Params: ours {ours['params_m']:.2f}M vs the paper's {fmt_num(pp)}M.")
            if pg is not None and _differs(ours["gflops"], pg):
                notes.append(f"GFLOPs per view: ours {ours['gflops']:.1f} vs the paper's {fmt_num(pg)}.")
        if detail:
            notes.append(f"{status}: {detail}")
    raw.update({f"ours_{k}": v for k, v in ours.items()})
    mine = est if kind != "external" else None
    raw.update(
        {
            "ours_top1_std": mine.std if mine is not None else None,
            "ours_top1_lo": mine.lo if mine is not None else None,
            "ours_top1_hi": mine.hi if mine is not None else None,
            "ours_n": len(done) if kind != "external" else None,
            "ours_top1_seeds": [ev["top1"] for _, ev in done],
            "interval": mine.kind if mine is not None else None,
            "seeds": [k for k, _ in reps],
        }
    )
    raw["delta_top1"] = (
        round(ours["top1"] - paper["top1"], 4)
        if ours["top1"] is not None and paper.get("top1") is not None
        else None
    )
    raw["delta_top5"] = (
        round(ours["top5"] - paper["top5"], 4)
        if ours["top5"] is not None and paper.get("top5") is not None
        else None
    )
    views = ours["views"] if kind != "external" else paper.get("views")
    views_txt = ""
    if kind != "external":
        p = Protocol.parse(row["protocol"])
        views_txt = f"{views} ({p.clips}×{p.crops})"
    elif paper.get("views_text"):
        views_txt = paper["views_text"]
    elif views:
        views_txt = str(views)
    cells = {
        "label": row["label"] + (f" {EXTERNAL_MARK}" if kind == "external" else ""),
        "backbone": row.get("backbone", ""),
        "input": row.get("input", ""),
        "dataset": DATASET_NAMES.get(row.get("dataset"), row.get("dataset") or ""),
        "section": row.get("section", ""),
        "source": source,
        "paper_top1": fmt_num(paper.get("top1")),
        "ours_top1": fmt_num(ours["top1"], 1),
        "ours_top1_ci": V.fmt_interval(mine),
        "delta_top1": fmt_delta(ours["top1"], paper.get("top1")),
        "verdict": "",
        "paper_top5": fmt_num(paper.get("top5")),
        "ours_top5": fmt_num(ours["top5"], 1),
        "delta_top5": fmt_delta(ours["top5"], paper.get("top5")),
        "paper_params_m": fmt_num(paper.get("params_m")),
        "ours_params_m": fmt_num(ours["params_m"], 2) if ours["params_m"] is not None else "",
        "paper_gflops": fmt_num(paper.get("gflops")),
        "ours_gflops": fmt_g(ours["gflops"]) if ours["gflops"] is not None else "",
        "views": views_txt,
        "paper_gflops_x_views": fmt_gxv(paper.get("gflops_x_views"), paper.get("gflops"), paper.get("views"))
        if kind == "external" or paper.get("gflops_x_views") is not None
        else "",
        "ours_gflops_x_views": (
            fmt_gxv(ours["gflops_x_views"], fmt_g(ours["gflops"]), ours["views"])
            if ours["gflops_x_views"] is not None
            else ""
        ),
        "status": status,
    }
    return {
        "cells": cells,
        "raw": raw,
        "notes": notes,
        "status": status,
        "kind": kind,
        "detail": detail,
        "row": row,
        "estimate": est,
        "replicates": [k for k, _ in reps],
        "verdict": None,
    }


def _claims(table: dict, rows: list[dict], comparable: bool) -> list[dict]:
    """Each claim of the table checked on our numbers (verdicts.compare per pair)."""
    out = []
    for c in table.get("claims") or []:
        pairs = []
        for i, j in c["pairs"]:
            a, b = rows[i], rows[j]
            external = "external" in (a["kind"], b["kind"])
            ea = a["estimate"] if a["status"] in (DONE, REPORTED) else None
            eb = b["estimate"] if b["status"] in (DONE, REPORTED) else None
            result = V.NOT_COMPARABLE if external and not comparable else V.compare(ea, eb)
            pairs.append(
                {
                    "better": a["row"]["label"],
                    "worse": b["row"]["label"],
                    "result": result,
                    "numbers": V.fmt_claim_pair(ea, eb),
                    "missing": [r["row"]["label"] for r, e in ((a, ea), (b, eb)) if e is None],
                }
            )
        out.append(
            {
                "text": c["text"],
                "source": c.get("source", ""),
                "result": V.combine([p["result"] for p in pairs]),
                "pairs": pairs,
                "detail": "; ".join(
                    f"{p['better']} vs {p['worse']}: {p['numbers']}"
                    + (f" ({p['result']})" if len(pairs) > 1 else "")
                    for p in pairs
                ),
            }
        )
    return out


def _verdict_note(rows: list[dict], tolerance: float, bootstrap: dict, comparable: bool) -> str:
    kinds = {r["raw"].get("interval") for r in rows}
    seeds = sorted({r["raw"]["ours_n"] for r in rows if r["raw"].get("interval") == V.SEEDS})
    parts = []
    if V.SEEDS in kinds:
        parts.append(
            f"Top-1 ours = the mean over {'/'.join(map(str, seeds))} seeds; interval ± = their sample "
            "standard deviation."
        )
    if V.BOOTSTRAP in kinds:
        parts.append(
            f"[lo, hi] (bootstrap) = one seed: the {bootstrap['confidence'] * 100:g} % percentile "
            f"bootstrap interval over the validation videos ({bootstrap['resamples']} resamples, "
            f"seed {bootstrap['seed']})."
        )
    if comparable:
        parts.append(
            f"Verdict (tolerance ±{tolerance:g} Top-1): reproduced = the whole interval lies within "
            f"paper ± {tolerance:g}; not reproduced = it lies wholly outside; inconclusive = otherwise."
        )
    else:
        parts.append(
            "Verdict: not comparable — this run is scaled down (the embedded default or a "
            "rehearsal), its numbers are not the paper's; the claims below are still checked on "
            "its own numbers."
        )
    return " ".join(parts)


def build_table(
    table: dict,
    results: Results,
    model_info_dirs=None,
    compute_model_info=False,
    size_notes: bool = True,
    comparable: bool = True,
) -> dict:
    """One table's cells, verdicts and claims; `size_notes`: note where our Params/GFLOPs
    differ from the paper's (off for the embedded run, whose scaled-down models differ by
    design); `comparable`: False for a scaled-down run (every verdict "not comparable")."""
    tolerance = float(table.get("tolerance", DEFAULT_TOLERANCE))
    bootstrap = {**DEFAULT_BOOTSTRAP, **(table.get("bootstrap") or {})}
    rows = [
        build_row(r, results, model_info_dirs, compute_model_info, size_notes, bootstrap)
        for r in table["rows"]
    ]
    pending = 0
    for r in rows:
        if r["kind"] == "external" or r["row"]["paper"].get("top1") is None:
            continue
        if r["status"] == DONE:
            r["verdict"] = V.verdict(r["estimate"], r["row"]["paper"]["top1"], tolerance, comparable)
            r["cells"]["verdict"] = r["verdict"] or ""
        else:
            pending += 1
    verdict_counts = V.summary_counts([r["verdict"] for r in rows])
    claims = _claims(table, rows, comparable)
    footnotes: list[str] = []
    for r in rows:
        marks = []
        for n in r["notes"]:
            if n not in footnotes:
                footnotes.append(n)
            marks.append(footnotes.index(n) + 1)
        r["cells"]["notes"] = " ".join(f"[{m}]" for m in sorted(set(marks)))
    multi_ds = len({r["row"].get("dataset") for r in rows}) > 1
    present = [
        (k, h)
        for k, h in COLUMNS
        if k in ALWAYS
        or (k == "dataset" and multi_ds)
        or (k != "dataset" and any(r["cells"].get(k) for r in rows))
    ]
    counts = {
        s: sum(r["status"] == s for r in rows) for s in ("done", "running", "not run", "failed", REPORTED)
    }
    return {
        "number": table["number"],
        "title": table["title"],
        "dataset": table.get("dataset"),
        "rows": rows,
        "footnotes": footnotes,
        "columns": present,
        "counts": counts,
        "tolerance": tolerance,
        "comparable": comparable,
        "verdict_counts": verdict_counts,
        "verdict_line": V.summary_line(verdict_counts, pending),
        "verdict_note": _verdict_note(rows, tolerance, bootstrap, comparable),
        "claims": claims,
        "claim_counts": {c: sum(x["result"] == c for x in claims) for c in V.CLAIM_VERDICTS},
    }


def build_tables(
    tables: list[dict],
    results: Results,
    model_info_dirs=None,
    compute_model_info=False,
    size_notes: bool = True,
    comparable: bool = True,
) -> list[dict]:
    return [
        build_table(t, results, model_info_dirs, compute_model_info, size_notes, comparable)
        for t in tqdm(tables, desc="tables", unit="table", leave=False, disable=len(tables) < 2)
    ]


# ---------------------------------------------------------------------------- rendering
COLUMN_FOOTNOTE = (
    "Δ = ours − paper. Our Params/GFLOPs: `smallbig model-info` of the "
    "configuration this run used (results/<run>/<id>/params.yaml; the full run "
    "uses the paper-size params/experiments/<id>.yaml); GFLOPs = multiply-accumulates per "
    "224² view (the paper's convention; the 256² three-crop views cost ≈1.31×); "
    "GFLOPs×views = per view × the views of the row's test protocol. "
    f"{EXTERNAL_MARK} = another paper's result, as reported."
)
LEFT_ALIGNED = {"label", "backbone", "input", "dataset", "section", "source", "status", "notes", "views"}


def _caption(t: dict) -> str:
    return f"Table {t['number']}: {t['title']}"


def render_markdown(t: dict, banner: str | None = None) -> str:
    return render(
        "table.md",
        caption=_caption(t),
        banner=banner,
        colnote=COLUMN_FOOTNOTE,
        verdict_note=t["verdict_note"],
        verdict_line=t["verdict_line"],
        claims=t["claims"],
        headers=[h for _, h in t["columns"]],
        footnotes=t["footnotes"],
        rows=[[r["cells"].get(k, "") for k, _ in t["columns"]] for r in t["rows"]],
    )


CSV_FIELDS = [
    "table",
    "row",
    "label",
    "kind",
    "experiment",
    "ensemble",
    "protocol",
    "dataset",
    "section",
    "backbone",
    "input",
    "paper_top1",
    "ours_top1",
    "ours_top1_std",
    "ours_top1_lo",
    "ours_top1_hi",
    "ours_n",
    "interval",
    "delta_top1",
    "verdict",
    "tolerance",
    "paper_top5",
    "ours_top5",
    "delta_top5",
    "paper_params_m",
    "ours_params_m",
    "paper_gflops",
    "ours_gflops",
    "paper_views",
    "ours_views",
    "paper_gflops_x_views",
    "ours_gflops_x_views",
    "status",
    "detail",
    "notes",
]


def render_csv(t: dict) -> str:
    """One line per row, raw numbers (empty where there is none)."""
    records = []
    for i, r in enumerate(t["rows"], 1):
        row = r["row"]
        rec = {
            "table": t["number"],
            "row": i,
            "label": row["label"],
            "kind": r["kind"],
            "experiment": row.get("experiment", ""),
            "ensemble": "+".join(row.get("ensemble", [])),
            "protocol": row.get("protocol", ""),
            "dataset": row.get("dataset", ""),
            "section": row.get("section", ""),
            "backbone": row.get("backbone", ""),
            "input": row.get("input", ""),
            "status": r["status"],
            "detail": r["detail"],
            "notes": " | ".join(r["notes"]),
            "verdict": r["verdict"] or "",
            "tolerance": t["tolerance"] if r["kind"] != "external" else "",
        }
        rec.update({k: ("" if v is None else v) for k, v in r["raw"].items() if k in CSV_FIELDS})
        records.append(rec)
    return (
        pd.DataFrame.from_records(records, columns=CSV_FIELDS)
        .fillna("")
        .to_csv(index=False, lineterminator="\n")
    )


def render_latex(t: dict, banner: str | None = None) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); notes as numbered lines below, a
    \\midrule between the table's sections."""
    cols = [(k, h) for k, h in t["columns"] if k != "notes"] + [("notes", "Notes")]
    sections = [r["row"].get("section") for r in t["rows"]]
    rows = [
        {
            "cells": [r["cells"].get(k, "") for k, _ in cols],
            "new_section": i > 0 and sections[i] != sections[i - 1],
        }
        for i, r in enumerate(t["rows"])
    ]
    return render(
        "table.tex",
        number=t["number"],
        caption=_caption(t),
        banner=banner,
        align="".join("l" if k in LEFT_ALIGNED else "r" for k, _ in cols),
        headers=[h for _, h in cols],
        rows=rows,
        colnote=COLUMN_FOOTNOTE,
        verdict_note=t["verdict_note"],
        verdict_line=t["verdict_line"],
        claims=t["claims"],
        footnotes=t["footnotes"],
    )


def render_html_table(t: dict) -> str:
    """An HTML fragment: caption, table, notes (class names used by the report's CSS)."""
    return render("table.html", t=t, caption=_caption(t), colnote=COLUMN_FOOTNOTE)


def render_html_page(t: dict, banner: str | None = None) -> str:
    return render("table-page.html", t=t, caption=_caption(t), colnote=COLUMN_FOOTNOTE, banner=banner)


def render_html_fragment(t: dict):
    """The table fragment, marked safe for embedding in index.html."""
    return markup(render_html_table(t))


def table_files(number: int) -> dict[str, str]:
    return {ext: f"table{number}.{ext}" for ext in ("md", "csv", "tex", "html")}


def experiment_ids_in(built: list[dict]) -> list[str]:
    """Experiment ids of the built tables' rows (ensemble members too), in order of first use."""
    return list(dict.fromkeys(i for t in built for r in t["rows"] for i in r["row"].get("members", [])))


def write_tables(
    built: list[dict], out_dir: str | Path, banner: str | None = None, index: bool = True
) -> list[Path]:
    """reports/tables/table<N>.{md,csv,tex,html} for each built table, plus (when `index`)
    all.md and summary.json of all of them. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in built:
        files = table_files(t["number"])
        for ext, text in (
            ("md", render_markdown(t, banner)),
            ("csv", render_csv(t)),
            ("tex", render_latex(t, banner)),
            ("html", render_html_page(t, banner)),
        ):
            written.append(atomic_write_text(out / files[ext], text))
    if index:
        head = ["# SmallBigNet reproduction: Tables 2–11, paper vs ours", ""]
        if banner:
            head += [f"> **{banner}**", ""]
        md = [part for t in built for part in (render_markdown(t), "")]
        written.append(atomic_write_text(out / "all.md", "\n".join(head + md)))
        summary = [
            {
                "number": t["number"],
                "title": t["title"],
                "counts": t["counts"],
                "files": table_files(t["number"]),
                "tolerance": t["tolerance"],
                "comparable": t["comparable"],
                "verdict_counts": t["verdict_counts"],
                "verdict_line": t["verdict_line"],
                "claims": t["claims"],
                "rows": [
                    {
                        "label": r["row"]["label"],
                        "kind": r["kind"],
                        "status": r["status"],
                        "detail": r["detail"],
                        "verdict": r["verdict"],
                        **r["raw"],
                        "cells": r["cells"],
                    }
                    for r in t["rows"]
                ],
                "footnotes": t["footnotes"],
            }
            for t in built
        ]
        written.append(
            atomic_write_text(
                out / "summary.json",
                json.dumps({"banner": banner, "tables": summary}, indent=1, ensure_ascii=False, default=str),
            )
        )
    return written


# ---------------------------------------------------------------------------- verdicts.json
def verdict_records(built: list[dict], results: Results) -> dict:
    """reports/verdicts.json: one record per row with a verdict (our rows that have a complete
    result and a paper number), and every claim. `runs`: per seed replicate the training seed
    and the MLflow run ids of its training and evaluation (None where unknown; an ensemble row
    lists them per member under `members`)."""
    rows = []
    for t in built:
        for r in t["rows"]:
            if r["verdict"] is None:
                continue
            row = r["row"]
            proto = row["protocol"]
            rec: dict[str, Any] = {
                "table": f"table{t['number']}",
                "row": row["label"],
                "experiment": row.get("experiment"),
                "protocol": proto,
                "verdict": r["verdict"],
                "top1": r["raw"]["ours_top1"],
                "paper_top1": row["paper"].get("top1"),
                "interval": [r["raw"]["ours_top1_lo"], r["raw"]["ours_top1_hi"]],
                "interval_kind": r["raw"]["interval"],
                "std": r["raw"]["ours_top1_std"],
                "n": r["raw"]["ours_n"],
                "tolerance": t["tolerance"],
            }
            if r["kind"] == "experiment":
                rec["runs"] = [results.run_ids(row["experiment"], proto, k) for k in r["replicates"]]
            else:
                rec.update(ensemble=row["ensemble"], name=row["name"])
                rec["runs"] = [
                    {
                        "seed": k,
                        "train_run_id": None,
                        "eval_run_id": None,
                        "members": [
                            {"experiment": m, **results.run_ids(m, proto, k)} for m in row["ensemble"]
                        ],
                    }
                    for k in r["replicates"]
                ]
            rows.append(rec)
    claims = [{"table": f"table{t['number']}", **c, "pairs": c["pairs"]} for t in built for c in t["claims"]]
    comparable = all(t["comparable"] for t in built)
    return {"comparable": comparable, "rows": rows, "claims": claims}


def write_verdicts(built: list[dict], results: Results, path: str | Path) -> Path:
    return atomic_write_text(
        Path(path), json.dumps(verdict_records(built, results), indent=1, ensure_ascii=False, default=str)
    )
