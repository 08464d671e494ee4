"""Tables 2-11, paper vs ours: cells from params/tables.yaml + results/<run>/, rendered as
Markdown, CSV, LaTeX (booktabs) and HTML under reports/tables/.

Each row: the paper's Top-1/Top-5 (and Params/GFLOPs where it gives them), ours, Δ = ours − paper,
the views used, GFLOPs × views, a status (not run / running / done / failed; "reported" for
other papers' rows) and notes (footnotes: the experiment's `notes:`, the row's own note, and
a note wherever our Params/GFLOPs differ from the paper's).

Our Params/GFLOPs are `smallbig model-info` of the configuration the run used (the workflow's
results/<run>/model-info/<id>.json from results/<run>/<id>/params.yaml; for the full run that is
the paper-size params/experiments/<id>.yaml), GFLOPs = multiply-accumulates per 224² view as the
paper counts them; GFLOPs × views = that × the views of the row's protocol.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from smallbig.analysis.collect import DONE, Results, parse_protocol
from smallbig.config import EXPERIMENTS_DIR

EXTERNAL_MARK = "†"
REPORTED = "reported"

# (key, header); `always` columns are kept even when empty
COLUMNS = [
    ("label", "Model / setting"), ("backbone", "Backbone"), ("input", "Frames, size"),
    ("dataset", "Dataset"), ("section", "Test"), ("source", "Our run"),
    ("paper_top1", "Top-1 paper"), ("ours_top1", "Top-1 ours"), ("delta_top1", "Δ Top-1"),
    ("paper_top5", "Top-5 paper"), ("ours_top5", "Top-5 ours"), ("delta_top5", "Δ Top-5"),
    ("paper_params_m", "Params (M) paper"), ("ours_params_m", "Params (M) ours"),
    ("paper_gflops", "GFLOPs paper"), ("ours_gflops", "GFLOPs ours"),
    ("views", "Views"), ("paper_gflops_x_views", "GFLOPs×views paper"),
    ("ours_gflops_x_views", "GFLOPs×views ours"), ("status", "Status"), ("notes", "Notes"),
]
ALWAYS = {"label", "paper_top1", "ours_top1", "delta_top1", "paper_top5", "ours_top5",
          "delta_top5", "views", "paper_gflops_x_views", "ours_gflops_x_views", "status", "notes"}
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


def _experiment_notes(exp_id: str) -> list[str]:
    path = EXPERIMENTS_DIR / f"{exp_id}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    notes = data.get("notes") or []
    return [str(n) for n in (notes if isinstance(notes, list) else [notes])]


def _differs(ours: float, paper: float) -> bool:
    """Beyond 1% and beyond the rounding of the paper's figure."""
    decimals = 0 if float(paper).is_integer() else len(repr(float(paper)).split(".")[1])
    return abs(ours - paper) > max(0.01 * abs(paper), 0.5 * 10 ** -decimals)


