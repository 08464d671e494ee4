"""`reports/index.html`: one static, self-contained page (inline CSS, no scripts, no external
resources, relative links only: works from file:// and from any web server) linking every table
and figure, with the run's metadata and a banner when the results come from the embedded
default (not comparable to the paper)."""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from smallbig.analysis.collect import DONE, FAILED, NOT_RUN, RUNNING, Results, read_json
from smallbig.analysis.io import atomic_write_text
from smallbig.analysis.report_tables import CSS, render_html_table, table_files
from smallbig.config import REPO_ROOT

EMBEDDED_BANNER = ("Embedded default: these results come from the scaled-down embedded run "
                   "(generated videos, small models, CPU). They exercise the pipeline end to end "
                   "and are NOT comparable to the paper's numbers.")


def banner_for(run: str, results: Results | None = None) -> str | None:
    """The embedded banner when the run is `embedded`, or when any experiment of the run was
    resolved with the embedded overlay (its data root lies under an `embedded` directory)."""
    if run == "embedded":
        return EMBEDDED_BANNER
    if results is not None and results.dir.is_dir():
        for p in sorted(results.dir.glob("*/params.yaml")):
            params = results.experiment(p.parent.name)["params"]
            root = str((params or {}).get("data", {}).get("root", ""))
            if "embedded" in Path(root).parts:
                return EMBEDDED_BANNER
    return None


# ---------------------------------------------------------------------------- metadata
def git_info(repo: Path | None = None) -> dict:
    """Commit of the working directory's repository (where the workflow runs), else of the
    installed package's repository."""
    def git(where, *args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                              timeout=20).stdout.strip()

    for where in ([repo] if repo else [Path.cwd(), REPO_ROOT]):
        try:
            commit = git(where, "rev-parse", "HEAD")
            if not commit:
                continue
            dirty = bool(git(where, "status", "--porcelain", "--untracked-files=no"))
            return {"commit": commit, "dirty": dirty, "commit_date": git(where, "log", "-1", "--format=%cI"),
                    "repository": str(Path(where).resolve())}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": "unknown (no git repository)"}


def manifest_summary(m: dict) -> str:
    """'train: 95 videos (95 usable, 0 quarantined, 1 missing, list sha256 09c44f9c5aee); ...'"""
    if not isinstance(m, dict):
        return "not a mapping"
    parts = []
    splits = m.get("splits") if isinstance(m.get("splits"), dict) else {}
    for name, sp in splits.items():
        if not isinstance(sp, dict):
            continue
        bits = [f"{sp.get('usable', '?')} usable"] if "usable" in sp else []
        for k, label in (("quarantined", "quarantined"), ("num_missing", "missing")):
            if k in sp:
                bits.append(f"{sp[k]} {label}")
        if sp.get("sha256"):
            bits.append(f"list sha256 {str(sp['sha256'])[:12]}")
        parts.append(f"{name}: {sp.get('count', '?')} videos ({', '.join(bits)})")
    head = ", ".join(f"{k} {m[k]}" for k in ("format", "num_classes") if m.get(k) is not None)
    return "; ".join(([head] if head else []) + parts) or json.dumps(m, sort_keys=True)[:300]


def _first(d: dict, *keys):
    for k in keys:
        if isinstance(d, dict) and d.get(k) not in (None, ""):
            return d[k]
    return None


