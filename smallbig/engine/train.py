"""`smallbig train`: the paper's training recipe from a params file, on one CPU or many GPUs.

Outputs in the run directory (docs/architecture.md):
  params.yaml          the resolved params of the run
  last.pt, last.prev.pt  periodic full-state checkpoints (the newest and the one before it)
  checkpoint.pt        the final checkpoint (same format)
  history.json         per epoch: loss, lr, val_top1, clips_per_s, peak_mem_mb
  train_metrics.json   summary: final loss/LR/val top-1, batch plan, AMP, device, MLflow run id

  mlflow-run.json      the MLflow run of this directory (id, store), so that a resume which
                       fails before it can read a checkpoint still ends that run FAILED; the run
                       holds the final weights as the MLflow model runs:/<run_id>/model
                       (smallbig/engine/mlflow_models.py) and the train/val datasets as inputs
  mlflow-unsent.json   only when the MLflow store was unreachable until the end: what it misses

Exit code 3 (EXIT_REQUEUE): stopped by SIGTERM/SIGUSR1 after writing last.pt; rerun the same
command with --resume (Slurm: `#SBATCH --signal=B:USR1@120` + `--requeue`, see docs/engine.md).
The MLflow run then has the status KILLED; a failure ends it FAILED (a resume that fails, even
before loading a checkpoint, ends the run it was to continue FAILED).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from smallbig import __version__
from smallbig.config import dump_params, params_hash
from smallbig.data import build_dataset, collate, normalize
from smallbig.engine import distributed as D
from smallbig.engine import metrics, mlflow_models, tracking
from smallbig.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    find_resume_checkpoint,
    load_checkpoint,
    remove_dead_tmp,
    restore_rng,
    restore_training_state,
    rng_state,
    save_rotating,
    training_state,
    unwrap,
)
from smallbig.engine.optim import BatchPlan, build_optimizer, build_scheduler, plan_batch

# the engine's errors and what training and evaluation share (re-exported here: callers and
# tests import NonFiniteLossError / TrainingError from smallbig.engine.train)
from smallbig.engine.runtime import (  # noqa: F401
    NonFiniteLossError,
    TrainingError,
    amp_settings,
    apply_channels_last,
    batch_labels,
    now_iso,
    peak_mem_mb,
    to_input,
)
from smallbig.engine.seeding import EpochSampler, SeededDataset, WorkerInit, mix_seed, seed_everything

# signals and the time-limit deadline; no torch there, so the CLI installs it before importing us
from smallbig.engine.stopping import StopFlag
from smallbig.fsutil import atomic_write_json
from smallbig.models import build_model, load_pretrained_2d
from smallbig.models.weights import resolve_pretrained
from smallbig.spec.params import Params

EXIT_OK = 0
EXIT_REQUEUE = 3
RUN_FILE = "mlflow-run.json"


def default_builders():
    """(build_model, build_dataset, collate, normalize) of smallbig.models / smallbig.data;
    tests swap in toy ones (`builders=`)."""
    return build_model, build_dataset, collate, normalize


class RunLog:
    """Rank 0: the message, also appended to OUT/train.log, which (unlike the workflow's
    per-job log) keeps the whole story of a run over its jobs: stops, resumes, retries."""

    def __init__(self, out_dir: Path, is_main: bool, log: Callable[[str], None]):
        self.out_dir, self.is_main, self.log = out_dir, is_main, log

    def __call__(self, m: str) -> None:
        if not self.is_main:
            return
        self.log(m)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "train.log", "a") as f:
                f.write(f"{now_iso()} {m}\n")
        except OSError:
            pass


def _stderr_log(m: str) -> None:
    print(f"smallbig train: {m}", file=sys.stderr, flush=True)


@dataclass
class TrainRun:
    """Everything one training process holds: what it was given, what it built, where it is."""

    p: Params
    params: dict  # the validated mapping: hashed, dumped to params.yaml, logged, checkpointed
    phash: str
    out_dir: Path
    info: D.DistInfo
    dev: torch.device
    say: RunLog
    stop: StopFlag
    collate: Callable
    normalize: Callable
    # built
    dataset: Any = None
    val_ds: Any = None
    model: Any = None  # DDP-wrapped under several processes
    train_model: Any = None  # `model`, torch.compile'd if asked
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    plan: BatchPlan | None = None
    amp_dtype: torch.dtype | None = None
    amp_eff: str = "none"
    channels_last: bool = False
    n: int = 0
    ipe: int = 0
    epochs: int = 0
    total_iters: int = 0
    sampler: EpochSampler | None = None
    # where the run stands (restored from a checkpoint on resume)
    start_epoch: int = 0
    global_it: int = 0
    history: list = field(default_factory=list)
    epoch_stats: dict | None = None
    run_id: str | None = None
    run: Any = None
    started: str = ""
    prior_elapsed: float = 0.0  # wall time of earlier (resumed) processes, for GPU-hours
    t_start: float = 0.0


def _fail_resumed_run(out_dir: Path, state: dict, error: BaseException, log) -> None:
    """A resume failed before its MLflow run was resumed: end the run of OUT (from the
    checkpoint if it was read, else OUT/mlflow-run.json) FAILED instead of leaving it RUNNING."""
    run_id = state.get("ckpt_run_id")
    try:
        rec = json.loads((out_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        rec = {}
    if not run_id and rec.get("tracking_uri") == tracking.tracking_uri():
        run_id = rec.get("run_id")
    if run_id:
        tracking.fail_orphan_run(run_id, f"resume failed: {type(error).__name__}: {error}", log=log)


# --------------------------------------------------------------------------- training
def train(
    params: dict | Params,
    out_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    track: bool = True,
    progress: bool = True,
    builders=None,
    log=None,
    stop: StopFlag | None = None,
) -> int:
    """Train per `params` (a validated params mapping or Params); returns EXIT_OK or
    EXIT_REQUEUE (stopped by a signal or the time-limit deadline of `stop`, checkpointed).
    `stop`: an installed StopFlag (the CLI installs one at start); default: a new one with no
    deadline, installed here."""
    state: dict = {}
    try:
        return _train(params, Path(out_dir), resume, device, track, progress, builders, log, stop, state)
    except Exception as e:
        if resume and track and state.get("is_main") and state.get("run") is None:
            _fail_resumed_run(Path(out_dir), state, e, state.get("say") or log or print)
        raise


def _train(
    params,
    out_dir: Path,
    resume: bool,
    device: str | None,
    track: bool,
    progress: bool,
    builders,
    log,
    stop: StopFlag | None,
    state: dict,
) -> int:
    own_stop = stop is None
    stop = stop if stop is not None else StopFlag()
    stop.install()
    info, dev = D.setup(device)
    state["is_main"] = info.is_main
    say = state["say"] = RunLog(out_dir, info.is_main, log or _stderr_log)
    if D.any_flag(stop.set, info, dev):
        say(f"stop ({stop.reason()}) before anything was loaded; exit {EXIT_REQUEUE}")
        if own_stop:
            stop.restore()
        D.cleanup()
        return EXIT_REQUEUE
    build_model, build_dataset, collate, normalize = builders or default_builders()
    p = Params.from_dict(params)
    raw = p.to_dict() if isinstance(params, Params) else params
    r = TrainRun(
        p=p,
        params=raw,
        phash=params_hash(raw),
        out_dir=out_dir,
        info=info,
        dev=dev,
        say=say,
        stop=stop,
        collate=collate,
        normalize=normalize,
    )
    ckpt = _checkpoint_to_resume(r, resume, state)
    _build(r, ckpt, build_model, build_dataset)
    if info.is_main:
        dump_params(raw, out_dir / "params.yaml")
    return _run(r, state, track, progress, own_stop)


def _checkpoint_to_resume(r: TrainRun, resume: bool, state: dict) -> dict | None:
    """The existing state in the output directory: never overwritten silently; with `resume`,
    the checkpoint to continue (None: nothing there yet, start afresh)."""
    out_dir, info = r.out_dir, r.info
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if ((out_dir / "last.pt").exists() or (out_dir / "checkpoint.pt").exists()) and not resume:
        raise CheckpointError(
            f"{out_dir}: already holds a checkpoint (last.pt/checkpoint.pt); pass --resume to "
            f"continue it, or choose another --out"
        )
    if not resume:
        return None
    if info.is_main:
        remove_dead_tmp(out_dir)
    ckpt = find_resume_checkpoint(out_dir, r.say) if info.is_main else None
    ckpt = D.broadcast_object(ckpt, info) if info.distributed else ckpt
    if ckpt is None and (out_dir / "checkpoint.pt").exists():
        ckpt = load_checkpoint(out_dir / "checkpoint.pt")
    if ckpt is not None:
        state["ckpt_run_id"] = ckpt.get("mlflow_run_id")
    if ckpt is not None and ckpt["params_hash"] != r.phash:
        raise CheckpointError(
            f"{out_dir / 'last.pt'}: made with different params (hash {ckpt['params_hash'][:12]} "
            f"vs {r.phash[:12]} now); refusing to resume. Use a new --out for new params."
        )
    return ckpt


def _build(r: TrainRun, ckpt: dict | None, build_model, build_dataset) -> None:
    """Determinism, data, model, optimizer (the order fixes the RNG draws: keep it)."""
    tr, info, dev = r.p.train, r.info, r.dev
    seed_everything(tr.seed)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    # inputs first, before any model is built: the ImageNet file a fresh run starts from
    # (model.pretrained, verified) and both list files (a bad train.txt/val.txt: exit 2, FILE:LINE)
    weights = resolve_pretrained(r.params) if ckpt is None else None
    r.dataset = build_dataset(r.params, "train", "train")
    r.val_ds = build_dataset(r.params, "val", "val")
    model = build_model(r.params["model"])
    if weights is not None:  # a fresh run starts from model.pretrained or `none`
        _load_pretrained(r, model, weights)
    r.channels_last = apply_channels_last(model) if tr.channels_last else False
    model = model.to(dev)
    if info.distributed and tr.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    r.plan = plan_batch(tr, info.world_size)
    r.amp_dtype, use_scaler, r.amp_eff = amp_settings(tr.amp, dev)
    if tr.amp not in (None, "none") and r.amp_eff == "none":
        r.say(f"amp {tr.amp} requested but running on {dev.type}: AMP disabled, training in fp32")
    _plan_iterations(r)
    r.optimizer = build_optimizer(model, tr, r.plan.lr)
    r.scheduler = build_scheduler(r.optimizer, tr, r.ipe)
    r.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    r.started = now_iso()
    if ckpt is not None:
        restore_training_state(ckpt, model, r.optimizer, r.scheduler, r.scaler)
        _resume_position(r, ckpt)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    r.model = model
    r.train_model = torch.compile(model) if tr.compile else model
    if ckpt is not None and "rng" in ckpt:
        restore_rng(ckpt, info.rank, info.world_size)
    else:
        # model init is identical on every rank (same seed); dropout etc. differ per rank
        seed_everything(mix_seed(tr.seed, info.rank, 0x7A1))


def _load_pretrained(r: TrainRun, model, weights) -> None:
    """The verified ImageNet file `resolve_pretrained` gave for model.pretrained."""
    got = load_pretrained_2d(model, weights)
    r.say(
        f"initialised from {r.p.model.pretrained} ({weights}, ResNet-"
        f"{got['source_depth']}: {got['loaded']} tensors loaded)"
    )


def _plan_iterations(r: TrainRun) -> None:
    plan, info = r.plan, r.info
    r.n = n = len(r.dataset)
    per_rank = -(-n // info.world_size)
    r.ipe = per_rank // plan.per_gpu_batch // plan.accum_steps
    if r.ipe == 0:
        raise TrainingError(
            f"training set of {n} clips is smaller than one optimizer step "
            f"({plan.total_batch} clips = {plan.per_gpu_batch} x {plan.accum_steps} accumulation x "
            f"{info.world_size} process(es)); lower train.batch_size/per_gpu_batch"
        )
    r.epochs = r.p.train.epochs
    r.total_iters = r.ipe * r.epochs
    r.sampler = EpochSampler(
        n,
        r.p.train.seed,
        info.rank,
        info.world_size,
        shuffle=True,
        samples_per_rank=r.ipe * plan.accum_steps * plan.per_gpu_batch,
    )


def _resume_position(r: TrainRun, ckpt: dict) -> None:
    r.start_epoch, r.global_it = int(ckpt["epoch"]), int(ckpt["iteration"])
    r.history = list(ckpt.get("history", []))
    r.epoch_stats = ckpt.get("epoch_stats")
    r.run_id = ckpt.get("mlflow_run_id")
    r.prior_elapsed, r.started = float(ckpt.get("elapsed_s", 0.0)), ckpt.get("started") or r.started
    old, plan = ckpt.get("batch_plan", {}), r.plan
    if old and (old.get("world_size"), old.get("accum_steps")) != (plan.world_size, plan.accum_steps):
        r.say(
            f"WARNING: resuming with {plan.world_size} process(es) x {plan.accum_steps} accumulation "
            f"(checkpoint: {old.get('world_size')} x {old.get('accum_steps')}): same "
            f"total batch, but the data order per process differs from an uninterrupted run"
        )
    r.say(
        f"resuming {r.out_dir / 'last.pt'} at epoch {r.start_epoch}, iteration {r.global_it}/{r.total_iters}"
    )


def _run(r: TrainRun, state: dict, track: bool, progress: bool, own_stop: bool) -> int:
    """The MLflow run around the epochs; its final status FINISHED, KILLED (stopped) or FAILED."""
    status, pbar = "FAILED", None
    r.t_start = time.time()
    try:
        if r.info.is_main:
            _start_tracking(r, state, track)
        plan = r.plan
        r.say(
            f"{r.p.id}: {r.n} clips, {r.epochs} epochs x {r.ipe} iterations, batch "
            f"{plan.total_batch} ({plan.per_gpu_batch}/process x {plan.accum_steps} accumulation "
            f"x {plan.world_size} process(es), policy {plan.policy}), lr {plan.lr:g}, amp "
            f"{r.amp_eff}, device {r.dev}"
        )
        pbar = tqdm(
            total=r.total_iters,
            initial=r.global_it,
            disable=not (progress and r.info.is_main),
            desc=f"train {r.p.id}",
            unit="it",
            dynamic_ncols=True,
            mininterval=1.0,
            file=sys.stderr,
        )
        rc = _epochs(r, pbar)
        status = "FINISHED" if rc == EXIT_OK else "KILLED"
        return rc
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            status = "KILLED"
        if r.run is not None:
            r.run.set_tags({"smallbig.error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if own_stop:
            r.stop.restore()
        if pbar is not None:
            pbar.close()
        if r.run is not None:
            try:
                r.run.finish(status)
            except Exception as e:  # never hide the real outcome behind a tracking error
                r.say(f"WARNING: could not close the MLflow run: {e}")
        D.cleanup()


def _start_tracking(r: TrainRun, state: dict, track: bool) -> None:
    """Rank 0: start (or resume) the MLflow run; OUT/mlflow-run.json names it."""
    run = r.run = state["run"] = tracking.start_run(
        r.params,
        "train",
        resume_run_id=r.run_id,
        enabled=track,
        log=r.say,
        unsent_file=r.out_dir / tracking.UNSENT_FILE,
        extra_tags={"out_dir": str(r.out_dir.resolve()), "amp_effective": r.amp_eff, "device": str(r.dev)},
    )
    if run.run_id and (r.run_id is None or run.run_id != r.run_id):
        run.log_params(
            {f"engine.{k}": v for k, v in r.plan.as_dict().items()}
            | {
                "engine.amp_effective": r.amp_eff,
                "engine.iters_per_epoch": r.ipe,
                "engine.device": r.dev.type,
            }
        )
        run.log_artifact(r.out_dir / "params.yaml")
        run.log_inputs(
            [
                tracking.dataset_input(r.params, "train", r.dataset, "training"),
                tracking.dataset_input(r.params, "val", r.val_ds, "validation"),
            ]
        )
    if run.run_id:
        atomic_write_json(
            r.out_dir / RUN_FILE,
            {"run_id": run.run_id, "tracking_uri": tracking.tracking_uri(), "experiment": r.p.id},
        )
    r.run_id = run.run_id


def _stopped(r: TrainRun, when: str, hint: str = "") -> int:
    r.say(f"stop ({r.stop.reason()}){when}; exit {EXIT_REQUEUE}{hint}")
    return EXIT_REQUEUE


def _epochs(r: TrainRun, pbar) -> int:
    """Epochs from where the run stands; EXIT_REQUEUE when stopped (checkpointed)."""
    if r.start_epoch < r.epochs and D.any_flag(r.stop.set, r.info, r.dev):
        # stopped before the first iteration of this process: nothing new to save
        return _stopped(r, " before training started", " (resume with --resume)")
    for epoch in range(r.start_epoch, r.epochs):
        stats = r.epoch_stats or {"loss_sum": 0.0, "loss_n": 0, "clips": 0, "time": 0.0, "skipped": 0}
        r.epoch_stats = None
        if train_epoch(r, epoch, stats, pbar):
            return EXIT_REQUEUE
        end_epoch(r, epoch, stats)
        if D.any_flag(r.stop.set, r.info, r.dev) and epoch + 1 < r.epochs:
            return _stopped(r, f": checkpointed {r.out_dir / 'last.pt'} at iteration {r.global_it}")
    write_final(r)
    D.barrier(r.info)
    return EXIT_OK


def _save_last(r: TrainRun, epoch: int, stats) -> None:
    full = _state(r, epoch, stats)  # collective: every rank
    if r.info.is_main:
        save_rotating(full, r.out_dir / "last.pt")
    D.barrier(r.info)


def _state(r: TrainRun, epoch: int, stats) -> dict:
    return training_state(
        model=r.model,
        optimizer=r.optimizer,
        scheduler=r.scheduler,
        scaler=r.scaler,
        rngs=D.all_gather_objects(rng_state(), r.info),
        epoch=epoch,
        iteration=r.global_it,
        iters_per_epoch=r.ipe,
        total_iters=r.total_iters,
        history=r.history,
        epoch_stats=stats,
        plan=r.plan,
        seed=r.p.train.seed,
        params=r.params,
        params_hash=r.phash,
        version=__version__,
        run_id=r.run_id,
        started=r.started,
        elapsed_s=r.prior_elapsed + time.time() - r.t_start,
    )


def train_epoch(r: TrainRun, epoch: int, stats: dict, pbar) -> bool:
    """The iterations of `epoch` not done yet (a resumed run starts mid-epoch, at exactly the
    samples an uninterrupted run would see next); checkpoints every
    train.checkpoint_every_iters. True when stopped (checkpointed first)."""
    it0 = r.global_it - epoch * r.ipe
    if it0 >= r.ipe:
        return False
    plan = r.plan
    r.sampler.set_epoch(epoch, start=it0 * plan.accum_steps * plan.per_gpu_batch)
    loader = DataLoader(
        SeededDataset(r.dataset),
        batch_size=plan.per_gpu_batch,
        sampler=r.sampler,
        num_workers=r.p.data.num_workers,
        collate_fn=r.collate,
        worker_init_fn=WorkerInit(r.p.train.seed, epoch, r.info.rank),
        pin_memory=r.dev.type == "cuda",
        drop_last=True,
    )
    batches = iter(loader)
    r.train_model.train()
    value = float("nan")
    for _ in range(it0, r.ipe):
        t0 = time.time()
        clips, value = _optimizer_step(r, batches, stats, epoch, value)
        lr_now = r.optimizer.param_groups[0]["lr"]
        r.scheduler.step()
        r.global_it += 1
        dt = time.time() - t0
        stats["clips"] += clips
        stats["time"] += dt
        stats["lr"] = lr_now
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(
                epoch=epoch + 1,
                loss=f"{value:.4f}",
                lr=f"{lr_now:.3g}",
                clips_s=f"{clips * r.info.world_size / max(dt, 1e-9):.1f}",
                refresh=False,
            )
        stopping = D.any_flag(r.stop.set, r.info, r.dev)
        last_of_epoch = r.global_it == (epoch + 1) * r.ipe
        if stopping and not last_of_epoch:
            _save_last(r, epoch, stats)
            _stopped(
                r,
                f": checkpointed {r.out_dir / 'last.pt'} at iteration {r.global_it}",
                " (resume with --resume)",
            )
            return True
        if r.global_it % r.p.train.checkpoint_every_iters == 0 and not last_of_epoch:
            _save_last(r, epoch, stats)
    del batches, loader
    return False


def _optimizer_step(r: TrainRun, batches, stats: dict, epoch: int, value: float):
    """One optimizer step over train.accum_steps micro-batches; -> (clips, last loss value)."""
    plan, dev, p = r.plan, r.dev, r.p
    clips = 0
    for micro in range(plan.accum_steps):
        batch = next(batches)
        stats["skipped"] += len(batch.get("skipped", []) or [])
        if batch["video"].shape[0] == 0:
            continue
        x = to_input(batch["video"], dev, p.data.mean, p.data.std, r.normalize, r.channels_last)
        y = batch_labels(batch, dev)
        sync = (
            r.model.no_sync()
            if r.info.distributed and micro < plan.accum_steps - 1
            else contextlib.nullcontext()
        )
        with sync:
            with torch.autocast(dev.type, dtype=r.amp_dtype, enabled=r.amp_dtype is not None):
                logits = r.train_model(x)
            loss = F.cross_entropy(logits.float(), y)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at iteration {r.global_it + 1} (epoch {epoch + 1}, "
                    f"micro-batch {micro + 1}/{plan.accum_steps}); stopping. Lower "
                    f"train.lr or check the data; last good checkpoint: {r.out_dir / 'last.pt'}"
                )
            scaled = loss / plan.accum_steps
            (r.scaler.scale(scaled) if r.scaler is not None else scaled).backward()
        stats["loss_sum"] += value * y.shape[0]
        stats["loss_n"] += y.shape[0]
        clips += y.shape[0]
    if r.scaler is not None:
        r.scaler.step(r.optimizer)
        r.scaler.update()
    else:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return clips, value


def end_epoch(r: TrainRun, epoch: int, stats: dict) -> None:
    """Epoch end: validation (every train.val_every_epochs and at the last epoch), the history
    row (history.json, MLflow), last.pt."""
    val_top1 = None
    if (epoch + 1) % r.p.train.val_every_epochs == 0 or epoch + 1 == r.epochs:
        val_top1 = validate(
            unwrap(r.model),
            r.val_ds,
            r.p,
            r.dev,
            r.info,
            r.collate,
            r.normalize,
            r.amp_dtype,
            r.channels_last,
        )
    if r.info.distributed:  # loss over all processes' clips
        parts = D.all_gather_objects((stats["loss_sum"], stats["loss_n"], stats["skipped"]), r.info)
        loss_sum, loss_n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        skipped = sum(p[2] for p in parts)
    else:
        loss_sum, loss_n, skipped = stats["loss_sum"], stats["loss_n"], stats["skipped"]
    row = {
        "epoch": epoch + 1,
        "iteration": r.global_it,
        "loss": loss_sum / max(1, loss_n),
        "lr": stats.get("lr", r.optimizer.param_groups[0]["lr"]),
        "val_top1": val_top1,
        "clips_per_s": stats["clips"] * r.info.world_size / max(stats["time"], 1e-9),
        "peak_mem_mb": peak_mem_mb(r.dev),
        "skipped": skipped,
    }
    r.history.append(row)
    if r.info.is_main:
        atomic_write_json(r.out_dir / "history.json", r.history)
        if r.run is not None:
            r.run.log_metrics(
                {k: v for k, v in row.items() if k not in ("epoch", "iteration")}, step=epoch + 1
            )
    _save_last(r, epoch + 1, None)


def write_final(r: TrainRun) -> None:
    """The final checkpoint.pt, history.json and the run summary train_metrics.json."""
    final = _state(r, r.epochs, None)  # collective
    if not r.info.is_main:
        return
    # history.json again: a run resumed from the final last.pt (the job was stopped after its
    # last iteration and the workflow removed its outputs) must write every output
    atomic_write_json(r.out_dir / "history.json", r.history)
    atomic_save(final, r.out_dir / "checkpoint.pt")
    summary = run_summary(r)
    atomic_write_json(r.out_dir / "train_metrics.json", summary)
    if r.run is not None:
        r.run.log_metrics(
            {
                "final_loss": summary["final_loss"] or float("nan"),
                **({"final_val_top1": summary["val_top1"]} if summary["val_top1"] is not None else {}),
            },
            step=r.epochs,
        )
        r.run.log_artifact(r.out_dir / "history.json")
        r.run.log_artifact(r.out_dir / "train_metrics.json")
        # the final weights as an MLflow PyTorch model (runs:/<run_id>/model), linked to the
        # metrics of the last epoch; kept for later like any record if the store is away
        mlflow_models.log_final_model(r.run, unwrap(r.model), r.params, r.out_dir / "checkpoint.pt", r.epochs)


def run_summary(r: TrainRun) -> dict:
    """train_metrics.json: final loss/LR/val top-1, batch plan, AMP, device, wall time."""
    history, dev = r.history, r.dev
    vals = [h["val_top1"] for h in history if h.get("val_top1") is not None]
    last = history[-1] if history else {}
    return {
        "experiment": r.p.id,
        "params_hash": r.phash,
        "epochs": r.epochs,
        "iterations": r.global_it,
        "iters_per_epoch": r.ipe,
        "final_loss": last.get("loss"),
        "final_lr": last.get("lr"),
        "val_top1": vals[-1] if vals else None,
        "best_val_top1": max(vals) if vals else None,
        "clips_per_s": last.get("clips_per_s"),
        "wall_time_s_this_process": time.time() - r.t_start,
        "wall_time_s": r.prior_elapsed + time.time() - r.t_start,
        "started": r.started,
        "finished": now_iso(),
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "gpu_hours": (
            (r.prior_elapsed + time.time() - r.t_start) * r.info.world_size / 3600.0
            if dev.type == "cuda"
            else None
        ),  # CPU runs: wall_time_s
        "batch_plan": r.plan.as_dict(),
        "amp": r.amp_eff,
        "channels_last": r.channels_last,
        "compile": r.p.train.compile,
        "device": str(dev),
        "world_size": r.info.world_size,
        "mlflow_run_id": r.run_id,
        "checkpoint": str(r.out_dir / "checkpoint.pt"),
    }


@torch.no_grad()
def validate(model, dataset, p: Params, dev, info, collate, normalize, amp_dtype, channels_last) -> float:
    """Top-1 (%) on the validation split, one centre clip per video (the paper's 'val clip')."""
    p = Params.from_dict(p)
    was_training = model.training
    model.eval()
    idx = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(
        Subset(dataset, idx),
        batch_size=p.test.batch_size * 2,
        num_workers=p.data.num_workers,
        collate_fn=collate,
    )
    ids, logits_all, labels_all = [], [], []
    for batch in loader:
        if batch["video"].shape[0] == 0:
            continue
        x = to_input(batch["video"], dev, p.data.mean, p.data.std, normalize, channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        logits_all.append(out.float().cpu().numpy())
        labels_all.append(batch_labels(batch, "cpu").numpy())
        ids.extend(list(batch["video_id"]))
    model.train(was_training)
    return _val_top1(D.all_gather_objects((ids, logits_all, labels_all), info))


def _val_top1(parts: list) -> float:
    """Top-1 over every rank's (ids, logits, labels), each video once (ranks pad by repeating)."""
    seen, L, Y = set(), [], []
    for pid, plog, plab in parts:
        if not plog:
            continue
        lg, lb = np.concatenate(plog), np.concatenate(plab)
        for i, v in enumerate(pid):
            if v not in seen:
                seen.add(v)
                L.append(lg[i])
                Y.append(lb[i])
    if not L:
        return float("nan")
    return metrics.compute_metrics(np.stack(L)[:, None, :], np.array(Y))["top1"]
