"""`smallbig data ...`: the embedded dataset, preparation, frames, validation.

  smallbig data toy --out DIR [--seed N] [--datasets ...] [--per-class train=24 val=16 ...]
  smallbig data prepare PARAMS [--overlay OVERLAY] [--workers N] [--recheck]
  smallbig data check --list LIST --root DIR --out REPORT.json [--decode-all] [--min-frames N]
                     [--num-classes N] [--file-timeout SECONDS]
  smallbig data check PARAMS --out REPORT.json   (train.txt + val.txt of data.root)
  smallbig data frames --list LIST --root DIR --out-list LIST [--short-side N] [--subdir frames]
  smallbig data resize --list LIST --root DIR --out-list LIST --short-side N [--subdir videos320]

Errors become messages and exit codes in `smallbig.cli.main` (smallbig/errors.py): a bad list,
dataset directory, source or archive exits 2, a check whose decoder workers do not start exits 1.
Only torch-free modules are imported at the top (the CLI's start-up stays light); the commands
import what they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from smallbig.config import load_params
from smallbig.data.lists import (
    DataError,
    LabelBound,
    label_bounds,
    load_manifest,
    read_list,
    scan_list,
    write_list,
)
from smallbig.errors import SmallbigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `smallbig` parser."""
    p = sub.add_parser("data", help="acquire, extract, check datasets; the embedded dataset")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    t = dsub.add_parser("toy", help="generate the embedded dataset (real encoded videos)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--datasets",
        nargs="+",
        default=["kinetics400", "sthv2", "sthv1"],
        choices=["kinetics400", "sthv2", "sthv1"],
        help="which trees to generate",
    )
    t.add_argument(
        "--per-class",
        nargs="+",
        default=[],
        metavar="SPLIT=N",
        help="videos per class, e.g. train=24 val=16 (splits: train val test ss_train ss_val; "
        "default 12 6 1 12 6)",
    )
    t.set_defaults(func=_toy)

    pr = dsub.add_parser("prepare", help="acquire -> lists -> frames -> check -> manifest (idempotent)")
    pr.add_argument("params", help="experiment or resolved params file")
    pr.add_argument("--overlay", default=None, help="overlay (e.g. params/embedded.yaml)")
    pr.add_argument("--workers", type=int, default=None, help="processes for frames and checks")
    pr.add_argument("--recheck", action="store_true", help="re-run the check even if lists are unchanged")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=_prepare)

    c = dsub.add_parser("check", help="open every video of a list; report bad files with reasons")
    c.add_argument(
        "params",
        nargs="?",
        default=None,
        help="params file: check train.txt and val.txt of its data.root (instead of --list/--root)",
    )
    c.add_argument("--overlay", default=None)
    c.add_argument("--list", help="list file (`path label` or `frame_dir n label`)")
    c.add_argument("--root", help="directory the list's paths are relative to")
    c.add_argument("--out", required=True, help="JSON report {ok, bad: [{path, reason}]}")
    c.add_argument("--decode-all", action="store_true", help="decode every frame (slow, finds truncation)")
    c.add_argument("--min-frames", type=_positive_int, default=None, help="flag videos with fewer frames")
    c.add_argument("--workers", type=_positive_int, default=None)
    c.add_argument("--frame-template", default="img_{:05d}.jpg", help="for frame lists")
    c.add_argument(
        "--num-classes",
        type=_positive_int,
        default=None,
        help="labels must be below N (also checked: ROOT/classes.json, and model.num_classes with PARAMS)",
    )
    c.add_argument(
        "--file-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="deadline for decoding one file; a decoder past it is killed and the file "
        "reported (default $SMALLBIG_CHECK_FILE_TIMEOUT, else 300)",
    )
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_check)

    f = dsub.add_parser("frames", help="extract JPEG frames img_{:05d}.jpg from the videos of a list")
    f.add_argument("--list", required=True)
    f.add_argument("--root", required=True)
    f.add_argument("--out-list", required=True, help="frames list to write (`frame_dir n label`)")
    f.add_argument("--subdir", default="frames", help="frame folders go to ROOT/SUBDIR/<id>/")
    f.add_argument("--short-side", type=int, default=320, help="0 keeps the original size")
    f.add_argument("--workers", type=int, default=None)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_frames)

    r = dsub.add_parser("resize", help="re-encode the videos of a list to a short side")
    r.add_argument("--list", required=True)
    r.add_argument("--root", required=True)
    r.add_argument("--out-list", required=True)
    r.add_argument("--subdir", default="videos320")
    r.add_argument("--short-side", type=int, default=320)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_resize)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def _logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _toy(args) -> int:
    from smallbig.data.toy import make_toy

    per_class = {}
    for item in args.per_class:
        key, _, val = item.partition("=")
        if key not in ("train", "val", "test", "ss_train", "ss_val") or not val.isdigit() or int(val) < 1:
            raise SystemExit(
                f"smallbig data toy: --per-class {item!r}: expected SPLIT=N with SPLIT one of "
                "train, val, test, ss_train, ss_val and N >= 1"
            )
        per_class[key] = int(val)
    try:
        summary = make_toy(args.out, args.seed, datasets=tuple(args.datasets), per_class=per_class or None)
    except ValueError as e:
        raise SystemExit(f"smallbig data toy: {e}") from None
    print(json.dumps(summary, indent=1))
    return 0


