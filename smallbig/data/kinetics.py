"""Kinetics-400 acquisition from the CVD Foundation mirror layout (or a local copy of it).

Layout under `data.source.base_url` (https://s3.amazonaws.com/kinetics/400, a mirror, a
`file://` URL or a plain local path):

    annotations/{train,val,test}.csv           label,youtube_id,time_start,time_end,split
    {train,val,test}/k400_<split>_path.txt     one tarball URL per line
    {train,val,test}/part_<N>.tar.gz           flat <youtube_id>_<start:06d>_<end:06d>.mp4
    replacement_for_corrupted_k400.tgz         good copies of videos corrupted in the tarballs

Tarballs are fetched from `<base_url>/<split>/<file name of each listed URL>`, so a mirror
(or the embedded toy mirror) serves them whatever host its path lists name.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from smallbig.data import archives, download
from smallbig.data.lists import DataError, Entry, write_list
from smallbig.spec.params import DataSpec

log = logging.getLogger("smallbig.data")
REPLACEMENT = "replacement_for_corrupted_k400.tgz"
REQUIRED_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def video_name(youtube_id: str, start, end) -> str:
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}.mp4"


def parse_annotations(path: str | Path) -> list[dict]:
    """Rows of a Kinetics CSV as dicts with label, youtube_id, time_start, time_end, split, name."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; header is {cols}")
        rows = []
        for lineno, row in enumerate(reader, 2):
            try:
                name = video_name(row["youtube_id"], row["time_start"], row["time_end"])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: bad time_start/time_end in {row}") from None
            rows.append(
                {
                    "label": (row.get("label") or "").strip(),
                    "youtube_id": row["youtube_id"],
                    "time_start": row["time_start"],
                    "time_end": row["time_end"],
                    "split": row.get("split", ""),
                    "name": name,
                }
            )
    return rows


def class_names(train_rows: list[dict]) -> list[str]:
    """Class indices come from the sorted training labels."""
    names = sorted({r["label"] for r in train_rows if r["label"]})
    if not names:
        raise DataError("training annotations hold no labels")
    return names


def parse_checksums(text: str) -> dict[str, str]:
    """`sha256sum` format: '<hex>  <relative path>' per line -> {relative path: hex}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        out[name.strip().lstrip("*")] = digest.lower()
    return out


def acquire(data: DataSpec, root: Path, progress: bool = True) -> dict:
    """Download, verify, extract and apply replacements; write lists and classes.json.

    `data.source` keys: base_url (required), download_dir, splits, retries, keep_archives,
    checksums, replacement (dataset-specific; the defaults below are this dataset's, not params
    defaults: the source is replaced whole, never merged with params/base.yaml's).
    Returns the per-split summary (counts, missing) for the manifest."""
    src = data.source
    if "base_url" not in src:
        raise DataError(
            "data.source.base_url: required for kinetics400 (the CVD mirror URL, a "
            "file:// URL or a local path)"
        )
    base = str(src["base_url"])
    raw = Path(src.get("download_dir") or root / "raw")
    splits = list(src.get("splits") or ["train", "val"])
    retries = int(src.get("retries", 3))
    keep = bool(src.get("keep_archives", True))
    checks = src.get("checksums")
    sums: dict[str, str] = {}
    if isinstance(checks, dict):
        sums = {k: str(v).lower() for k, v in checks.items()}
    elif checks:
        url = (
            checks
            if ("://" in str(checks) or Path(str(checks)).is_absolute())
            else download.join_url(base, checks)
        )
        sums = parse_checksums(download.read_text(url, raw / "SHA256SUMS", retries))

    def get(rel: str, dest: Path) -> Path:
        return download.fetch(
            download.join_url(base, rel), dest, sha256=sums.get(rel), retries=retries, progress=progress
        )

    ann = {}
    for split in sorted(set(splits) | {"train"}):  # train labels define the class indices
        ann[split] = parse_annotations(get(f"annotations/{split}.csv", raw / "annotations" / f"{split}.csv"))
    classes = class_names(ann["train"])
    index = {c: i for i, c in enumerate(classes)}

    for split in splits:
        listing = get(f"{split}/k400_{split}_path.txt", raw / split / f"k400_{split}_path.txt").read_text()
        names = [line.strip().rsplit("/", 1)[-1] for line in listing.splitlines() if line.strip()]
        videos = root / "videos" / split
        for name in names:
            work = raw / "extract" / split
            if archives.is_extracted(work, name) and not (raw / split / name).exists():
                tree = work / f"tree-{name}"  # extracted earlier, archive deleted (keep_archives: false)
            else:
                tar = get(f"{split}/{name}", raw / split / name)
                tree = archives.extract(tar, work, progress=progress)
                if not keep:
                    tar.unlink()
            archives.move_files(tree, videos, (".mp4",))
    # replacements: good copies of corrupted videos, matched by file name
    rep_rel = src.get("replacement", REPLACEMENT)
    replaced = []
    if rep_rel:
        tar = get(rep_rel, raw / Path(rep_rel).name)
        tree = archives.extract(tar, raw / "extract" / "replacement", progress=progress)
        listed = {split: {r["name"] for r in ann.get(split, [])} for split in splits}
        for p in sorted(tree.rglob("*.mp4")):
            for split in splits:
                target = root / "videos" / split / p.name
                if target.exists() or p.name in listed[split]:
                    if not target.exists() or download.sha256_file(target) != download.sha256_file(p):
                        target.parent.mkdir(parents=True, exist_ok=True)
                        download.copy_atomic(p, target)
                    replaced.append(f"{split}/{p.name}")

    summary = {"classes": classes, "splits": {}, "replaced": sorted(set(replaced))}
    for split in splits:
        entries, missing, unknown = [], [], []
        seen = set()
        for r in ann[split]:
            if r["name"] in seen:
                continue
            seen.add(r["name"])
            if r["label"] not in index:
                unknown.append(r["name"])
                continue
            rel = f"videos/{split}/{r['name']}"
            if (root / rel).is_file():
                entries.append(Entry(rel, index[r["label"]], None))
            else:
                missing.append(r["name"])
        if unknown:
            log.warning("%s: %d videos with labels not in the training set left out", split, len(unknown))
        write_list(root / f"{split}_videos.txt", entries, "video")
        summary["splits"][split] = {"entries": entries, "missing": missing, "unknown_label": unknown}
        log.info("kinetics400 %s: %d videos listed, %d missing", split, len(entries), len(missing))
    return summary