def run_metadata(results: Results, exp_ids: list[str]) -> dict:
    """Git commit, dataset manifests, hardware, GPU-hours and dates of the run."""
    meta: dict[str, Any] = {"run": results.run, "results_dir": str(results.dir),
                            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "git": git_info()}
    datasets: dict[str, dict] = {}
    hardware: set[str] = set()
    gpu_hours = cpu_hours = 0.0
    gpu_hours_known = 0
    starts, ends = [], []
    trained = 0
    for exp_id in exp_ids:
        e = results.experiment(exp_id)
        p = e["params"]
        if isinstance(p, dict):
            root = p.get("data", {}).get("root")
            if root and root not in datasets:
                # data roots are relative to the working directory (the workflow runs from the
                # repository it was started in, which may be a copy)
                rp = Path(root)
                entry: dict[str, Any] = {"dataset": p["data"].get("dataset"), "root": root}
                mf = rp / "manifest.json"
                if mf.is_file():
                    try:
                        entry["manifest"] = manifest_summary(read_json(mf))
                    except Exception as err:  # noqa: BLE001
                        entry["manifest"] = f"unreadable: {err}"
                else:
                    entry["manifest"] = f"not found ({mf})"
                datasets[root] = entry
        tm = e["train_metrics"]
        if isinstance(tm, dict):
            trained += 1
            hw = _first(tm, "hardware", "device_name", "gpu_name", "device")
            n = _first(tm, "world_size", "num_gpus", "gpus")
            if hw:
                hardware.add(f"{hw}" + (f" × {n}" if n else ""))
            gh = _first(tm, "gpu_hours")
            on_gpu = gh is not None or "cuda" in str(_first(tm, "device") or "") or bool(_first(tm, "gpu_name"))
            if gh is None:
                secs = _first(tm, "wall_time_s", "train_time_s", "elapsed_s",
                              "wall_time_s_this_process")
                if secs is not None:
                    gh = float(secs) / 3600.0 * float(n or 1)
            if gh is not None:
                try:
                    if on_gpu:
                        gpu_hours += float(gh)
                        gpu_hours_known += 1
                    else:
                        cpu_hours += float(gh)
                except (TypeError, ValueError):
                    pass
            s = _first(tm, "started", "start_time", "started_at")
            f = _first(tm, "finished", "end_time", "finished_at")
            if s:
                starts.append(str(s))
            if f:
                ends.append(str(f))
        # without recorded dates: params.yaml written = started, last training file = finished
        def _mtime(path: Path) -> str:
            return _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).isoformat(
                timespec="seconds")

        if not (isinstance(tm, dict) and _first(tm, "started", "start_time", "started_at")):
            if (e["dir"] / "params.yaml").is_file() and e["train_started"]:
                starts.append(_mtime(e["dir"] / "params.yaml"))
        if not (isinstance(tm, dict) and _first(tm, "finished", "end_time", "finished_at")):
            done = [f for f in (e["dir"] / "train" / n for n in ("train_metrics.json", "history.json"))
                    if f.is_file()]
            if done:
                ends.append(_mtime(done[0]))
    meta["datasets"] = list(datasets.values())
    meta["hardware"] = sorted(hardware) or ["not recorded"]
    meta["report_host"] = f"{platform.node()} ({platform.platform()}, {os.cpu_count()} CPUs)"
    meta["gpu_hours"] = round(gpu_hours, 3) if gpu_hours_known else None
    meta["gpu_hours_runs"] = gpu_hours_known
    meta["cpu_process_hours"] = round(cpu_hours, 3)
    meta["trained_runs"] = trained
    meta["first_start"] = min(starts) if starts else None
    meta["last_finish"] = max(ends) if ends else None
    return meta


# ---------------------------------------------------------------------------- page
def _meta_rows(meta: dict) -> list[tuple[str, str]]:
    g = meta["git"]
    commit = g.get("commit", "unknown") + (" (uncommitted changes)" if g.get("dirty") else "")
    ds = " | ".join(f"{d.get('dataset')} at {d['root']}: {d.get('manifest')}"
                    for d in meta["datasets"]) or "no run params found"
    gh = (f"{meta['gpu_hours']} (from {meta['gpu_hours_runs']} run(s))"
          if meta["gpu_hours"] is not None else "none recorded") + (
        f"; CPU-only training: {meta['cpu_process_hours']} process-hours" if meta.get("cpu_process_hours") else "")
    return [("Run", f"{meta['run']} ({meta['results_dir']})"), ("Git commit", commit),
            ("Commit date", g.get("commit_date", "")), ("Datasets (manifests)", ds),
            ("Hardware", ", ".join(meta["hardware"])), ("GPU-hours used", gh),
            ("Trained runs", str(meta["trained_runs"])),
            ("First start", meta["first_start"] or "–"), ("Last finish", meta["last_finish"] or "–"),
            ("Report generated", meta["generated"]), ("Report host", meta["report_host"])]


def _status_summary(built: list[dict]) -> dict[str, dict]:
    """Distinct (row source) statuses: experiment id@protocol / ensemble name -> status."""
    seen: dict[str, dict] = {}
    for t in built:
        for r in t["rows"]:
            row = r["row"]
            if r["kind"] == "external":
                continue
            key = (row.get("experiment") or row.get("name")) + "@" + row["protocol"]
            seen.setdefault(key, {"status": r["status"], "detail": r["detail"],
                                  "tables": []})["tables"].append(t["number"])
    return seen


