"""`reports/index.html`: one static, self-contained page (inline CSS, no scripts, no external
resources, relative links only: works from file:// and from any web server) linking every table
and figure, with the run's metadata and a banner when the results come from the embedded
default (not comparable to the paper)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from smallbig.analysis.collect import DONE, FAILED, NOT_RUN, RUNNING, ReportInputError, Results, read_json
from smallbig.analysis.report_tables import experiment_ids_in, render_html_fragment, table_files
from smallbig.analysis.templates import render
from smallbig.analysis.verdicts import CLAIM_VERDICTS
from smallbig.fsutil import atomic_write_text
from smallbig.gitinfo import git_info

EMBEDDED_BANNER = (
    "Embedded default: these results come from the scaled-down embedded run "
    "(generated videos, small models, CPU). They exercise the pipeline end to end "
    "and are NOT comparable to the paper's numbers."
)


def banner_for(run: str, results: Results | None = None) -> str | None:
    """The embedded banner when the run is `embedded`, or when any experiment of the run was
    resolved with the embedded overlay (its data root lies under an `embedded` directory)."""
    if run == "embedded":
        return EMBEDDED_BANNER
    if results is not None and results.dir.is_dir():
        for p in sorted(results.dir.glob("*/params.yaml")):
            data = results.experiment(p.parent.name)["data"]
            if data is not None and "embedded" in Path(data.root).parts:
                return EMBEDDED_BANNER
    return None


# ---------------------------------------------------------------------------- metadata
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


def _mtime(path: Path) -> str:
    return _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.UTC).isoformat(timespec="seconds")


def _first(d: dict, *keys):
    for k in keys:
        if isinstance(d, dict) and d.get(k) not in (None, ""):
            return d[k]
    return None


def run_metadata(results: Results, exp_ids: list[str]) -> dict:
    """Git commit, dataset manifests, hardware, GPU-hours and dates of the run."""
    meta: dict[str, Any] = {
        "run": results.run,
        "results_dir": str(results.dir),
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git": git_info(),
    }
    datasets: dict[str, dict] = {}
    hardware: set[str] = set()
    gpu_hours = cpu_hours = 0.0
    gpu_hours_known = 0
    starts, ends = [], []
    trained = 0
    replicates = [(i, k) for i in exp_ids for k in results.experiment_seeds([i])]
    for exp_id, seed in replicates:
        e = results.experiment(exp_id, seed)
        data = e["data"] if isinstance(e["params"], dict) and "data" in e["params"] else None
        if data is not None and data.root not in datasets:
            # data roots are relative to the working directory (the workflow runs from the
            # repository it was started in, which may be a copy)
            mf = Path(data.root) / "manifest.json"
            try:
                manifest = manifest_summary(read_json(mf))
            except FileNotFoundError:
                manifest = f"not found ({mf})"
            except ReportInputError as err:
                manifest = f"unreadable: {err}"
            datasets[data.root] = {"dataset": data.dataset, "root": data.root, "manifest": manifest}
        tm = e["train_metrics"]
        if isinstance(tm, dict):
            trained += 1
            hw = _first(tm, "hardware", "device_name", "gpu_name", "device")
            n = _first(tm, "world_size", "num_gpus", "gpus")
            if hw:
                hardware.add(f"{hw}" + (f" × {n}" if n else ""))
            gh = _first(tm, "gpu_hours")
            on_gpu = (
                gh is not None or "cuda" in str(_first(tm, "device") or "") or bool(_first(tm, "gpu_name"))
            )
            if gh is None:
                secs = _first(tm, "wall_time_s", "train_time_s", "elapsed_s", "wall_time_s_this_process")
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
        if (
            not (isinstance(tm, dict) and _first(tm, "started", "start_time", "started_at"))
            and (e["dir"] / "params.yaml").is_file()
            and e["train_started"]
        ):
            starts.append(_mtime(e["dir"] / "params.yaml"))
        if not (isinstance(tm, dict) and _first(tm, "finished", "end_time", "finished_at")):
            done = [
                f
                for f in (e["dir"] / "train" / n for n in ("train_metrics.json", "history.json"))
                if f.is_file()
            ]
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
    commit = (g.get("commit") or "unknown (no git repository)") + (
        " (uncommitted changes)" if g.get("dirty") else ""
    )
    ds = (
        " | ".join(f"{d.get('dataset')} at {d['root']}: {d.get('manifest')}" for d in meta["datasets"])
        or "no run params found"
    )
    gh = (
        f"{meta['gpu_hours']} (from {meta['gpu_hours_runs']} run(s))"
        if meta["gpu_hours"] is not None
        else "none recorded"
    ) + (
        f"; CPU-only training: {meta['cpu_process_hours']} process-hours"
        if meta.get("cpu_process_hours")
        else ""
    )
    return [
        ("Run", f"{meta['run']} ({meta['results_dir']})"),
        ("Git commit", commit),
        ("Commit date", g.get("commit_date") or ""),
        ("Datasets (manifests)", ds),
        ("Hardware", ", ".join(meta["hardware"])),
        ("GPU-hours used", gh),
        ("Trained runs", str(meta["trained_runs"])),
        ("First start", meta["first_start"] or "–"),
        ("Last finish", meta["last_finish"] or "–"),
        ("Report generated", meta["generated"]),
        ("Report host", meta["report_host"]),
    ]


def _status_summary(built: list[dict]) -> dict[str, dict]:
    """Distinct row sources: experiment id@protocol / ensemble name -> status, detail, tables."""
    seen: dict[str, dict] = {}
    for t in built:
        for r in t["rows"]:
            row = r["row"]
            if r["kind"] == "external":
                continue
            key = (row.get("experiment") or row.get("name")) + "@" + row["protocol"]
            entry = seen.setdefault(key, {"status": r["status"], "detail": r["detail"], "tables": []})
            if t["number"] not in entry["tables"]:
                entry["tables"].append(t["number"])
    return seen


def _verdict_summary(built: list[dict]) -> tuple[str, list[dict]]:
    """(a sentence over all tables, one entry per table) for the index's summary."""
    total: dict[str, int] = {}
    for t in built:
        for k, v in t["verdict_counts"].items():
            total[k] = total.get(k, 0) + v
    claims = {k: sum(t["claim_counts"].get(k, 0) for t in built) for k in CLAIM_VERDICTS}
    rows = [
        {
            "number": t["number"],
            "line": t["verdict_line"],
            "claims": " / ".join(str(t["claim_counts"].get(k, 0)) for k in CLAIM_VERDICTS)
            if t["claims"]
            else "none stated",
        }
        for t in built
    ]
    head = "All tables: " + (", ".join(f"{v} {k}" for k, v in total.items() if v) or "no verdict yet")
    head += " (table rows; a row repeated in several tables counts in each). Claims: " + ", ".join(
        f"{v} {k}" for k, v in claims.items() if v
    )
    if not any(claims.values()):
        head += "none checked"
    return head + ".", rows


