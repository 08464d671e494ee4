"""Checkpoints: atomic writes, full training state, clear errors on bad files.

A checkpoint is a dict (loadable with ``torch.load(weights_only=True)``)::

    {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "iteration",
     "params", "params_hash", "smallbig_version", ...}

``model`` is always the state dict of the *unwrapped* model (no ``module.`` / ``_orig_mod.``
prefixes), so a checkpoint written under DDP or torch.compile loads into a plain model.

Writes go to ``<file>.tmp`` in the same directory, are flushed and fsync'ed, and then renamed
over the target with ``os.replace`` (atomic on POSIX): a process killed at any moment leaves
either the old file or the new one, never half of one. :func:`save_rotating` additionally
keeps the previous good checkpoint as ``last.prev.pt``. A write that fails (disk full, quota, file
size limit, I/O error) removes its temporary file, leaves the previous checkpoint untouched and
raises :class:`CheckpointWriteError` ("<path>: disk full while writing checkpoint ...").
"""
from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

REQUIRED_KEYS = ("model", "epoch", "iteration", "params", "params_hash")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, truncated, or does not fit the run. Names the file."""


class OutputWriteError(RuntimeError):
    """Writing an output file failed (disk full, quota, file size limit, I/O error). Names the
    file; the file it was to replace is untouched and no partial file is left behind."""


class CheckpointWriteError(OutputWriteError, CheckpointError):
    """A checkpoint could not be written (see OutputWriteError)."""


_WRITE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file size limit exceeded", errno.EIO: "I/O error",
                 errno.EROFS: "read-only file system"}


def write_failure(e: BaseException, directory: str | Path) -> str | None:
    """What made a write fail, in words ('disk full', ...), from the exception and its causes
    (torch.save reports ENOSPC as a RuntimeError whose context is the OSError); a bare
    serializer error on a file system with (almost) no free space left is 'disk full' too.
    None: not a write failure (a bug, a bad object, ...)."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return _WRITE_ERRNOS.get(x.errno, x.strerror or os.strerror(x.errno))
        x = x.__cause__ or x.__context__
    text = str(e).lower()
    if isinstance(e, RuntimeError) and any(p in text for p in (
            "unexpected pos", "file write failed", "iostream error", "write failed")):
        try:
            st = os.statvfs(directory)
            if st.f_bavail * st.f_frsize < (1 << 20):
                return "disk full"
        except OSError:
            pass
        return "write failed"
    return None


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
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            why = write_failure(e, path.parent)
            if why is None:
                raise
            intact = sorted(p.name for p in path.parent.glob("*.pt"))
            raise CheckpointWriteError(
                f"{path}: {why} while writing checkpoint ({_first_line(e)}); nothing was "
                f"replaced, no partial file left"
                + (f"; the checkpoint(s) already there are intact: {', '.join(intact)}"
                   if intact else "") + "; free space (or raise the limit) and rerun"
            ) from None
        if keep_previous and path.exists():
            os.replace(path, prev_path(path))
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    _fsync_dir(path.parent)
    return path


def _first_line(e: BaseException) -> str:
    seen, x = set(), e
    while x is not None and id(x) not in seen:  # the OSError says more than torch's wrapper
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return f"{type(x).__name__}: [Errno {x.errno}] {x.strerror}"
        x = x.__cause__ or x.__context__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


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
    from smallbig.fsutil import not_regular

    path = Path(path)
    kind = not_regular(path)
    if kind and kind.startswith("missing"):
        raise CheckpointError(f"{path}: checkpoint not found")
    if kind:  # a FIFO would block torch.load forever
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint file")
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
