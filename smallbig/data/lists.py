"""List files (mmaction2 format) and the errors of the data layer. No torch import here, so
the check workers stay light.

A list has one entry per line: `path label` (videos) or `frame_dir num_frames label` (frame
folders); fields are separated by spaces or tabs (a video path may itself contain spaces: the
label is the last field). Tolerated: blank lines, CRLF line endings, surrounding whitespace, a
UTF-8 byte-order mark. Refused, each as `FILE:LINE: problem`: bytes that are not UTF-8, a NUL
byte, missing fields, a label that is not a plain integer, a negative label, a label outside
[0, num_classes) (the dataset's `classes.json`, and the model's `model.num_classes` where
given), a frame count that is not a positive integer, and the same path listed twice.

    read_list(path, fmt=None, num_classes=None)   entries; DataError naming every problem
    scan_list(path, fmt=None, num_classes=None)   (entries of the good lines, problems)
    label_bounds(root, params=None)               limits on labels: classes.json, model.num_classes
    load_manifest(root), load_quarantine(root)    manifest.json / quarantine.json of a prepared root
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from smallbig.errors import InputError


class DataError(InputError):
    """A prepared dataset directory or list is missing or malformed (names file and problem).
    Bad input: exit 2 (smallbig/errors.py)."""


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the dataset root (video file or frame folder)
    label: int
    num_frames: int | None  # frame folders: number of frames; videos: None

    @property
    def is_frames(self) -> bool:
        return self.num_frames is not None

    @property
    def video_id(self) -> str:
        name = Path(self.path).name
        return name.rsplit(".", 1)[0] if "." in name and not self.is_frames else name


@dataclass(frozen=True)
class LabelBound:
    """Labels must lie in [0, n); `source` says where n comes from (for messages)."""

    n: int
    source: str


# --------------------------------------------------------------------------- lists
_INT = re.compile(r"-?[0-9]+")
MAX_LIST_PROBLEMS_SHOWN = 20


def _bounds(num_classes) -> list[LabelBound]:
    if num_classes is None:
        return []
    if isinstance(num_classes, LabelBound):
        return [num_classes]
    if isinstance(num_classes, int):
        return [LabelBound(num_classes, "num_classes")]
    return [b if isinstance(b, LabelBound) else LabelBound(int(b), "num_classes") for b in num_classes]


def _label_problem(text: str, bounds: list[LabelBound]) -> tuple[int | None, str | None]:
    if not _INT.fullmatch(text):
        return None, f"label {text!r} is not an integer"
    label = int(text)
    if label < 0:
        return None, f"label {label} is negative (labels are 0..num_classes-1)"
    for b in bounds:
        if label >= b.n:
            return None, f"label {label} is out of range [0, {b.n}) ({b.source})"
    return label, None


def scan_list(path: str | Path, fmt: str | None = None, num_classes=None) -> tuple[list[Entry], list[str]]:
    """Parse a list; return the entries of the good lines and one `FILE:LINE: problem` per bad line.

    `fmt` (video/frames) fixes the column count; None accepts either (by columns).
    `num_classes`: an int, a LabelBound, or a list of them (labels must be below each)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: list file not found (run `smallbig data prepare`)")
    if not path.is_file():
        raise DataError(f"{path}: list file is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: list file unreadable: {e.strerror or e}") from None
    bounds = _bounds(num_classes)
    want = {"video": "`path label`", "frames": "`frame_dir num_frames label`"}.get(
        fmt, "`path label` or `frame_dir num_frames label`"
    )
    entries: list[Entry] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for lineno, bline in enumerate(raw.split(b"\n"), 1):
        bline = bline.rstrip(b"\r")  # CRLF line endings
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                f"{path}:{lineno}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column "
                f"{e.start + 1}); lists are UTF-8 text"
            )
            continue
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark (Windows editors)
        line = line.strip()
        if not line:
            continue  # blank lines are allowed
        parts = line.split()
        if "\x00" in line:
            problems.append(f"{path}:{lineno}: contains a NUL byte; lists are UTF-8 text")
            continue
        if len(parts) < 2 or (fmt == "frames" and len(parts) < 3):
            got = "1 field" if len(parts) == 1 else f"{len(parts)} fields"
            problems.append(f"{path}:{lineno}: expected {want}, got {got}: {line!r}")
            continue
        frames_cols = fmt == "frames" or (fmt is None and len(parts) == 3 and _INT.fullmatch(parts[1]))
        if frames_cols:
            p, n_text, label_text = line.rsplit(None, 2)
            if not _INT.fullmatch(n_text) or int(n_text) < 1:
                problems.append(
                    f"{path}:{lineno}: number of frames {n_text!r} is not a positive integer "
                    f"(expected {want})"
                )
                continue
            num_frames = int(n_text)
        else:
            p, label_text = line.rsplit(None, 1)
            num_frames = None
        label, why = _label_problem(label_text, bounds)
        if why:
            problems.append(f"{path}:{lineno}: {why}")
            continue
        if p in seen:
            problems.append(f"{path}:{lineno}: duplicate entry {p!r} (already on line {seen[p]})")
            continue
        seen[p] = lineno
        entries.append(Entry(p, label, num_frames))
    return entries, problems