def _load(path: str, overlay: str | None) -> dict:
    """An experiment file (with `extends`) or a resolved one; validated either way."""
    return load_params(path, overlay)


def _prepare(args) -> int:
    """DataError, DownloadError, ArchiveError: exit 2; CheckError (the check's decoder workers do
    not start: the environment, not the data): exit 1."""
    from smallbig.data.prepare import prepare

    _logging()
    params = _load(args.params, args.overlay)
    m = prepare(params, progress=not args.quiet, workers=args.workers, force_check=args.recheck)
    counts = {
        s: {k: v[k] for k in ("count", "usable", "quarantined", "num_missing")}
        for s, v in m["splits"].items()
    }
    print(
        json.dumps(
            {
                "root": params["data"]["root"],
                "dataset": m["dataset"],
                "format": m["format"],
                "num_classes": m["num_classes"],
                "splits": counts,
            },
            indent=1,
        )
    )
    return 0


def _check(args) -> int:
    """Exit 0: the check ran (bad videos are in the report); 2: the list is invalid (each bad
    line reported as FILE:LINE: problem, on stderr and under "list_problems" in the report; the
    other lines are still checked) or the check cannot run on these arguments; 1: the decoder
    workers do not start."""
    from smallbig.data.check import CheckInputError, check_entries, resolve_file_timeout, write_json

    try:
        timeout = resolve_file_timeout(args.file_timeout)
        if args.params:
            if args.list or args.root:
                raise DataError("give either PARAMS or --list/--root, not both")
            params = _load(args.params, args.overlay)
            root = Path(params["data"]["root"])
            manifest = load_manifest(root)
            template = manifest.get("frame_template") or args.frame_template
            lists = [root / "train.txt", root / "val.txt"]
            bounds = label_bounds(root, params)
            min_frames = args.min_frames
            if min_frames is None:
                min_frames = manifest.get("check", {}).get("settings", {}).get("min_frames")
        else:
            if not (args.list and args.root):
                raise DataError("needs --list and --root (or a params file)")
            root, template, min_frames = Path(args.root), args.frame_template, args.min_frames
            lists = [Path(args.list)]
            bounds = label_bounds(root)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory")
        if args.num_classes is not None:
            bounds.append(LabelBound(args.num_classes, f"--num-classes {args.num_classes}"))
        entries, problems = [], []
        for lp in lists:
            e, p = scan_list(lp, None, bounds)
            entries += e
            problems += p
        report = check_entries(
            root,
            entries,
            args.decode_all,
            min_frames,
            args.workers,
            template,
            progress=not args.quiet,
            file_timeout=timeout,
        )
        if problems:
            report["list_problems"] = problems
        write_json(Path(args.out), report)
    except SmallbigError as e:
        if not isinstance(e, DataError):  # invalid params, CheckError (exit 1), a full disk, ...
            raise
        raise CheckInputError(str(e)) from None
    except (OSError, ValueError) as e:  # a bad --out directory, an unreadable list, ...
        raise CheckInputError(str(e)) from None
    print(f"{report['ok']} ok, {len(report['bad'])} bad -> {args.out}")
    for b in report["bad"][:20]:
        print(f"  {b['path']}: {b['reason']}")
    if len(report["bad"]) > 20:
        print(f"  ... and {len(report['bad']) - 20} more")
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(
            f"smallbig data check: invalid list: {len(problems)} bad line(s) (listed above and under "
            f'"list_problems" in {args.out}); fix them, the other lines were checked',
            file=sys.stderr,
        )
        return 2
    return 0


def _frames(args) -> int:
    from smallbig.data.frames import extract_frames

    _logging()
    entries = read_list(args.list, "video")
    out, failed = extract_frames(
        Path(args.root), entries, args.subdir, args.short_side or None, args.workers, not args.quiet
    )
    write_list(args.out_list, out, "frames")
    print(f"{len(out) - len(failed)} videos extracted, {len(failed)} failed -> {args.out_list}")
    for f in failed:
        print(f"  {f['path']}: {f['reason']}")
    return 0


def _resize(args) -> int:
    from smallbig.data.frames import resize_videos

    entries = read_list(args.list, "video")
    out, failed = resize_videos(Path(args.root), entries, args.subdir, args.short_side, not args.quiet)
    write_list(args.out_list, out, "video")
    print(f"{len(out)} videos re-encoded, {len(failed)} failed -> {args.out_list}")
    for f in failed:
        print(f"  {f['path']}: {f['reason']}")
    return 0
