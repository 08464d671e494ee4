"""The git commit a result was made with (MLflow tags, the report's footer): one helper."""

from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE_REPO = Path(__file__).resolve().parents[1]


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(repo: str | Path | None = None) -> dict:
    """{"commit", "dirty" (bool or None), "commit_date", "repository"} of `repo`, else of the
    working directory's repository (where the workflow runs), else of the package's checkout;
    {"commit": None, ...} outside any repository."""
    for where in [Path(repo)] if repo else [Path.cwd(), PACKAGE_REPO]:
        commit = _git(where, "rev-parse", "HEAD")
        if not commit:
            continue
        status = _git(where, "status", "--porcelain", "--untracked-files=no")
        return {
            "commit": commit,
            "dirty": None if status is None else bool(status),
            "commit_date": _git(where, "log", "-1", "--format=%cI"),
            "repository": str(where.resolve()),
        }
    return {"commit": None, "dirty": None, "commit_date": None, "repository": None}
