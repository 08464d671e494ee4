"""Something-Something V1 and V2 from the archive parts the user downloaded (licence-gated).

`data.source.archive_dir` holds, as downloaded from the 20BN / Qualcomm page:

  V2: 20bn-something-something-v2-00, -01, ...   parts of one tar.gz of <id>.webm
      something-something-v2-labels.json          {"Template without brackets": "index", ...}
      something-something-v2-train.json           [{"id", "label", "template", "placeholders"}]
      something-something-v2-validation.json
      (the label files may also sit in a `labels/` folder as labels.json, train.json,
      validation.json, as in the download package's zip)
  V1: 20bn-something-something-v1-00, -01, ...   parts of one tar.gz of <id>/{:05d}.jpg
      something-something-v1-labels.csv           one label per line; line number = index
      something-something-v1-train.csv            id;label
      something-something-v1-validation.csv

The parts are verified (contiguous numbering, non-empty, checksums when
`data.source.checksums` gives them), joined as one stream and extracted.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from smallbig.data import archives
from smallbig.data.lists import DataError, Entry, write_list
from smallbig.spec.params import DataSpec

V1_TEMPLATE = "{:05d}.jpg"


def strip_template(t: str) -> str:
    """'Putting [something] next to [something]' -> 'Putting something next to something'."""
    return t.replace("[", "").replace("]", "")


# --------------------------------------------------------------------------- parsers
def parse_v2_labels(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(Path(path).read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object template -> index")
    try:
        return {k: int(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: every index must be an integer (or a string of one)") from None


def parse_v2_split(path: Path, labels: dict[str, int]) -> list[tuple[str, int]]:
    """[(video id, class index)] from a V2 train/validation JSON."""
    try:
        items = json.loads(Path(path).read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    out = []
    for i, it in enumerate(items):
        try:
            vid, tmpl = str(it["id"]), it["template"]
        except (KeyError, TypeError):
            raise DataError(f"{path}: item {i}: needs 'id' and 'template', got {it!r}") from None
        key = strip_template(tmpl)
        if key not in labels:
            raise DataError(f"{path}: item {i} (id {vid}): template {tmpl!r} is not in the labels file")
        out.append((vid, labels[key]))
    return out


def parse_v1_labels(path: Path) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: no labels")
    return names


def parse_v1_split(path: Path, names: list[str]) -> list[tuple[str, int]]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        vid, sep, label = line.partition(";")
        if not sep:
            raise DataError(f"{path}:{lineno}: expected 'id;label', got {line!r}")
        label = label.strip()
        if label not in index:
            raise DataError(f"{path}:{lineno}: label {label!r} is not in the labels file")
        out.append((vid.strip(), index[label]))
    return out


# --------------------------------------------------------------------------- archive parts
def find_parts(archive_dir: Path, version: int) -> list[Path]:
    prefix = f"20bn-something-something-v{version}-"
    parts = sorted(p for p in archive_dir.glob(prefix + "??") if re.fullmatch(r"\d\d", p.name[-2:]))
    return parts


def _first(archive_dir: Path, *names: str) -> Path | None:
    for n in names:
        if (archive_dir / n).is_file():
            return archive_dir / n
    return None


def locate(archive_dir: Path, version: int) -> dict:
    """Find every input file; raise one DataError listing everything missing."""
    v = version
    problems = []
    if not archive_dir.is_dir():
        raise DataError(
            f"data.source.archive_dir: {archive_dir} is not a directory; place the "
            f"downloaded 20bn-something-something-v{v}-?? parts and label files there"
        )
    parts = find_parts(archive_dir, v)
    if not parts:
        problems.append(f"archive parts 20bn-something-something-v{v}-00, -01, ... (none found)")
    else:
        nums = [int(p.name[-2:]) for p in parts]
        expected = list(range(nums[-1] + 1))
        gaps = sorted(set(expected) - set(nums))
        if gaps:
            problems.append(
                "archive part(s) "
                + ", ".join(f"20bn-something-something-v{v}-{g:02d}" for g in gaps)
                + f" (found {', '.join(p.name for p in parts)})"
            )
        empty = [p.name for p in parts if p.stat().st_size == 0]
        if empty:
            problems.append(f"non-empty archive part(s): {', '.join(empty)} are zero bytes")
    files = {"parts": parts}
    if v == 2:
        wanted = {
            "labels": ("something-something-v2-labels.json", "labels/labels.json"),
            "train": ("something-something-v2-train.json", "labels/train.json"),
            "val": ("something-something-v2-validation.json", "labels/validation.json"),
        }
    else:
        wanted = {
            "labels": ("something-something-v1-labels.csv",),
            "train": ("something-something-v1-train.csv",),
            "val": ("something-something-v1-validation.csv",),
        }
    for key, names in wanted.items():
        files[key] = _first(archive_dir, *names)
        if files[key] is None:
            problems.append(" or ".join(names))
    if problems:
        raise DataError(
            f"{archive_dir}: Something-Something V{v} input incomplete; missing:\n  - "
            + "\n  - ".join(problems)
        )
    return files


def verify_parts(parts: list[Path], checksums: dict | None) -> None:
    """Check parts against `{part name: md5 or sha256 hex}` where given."""
    if not checksums:
        return
    for p in parts:
        want = checksums.get(p.name)
        if not want:
            continue
        want = str(want).lower()
        h = hashlib.md5() if len(want) == 32 else hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != want:
            raise DataError(
                f"{p}: checksum mismatch: expected {want}, got {h.hexdigest()} (re-download this part)"
            )


# --------------------------------------------------------------------------- acquisition
def acquire(data: DataSpec, root: Path, version: int, progress: bool = True) -> dict:
    """`data.source` keys: archive_dir (required), checksums, extract_dir."""
    src = data.source
    if "archive_dir" not in src:
        raise DataError(
            f"data.source.archive_dir: required for sthv{version} (the folder with the "
            f"downloaded 20bn-something-something-v{version}-?? parts and label files)"
        )
    archive_dir = Path(src["archive_dir"])
    files = locate(archive_dir, version)
    verify_parts(files["parts"], src.get("checksums"))
    work = Path(src.get("extract_dir") or root / "raw")
    tree = archives.extract(
        files["parts"], work, marker_name=f"20bn-something-something-v{version}", progress=progress
    )
    summary = {"splits": {}, "archive_parts": [p.name for p in files["parts"]]}
    if version == 2:
        labels = parse_v2_labels(files["labels"])
        classes = [None] * (max(labels.values()) + 1)
        for name, i in labels.items():
            classes[i] = name
        if any(c is None for c in classes):
            raise DataError(f"{files['labels']}: indices are not contiguous 0..{len(classes) - 1}")
        archives.move_files(tree, root / "videos", (".webm",))
        for split in ("train", "val"):
            entries, missing = [], []
            for vid, label in parse_v2_split(files[split], labels):
                rel = f"videos/{vid}.webm"
                if (root / rel).is_file():
                    entries.append(Entry(rel, label, None))
                else:
                    missing.append(f"{vid}.webm")
            write_list(root / f"{split}_videos.txt", entries, "video")
            summary["splits"][split] = {"entries": entries, "missing": missing}
    else:
        classes = parse_v1_labels(files["labels"])
        frames_root = root / "frames"
        frames_root.mkdir(parents=True, exist_ok=True)
        for d in sorted(p for p in tree.rglob("*") if p.is_dir()):
            if any(d.glob("*.jpg")) and not (frames_root / d.name).exists():
                d.replace(frames_root / d.name)
        for split in ("train", "val"):
            entries, missing = [], []
            for vid, label in parse_v1_split(files[split], classes):
                folder = frames_root / vid
                n = count_frames(folder, V1_TEMPLATE)
                if n:
                    entries.append(Entry(f"frames/{vid}", label, n))
                else:
                    missing.append(vid)
            write_list(root / f"{split}_frames.txt", entries, "frames")
            summary["splits"][split] = {"entries": entries, "missing": missing}
        summary["frame_template"] = V1_TEMPLATE
    summary["classes"] = classes
    return summary


def count_frames(folder: Path, template: str) -> int:
    """Number of consecutive frames template.format(1), (2), ... present in `folder`."""
    if not folder.is_dir():
        return 0
    n = sum(1 for _ in folder.glob("*.jpg"))
    # trust the count only if the numbering is contiguous from 1
    while n > 0 and not (folder / template.format(n)).is_file():
        n -= 1
    return n
