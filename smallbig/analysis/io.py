"""Small file helpers for the report (atomic writes: a killed report never leaves half a file)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure(fig, stem: str | Path, dpi: int = 110) -> list[Path]:
    """Save a matplotlib figure as <stem>.png and <stem>.svg (atomically); closes it."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        target = stem.with_name(f"{stem.name}.{ext}")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{ext}", dir=target.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight",
                        metadata={"Date": None} if ext == "svg" else None)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        out.append(target)
    plt.close(fig)
    return out
