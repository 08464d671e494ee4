"""`smallbig report ...`: tables, figures, feature maps and the HTML report. Each subcommand is one
entry point a Snakemake rule can call. The run's results directory is `--results results/<run>`,
or equivalently `--results results --run <run>` (`full` or `embedded`).

  smallbig report tables   --results results/embedded --out reports/tables      (all ten)
                           [--seeds N] [--verdicts reports/verdicts.json] [--not-comparable]
  smallbig report table N  --results results/embedded --out reports/tables      (one table)
  smallbig report figures  --results results/embedded --out reports/figures
  smallbig report featmaps --results results/embedded --out reports/figures
  smallbig report html     --results results/embedded --out reports
  smallbig report build    --results results/embedded --out reports [--featmaps]
  smallbig report check    reports/index.html [--screenshot reports/screenshot.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smallbig.spec.tables import TablesError, load_tables

# `smallbig` imports this module for every command: the report's modules are imported by the
# subcommands that use them (pandas, jinja2; figures: matplotlib; featmaps, model info: torch;
# MLflow; check: aiohttp).

DEFAULT_RESULTS = "results/full"


def _results_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        help="results/<run>, or the results root together with --run (default: results/full)",
    )
    p.add_argument(
        "--run",
        default=None,
        help="run name: the results directory is <results>/<run> (default: --results "
        "is the run's directory and names the run)",
    )
    p.add_argument(
        "--logs", default=None, help="the workflow's logs/<run> (default: next to results/, if it exists)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seed replicates of every experiment (the workflow config's `seeds`): replicate 0 in "
        "<results>/<id>/, replicate k in <results>/<id>/seed-<k>/ (default: those that exist)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    _results_args(p)
    p.add_argument("--tables-file", default=None, help="tables definition (default: params/tables.yaml)")
    p.add_argument(
        "--model-info-dir",
        action="append",
        default=[],
        help="directory with <id>.json from `smallbig model-info --json` (repeatable); "
        "<results>/model-info/ and <results>/model-info.json are always read",
    )
    p.add_argument(
        "--compute-model-info",
        dest="compute_model_info",
        action="store_true",
        default=True,
        help="compute model info that no file gives (the default)",
    )
    p.add_argument(
        "--no-compute-model-info",
        dest="compute_model_info",
        action="store_false",
        help="do not compute missing model info (Params/GFLOPs 'ours' stay empty)",
    )
    p.add_argument(
        "--embedded", action="store_true", help="force the 'embedded default, not comparable' banner"
    )
    p.add_argument(
        "--not-comparable",
        action="store_true",
        help="the run is scaled down (the workflow config's paper_comparable: false): every verdict "
        "reads 'not comparable' (implied by the embedded banner)",
    )


def run_dir(results: str | Path, run: str | None) -> Path:
    """results/<run> from (--results, --run): `results --run x` or `results/x` (with or without
    a matching --run)."""
    results = Path(results)
    if run is None or results.name == run:
        return results
    return results / run


def _mlflow_run_state(record: dict) -> str | None:
    """The MLflow status of a training's `train/mlflow-run.json` record; None when its store
    is not there or does not answer (asked only for trainings without a final checkpoint)."""
    uri, run_id = record.get("tracking_uri"), record.get("run_id")
    if not uri or not run_id or (uri.startswith("sqlite:///") and not Path(uri[10:]).is_file()):
        return None  # never create a store by asking it
    from smallbig.engine import tracking

    tracking.bound_http_retries()
    tracking.disable_telemetry()
    if not tracking.probe(uri):
        return None
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 — a report never dies on the tracking store
        return None


def _model_info(params: dict) -> dict:
    from smallbig.models import model_info

    return model_info(params)


def _results(args):
    from smallbig.analysis.collect import Results

    if args.seeds is not None and args.seeds < 1:
        raise TablesError(f"--seeds: must be >= 1, got {args.seeds}")
    return Results(
        run_dir(args.results, args.run),
        args.run,
        args.logs,
        run_state=_mlflow_run_state,
        model_info=_model_info,
        seeds=args.seeds,
    )


def _setup(args, numbers: list[int] | None = None, model_info_tables: list[int] | None = None):
    """(results, banner, built tables); `model_info_tables`: compute missing model info only for
    these tables (the figures need it for Table 10 only)."""
    from smallbig.analysis.html import EMBEDDED_BANNER, banner_for
    from smallbig.analysis.report_tables import build_tables

    results = _results(args)
    banner = EMBEDDED_BANNER if args.embedded else banner_for(results.run, results)
    tables = load_tables(args.tables_file)
    if numbers:
        known = [t["number"] for t in tables]
        bad = [n for n in numbers if n not in known]
        if bad:
            raise TablesError(f"{args.tables_file or 'params/tables.yaml'}: no table {bad} (tables: {known})")
        tables = [t for t in tables if t["number"] in numbers]
    dirs = [Path(d) for d in args.model_info_dir]
    comparable = banner is None and not args.not_comparable
    built = [
        build_tables(
            [t],
            results,
            dirs,
            args.compute_model_info and (model_info_tables is None or t["number"] in model_info_tables),
            size_notes=banner is None,
            comparable=comparable,
        )[0]
        for t in tables
    ]
    return results, banner, built


def cmd_tables(args) -> int:
    from smallbig.analysis.report_tables import write_tables, write_verdicts

    numbers = [args.number] if getattr(args, "number", None) else None
    results, banner, built = _setup(args, numbers)
    paths = write_tables(built, args.out, banner, index=numbers is None)
    if getattr(args, "verdicts", None):
        paths.append(write_verdicts(built, results, args.verdicts))
    _print_counts(built)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def cmd_figures(args) -> int:
    from smallbig.analysis.figures import write_figures  # matplotlib

    results, banner, built = _setup(args, model_info_tables=[10])
    manifest = write_figures(built, results, args.out, banner)
    print(f"wrote {len(manifest)} figures (PNG + SVG) to {args.out}")
    return 0


def cmd_featmaps(args) -> int:
    from smallbig.analysis.featmaps import write_featmaps  # torch

    m = write_featmaps(
        run_dir(args.results, args.run),
        args.out,
        args.smallbig,
        args.nonlocal_id,
        args.videos,
        args.video_id or None,
        args.smallbig_checkpoint,
        args.nonlocal_checkpoint,
    )
    for line in m["missing"]:
        print(f"feature maps: {line}", file=sys.stderr)
    print(f"wrote {len(m['figures'])} feature-map figures to {Path(args.out) / 'featmaps'}")
    return 0


def cmd_html(args) -> int:
    from smallbig.analysis.html import write_index
    from smallbig.analysis.report_tables import table_files, write_tables, write_verdicts

    results, banner, built = _setup(args)
    out = Path(args.out)
    # the index links every table file: write them when any is missing (never rewrites the
    # workflow's own table outputs)
    names = [f for t in built for f in table_files(t["number"]).values()] + ["all.md", "summary.json"]
    if any(not (out / "tables" / f).is_file() for f in names):
        write_tables(built, out / "tables", banner)
    if not (out / "verdicts.json").is_file():
        write_verdicts(built, results, out / "verdicts.json")
    path = write_index(out, built, results, banner)
    print(f"wrote {path}")
    return 0


def cmd_build(args) -> int:
    from smallbig.analysis.figures import write_figures  # matplotlib
    from smallbig.analysis.html import write_index
    from smallbig.analysis.report_tables import write_tables, write_verdicts

    results, banner, built = _setup(args)
    out = Path(args.out)
    write_tables(built, out / "tables", banner)
    write_verdicts(built, results, out / "verdicts.json")
    write_figures(built, results, out / "figures", banner)
    if args.featmaps:
        from smallbig.analysis.featmaps import write_featmaps  # torch

        m = write_featmaps(results.dir, out / "figures", num_videos=args.videos)
        for line in m["missing"]:
            print(f"feature maps: {line}", file=sys.stderr)
    path = write_index(out, built, results, banner)
    _print_counts(built)
    print(f"wrote {path}")
    return 0


def cmd_check(args) -> int:
    from smallbig.analysis.browser import check_report  # aiohttp

    sections = {}
    for item in args.section:
        element_id, sep, path = item.partition("=")
        if not sep or not element_id or not path:
            raise TablesError(f"--section {item!r}: expected ID=PNG (e.g. figures=reports/figures.png)")
        sections[element_id] = path
    r = check_report(args.index, args.screenshot, serve=not args.no_serve, sections=sections)
    print(json.dumps({k: v for k, v in r.items() if k != "text"}, indent=1))
    return 0 if r["ok"] else 1


def _print_counts(built) -> None:
    total: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    for t in built:
        for k, v in t["counts"].items():
            total[k] = total.get(k, 0) + v
        for k, v in t["verdict_counts"].items():
            verdicts[k] = verdicts.get(k, 0) + v
    print("rows: " + ", ".join(f"{v} {k}" for k, v in total.items() if v))
    print("verdicts: " + (", ".join(f"{v} {k}" for k, v in verdicts.items() if v) or "none yet"))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `smallbig report {tables,table,figures,featmaps,html,build,check}`."""
    rep = sub.add_parser(
        "report",
        help="tables, figures, feature maps and the HTML report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rsub = rep.add_subparsers(dest="report_command", metavar="WHAT")
    rsub.required = True

    p = rsub.add_parser("tables", help="Tables 2-11 as Markdown, CSV, LaTeX and HTML")
    _common(p)
    p.add_argument("--out", default="reports/tables")
    p.add_argument(
        "--verdicts",
        default=None,
        metavar="FILE",
        help="also write the verdicts of every row and claim as JSON (the workflow: reports/verdicts.json)",
    )
    p.set_defaults(func=cmd_tables)

    p = rsub.add_parser("table", help="one table (table<N>.{md,csv,tex,html})")
    p.add_argument("number", type=int, help="paper table number, 2-11")
    _common(p)
    p.add_argument("--out", default="reports/tables")
    p.set_defaults(func=cmd_tables)

    p = rsub.add_parser("figures", help="accuracy vs cost, ablations, training curves, views")
    _common(p)
    p.add_argument("--out", default="reports/figures")
    p.set_defaults(func=cmd_figures)

    p = rsub.add_parser("featmaps", help="feature-map visualisations (paper Fig. 3)")
    _results_args(p)
    p.add_argument(
        "--out",
        default="reports/figures",
        help="figures directory (writes featmaps/*.png|svg and featmaps.json)",
    )
    p.add_argument("--smallbig", default="k400-r23-sb-full", help="SmallBig experiment id")
    p.add_argument(
        "--nonlocal", dest="nonlocal_id", default="k400-r23-nonlocal", help="NonLocal experiment id"
    )
    p.add_argument("--smallbig-checkpoint", default=None, help="override the SmallBig checkpoint")
    p.add_argument("--nonlocal-checkpoint", default=None, help="override the NonLocal checkpoint")
    p.add_argument("--videos", type=int, default=2, help="number of validation videos")
    p.add_argument("--video-id", action="append", default=[], help="a validation video id (repeatable)")
    p.set_defaults(func=cmd_featmaps)

    p = rsub.add_parser(
        "html",
        help="<out>/index.html (links tables/ and the figures/ manifests; writes missing tables/verdicts)",
    )
    _common(p)
    p.add_argument("--out", "--reports", dest="out", default="reports")
    p.set_defaults(func=cmd_html)

    p = rsub.add_parser(
        "build", help="tables + verdicts.json + figures (+ feature maps) + index.html in one go"
    )
    _common(p)
    p.add_argument("--out", "--reports", dest="out", default="reports")
    p.add_argument("--featmaps", action="store_true", help="also draw the feature maps")
    p.add_argument("--videos", type=int, default=2)
    p.set_defaults(func=cmd_build)

    p = rsub.add_parser(
        "check", help="load index.html in headless Chromium: console errors, images, links, screenshot"
    )
    p.add_argument("index", nargs="?", default="reports/index.html")
    p.add_argument("--screenshot", default=None)
    p.add_argument("--no-serve", action="store_true", help="file:// only (no local HTTP server)")
    p.add_argument(
        "--section",
        action="append",
        default=[],
        metavar="ID=PNG",
        help="also screenshot the element with this id at the size the page shows it "
        "(repeatable; e.g. figures=reports/figures.png)",
    )
    p.set_defaults(func=cmd_check)
