"""`smallbig dvc ...`: the steps of the DVC pipeline (dvc.yaml) that belong to DVC and to no
library area. Each is one stage command (docs/workflow.md, "DVC"):

  smallbig dvc data PARAMS --out results/dvc/data.json
      the prepared dataset PARAMS trains on (data.root): checked against its manifest.json and
      written as a small fingerprint, the one data dependency of the training stage. At full
      scale that is the lab's prepared dataset, never re-made and never hashed file by file.
  smallbig dvc resumable PARAMS TRAIN_DIR
      keep TRAIN_DIR/last.pt (a persistent DVC output) only when it was made with PARAMS, so an
      interrupted `dvc repro` resumes while `dvc exp run -S train.lr=...` starts afresh
  smallbig dvc metrics RUN_DIR --protocol P --out results/dvc/metrics.json --plots results/dvc/plots
      the same keys for every experiment at one fixed path (`dvc exp show` shares the columns)
      and the training curves (`dvc plots`)
  smallbig dvc shared-data [--overlay O]
      what of each prepared dataset a lab versions and shares (workflow/scripts/dvc-snapshot.sh
      full): the verified source archives, lists, manifest and quarantine report, never the
      frames or extracted videos `smallbig data prepare` rebuilds from them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from smallbig.errors import InputError
from smallbig.fsutil import atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dvc", help="steps of the DVC pipeline: data fingerprint, resume guard, metrics")
    psub = p.add_subparsers(dest="dvc_command", metavar="STEP")
    psub.required = True

    q = psub.add_parser("data", help="check the prepared dataset of a params file; write its fingerprint")
    q.add_argument("params", help="resolved params YAML (results/dvc/params.yaml)")
    q.add_argument("--out", required=True, help="fingerprint JSON (results/dvc/data.json)")
    q.set_defaults(func=_data)

    q = psub.add_parser("resumable", help="set aside a last.pt made with other params")
    q.add_argument("params", help="resolved params YAML the training runs with")
    q.add_argument("train_dir", help="the training's --out directory")
    q.set_defaults(func=_resumable)

    q = psub.add_parser("metrics", help="shared-column metrics and training curves of one run")
    q.add_argument("run_dir", help="results/dvc/<scale>/<id> (train/, eval-<protocol>/)")
    q.add_argument("--protocol", required=True)
    q.add_argument("--out", required=True, help="metrics JSON (results/dvc/metrics.json)")
    q.add_argument("--plots", required=True, help="directory of the curves (results/dvc/plots)")
    q.set_defaults(func=_metrics)

    q = psub.add_parser("shared-data", help="per dataset, the paths to version (sources, lists, manifest)")
    q.add_argument("--overlay", help="overlay of the run (e.g. params/embedded.yaml); default: none (full)")
    q.set_defaults(func=_shared_data)


# --------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({what}): {e}") from None


# --------------------------------------------------------------------------- data
def data_fingerprint(params: dict, params_file: str = "PARAMS") -> dict:
    """What identifies the prepared dataset at `data.root`: its manifest (lists, counts, the
    check's settings and result) and the hashes of the lists the loaders read, after checking
    that the directory is the one the params describe and that the lists are those the
    manifest recorded. The videos and frames are not read: `smallbig data prepare` vouches for
    them (manifest.json is written last, after the check)."""
    data = params["data"]
    root = Path(data["root"])
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise InputError(
            f"{root}: not a prepared dataset (no manifest.json). data.root of {params_file} must "
            f"point at a dataset prepared by `smallbig data prepare {params_file}` (or the "
            f"workflow's data_{data['dataset']} rule)"
        )
    manifest = _read_json(mpath, "the manifest of a prepared dataset")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise InputError(f"{mpath}: not a smallbig manifest (no `splits` mapping)")
    for key in ("dataset", "format"):
        if manifest.get(key) != data[key]:
            raise InputError(
                f"{mpath}: {key} is {manifest.get(key)!r}, but data.{key} of {params_file} is "
                f"{data[key]!r}: data.root points at another dataset"
            )
    splits = {}
    for split in ("train", "val"):
        info = manifest["splits"].get(split)
        if not isinstance(info, dict) or "list" not in info:
            raise InputError(f"{mpath}: splits.{split}: missing (the dataset has no {split} list)")
        lpath = root / str(info["list"])
        if not lpath.is_file():
            raise InputError(f"{lpath}: missing (listed by {mpath})")
        sha = _sha256(lpath)
        if sha != info.get("sha256"):
            raise InputError(
                f"{lpath}: changed since {mpath} was written (sha256 {sha[:12]}, recorded "
                f"{str(info.get('sha256'))[:12]}); run `smallbig data prepare` again"
            )
        splits[split] = {k: info.get(k) for k in ("count", "usable", "quarantined", "num_missing")}
        splits[split]["list_sha256"] = sha
    report = root / str((manifest.get("check") or {}).get("report", "quarantine.json"))
    return {
        "dataset": data["dataset"],
        "root": str(root),
        "format": data["format"],
        "manifest_sha256": _sha256(mpath),
        "quarantine_sha256": _sha256(report) if report.is_file() else None,
        "num_classes": manifest.get("num_classes"),
        "splits": splits,
    }


def _data(args) -> int:
    from smallbig import config

    fp = data_fingerprint(config.load_resolved(args.params), args.params)
    atomic_write_json(args.out, fp)
    counts = ", ".join(f"{s} {v['usable']} usable" for s, v in fp["splits"].items())
    print(
        f"smallbig dvc data: {fp['root']} ({fp['dataset']}, {counts}), manifest {fp['manifest_sha256'][:12]}"
    )
    return 0


# --------------------------------------------------------------------------- resumable
def _resumable(args) -> int:
    """DVC keeps a `persist` output between runs; the engine resumes from it only with the
    same params (and refuses otherwise). A last.pt made with other params is renamed aside
    (never deleted: it may hold days of an interrupted run) and the training starts afresh."""
    from smallbig import config
    from smallbig.engine.checkpoint import CheckpointError, load_checkpoint, prev_path

    last = Path(args.train_dir) / "last.pt"
    if not last.exists():
        return 0
    try:
        ckpt = load_checkpoint(last)
    except CheckpointError:
        return 0  # unreadable: the engine's resume falls back to last.prev.pt and says so
    now = config.params_hash(config.load_resolved(args.params))
    made = str(ckpt.get("params_hash"))
    if made == now:
        print(f"smallbig dvc resumable: {last} has these params: the training resumes from it")
        return 0
    for path in (last, prev_path(last)):
        if path.exists():
            kept = path.with_name(f"{path.stem}.params-{made[:12]}{path.suffix}")
            os.replace(path, kept)
            print(
                f"smallbig dvc resumable: {path} was made with other params (hash {made[:12]}, "
                f"now {now[:12]}): kept as {kept.name}; the training starts afresh"
            )
    return 0


# --------------------------------------------------------------------------- metrics
METRIC_KEYS = ("top1", "top5", "mean_class_acc", "num_videos")


def shared_metrics(run_dir: Path, protocol: str) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, loss curve, val top-1 curve) of one run: the same keys for every experiment
    (DVC compares files by path and key), the curves per epoch from the training's history."""
    ev = _read_json(run_dir / f"eval-{protocol}" / "metrics.json", "the evaluation's metrics")
    tm = _read_json(run_dir / "train" / "train_metrics.json", "the training's summary")
    history = _read_json(run_dir / "train" / "history.json", "the training's history")
    if not isinstance(ev, dict) or not isinstance(tm, dict) or not isinstance(history, list):
        raise InputError(f"{run_dir}: metrics.json / train_metrics.json / history.json: unexpected layout")
    metrics = {"experiment": ev.get("experiment"), "protocol": protocol}
    metrics.update({k: ev.get(k) for k in METRIC_KEYS})
    metrics.update({k: tm.get(k) for k in ("val_top1", "final_loss", "epochs")})
    loss = [{"epoch": h["epoch"], "loss": h["loss"], "lr": h.get("lr")} for h in history]
    val = [{"epoch": h["epoch"], "val_top1": h["val_top1"]} for h in history if h.get("val_top1") is not None]
    return metrics, loss, val


def _metrics(args) -> int:
    metrics, loss, val = shared_metrics(Path(args.run_dir), args.protocol)
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plots / "loss.json", loss)
    atomic_write_json(plots / "val_top1.json", val)
    atomic_write_json(args.out, metrics)
    print(
        f"smallbig dvc metrics: {metrics['experiment']} {args.protocol}: top1 {metrics['top1']} top5 {metrics['top5']}"
    )
    return 0


