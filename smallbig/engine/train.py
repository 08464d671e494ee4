"""`smallbig train`: the paper's training recipe from a params file, on one CPU or many GPUs.

Outputs in the run directory (docs/architecture.md):
  params.yaml          the resolved params of the run
  last.pt, last.prev.pt  periodic full-state checkpoints (the newest and the one before it)
  checkpoint.pt        the final checkpoint (same format)
  history.json         per epoch: loss, lr, val_top1, clips_per_s, peak_mem_mb
  train_metrics.json   summary: final loss/LR/val top-1, batch plan, AMP, device, MLflow run id

  mlflow-run.json      the MLflow run of this directory (id, store), so that a resume which
                       fails before it can read a checkpoint still ends that run FAILED
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
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from smallbig import __version__
from smallbig.config import dump_params, params_hash
from smallbig.engine import distributed as D
from smallbig.engine.checkpoint import (CheckpointError, OutputWriteError, load_checkpoint,
                                        prev_path, quarantine, rng_state, save_rotating,
                                        set_rng_state, atomic_save, unwrap, write_failure)
from smallbig.engine.optim import build_optimizer, build_scheduler, plan_batch
from smallbig.engine.seeding import EpochSampler, SeededDataset, WorkerInit, mix_seed, seed_everything
# signals and the time-limit deadline; no torch there, so the CLI installs it before importing us
from smallbig.engine.stopping import StopFlag

EXIT_OK = 0
EXIT_REQUEUE = 3


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the iteration."""