# ---------------------------------------------------------------------------- building
def build_row(row: dict, results: Results, model_info_dirs=None, compute_model_info=False,
              size_notes: bool = True) -> dict:
    """Cells of one row (raw numbers under `raw`, display strings under the column keys)."""
    paper = row["paper"]
    raw: dict[str, Any] = {k: paper.get(k) for k in ("top1", "top5", "params_m", "gflops",
                                                     "views", "gflops_x_views")}
    raw = {f"paper_{k}": v for k, v in raw.items()}
    notes: list[str] = []
    if row.get("note"):
        notes.append(row["note"])
    kind = row["kind"]
    ours: dict[str, Any] = {"top1": None, "top5": None, "params_m": None, "gflops": None,
                            "views": None, "gflops_x_views": None}
    detail = ""
    if kind == "external":
        status = REPORTED
        source = "reported"
    else:
        proto = row["protocol"]
        clips, crops = parse_protocol(proto)
        ours["views"] = clips * crops
        if kind == "experiment":
            ev = results.evaluation(row["experiment"], proto)
            source = row["experiment"]
        else:
            ev = results.ensemble(row["name"], row["ensemble"], proto)
            source = "ensemble: " + " + ".join(row["ensemble"])
        status, detail = ev["status"], ev.get("detail", "")
        if status == DONE:
            ours["top1"], ours["top5"] = ev["top1"], ev["top5"]
            if ev.get("views"):
                ours["views"] = ev["views"]
            if ev.get("skipped"):
                notes.append(f"{ev['skipped']} validation video(s) could not be decoded and are not counted.")
        for exp_id in row["members"]:
            notes.extend(_experiment_notes(exp_id))
        # the embedded run (size_notes off) computes model info only for what it ran
        infos = [results.model_info(i, model_info_dirs, compute_model_info, paper_size=size_notes)
                 for i in row["members"]]
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
    raw["delta_top1"] = (round(ours["top1"] - paper["top1"], 4)
                         if ours["top1"] is not None and paper.get("top1") is not None else None)
    raw["delta_top5"] = (round(ours["top5"] - paper["top5"], 4)
                         if ours["top5"] is not None and paper.get("top5") is not None else None)
    views = ours["views"] if kind != "external" else paper.get("views")
    views_txt = ""
    if kind != "external":
        c, k = parse_protocol(row["protocol"])
        views_txt = f"{views} ({c}×{k})"
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
        "paper_top1": fmt_num(paper.get("top1")), "ours_top1": fmt_num(ours["top1"], 1),
        "delta_top1": fmt_delta(ours["top1"], paper.get("top1")),
        "paper_top5": fmt_num(paper.get("top5")), "ours_top5": fmt_num(ours["top5"], 1),
        "delta_top5": fmt_delta(ours["top5"], paper.get("top5")),
        "paper_params_m": fmt_num(paper.get("params_m")),
        "ours_params_m": fmt_num(ours["params_m"], 2) if ours["params_m"] is not None else "",
        "paper_gflops": fmt_num(paper.get("gflops")),
        "ours_gflops": fmt_g(ours["gflops"]) if ours["gflops"] is not None else "",
        "views": views_txt,
        "paper_gflops_x_views": fmt_gxv(paper.get("gflops_x_views"), paper.get("gflops"),
                                        paper.get("views")) if kind == "external" or
        paper.get("gflops_x_views") is not None else "",
        "ours_gflops_x_views": (fmt_gxv(ours["gflops_x_views"], fmt_g(ours["gflops"]), ours["views"])
                                if ours["gflops_x_views"] is not None else ""),
        "status": status,
    }
    return {"cells": cells, "raw": raw, "notes": notes, "status": status, "kind": kind,
            "detail": detail, "row": row}


def build_table(table: dict, results: Results, model_info_dirs=None,
                compute_model_info=False, size_notes: bool = True) -> dict:
    """One table's cells; `size_notes`: note where our Params/GFLOPs differ from the paper's
    (off for the embedded run, whose scaled-down models differ by design)."""
    rows = [build_row(r, results, model_info_dirs, compute_model_info, size_notes)
            for r in table["rows"]]
    footnotes: list[str] = []
    for r in rows:
        marks = []
        for n in r["notes"]:
            if n not in footnotes:
                footnotes.append(n)
            marks.append(footnotes.index(n) + 1)
        r["cells"]["notes"] = " ".join(f"[{m}]" for m in sorted(set(marks)))
    multi_ds = len({r["row"].get("dataset") for r in rows}) > 1
    present = [(k, h) for k, h in COLUMNS
               if k in ALWAYS or (k == "dataset" and multi_ds)
               or (k != "dataset" and any(r["cells"].get(k) for r in rows))]
    counts = {s: sum(r["status"] == s for r in rows) for s in
              ("done", "running", "not run", "failed", REPORTED)}
    return {"number": table["number"], "title": table["title"], "dataset": table.get("dataset"),
            "rows": rows, "footnotes": footnotes, "columns": present, "counts": counts}


def build_tables(tables: list[dict], results: Results, model_info_dirs=None,
                 compute_model_info=False, size_notes: bool = True) -> list[dict]:
    from tqdm import tqdm

    return [build_table(t, results, model_info_dirs, compute_model_info, size_notes)
            for t in tqdm(tables, desc="tables", unit="table", leave=False,
                          disable=len(tables) < 2)]


# ---------------------------------------------------------------------------- rendering
COLUMN_FOOTNOTE = ("Δ = ours − paper. Our Params/GFLOPs: `smallbig model-info` of the "
                   "configuration this run used (results/<run>/<id>/params.yaml; the full run "
                   "uses the paper-size params/experiments/<id>.yaml); GFLOPs = multiply-accumulates per "
                   "224² view (the paper's convention; the 256² three-crop views cost ≈1.31×); "
                   "GFLOPs×views = per view × the views of the row's test protocol. "
                   f"{EXTERNAL_MARK} = another paper's result, as reported.")


