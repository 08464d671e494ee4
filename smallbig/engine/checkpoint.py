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

Resuming a training: :func:`find_resume_checkpoint` (last.pt, else the previous good one),
:func:`remove_dead_tmp`, :func:`training_state` (what a checkpoint holds) and
:func:`restore_training_state` (its inverse on a freshly built model/optimizer/scheduler).
"""

from __future__ import annotations

import os
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from smallbig.errors import InputError, OutputWriteError
from smallbig.fsutil import atomic_write, not_regular, write_failure  # noqa: F401 (re-exported)
from smallbig.models import build_model

REQUIRED_KEYS = ("model", "epoch", "iteration", "params", "params_hash")


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable, truncated, or does not fit the run. Names the file.
    Exit 2 (`smallbig COMMAND: checkpoint error: ...`)."""

    label = "checkpoint error"


class CheckpointWriteError(OutputWriteError):
    """A checkpoint could not be written (see smallbig.errors.OutputWriteError). Exit 1."""


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
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
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
                k = k[len(prefix) :]
        out[k] = v
    return out


# --------------------------------------------------------------------------- save / load
def atomic_save(obj, path: str | Path, keep_previous: bool = False) -> Path:
    """torch.save to ``path`` atomically (smallbig.fsutil.atomic_write: tmp file in the same
    directory + fsync + os.replace).

    ``keep_previous``: the file it replaces becomes ``<stem>.prev.pt``. The new file is complete
    on disk (tmp) before anything is renamed, so at every instant at least one complete
    checkpoint exists under ``path`` or its ``.prev.pt``.
    """
    path = Path(path)
    try:
        return atomic_write(
            path,
            partial(_torch_save, obj),
            what="checkpoint",
            keep_previous=prev_path(path) if keep_previous else None,
        )
    except OutputWriteError as e:
        intact = sorted(p.name for p in path.parent.glob("*.pt"))
        raise CheckpointWriteError(
            f"{e}"
            + (f"; the checkpoint(s) already there are intact: {', '.join(intact)}" if intact else "")
            + "; free space (or raise the limit) and rerun"
        ) from None


def _torch_save(obj, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)


def save_rotating(obj, path: str | Path) -> Path:
    """Atomically write ``path`` (e.g. last.pt); the file it replaces becomes ``<stem>.prev.pt``."""
    return atomic_save(obj, path, keep_previous=True)


def prev_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and sanity-check a checkpoint; CheckpointError naming the file on any problem."""
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


# --------------------------------------------------------------------------- resuming a training
def remove_dead_tmp(out_dir: Path) -> None:
    """Temporary checkpoint files (.NAME.PID.tmp) of processes that no longer exist (killed while
    writing): never valid, never read; removed on resume."""
    for tmp in out_dir.glob(".*.pt.*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
            continue  # that process is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        try:
            tmp.unlink()
        except OSError:
            pass


def find_resume_checkpoint(out_dir: Path, log) -> dict | None:
    """Load DIR/last.pt; if it is unreadable, keep it aside (renamed) and use last.prev.pt."""
    last = out_dir / "last.pt"
    if not last.exists():
        return None
    try:
        return load_checkpoint(last)
    except CheckpointError as e:
        prev = prev_path(last)
        if not prev.exists():
            raise
        try:
            ckpt = load_checkpoint(prev)
        except CheckpointError as e2:
            raise CheckpointError(f"{e}; and the previous one is bad too: {e2}") from None
        kept = quarantine(last)
        os.replace(prev, last)
        log(
            f"WARNING: {e}. Kept it as {kept.name}; resuming from the previous good checkpoint "
            f"{prev.name} (iteration {ckpt['iteration']})."
        )
        return ckpt


def training_state(
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    rngs: list,
    epoch: int,
    iteration: int,
    iters_per_epoch: int,
    total_iters: int,
    history: list,
    epoch_stats,
    plan,
    seed: int,
    params: dict,
    params_hash: str,
    version: str,
    run_id,
    started: str,
    elapsed_s: float,
) -> dict:
    """The full state of a training at `iteration` (`epoch` = the epoch it is in, or the next one
    at an epoch boundary): what last.pt and checkpoint.pt hold. `rngs`: every rank's rng_state()."""
    done = iteration - epoch * iters_per_epoch
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs[0],
        "rng_per_rank": rngs,
        "epoch": epoch,
        "iteration": iteration,
        "iters_per_epoch": iters_per_epoch,
        "total_iters": total_iters,
        "history": history,
        # where the data order resumes: this rank's samples of epoch `epoch` already used
        "data_position": {
            "epoch": epoch,
            "iter_in_epoch": done,
            "samples_done_per_rank": done * plan.accum_steps * plan.per_gpu_batch,
            "seed": seed,
        },
        "epoch_stats": epoch_stats,
        "batch_plan": plan.as_dict(),
        "params": params,
        "params_hash": params_hash,
        "smallbig_version": version,
        "mlflow_run_id": run_id,
        "started": started,
        "elapsed_s": elapsed_s,
    }


def restore_training_state(ckpt: dict, model, optimizer, scheduler, scaler) -> None:
    """Load a checkpoint's weights and optimizer/scheduler/scaler states (RNGs: restore_rng)."""
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def restore_rng(ckpt: dict, rank: int, world_size: int) -> None:
    """This rank's RNG states of the checkpoint (the rank-0 ones if it was made by another number
    of processes)."""
    per_rank = ckpt.get("rng_per_rank")
    set_rng_state(per_rank[rank] if per_rank and len(per_rank) == world_size else ckpt["rng"])
