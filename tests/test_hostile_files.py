"""Files other than params and videos that a user hands to `smallbig`: checkpoints, scores files,
ImageNet weights. A FIFO, a directory, garbage or a truncated file is refused by name (exit 2) —
never a hang (each run under a timeout), never a traceback."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "params" / "experiments" / "k400-r23-sb-full.yaml"


def run(args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "smallbig", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, SMALLBIG_NO_MLFLOW="1"),
    )


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _make(kind: str, p: Path) -> Path:
    if kind == "fifo":
        return _fifo(p)
    if kind == "directory":
        p.mkdir()
        return p
    if kind == "garbage":
        p.write_bytes(random.Random(3).randbytes(5000))
        return p
    if kind == "empty":
        p.write_bytes(b"")
        return p
    if kind == "link to /dev/zero":
        p.symlink_to("/dev/zero")
        return p
    raise AssertionError(kind)


KINDS = ["fifo", "directory", "garbage", "empty", "link to /dev/zero"]
EXPECT = {
    "fifo": "FIFO",
    "directory": "directory",
    "garbage": "",
    "empty": "",
    "link to /dev/zero": "character device",
}


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_refuses_a_bad_checkpoint_file(tmp_path, kind):
    ck = _make(kind, tmp_path / "ck.pt")
    r = run(["evaluate", EXP, "--checkpoint", ck, "--out", tmp_path / "ev"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(ck) in r.stderr and EXPECT[kind] in r.stderr, r.stderr


def test_truncated_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    ck = tmp_path / "cut.pt"
    ck.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = run(["evaluate", EXP, "--checkpoint", ck, "--out", tmp_path / "ev"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{ck}: not a readable checkpoint" in r.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_ensemble_refuses_a_bad_scores_file(tmp_path, kind):
    good = tmp_path / "good.npz"
    np.savez(
        good,
        logits=np.zeros((2, 1, 3)),
        labels=np.zeros(2, int),
        video_ids=np.array(["a", "b"]),
        clip_idx=np.zeros((2, 1), int),
        crop_idx=np.zeros((2, 1), int),
    )
    bad = _make(kind, tmp_path / "bad.npz")
    r = run(["ensemble", good, bad, "--out", tmp_path / "ens"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(bad) in r.stderr and EXPECT[kind] in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory", "garbage", "link to /dev/zero"])
def test_pretrained_weights_path_refused_by_name(tmp_path, kind):
    w = _make(kind, tmp_path / "w.pth")
    code = (
        "from smallbig.models import build_model, load_pretrained_2d\n"
        "from smallbig.models.weights import PretrainedError\n"
        "from smallbig.config import load_params\n"
        f"m = build_model(load_params({str(EXP)!r})['model'])\n"
        "try:\n"
        f"    load_pretrained_2d(m, {str(w)!r})\n"
        "except PretrainedError as e:\n"
        "    print('REFUSED', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.startswith(f"REFUSED {w}") and EXPECT[kind] in r.stdout, r.stdout
