"""`smallbig report ...`: tables, figures, feature maps and the HTML report (each one entry point a
Snakemake rule can call).

  smallbig report tables   --results results --run embedded --out reports/tables
  smallbig report figures  --results results --run embedded --out reports/figures
  smallbig report featmaps --results results --run embedded --out reports/figures
  smallbig report html     --results results --run embedded --reports reports
  smallbig report build    --results results --run embedded --reports reports [--featmaps]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smallbig.config import REPO_ROOT


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=str(REPO_ROOT / "results"),
                   help="results root (default: <repo>/results)")
    p.add_argument("--run", default="full", help="run name under the results root: full | embedded")
    p.add_argument("--tables-file", default=None, help="tables definition (default: params/tables.yaml)")
    p.add_argument("--model-info-dir", action="append", default=[],
                   help="directory with <id>.json from `smallbig model-info` (repeatable; "
                        "results/<run>/model-info/ is always searched)")
    p.add_argument("--compute-model-info", action="store_true",
                   help="compute missing model info with smallbig.models.model_info")
    p.add_argument("--embedded", action="store_true",
                   help="force the 'embedded default, not comparable' banner")


def _setup(args):
    from smallbig.analysis.collect import Results
    from smallbig.analysis.html import EMBEDDED_BANNER, banner_for
    from smallbig.analysis.report_tables import build_tables
    from smallbig.analysis.tables import load_tables

    results = Results(args.results, args.run)
    banner = EMBEDDED_BANNER if args.embedded else banner_for(args.run, results)
    tables = load_tables(args.tables_file)
    built = build_tables(tables, results, [Path(d) for d in args.model_info_dir],
                         args.compute_model_info)
    return results, banner, built


def cmd_tables(args) -> int:
    from smallbig.analysis.report_tables import write_tables

    _, banner, built = _setup(args)
    paths = write_tables(built, args.out, banner)
    _print_counts(built)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def cmd_figures(args) -> int:
    from smallbig.analysis.figures import write_figures

    results, banner, built = _setup(args)
    manifest = write_figures(built, results, args.out, banner)
    print(f"wrote {len(manifest)} figures (PNG + SVG) to {args.out}")
    return 0


def cmd_featmaps(args) -> int:
    from smallbig.analysis.featmaps import write_featmaps

    m = write_featmaps(Path(args.results) / args.run, args.out, args.smallbig, args.nonlocal_id,
                       args.videos, args.video_id or None, args.smallbig_checkpoint,
                       args.nonlocal_checkpoint)
    for line in m["missing"]:
        print(f"feature maps: {line}", file=sys.stderr)
    print(f"wrote {len(m['figures'])} feature-map figures to {Path(args.out) / 'featmaps'}")
    return 0


def cmd_html(args) -> int:
    from smallbig.analysis.html import write_index

    results, banner, built = _setup(args)
    path = write_index(args.reports, built, results, banner)
    print(f"wrote {path}")
    return 0


def cmd_build(args) -> int:
    from smallbig.analysis.featmaps import write_featmaps
    from smallbig.analysis.figures import write_figures
    from smallbig.analysis.html import write_index
    from smallbig.analysis.report_tables import write_tables

    results, banner, built = _setup(args)
    reports = Path(args.reports)
    write_tables(built, reports / "tables", banner)
    write_figures(built, results, reports / "figures", banner)
    if args.featmaps:
        m = write_featmaps(results.dir, reports / "figures", num_videos=args.videos)
        for line in m["missing"]:
            print(f"feature maps: {line}", file=sys.stderr)
    path = write_index(reports, built, results, banner)
    _print_counts(built)
    print(f"wrote {path}")
    return 0


def _print_counts(built) -> None:
    total: dict[str, int] = {}
    for t in built:
        for k, v in t["counts"].items():
            total[k] = total.get(k, 0) + v
    print("rows: " + ", ".join(f"{v} {k}" for k, v in total.items() if v))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `smallbig report {tables,figures,featmaps,html,build}`."""
    rep = sub.add_parser("report", help="tables, figures, feature maps and the HTML report",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = rep.add_subparsers(dest="report_command", metavar="WHAT")
    rsub.required = True

    p = rsub.add_parser("tables", help="Tables 2-11 as Markdown, CSV, LaTeX and HTML")
    _common(p)
    p.add_argument("--out", default="reports/tables")
    p.set_defaults(func=cmd_tables)

    p = rsub.add_parser("figures", help="accuracy vs cost, ablations, training curves, views")
    _common(p)
    p.add_argument("--out", default="reports/figures")
    p.set_defaults(func=cmd_figures)

    p = rsub.add_parser("featmaps", help="feature-map visualisations (paper Fig. 3)")
    p.add_argument("--results", default=str(REPO_ROOT / "results"))
    p.add_argument("--run", default="full")
    p.add_argument("--out", default="reports/figures",
                   help="figures directory (writes featmaps/*.png|svg and featmaps.json)")
    p.add_argument("--smallbig", default="k400-r23-sb-full", help="SmallBig experiment id")
    p.add_argument("--nonlocal", dest="nonlocal_id", default="k400-r23-nonlocal",
                   help="NonLocal experiment id")
    p.add_argument("--smallbig-checkpoint", default=None, help="override the SmallBig checkpoint")
    p.add_argument("--nonlocal-checkpoint", default=None, help="override the NonLocal checkpoint")
    p.add_argument("--videos", type=int, default=2, help="number of validation videos")
    p.add_argument("--video-id", action="append", default=[], help="a validation video id (repeatable)")
    p.set_defaults(func=cmd_featmaps)

    p = rsub.add_parser("html", help="reports/index.html (reads tables/ and figures/ manifests)")
    _common(p)
    p.add_argument("--reports", default="reports")
    p.set_defaults(func=cmd_html)

    p = rsub.add_parser("build", help="tables + figures (+ feature maps) + index.html in one go")
    _common(p)
    p.add_argument("--reports", default="reports")
    p.add_argument("--featmaps", action="store_true", help="also draw the feature maps")
    p.add_argument("--videos", type=int, default=2)
    p.set_defaults(func=cmd_build)