def _caption(t: dict) -> str:
    return f"Table {t['number']}: {t['title']}"


def render_markdown(t: dict, banner: str | None = None) -> str:
    cols = t["columns"]
    out = [f"## {_caption(t)}", ""]
    if banner:
        out += [f"> **{banner}**", ""]

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out.append("| " + " | ".join(h for _, h in cols) + " |")
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for r in t["rows"]:
        out.append("| " + " | ".join(esc(r["cells"].get(k, "")) for k, _ in cols) + " |")
    out += ["", COLUMN_FOOTNOTE, ""]
    for i, n in enumerate(t["footnotes"], 1):
        out.append(f"{i}. {esc(n)}")
    return "\n".join(out) + "\n"


CSV_FIELDS = ["table", "row", "label", "kind", "experiment", "ensemble", "protocol", "dataset",
              "section", "backbone", "input", "paper_top1", "ours_top1", "delta_top1",
              "paper_top5", "ours_top5", "delta_top5", "paper_params_m", "ours_params_m",
              "paper_gflops", "ours_gflops", "paper_views", "ours_views",
              "paper_gflops_x_views", "ours_gflops_x_views", "status", "detail", "notes"]


def render_csv(t: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for i, r in enumerate(t["rows"], 1):
        row = r["row"]
        rec = {"table": t["number"], "row": i, "label": row["label"], "kind": r["kind"],
               "experiment": row.get("experiment", ""),
               "ensemble": "+".join(row.get("ensemble", [])), "protocol": row.get("protocol", ""),
               "dataset": row.get("dataset", ""), "section": row.get("section", ""),
               "backbone": row.get("backbone", ""), "input": row.get("input", ""),
               "status": r["status"], "detail": r["detail"], "notes": " | ".join(r["notes"])}
        for k, v in r["raw"].items():
            if k in CSV_FIELDS:
                rec[k] = "" if v is None else v
        w.writerow(rec)
    return buf.getvalue()


_TEX = [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
        ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}")]
_TEX_UNICODE = {"×": r"$\times$", "Δ": r"$\Delta$", "−": "$-$", "–": "--", "±": r"$\pm$",
                "²": r"\textsuperscript{2}", "†": r"$^\dagger$", "≈": r"$\approx$",
                "’": "'", "“": "``", "”": "''", "—": "---"}


def tex_escape(s: Any) -> str:
    s = str(s)
    out = []
    for ch in s:
        rep = next((r for c, r in _TEX if c == ch), None)
        if rep is None:
            rep = _TEX_UNICODE.get(ch)
        if rep is None and ord(ch) > 127:
            rep = "?"
        out.append(rep if rep is not None else ch)
    return "".join(out).replace("`", "")


def render_latex(t: dict, banner: str | None = None) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); notes as numbered lines below."""
    cols = [(k, h) for k, h in t["columns"] if k != "notes"] + [("notes", "Notes")]
    align = "".join("l" if k in ("label", "backbone", "input", "dataset", "section", "source",
                                 "status", "notes", "views") else "r" for k, _ in cols)
    lines = [f"% Table {t['number']} -- generated by `smallbig report tables`; needs \\usepackage{{booktabs}}",
             r"\begin{table*}[t]", r"\centering", r"\scriptsize",
             f"\\caption{{{tex_escape(_caption(t))}}}", f"\\label{{tab:smallbig-{t['number']}}}",
             f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(h) for _, h in cols) + r" \\", r"\midrule"]
    prev_section = None
    for r in t["rows"]:
        sec = r["row"].get("section")
        if prev_section is not None and sec != prev_section:
            lines.append(r"\midrule")
        prev_section = sec
        lines.append(" & ".join(tex_escape(r["cells"].get(k, "")) for k, _ in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "", r"\smallskip", ""]
    if banner:
        lines.append(r"\textbf{" + tex_escape(banner) + r"}\\")
    lines.append(tex_escape(COLUMN_FOOTNOTE) + r"\\")
    for i, n in enumerate(t["footnotes"], 1):
        lines.append(f"[{i}] {tex_escape(n)}" + r"\\")
    lines.append(r"\end{table*}")
    return "\n".join(lines) + "\n"


def render_html_table(t: dict) -> str:
    """An HTML fragment: caption, table, notes (class names used by reports' CSS)."""
    e = html.escape
    cols = t["columns"]
    out = [f'<table class="results" id="table{t["number"]}">',
           f"<caption>{e(_caption(t))}</caption>", "<thead><tr>"]
    out += [f'<th class="col-{k}">{e(h)}</th>' for k, h in cols]
    out.append("</tr></thead><tbody>")
    for r in t["rows"]:
        cls = f"status-{r['status'].replace(' ', '-')} kind-{r['kind']}"
        out.append(f'<tr class="{cls}">')
        for k, _ in cols:
            v = r["cells"].get(k, "")
            if k == "status":
                title = f' title="{e(r["detail"])}"' if r["detail"] else ""
                out.append(f'<td class="status"{title}><span class="badge">{e(v)}</span></td>')
            elif k.startswith("delta") and v:
                sign = "pos" if v.startswith("+") else ("neg" if v.startswith("-") else "zero")
                out.append(f'<td class="num delta {sign}">{e(v)}</td>')
            else:
                num = " class=\"num\"" if k.startswith(("paper_", "ours_")) else ""
                out.append(f"<td{num}>{e(v)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    out.append(f'<p class="colnote">{e(COLUMN_FOOTNOTE)}</p>')
    if t["footnotes"]:
        out.append('<ol class="notes">' + "".join(f"<li>{e(n)}</li>" for n in t["footnotes"]) + "</ol>")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
.banner{background:#fff3cd;border:1px solid #e0b100;padding:.7em 1em;border-radius:4px;font-weight:600}
table.results,table.meta{border-collapse:collapse;font-size:.82em;margin:.5em 0}
table.results caption{text-align:left;font-weight:600;padding:.3em 0}
table.results th,table.results td,table.meta th,table.meta td{border-bottom:1px solid #e3e3e3;padding:.25em .5em;vertical-align:top}
table.results th{background:#f4f4f4;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.delta.pos{color:#1a7f37}td.delta.neg{color:#b42318}
.badge{border-radius:3px;padding:0 .4em;white-space:nowrap}
tr.status-done .badge{background:#d1f7d6}tr.status-running .badge{background:#dbeafe}
tr.status-failed .badge{background:#fde2e1}tr.status-not-run .badge{background:#eee;color:#666}
tr.kind-external{color:#666;font-style:italic}
ol.notes,p.colnote{font-size:.78em;color:#444}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0;max-width:48%}
.figs img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.8em;color:#444}
nav a{margin-right:.8em}
"""


def render_html_page(t: dict, banner: str | None = None) -> str:
    b = f'<p class="banner">{html.escape(banner)}</p>' if banner else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(_caption(t))}</title><style>{CSS}</style></head><body>"
            f'<p><a href="../index.html">← report</a></p>{b}\n{render_html_table(t)}\n</body></html>\n')


def table_files(number: int) -> dict[str, str]:
    return {ext: f"table{number}.{ext}" for ext in ("md", "csv", "tex", "html")}


def write_tables(built: list[dict], out_dir: str | Path, banner: str | None = None,
                 index: bool = True, only_index: bool = False) -> list[Path]:
    """reports/tables/table<N>.{md,csv,tex,html} for each built table, plus (when `index`)
    all.md and summary.json of all of them; `only_index` writes just those two. Returns paths."""
    from smallbig.analysis.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md_all = ["# SmallBigNet reproduction: Tables 2–11, paper vs ours", ""]
    if banner:
        md_all += [f"> **{banner}**", ""]
    summary = []
    for t in built:
        files = table_files(t["number"])
        if not only_index:
            for ext, text in (("md", render_markdown(t, banner)), ("csv", render_csv(t)),
                              ("tex", render_latex(t, banner)), ("html", render_html_page(t, banner))):
                p = out / files[ext]
                atomic_write_text(p, text)
                written.append(p)
        md_all += [render_markdown(t), ""]
        summary.append({"number": t["number"], "title": t["title"], "counts": t["counts"],
                        "files": files,
                        "rows": [{"label": r["row"]["label"], "kind": r["kind"],
                                  "status": r["status"], "detail": r["detail"], **r["raw"],
                                  "cells": r["cells"]} for r in t["rows"]],
                        "footnotes": t["footnotes"]})
    if index or only_index:
        p = out / "all.md"
        atomic_write_text(p, "\n".join(md_all))
        written.append(p)
        p = out / "summary.json"
        atomic_write_text(p, json.dumps({"banner": banner, "tables": summary}, indent=1,
                                        ensure_ascii=False, default=str))
        written.append(p)
    return written
