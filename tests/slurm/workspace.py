"""Scratch copies of the repository for the workflow tests (so a test never writes into the
developer's results/, data/ or reports/, and tests can run the workflow side by side)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def copy_repo(dest: str | Path) -> Path:
    """Copy the working tree (tracked and untracked, not ignored files, symlinks kept) to dest."""
    dest = Path(dest)
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        out = dest / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, out)
    return dest


def env(**extra) -> dict:
    """Environment for workflow commands: the project's venv first on PATH, MLflow in the copy."""
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("SLURM_CONF", None)
    e.update(extra)
    return e


def snakemake(
    cwd: Path, *args: str, timeout: float = 1800, check: bool = True, **env_extra
) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "snakemake"), *args]
    r = subprocess.run(cmd, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({r.returncode}) in {cwd}:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
        )
    return r


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run (rule -> number of jobs, and 'total')."""
    counts = {}
    if "Job stats:" not in output:
        return counts
    block = output.split("Job stats:", 1)[1]
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def jobs_of(output: str, rule: str) -> list[str]:
    """The wildcards of every job of `rule` in a dry run's output ('' when it has none)."""
    out = []
    for block in re.split(r"\n(?=\[)", output):
        if re.search(rf"^(local)?rule {re.escape(rule)}:", block, re.M):
            m = re.search(r"wildcards: (.*)", block)
            out.append(m.group(1).strip() if m else "")
    return out
