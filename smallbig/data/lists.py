"""List files (mmaction2 format) and the errors of the data layer. No torch import here, so
the check workers stay light."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A prepared dataset directory or list is missing or malformed (names file and problem)."""


@dataclass(frozen=True)
class Entry:
    path: str                # relative to the dataset root (video file or frame folder)
    label: int
    num_frames: int | None   # frame folders: number of frames; videos: None

    @property
    def is_frames(self) -> bool:
        return self.num_frames is not None

    @property
    def video_id(self) -> str:
        name = Path(self.path).name
        return name.rsplit(".", 1)[0] if "." in name and not self.is_frames else name


# --------------------------------------------------------------------------- lists
def read_list(path: str | Path, fmt: str | None = None) -> list[Entry]:
    """Read an mmaction2-style list: `path label` (videos) or `frame_dir num_frames label`.

    `fmt` (video/frames) checks the column count; None accepts either (by columns)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: list file not found (run `smallbig data prepare`)")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 2)
        try:
            if len(parts) == 3 and fmt != "video" and parts[1].isdigit():
                entries.append(Entry(parts[0], int(parts[2]), int(parts[1])))
            elif fmt != "frames":
                p, label = line.rsplit(None, 1)
                entries.append(Entry(p, int(label), None))
            else:
                raise ValueError
        except ValueError:
            want = {"video": "`path label`", "frames": "`frame_dir num_frames label`"}.get(
                fmt, "`path label` or `frame_dir num_frames label`")
            raise DataError(f"{path}:{lineno}: expected {want}, got {line!r}") from None
    return entries


def write_list(path: str | Path, entries: list[Entry], fmt: str) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for e in entries:
            if fmt == "frames":
                f.write(f"{e.path} {e.num_frames} {e.label}\n")
            else:
                f.write(f"{e.path} {e.label}\n")
    tmp.replace(path)
