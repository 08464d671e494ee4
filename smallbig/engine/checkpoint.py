"""Checkpoints: atomic writes, full training state, clear errors on bad files.

A checkpoint is a dict (loadable with ``torch.load(weights_only=True)``)::

    {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "iteration",
     "params", "params_hash", "smallbig_version", ...}

``model`` is always the state dict of the *unwrapped* model (no ``module.`` / ``_orig_mod.``
prefixes), so a checkpoint written under DDP or torch.compile loads into a plain model.

Writes go to ``<file>.tmp`` in the same directory, are flushed and fsync'ed, and then renamed
over the target with ``os.replace`` (atomic on POSIX): a process killed at any moment leaves
either the old file or the new one, never half of one. :func:`save_rotating` additionally
keeps the previous good checkpoint as ``last.prev.pt``.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

REQUIRED_KEYS = ("model", "epoch", "iteration", "params", "params_hash")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, truncated, or does not fit the run. Names the file."""


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """RNG states of Python, NumPy and torch (CPU + CUDA) as weights_only-safe objects."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- model helpers
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# --------------------------------------------------------------------------- save / load
def atomic_save(obj, path: str | Path, keep_previous: bool = False) -> Path:
    """torch.save to ``path`` atomically (tmp file in the same directory + fsync + os.replace).

    ``keep_previous``: the file it replaces becomes ``<stem>.prev.pt``. The new file is complete
    on disk (tmp) before anything is renamed, so at every instant at least one complete
    checkpoint exists under ``path`` or its ``.prev.pt``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, prev_path(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_rotating(obj, path: str | Path) -> Path:
    """Atomically write ``path`` (e.g. last.pt); the file it replaces becomes ``<stem>.prev.pt``."""
    return atomic_save(obj, path, keep_previous=True)


def prev_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint; CheckpointError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (truncated checkpoint)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError (zip), EOFError, UnpicklingError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupted?): {type(e).__name__}: {msg}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a smallbig checkpoint (top level is {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a smallbig checkpoint (missing {missing})")
    return ckpt


def load_model_from_checkpoint(path: str | Path, map_location="cpu"):
    """-> (model in eval mode, params) from any smallbig checkpoint (last.pt or checkpoint.pt)."""
    from smallbig.models import build_model

    ckpt = load_checkpoint(path, map_location)
    params = ckpt["params"]
    model = build_model(params["model"])
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its params describe: {e}") from None
    model.eval()
    return model, params


def quarantine(path: str | Path) -> Path:
    """Rename a bad checkpoint out of the way (kept for inspection, never deleted)."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, dest)
    return dest