class TrainingError(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers
def default_builders():
    from smallbig.data import build_dataset, collate, normalize
    from smallbig.models import build_model
    return build_model, build_dataset, collate, normalize


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, obj) -> None:
    """Atomic (tmp + rename); a failed write leaves the old file and no tmp file, and raises
    OutputWriteError naming the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputWriteError(f"{path}: {write_failure(e, path.parent)} while writing it "
                               f"([Errno {e.errno}] {e.strerror}); the previous version is intact") from None


RUN_FILE = "mlflow-run.json"


def _remove_dead_tmp(out_dir: Path) -> None:
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
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fail_resumed_run(out_dir: Path, state: dict, error: BaseException, log) -> None:
    """A resume failed before its MLflow run was resumed: end the run of OUT (from the
    checkpoint if it was read, else OUT/mlflow-run.json) FAILED instead of leaving it RUNNING."""
    from smallbig.engine import tracking

    run_id = state.get("ckpt_run_id")
    try:
        rec = json.loads((out_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        rec = {}
    if not run_id and rec.get("tracking_uri") == tracking.tracking_uri():
        run_id = rec.get("run_id")
    if run_id:
        tracking.fail_orphan_run(run_id, f"resume failed: {type(error).__name__}: {error}", log=log)


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """-> (autocast dtype or None, use GradScaler, effective amp string)."""
    if amp in (None, "none") or device.type != "cuda":
        return None, False, "none"
    if amp == "bf16":
        return torch.bfloat16, False, "bf16"
    if amp == "fp16":
        return torch.float16, True, "fp16"
    raise TrainingError(f"train.amp: unknown value {amp!r}")


def apply_channels_last(model: torch.nn.Module) -> bool:
    """Channels-last memory format. A smallbig VideoResNet (efficient formulation: 2-D convs
    over frame-major clips) switches its frames to channels-last itself (set_channels_last);
    -> False (feed inputs unchanged). Any other model: channels_last_3d weights, -> True (feed
    channels_last_3d inputs)."""
    try:
        from smallbig.models import VideoResNet, set_channels_last
    except ImportError:
        VideoResNet = None
    if VideoResNet is not None and isinstance(model, VideoResNet):
        set_channels_last(model, True)
        return False
    model.to(memory_format=torch.channels_last_3d)
    return True


def to_input(batch_video: torch.Tensor, device, mean, std, normalize, channels_last: bool):
    x = batch_video.to(device, non_blocking=True)
    x = normalize(x, mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _labels(batch, device):
    y = batch["label"]
    if not torch.is_tensor(y):
        y = torch.as_tensor(y)
    return y.to(device, dtype=torch.long, non_blocking=True)


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
        log(f"WARNING: {e}. Kept it as {kept.name}; resuming from the previous good checkpoint "
            f"{prev.name} (iteration {ckpt['iteration']}).")
        return ckpt


# --------------------------------------------------------------------------- training
def train(params: dict, out_dir: str | Path, resume: bool = False, device: str | None = None,
          track: bool = True, progress: bool = True, builders=None, log=None,
          stop: StopFlag | None = None) -> int:
    """Train per `params`; returns EXIT_OK or EXIT_REQUEUE (stopped by a signal or the time-limit
    deadline of `stop`, checkpointed). `stop`: an installed StopFlag (the CLI installs one at
    start); default: a new one with no deadline, installed here."""
    state: dict = {}
    try:
        return _train(params, Path(out_dir), resume, device, track, progress, builders, log, stop,
                      state)
    except Exception as e:
        if resume and track and state.get("is_main") and state.get("run") is None:
            _fail_resumed_run(Path(out_dir), state, e, state.get("say") or log or print)
        raise


def _train(params: dict, out_dir: Path, resume: bool, device: str | None, track: bool,
           progress: bool, builders, log, stop: StopFlag | None, state: dict) -> int:
    own_stop = stop is None
    stop = stop if stop is not None else StopFlag()
    stop.install()
    info, dev = D.setup(device)
    state["is_main"] = info.is_main
    log = log or (lambda m: print(f"smallbig train: {m}", file=sys.stderr, flush=True))

    def say(m: str) -> None:
        """Rank 0: the message, also appended to OUT/train.log, which (unlike the workflow's
        per-job log) keeps the whole story of a run over its jobs: stops, resumes, retries."""
        if not info.is_main:
            return
        log(m)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / "train.log", "a") as f:
                f.write(f"{_now_iso()} {m}\n")
        except OSError:
            pass

    state["say"] = say
    if D.any_flag(stop.set, info, dev):
        say(f"stop ({stop.reason()}) before anything was loaded; exit {EXIT_REQUEUE}")
        if own_stop:
            stop.restore()
        D.cleanup()
        return EXIT_REQUEUE
    build_model, build_dataset, collate, normalize = builders or default_builders()
    tr = params["train"]
    data_cfg = params["data"]
    phash = params_hash(params)

    # ---- existing state in the output directory: never overwrite silently
    ckpt = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "last.pt").exists() or (out_dir / "checkpoint.pt").exists():
        if not resume:
            raise CheckpointError(
                f"{out_dir}: already holds a checkpoint (last.pt/checkpoint.pt); pass --resume to "
                f"continue it, or choose another --out")
    if resume:
        if info.is_main:
            _remove_dead_tmp(out_dir)
        ckpt = find_resume_checkpoint(out_dir, say) if info.is_main else None
        ckpt = D.broadcast_object(ckpt, info) if info.distributed else ckpt
        if ckpt is None and (out_dir / "checkpoint.pt").exists():
            ckpt = load_checkpoint(out_dir / "checkpoint.pt")
        if ckpt is not None:
            state["ckpt_run_id"] = ckpt.get("mlflow_run_id")
        if ckpt is not None and ckpt["params_hash"] != phash:
            raise CheckpointError(
                f"{out_dir / 'last.pt'}: made with different params (hash {ckpt['params_hash'][:12]} "
                f"vs {phash[:12]} now); refusing to resume. Use a new --out for new params.")

    # ---- determinism, model, data
    seed = int(tr.get("seed", 0))
    seed_everything(seed)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    # inputs first, before any model is built: the ImageNet file a fresh run starts from
    # (model.pretrained, verified) and both list files (a bad train.txt/val.txt: exit 2, FILE:LINE)
    weights = None
    if ckpt is None:  # a fresh run starts from model.pretrained (verified ImageNet file) or `none`
        from smallbig.models.weights import resolve_pretrained
        weights = resolve_pretrained(params)
    dataset = build_dataset(params, "train", "train")
    val_ds = build_dataset(params, "val", "val")
    model = build_model(params["model"])
    if ckpt is None:
        if weights is not None:
            from smallbig.models import load_pretrained_2d
            got = load_pretrained_2d(model, weights)
            say(f"initialised from {params['model']['pretrained']} ({weights}, ResNet-"
                f"{got['source_depth']}: {got['loaded']} tensors loaded)")
    channels_last = apply_channels_last(model) if tr.get("channels_last", False) else False
    model = model.to(dev)
    if info.distributed and tr.get("sync_bn", False):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plan = plan_batch(tr, info.world_size)
    amp_dtype, use_scaler, amp_eff = amp_settings(tr.get("amp", "none"), dev)
    if tr.get("amp", "none") not in (None, "none") and amp_eff == "none":
        say(f"amp {tr.get('amp')} requested but running on {dev.type}: AMP disabled, training in fp32")

    n = len(dataset)
    per_rank = -(-n // info.world_size)
    ipe = per_rank // plan.per_gpu_batch // plan.accum_steps
    if ipe == 0:
        raise TrainingError(
            f"training set of {n} clips is smaller than one optimizer step "
            f"({plan.total_batch} clips = {plan.per_gpu_batch} x {plan.accum_steps} accumulation x "
            f"{info.world_size} process(es)); lower train.batch_size/per_gpu_batch")
    epochs = int(tr["epochs"])
    total_iters = ipe * epochs
    sampler = EpochSampler(n, seed, info.rank, info.world_size, shuffle=True,
                           samples_per_rank=ipe * plan.accum_steps * plan.per_gpu_batch)
    optimizer = build_optimizer(model, tr, plan.lr)
    scheduler = build_scheduler(optimizer, tr, ipe)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    start_epoch, global_it, history, epoch_stats, run_id = 0, 0, [], None, None
    # wall time accumulated over every (resumed) process of this run, for GPU-hours in reports
    prior_elapsed, started = 0.0, _now_iso()
    if ckpt is not None:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, global_it = int(ckpt["epoch"]), int(ckpt["iteration"])
        history = list(ckpt.get("history", []))
        epoch_stats = ckpt.get("epoch_stats")
        run_id = ckpt.get("mlflow_run_id")
        prior_elapsed, started = float(ckpt.get("elapsed_s", 0.0)), ckpt.get("started") or started
        old_plan = ckpt.get("batch_plan", {})
        if old_plan and (old_plan.get("world_size"), old_plan.get("accum_steps")) != (plan.world_size, plan.accum_steps):
            say(f"WARNING: resuming with {plan.world_size} process(es) x {plan.accum_steps} accumulation "
                f"(checkpoint: {old_plan.get('world_size')} x {old_plan.get('accum_steps')}): same "
                f"total batch, but the data order per process differs from an uninterrupted run")
        say(f"resuming {out_dir / 'last.pt'} at epoch {start_epoch}, iteration {global_it}/{total_iters}")

    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    train_model = torch.compile(model) if tr.get("compile", False) else model

    if ckpt is not None and "rng" in ckpt:
        per_rank_rng = ckpt.get("rng_per_rank")
        if per_rank_rng and len(per_rank_rng) == info.world_size:
            set_rng_state(per_rank_rng[info.rank])
        else:
            set_rng_state(ckpt["rng"])
    else:
        # model init is identical on every rank (same seed); dropout etc. differ per rank
        seed_everything(mix_seed(seed, info.rank, 0x7A1))

    if info.is_main:
        dump_params(params, out_dir / "params.yaml")
    run = None
    status = "FAILED"
    pbar = None
    t_start = time.time()
    try:
        if info.is_main:
            from smallbig.engine import tracking
            run = tracking.start_run(params, "train", resume_run_id=run_id, enabled=track, log=say,
                                     unsent_file=out_dir / tracking.UNSENT_FILE,
                                     extra_tags={"out_dir": str(out_dir.resolve()),
                                                 "amp_effective": amp_eff, "device": str(dev)})
            state["run"] = run
            if run.run_id and (run_id is None or run.run_id != run_id):
                run.log_params({f"engine.{k}": v for k, v in plan.as_dict().items()}
                               | {"engine.amp_effective": amp_eff, "engine.iters_per_epoch": ipe,
                                  "engine.device": dev.type})
                run.log_artifact(out_dir / "params.yaml")
            if run.run_id:
                _write_json(out_dir / RUN_FILE, {"run_id": run.run_id,
                                                 "tracking_uri": tracking.tracking_uri(),
                                                 "experiment": params["id"]})
            run_id = run.run_id
        say(f"{params['id']}: {n} clips, {epochs} epochs x {ipe} iterations, batch {plan.total_batch} "
            f"({plan.per_gpu_batch}/process x {plan.accum_steps} accumulation x {plan.world_size} "
            f"process(es), policy {plan.policy}), lr {plan.lr:g}, amp {amp_eff}, device {dev}")

        mean, std = data_cfg.get("mean", [0.485, 0.456, 0.406]), data_cfg.get("std", [0.229, 0.224, 0.225])
        num_workers = int(data_cfg.get("num_workers", 0))
        every = int(tr.get("checkpoint_every_iters", 1000))
        val_every = int(tr.get("val_every_epochs", 1))

        def make_state(epoch: int, stats) -> dict:
            rngs = D.all_gather_objects(rng_state(), info)
            return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rngs[0], "rng_per_rank": rngs, "epoch": epoch, "iteration": global_it,
                    "iters_per_epoch": ipe, "total_iters": total_iters, "history": history,
                    # where the data order resumes: this rank's samples of epoch `epoch` already used
                    "data_position": {"epoch": epoch, "iter_in_epoch": global_it - epoch * ipe,
                                      "samples_done_per_rank": (global_it - epoch * ipe)
                                      * plan.accum_steps * plan.per_gpu_batch, "seed": seed},
                    "epoch_stats": stats, "batch_plan": plan.as_dict(), "params": params,
                    "params_hash": phash, "smallbig_version": __version__, "mlflow_run_id": run_id,
                    "started": started, "elapsed_s": prior_elapsed + time.time() - t_start}

        def save_last(epoch: int, stats) -> None:
            full = make_state(epoch, stats)  # collective: every rank
            if info.is_main:
                save_rotating(full, out_dir / "last.pt")
            D.barrier(info)

        from tqdm import tqdm

        pbar = tqdm(total=total_iters, initial=global_it, disable=not (progress and info.is_main),
                    desc=f"train {params['id']}", unit="it", dynamic_ncols=True, mininterval=1.0,
                    file=sys.stderr)
        if start_epoch < epochs and D.any_flag(stop.set, info, dev):
            # stopped before the first iteration of this process: nothing new to save
            say(f"stop ({stop.reason()}) before training started; exit {EXIT_REQUEUE} "
                f"(resume with --resume)")
            status = "KILLED"
            return EXIT_REQUEUE
        for epoch in range(start_epoch, epochs):
            stats = epoch_stats or {"loss_sum": 0.0, "loss_n": 0, "clips": 0, "time": 0.0, "skipped": 0}
            epoch_stats = None
            it0 = global_it - epoch * ipe
            if it0 < ipe:
                sampler.set_epoch(epoch, start=it0 * plan.accum_steps * plan.per_gpu_batch)
                loader = DataLoader(SeededDataset(dataset), batch_size=plan.per_gpu_batch,
                                    sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                    worker_init_fn=WorkerInit(seed, epoch, info.rank),
                                    pin_memory=dev.type == "cuda", drop_last=True)
                batches = iter(loader)
                train_model.train()
                for _ in range(it0, ipe):
                    t0 = time.time()
                    clips = 0
                    for micro in range(plan.accum_steps):
                        batch = next(batches)
                        stats["skipped"] += len(batch.get("skipped", []) or [])
                        if batch["video"].shape[0] == 0:
                            continue
                        x = to_input(batch["video"], dev, mean, std, normalize, channels_last)
                        y = _labels(batch, dev)
                        sync = (model.no_sync() if info.distributed and micro < plan.accum_steps - 1
                                else contextlib.nullcontext())
                        with sync:
                            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                                logits = train_model(x)
                            loss = F.cross_entropy(logits.float(), y)
                            value = loss.item()
                            if not math.isfinite(value):
                                raise NonFiniteLossError(
                                    f"loss is {value} at iteration {global_it + 1} (epoch {epoch + 1}, "
                                    f"micro-batch {micro + 1}/{plan.accum_steps}); stopping. Lower "
                                    f"train.lr or check the data; last good checkpoint: {out_dir / 'last.pt'}")
                            scaled = loss / plan.accum_steps
                            (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        stats["loss_sum"] += value * y.shape[0]
                        stats["loss_n"] += y.shape[0]
                        clips += y.shape[0]
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    lr_now = optimizer.param_groups[0]["lr"]
                    scheduler.step()
                    global_it += 1
                    dt = time.time() - t0
                    stats["clips"] += clips
                    stats["time"] += dt
                    stats["lr"] = lr_now
                    if pbar is not None:
                        pbar.update(1)
                        pbar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", lr=f"{lr_now:.3g}",
                                         clips_s=f"{clips * info.world_size / max(dt, 1e-9):.1f}",
                                         refresh=False)
                    stopping = D.any_flag(stop.set, info, dev)
                    last_of_epoch = global_it == (epoch + 1) * ipe
                    if stopping and not last_of_epoch:
                        save_last(epoch, stats)
                        say(f"stop ({stop.reason()}): checkpointed {out_dir / 'last.pt'} at iteration "
                            f"{global_it}; exit {EXIT_REQUEUE} (resume with --resume)")
                        status = "KILLED"
                        return EXIT_REQUEUE
                    if global_it % every == 0 and not last_of_epoch:
                        save_last(epoch, stats)
                del batches, loader
            # ---- epoch end: validation, history, checkpoint
            val_top1 = None
            if (epoch + 1) % val_every == 0 or epoch + 1 == epochs:
                val_top1 = validate(unwrap(model), val_ds, params, dev, info, collate, normalize,
                                    amp_dtype, channels_last)
            if info.distributed:  # loss over all processes' clips
                parts = D.all_gather_objects((stats["loss_sum"], stats["loss_n"], stats["skipped"]), info)
                loss_sum, loss_n = sum(p[0] for p in parts), sum(p[1] for p in parts)
                skipped = sum(p[2] for p in parts)
            else:
                loss_sum, loss_n, skipped = stats["loss_sum"], stats["loss_n"], stats["skipped"]
            row = {"epoch": epoch + 1, "iteration": global_it,
                   "loss": loss_sum / max(1, loss_n),
                   "lr": stats.get("lr", optimizer.param_groups[0]["lr"]), "val_top1": val_top1,
                   "clips_per_s": stats["clips"] * info.world_size / max(stats["time"], 1e-9),
                   "peak_mem_mb": _peak_mem_mb(dev), "skipped": skipped}
            history.append(row)
            if info.is_main:
                _write_json(out_dir / "history.json", history)
                if run is not None:
                    run.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "iteration")},
                                    step=epoch + 1)
            save_last(epoch + 1, None)
            if D.any_flag(stop.set, info, dev) and epoch + 1 < epochs:
                say(f"stop ({stop.reason()}): checkpointed {out_dir / 'last.pt'} at iteration "
                    f"{global_it}; exit {EXIT_REQUEUE}")
                status = "KILLED"
                return EXIT_REQUEUE

        # ---- done
        final = make_state(epochs, None)
        if info.is_main:
            # history.json again: a run resumed from the final last.pt (the job was stopped after
            # its last iteration and the workflow removed its outputs) must write every output
            _write_json(out_dir / "history.json", history)
            atomic_save(final, out_dir / "checkpoint.pt")
            vals = [h["val_top1"] for h in history if h.get("val_top1") is not None]
            summary = {
                "experiment": params["id"], "params_hash": phash, "epochs": epochs,
                "iterations": global_it, "iters_per_epoch": ipe,
                "final_loss": history[-1]["loss"] if history else None,
                "final_lr": history[-1]["lr"] if history else None,
                "val_top1": vals[-1] if vals else None, "best_val_top1": max(vals) if vals else None,
                "clips_per_s": history[-1]["clips_per_s"] if history else None,
                "wall_time_s_this_process": time.time() - t_start,
                "wall_time_s": prior_elapsed + time.time() - t_start,
                "started": started, "finished": _now_iso(),
                "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                "gpu_hours": ((prior_elapsed + time.time() - t_start) * info.world_size / 3600.0
                              if dev.type == "cuda" else None),  # CPU runs: wall_time_s
                "batch_plan": plan.as_dict(), "amp": amp_eff, "channels_last": channels_last,
                "compile": bool(tr.get("compile", False)), "device": str(dev),
                "world_size": info.world_size, "mlflow_run_id": run_id,
                "checkpoint": str(out_dir / "checkpoint.pt"),
            }
            _write_json(out_dir / "train_metrics.json", summary)
            if run is not None:
                run.log_metrics({"final_loss": summary["final_loss"] or float("nan"),
                                 **({"final_val_top1": summary["val_top1"]} if vals else {})},
                                step=epochs)
                run.log_artifact(out_dir / "history.json")
                run.log_artifact(out_dir / "train_metrics.json")
        D.barrier(info)
        status = "FINISHED"
        return EXIT_OK
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            status = "KILLED"
        if run is not None:
            run.set_tags({"smallbig.error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if own_stop:
            stop.restore()
        if pbar is not None:
            pbar.close()
        if run is not None:
            try:
                run.finish(status)
            except Exception as e:  # never hide the real outcome behind a tracking error
                say(f"WARNING: could not close the MLflow run: {e}")
        D.cleanup()


@torch.no_grad()
def validate(model, dataset, params, dev, info, collate, normalize, amp_dtype, channels_last) -> float:
    """Top-1 (%) on the validation split, one centre clip per video (the paper's 'val clip')."""
    import numpy as np

    from smallbig.engine import metrics

    was_training = model.training
    model.eval()
    idx = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx),
                        batch_size=int(params["test"].get("batch_size", 4)) * 2,
                        num_workers=int(params["data"].get("num_workers", 0)), collate_fn=collate)
    ids, logits_all, labels_all = [], [], []
    mean, std = params["data"].get("mean"), params["data"].get("std")
    for batch in loader:
        if batch["video"].shape[0] == 0:
            continue
        x = to_input(batch["video"], dev, mean, std, normalize, channels_last)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        logits_all.append(out.float().cpu().numpy())
        labels_all.append(_labels(batch, "cpu").numpy())
        ids.extend(list(batch["video_id"]))
    model.train(was_training)
    parts = D.all_gather_objects((ids, logits_all, labels_all), info)
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