def render_index(built: list[dict], figures: list[dict], featmaps: dict | None, meta: dict,
                 banner: str | None, tables_rel: str = "tables") -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             '<link rel="icon" href="data:,">',
             "<title>SmallBigNet reproduction report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>SmallBigNet (CVPR 2020): reproduction report</h1>"]
    if banner:
        parts.append(f'<p class="banner" id="embedded-banner">{e(banner)}</p>')
    nav = ['<a href="#summary">Summary</a>', '<a href="#metadata">Run metadata</a>']
    nav += [f'<a href="#table{t["number"]}">Table {t["number"]}</a>' for t in built]
    nav += ['<a href="#figures">Figures</a>', '<a href="#featmaps">Feature maps</a>']
    parts.append("<nav>" + " ".join(nav) + "</nav>")

    summary = _status_summary(built)
    counts = {s: sum(v["status"] == s for v in summary.values()) for s in (DONE, RUNNING, NOT_RUN, FAILED)}
    parts.append('<h2 id="summary">Summary</h2>')
    parts.append("<p>" + ", ".join(f"{n} {e(s)}" for s, n in counts.items())
                 + f" of {len(summary)} evaluations/ensembles the tables need.</p>")
    parts.append('<table class="results" id="status"><thead><tr><th>evaluation</th><th>status</th>'
                 "<th>tables</th><th>detail</th></tr></thead><tbody>")
    for key, v in summary.items():
        parts.append(f'<tr class="status-{v["status"].replace(" ", "-")}"><td>{e(key)}</td>'
                     f'<td class="status"><span class="badge">{e(v["status"])}</span></td>'
                     f'<td>{", ".join(map(str, sorted(set(v["tables"]))))}</td><td>{e(v["detail"])}</td></tr>')
    parts.append("</tbody></table>")

    parts.append('<h2 id="metadata">Run metadata</h2><table class="meta"><tbody>')
    for k, v in _meta_rows(meta):
        parts.append(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>")
    parts.append("</tbody></table>")

    for t in built:
        files = table_files(t["number"])
        links = " · ".join(f'<a href="{tables_rel}/{f}">{ext.upper() if ext != "tex" else "LaTeX"}</a>'
                           for ext, f in files.items())
        parts.append(f'<h2 id="table{t["number"]}-section">Table {t["number"]}</h2>')
        parts.append(f'<p class="links">Download: {links}</p>')
        parts.append(render_html_table(t))
    parts.append(f'<p class="links">All tables: <a href="{tables_rel}/all.md">all.md</a> · '
                 f'<a href="{tables_rel}/summary.json">summary.json</a></p>')

    parts.append('<h2 id="figures">Figures</h2>')
    cats: dict[str, list[dict]] = {}
    for f in figures:
        cats.setdefault(f["category"], []).append(f)
    if not cats:
        parts.append("<p>No figures were generated.</p>")
    for cat, items in cats.items():
        parts.append(f"<h3>{e(cat)}</h3><div class=\"figs\">")
        for f in items:
            parts.append(_figure_html(f, "figures"))
        parts.append("</div>")

    parts.append('<h2 id="featmaps">Feature maps (paper Fig. 3)</h2>')
    if featmaps and featmaps.get("figures"):
        parts.append('<div class="figs">')
        for f in featmaps["figures"]:
            parts.append(_figure_html(f, "figures"))
        parts.append("</div>")
    else:
        parts.append("<p>No feature-map figures.</p>")
    if featmaps and featmaps.get("missing"):
        parts.append("<ul>" + "".join(f"<li>{e(m)}</li>" for m in featmaps["missing"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure_html(f: dict, rel: str) -> str:
    e = html.escape
    png, svg = f"{rel}/{f['png']}", f"{rel}/{f['svg']}"
    return (f'<figure><a href="{e(png)}"><img src="{e(png)}" alt="{e(f["caption"])}"></a>'
            f'<figcaption>{e(f["caption"])} (<a href="{e(svg)}">SVG</a>)</figcaption></figure>')


def write_index(reports_dir: str | Path, built: list[dict], results: Results,
                banner: str | None) -> Path:
    """reports/index.html from built tables and whatever figures.json / featmaps.json exist."""
    from smallbig.analysis.figures import experiment_ids_in

    reports = Path(reports_dir)
    figs_dir = reports / "figures"
    figures: list[dict] = []
    featmaps = None
    for name in ("figures.json", "featmaps.json"):
        p = figs_dir / name
        if not p.is_file():
            continue
        try:
            data = read_json(p)
        except Exception:  # noqa: BLE001
            continue
        if name == "figures.json" and isinstance(data, list):
            figures = [f for f in data if (figs_dir / f["png"]).is_file()]
        elif isinstance(data, dict):
            featmaps = dict(data)
            featmaps["figures"] = [f for f in data.get("figures", []) if (figs_dir / f["png"]).is_file()]
    meta = run_metadata(results, experiment_ids_in(built))
    atomic_write_text(reports / "metadata.json", json.dumps(meta, indent=1, default=str))
    return atomic_write_text(reports / "index.html",
                             render_index(built, figures, featmaps, meta, banner))
