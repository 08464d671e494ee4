"""`smallbig data prepare PARAMS`: from the raw source to a training-ready dataset directory.

acquisition (download / verify / extract / replacements, or archive parts) -> canonical lists
-> frames (when data.format is frames) -> check -> quarantine.json -> manifest.json (last).

Every step is idempotent: finished downloads, extractions and frame folders are kept, and the
check is skipped when the lists and check settings are unchanged since the last run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path

from smallbig import __version__
from smallbig.data import check as checkmod
from smallbig.data import frames as framesmod
from smallbig.data import kinetics, something
from smallbig.data.lists import DataError, Entry, write_list
from smallbig.spec.params import DataSpec

log = logging.getLogger("smallbig.data")
DATASETS = ("kinetics400", "sthv1", "sthv2")


def sha256_text(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_json(path: Path, obj) -> None:
    checkmod.write_json(path, obj)


DEFAULT_MIN_FRAMES = 8  # the paper's shortest clip; dataset-level, not per experiment


def prepare(
    params: dict, progress: bool = True, workers: int | None = None, force_check: bool = False
) -> dict:
    """Prepare `params.data.root` (one process at a time per root: a lock file guards it)."""
    root = Path(params["data"]["root"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(params, progress, workers, force_check)


def _prepare(params: dict, progress: bool, workers: int | None, force_check: bool) -> dict:
    data = DataSpec.from_dict(params["data"])
    ds = data.dataset
    if ds not in DATASETS:
        raise DataError(f"data.dataset: unknown dataset {ds!r} (known: {', '.join(DATASETS)})")
    root = Path(data.root)
    fmt = data.format
    src = dict(data.source)  # dataset-specific keys (smallbig/data/kinetics.py, something.py)
    if ds == "sthv1" and fmt != "frames":
        raise DataError("data.format: Something-Something V1 is distributed as JPEG frames; use `frames`")
    root.mkdir(parents=True, exist_ok=True)

    # 1. acquisition -> <split>_videos.txt (or _frames.txt for V1), classes
    if ds == "kinetics400":
        summary = kinetics.acquire(data, root, progress)
    else:
        summary = something.acquire(data, root, 1 if ds == "sthv1" else 2, progress)
    classes = summary["classes"]
    _write_json(root / "classes.json", classes)
    template = summary.get("frame_template", framesmod.TEMPLATE)

    # 2. lists in the configured format (frames extracted from videos when needed)
    failures: dict[str, dict] = {}
    lists: dict[str, list[Entry]] = {}
    for split, info in summary["splits"].items():
        entries = info["entries"]
        if fmt == "frames" and ds != "sthv1":
            entries, failed = framesmod.extract_frames(
                root, entries, f"frames/{split}", data.frame_short_side, workers, progress
            )
            write_list(root / f"{split}_frames.txt", entries, "frames")
            failures.update({f["path"]: f for f in failed})
        write_list(root / f"{split}.txt", entries, fmt)
        lists[split] = entries

    # 3. check -> quarantine.json (skipped when lists and settings are unchanged)
    min_frames = int(src.get("min_frames", DEFAULT_MIN_FRAMES))
    decode_all = bool(src.get("decode_all", False))
    list_sha = {split: sha256_text(root / f"{split}.txt") for split in lists}
    settings = {"lists_sha256": list_sha, "min_frames": min_frames, "decode_all": decode_all}
    old = _read_manifest(root)
    qpath = root / "quarantine.json"
    if not force_check and qpath.exists() and old.get("check", {}).get("settings") == settings:
        report = json.loads(qpath.read_text())
        log.info("%s: lists unchanged since the last check; kept %s", root, qpath)
    else:
        report = {"ok": 0, "bad": []}
        for entries in lists.values():
            r = checkmod.check_entries(root, entries, decode_all, min_frames, workers, template, progress)
            report["ok"] += r["ok"]
            for b in r["bad"]:
                if b["path"] in failures:  # the extraction's reason says more than "missing"
                    b = dict(b, reason=failures[b["path"]]["reason"])
                report["bad"].append(b)
        checkmod.write_json(qpath, report)
    bad_paths = {b["path"] for b in report["bad"]}

    # 4. manifest (written last: its presence means the directory is ready)
    manifest = {
        "dataset": ds,
        "format": fmt,
        "frame_template": template if fmt == "frames" else None,
        "num_classes": len(classes),
        "classes_sha256": sha256_text(root / "classes.json"),
        "source": src,
        "splits": {},
        "replaced": summary.get("replaced", []),
        "check": {
            "settings": settings,
            "ok": report["ok"],
            "bad": len(report["bad"]),
            "report": "quarantine.json",
        },
        "smallbig_version": __version__,
    }
    for split, entries in lists.items():
        info = summary["splits"][split]
        n_bad = sum(1 for e in entries if e.path in bad_paths)
        manifest["splits"][split] = {
            "list": f"{split}.txt",
            "sha256": list_sha[split],
            "count": len(entries),
            "quarantined": n_bad,
            "usable": len(entries) - n_bad,
            "num_missing": len(info["missing"]),
            "missing": info["missing"],
        }
        for extra in ("videos", "frames"):
            p = root / f"{split}_{extra}.txt"
            if p.exists():
                manifest["splits"][split][f"{extra}_list"] = p.name
                manifest["splits"][split][f"{extra}_sha256"] = sha256_text(p)
    _write_json(root / "manifest.json", manifest)
    return manifest


def _read_manifest(root: Path) -> dict:
    p = root / "manifest.json"
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except ValueError:
        return {}