# --------------------------------------------------------------------------- shared-data
LIST_FILES = ("*.txt", "classes.json", "quarantine.json", "manifest.json")


def shared_data(params: dict) -> list[Path]:
    """The paths of one prepared dataset a lab versions: what `smallbig data prepare` cannot make
    again without the network or a licence (the verified source: Kinetics' tarballs, path lists,
    annotations and replacement archive under the download dir, but not its `extract/` work;
    Something-Something's archive_dir as the user placed it) and what identifies the result
    (lists, classes, quarantine report, manifest). Frames and extracted videos are rebuilt from
    those by `smallbig data prepare` (it skips the download and, lists unchanged, the check);
    Kinetics' videos are versioned only when their tarballs are not kept (keep_archives: false)."""
    data = params["data"]
    root, src = Path(data["root"]), data.get("source") or {}
    paths = sorted({p for pattern in LIST_FILES for p in root.glob(pattern) if p.is_file()})
    if data["dataset"] == "kinetics400":
        raw = Path(src.get("download_dir") or root / "raw")
        if raw.is_dir():
            paths += sorted(p for p in raw.iterdir() if p.name != "extract" and not p.name.endswith(".part"))
        if not src.get("keep_archives", True) and (root / "videos").is_dir():
            paths.append(root / "videos")
    elif src.get("archive_dir") and Path(src["archive_dir"]).is_dir():
        paths.append(Path(src["archive_dir"]))
    return paths


def _shared_data(args) -> int:
    from smallbig import config

    seen: dict[tuple[str, str], dict] = {}
    for exp_id in config.experiment_ids():
        p = config.load_params(config.experiment_path(exp_id), overlay=args.overlay)
        seen.setdefault((p["data"]["dataset"], p["data"]["root"]), p)
    for (dataset, _root), p in sorted(seen.items()):
        for path in shared_data(p):
            print(f"{dataset}\t{path}")
    return 0