def render_index(
    built: list[dict],
    figures: list[dict],
    featmaps: dict | None,
    meta: dict,
    banner: str | None,
    tables_rel: str = "tables",
) -> str:
    statuses = _status_summary(built)
    verdict_total, verdict_rows = _verdict_summary(built)
    groups: dict[str, list[dict]] = {}
    for f in figures:
        groups.setdefault(f["category"], []).append(f)
    return render(
        "index.html",
        banner=banner,
        statuses=statuses,
        verdict_total=verdict_total,
        verdict_rows=verdict_rows,
        meta_rows=_meta_rows(meta),
        counts={
            s: sum(v["status"] == s for v in statuses.values()) for s in (DONE, RUNNING, NOT_RUN, FAILED)
        },
        tables=[
            {"number": t["number"], "files": table_files(t["number"]), "html": render_html_fragment(t)}
            for t in built
        ],
        tables_rel=tables_rel,
        figure_groups=list(groups.items()),
        featmaps={"figures": [], "missing": [], **(featmaps or {})},
    )


def _manifest(path: Path) -> Any:
    try:
        return read_json(path)
    except (FileNotFoundError, ReportInputError):
        return None


def write_index(reports_dir: str | Path, built: list[dict], results: Results, banner: str | None) -> Path:
    """reports/index.html (+ metadata.json) from built tables and whatever figures.json /
    featmaps.json exist (figures whose PNG is missing are left out)."""
    reports = Path(reports_dir)
    figs_dir = reports / "figures"

    def present(items) -> list[dict]:
        return [f for f in items if isinstance(f, dict) and (figs_dir / str(f.get("png"))).is_file()]

    figures = _manifest(figs_dir / "figures.json")
    figures = present(figures) if isinstance(figures, list) else []
    featmaps = _manifest(figs_dir / "featmaps.json")
    if isinstance(featmaps, dict):
        featmaps = {**featmaps, "figures": present(featmaps.get("figures", []))}
    else:
        featmaps = None
    meta = run_metadata(results, experiment_ids_in(built))
    atomic_write_text(reports / "metadata.json", json.dumps(meta, indent=1, default=str))
    return atomic_write_text(reports / "index.html", render_index(built, figures, featmaps, meta, banner))
