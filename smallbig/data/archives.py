"""Safe, resumable extraction of tar archives (also a stream of joined archive parts)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from smallbig.errors import InputError


class ArchiveError(InputError):
    """An archive is corrupt or unsafe (names the archive and the problem). Bad input: exit 2."""


class JoinedParts(io.RawIOBase):
    """Read several files as one stream (`cat part-00 part-01 ...` without a copy on disk)."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self._i = 0
        self._f = open(self.paths[0], "rb") if self.paths else None  # noqa: SIM115 (a stream that outlives this call; closed in readinto)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._f is not None:
            n = self._f.readinto(b)
            if n:
                return n
            self._f.close()
            self._i += 1
            self._f = open(self.paths[self._i], "rb") if self._i < len(self.paths) else None  # noqa: SIM115
        return 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()


def is_extracted(dest: Path, name: str) -> bool:
    return (dest / f".extracted-{name}").exists() and (dest / f"tree-{name}").exists()


def extract(
    archive: Path | list[Path], dest: Path, marker_name: str | None = None, progress: bool = True
) -> Path:
    """Extract a tar(.gz) (or the joined parts of one) into `dest`, idempotently.

    Extraction goes to `dest/.tmp-<name>` first, then moves into place; a marker file
    `dest/.extracted-<name>` records completion, so an interrupted extraction is redone
    from scratch, never half-used. Returns the extracted tree (`dest/<name>`, the marker's
    companion directory)."""
    from tqdm import tqdm

    parts = archive if isinstance(archive, list) else [archive]
    name = marker_name or Path(parts[0]).name
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / f".extracted-{name}"
    out = dest / f"tree-{name}"
    if marker.exists() and out.exists():
        return out
    tmp = dest / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(Path(p).stat().st_size for p in parts)
    label = name if len(parts) == 1 else f"{name} ({len(parts)} parts)"
    try:
        stream = JoinedParts(parts)
        buffered = io.BufferedReader(stream, buffer_size=1 << 20)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"extract {label}", disable=not progress, leave=False
        ) as bar:
            last = 0
            with tarfile.open(fileobj=buffered, mode="r|*") as tar:
                for member in tar:
                    tar.extract(member, tmp, filter="data")
                    pos = sum(Path(p).stat().st_size for p in parts[: stream._i]) + (
                        stream._f.tell() if stream._f else 0
                    )
                    bar.update(max(0, pos - last))
                    last = max(last, pos)
        buffered.close()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArchiveError(
            f"{label}: cannot extract ({type(e).__name__}: {e}); the archive is corrupt or incomplete"
        ) from None
    tmp.replace(out)
    marker.write_text("ok\n")
    return out


def move_files(tree: Path, dest: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Move every file under `tree` whose suffix is in `suffixes` flat into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in sorted(tree.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes:
            target = dest / p.name
            p.replace(target)
            moved.append(target)
    return moved