def format_problems(problems: list[str]) -> str:
    shown = problems[:MAX_LIST_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    return "\n".join(shown) + (f"\n... and {more} more problems in the list" if more > 0 else "")


def read_list(path: str | Path, fmt: str | None = None, num_classes=None) -> list[Entry]:
    """Read an mmaction2-style list: `path label` (videos) or `frame_dir num_frames label`.

    `fmt` (video/frames) checks the column count; None accepts either (by columns). Any bad
    line raises DataError naming each problem as `FILE:LINE: problem`."""
    entries, problems = scan_list(path, fmt, num_classes)
    if problems:
        raise DataError(format_problems(problems))
    return entries


def label_bounds(root: str | Path, params: dict | None = None) -> list[LabelBound]:
    """The limits on labels for the dataset at `root`: its `classes.json` (written by
    `smallbig data prepare`) and, where given, the model's `model.num_classes`."""
    out = []
    cj = Path(root) / "classes.json"
    if cj.exists() and not cj.is_file():  # a FIFO would block the read below
        raise DataError(f"{cj}: not a regular file")
    if cj.exists():
        try:
            classes = json.loads(cj.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise DataError(f"{cj}: not a readable JSON list of class names: {e}") from None
        if not isinstance(classes, (list, dict)) or not classes:
            raise DataError(f"{cj}: expected a non-empty JSON list of class names")
        out.append(LabelBound(len(classes), f"{cj} has {len(classes)} classes"))
    n = ((params or {}).get("model") or {}).get("num_classes")
    if n is not None:
        out.append(LabelBound(int(n), f"model.num_classes is {int(n)}"))
    return out


# --------------------------------------------------------------------------- a prepared directory
def load_quarantine(root: Path) -> dict[str, str]:
    q = root / "quarantine.json"
    if not q.exists():
        return {}
    if not q.is_file():  # a FIFO would block the read below
        raise DataError(f"{q}: not a regular file")
    try:
        report = json.loads(q.read_text())
        return {b["path"]: b["reason"] for b in report.get("bad", [])}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{q}: not a `smallbig data check` report: {e}") from None


def load_manifest(root: Path) -> dict:
    m = root / "manifest.json"
    if not m.exists():
        return {}
    if not m.is_file():  # a FIFO would block the read below
        raise DataError(f"{m}: not a regular file")
    try:
        return json.loads(m.read_text())
    except ValueError as e:
        raise DataError(f"{m}: not valid JSON: {e}") from None


def write_list(path: str | Path, entries: list[Entry], fmt: str) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            if fmt == "frames":
                f.write(f"{e.path} {e.num_frames} {e.label}\n")
            else:
                f.write(f"{e.path} {e.label}\n")
    tmp.replace(path)
