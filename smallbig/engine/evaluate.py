"""`smallbig evaluate` / `evaluate-merge` / `ensemble`: the paper's multi-view test protocol.

Every video of the validation split is decoded once into all views of the protocol (e.g. 10
clips x 3 crops), the model scores every view, and the per-video, per-view logits are saved
(`scores.npz`, format in smallbig/engine/metrics.py). All metrics — the protocol's own and every
subset (k clips x 1 or 3 crops) — are computed from the saved logits by smallbig.engine.metrics,
never by running the model again.

Sharding: `--shard i/n` scores videos i, i+n, i+2n, ... into `scores.shard-i-of-n.npz`;
`--merge` (or `smallbig evaluate-merge DIR`) checks that all n shards are present and writes
scores.npz + metrics.json. Under torchrun/Slurm with several processes the ranks shard
automatically and rank 0 merges.

Interrupted evaluations: every output is written to a temporary file, fsync'ed and renamed into
place, so a process killed at any moment (SIGKILL, node failure) leaves no partial scores file
under a final name; an evaluation first removes the outputs it is about to recompute (metrics.json,
the "complete" marker, before scores.npz), so outputs of an older evaluation are never mistaken
for this one's. Rerunning the same command restarts it and gives bitwise the same scores.
A write that fails (disk full, ...) raises OutputWriteError naming the file.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from smallbig.config import dump_params
from smallbig.data import build_dataset
from smallbig.data import collate as default_collate
from smallbig.data import normalize as default_normalize
from smallbig.engine import distributed as D
from smallbig.engine import metrics, tracking
from smallbig.engine.checkpoint import CheckpointError, clean_state_dict, load_checkpoint
from smallbig.engine.mlflow_models import LoadedModel
from smallbig.engine.runtime import amp_settings, apply_channels_last, to_input
from smallbig.errors import InputError, RunError
from smallbig.fsutil import atomic_write, atomic_write_text
from smallbig.models import build_model, model_info
from smallbig.spec.params import Params
from smallbig.spec.protocol import Protocol, ProtocolError

SHARD_RE = re.compile(r"^scores\.shard-(\d+)-of-(\d+)\.npz$")


def protocol_of(text: str | Protocol) -> Protocol:
    """Protocol.parse; a bad protocol is bad input (InputError, exit 2)."""
    try:
        return Protocol.parse(text)
    except ProtocolError as e:
        raise InputError(str(e)) from None


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise InputError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _savez(scores: dict, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **scores)


def save_scores(path: Path, scores: dict) -> None:
    """Atomically (a killed process leaves the old file or the new one, never part of one)."""
    atomic_write(path, partial(_savez, scores))


def _remove_stale(paths) -> None:
    """Remove outputs this evaluation is about to recompute, the complete-marker first, and the
    temporary files of killed earlier attempts at them."""
    for p in paths:
        tmps = [*p.parent.glob(f".{p.name}.*.tmp"), *p.parent.glob(f".{p.stem}.*.tmp{p.suffix}")]
        for q in [p, *tmps]:
            q.unlink(missing_ok=True)


def _stderr_log(m: str) -> None:
    print(f"smallbig evaluate: {m}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_views(
    model,
    dataset,
    params,
    device,
    indices=None,
    view_subset=None,
    batch_size=None,
    progress=True,
    normalize=None,
    collate=None,
    amp_dtype=None,
    channels_last=False,
    desc="evaluate",
    max_clips: int = 64,
) -> dict:
    """Run `model` on every view of every video (optionally only a clips x crops subset of the
    views); -> dict in the scores.npz format (without num_clips/num_crops)."""
    p = Params.from_dict(params)
    normalize, collate = normalize or default_normalize, collate or default_collate
    ds = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(
        ds,
        batch_size=batch_size or p.test.batch_size,
        num_workers=p.data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    model.eval()
    logits, labels, ids, skipped = [], [], [], []
    layout = None  # (clip_idx, crop_idx) of the first video, the saved ones, the view mask
    with tqdm(
        total=len(ds),
        desc=desc,
        unit="video",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
        file=sys.stderr,
    ) as bar:
        for batch in loader:
            skipped.extend(batch.get("skipped", []) or [])
            bar.update(len(batch.get("skipped", []) or []))
            if batch["video"].shape[0] == 0:
                continue
            layout = _view_layout(batch, layout, view_subset)
            video = batch["video"]  # [B, V, 3, T, H, W] uint8
            if layout[4] is not None:
                video = video[:, torch.from_numpy(layout[4])]
            B, V = video.shape[:2]
            x = to_input(
                video.reshape(B * V, *video.shape[2:]),
                device,
                p.data.mean,
                p.data.std,
                normalize,
                channels_last,
            )
            outs = []
            for chunk in x.split(max_clips):  # bounded memory: at most max_clips views per call
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outs.append(model(chunk).float())
            logits.append(torch.cat(outs).reshape(B, V, -1).cpu().numpy())
            y = batch["label"]
            labels.append(np.asarray(y.cpu() if torch.is_tensor(y) else y, dtype=np.int64))
            ids.extend(str(v) for v in batch["video_id"])
            bar.update(B)
    if not logits:
        raise RunError(f"no video could be evaluated ({len(skipped)} skipped)")
    return {
        "logits": np.concatenate(logits).astype(np.float32),
        "labels": np.concatenate(labels),
        "video_ids": np.array(ids, dtype=str),
        "clip_idx": layout[2].astype(np.int64),
        "crop_idx": layout[3].astype(np.int64),
        "skipped": np.array(skipped, dtype=str),
    }


def _view_layout(batch: dict, layout, view_subset):
    """(clip_idx, crop_idx) of the batch's views, checked against the first video's; the first
    time also the saved (renumbered) indices and the mask of a clips x crops subset.
    -> (base clip_idx, base crop_idx, saved clip_idx, saved crop_idx, mask or None)."""
    ci, cr = _per_view(batch["clip_idx"]), _per_view(batch["crop_idx"])
    if layout is not None:
        if not (np.array_equal(ci, layout[0]) and np.array_equal(cr, layout[1])):
            raise RunError(f"video {batch['video_id'][0]}: its views differ from the first video's")
        return layout
    if view_subset is None:
        return ci, cr, ci, cr, None
    nclips, ncrops = int(ci.max()) + 1, int(cr.max()) + 1
    mask = metrics.select_views(ci, cr, nclips, view_subset[0], view_subset[1], ncrops)
    # renumber the kept clips/crops 0.. so the saved subset is self-consistent
    return (
        ci,
        cr,
        np.unique(ci[mask], return_inverse=True)[1],
        np.unique(cr[mask], return_inverse=True)[1],
        mask,
    )


def _per_view(t) -> np.ndarray:
    a = np.asarray(t.cpu() if torch.is_tensor(t) else t, dtype=np.int64)
    if a.ndim == 2:  # collated [B, V]: all videos share the view layout
        if not (a == a[:1]).all():
            raise RunError("videos in one batch have different view layouts")
        a = a[0]
    return a


# --------------------------------------------------------------------------- metrics.json
def gflops(params: dict, protocol: str) -> dict:
    """Compute per view from smallbig.models.model_info: `gflops_per_view` at T x 224 x 224 (the
    paper's convention: its "GFlops x views" multiplies that by the views) and
    `gflops_per_view_test_crop` at this protocol's real crop. Empty if unavailable."""
    try:
        p = copy.deepcopy(dict(params))
        p["test"]["protocols"] = [protocol]  # model_info reports the primary protocol's crop
        info = model_info(p)
    except Exception as e:  # never fail an evaluation on a compute count
        print(f"smallbig evaluate: WARNING: model_info failed ({e}); no GFLOPs", file=sys.stderr)
        return {}
    return {
        "gflops_per_view": info.get("gmacs_224"),
        "gflops_per_view_test_crop": info.get("gmacs_test_crop"),
    }


def subsets_of(num_clips: int, num_crops: int) -> list[tuple[int, int]]:
    out = []
    for k in range(1, num_clips + 1):
        out.append((k, 1))
        if num_crops == 3:
            out.append((k, 3))
    return out


def build_metrics(
    scores: dict,
    experiment: str,
    protocol: str,
    per_view_gflops: float | None,
    extra: dict | None = None,
    per_view_gflops_test_crop: float | None = None,
) -> dict:
    num_clips, num_crops = int(scores["num_clips"]), int(scores["num_crops"])
    m = metrics.compute_metrics(scores["logits"], scores["labels"])
    out = {
        "experiment": experiment,
        "protocol": protocol,
        "num_clips": num_clips,
        "num_crops": num_crops,
        "top1": m["top1"],
        "top5": m["top5"],
        "mean_class_acc": m["mean_class_acc"],
        "per_class_acc": m["per_class_acc"],
        "num_videos": m["num_videos"],
        "num_views": m["num_views"],
        "skipped": int(len(scores.get("skipped", []))),
        "skipped_ids": [str(s) for s in scores.get("skipped", [])],
        "gflops_per_view": per_view_gflops,
        "gflops_x_views": None if per_view_gflops is None else per_view_gflops * num_clips * num_crops,
        "gflops_per_view_test_crop": per_view_gflops_test_crop,
        "gflops_x_views_test_crop": (
            None if per_view_gflops_test_crop is None else per_view_gflops_test_crop * num_clips * num_crops
        ),
        "subsets": {},
    }
    for k, c in subsets_of(num_clips, num_crops):
        s = metrics.subset_metrics(scores, k, c)
        out["subsets"][f"{k}x{c}"] = {
            "top1": s["top1"],
            "top5": s["top5"],
            "mean_class_acc": s["mean_class_acc"],
            "num_views": s["num_views"],
            "gflops_x_views": None if per_view_gflops is None else per_view_gflops * k * c,
        }
    out.update(extra or {})
    return out


# --------------------------------------------------------------------------- evaluate
def evaluate(
    params: dict | Params,
    checkpoint: str | Path | LoadedModel,
    out_dir: str | Path,
    protocol: str | None = None,
    shard: tuple[int, int] | None = None,
    device: str | None = None,
    track: bool = True,
    progress: bool = True,
    view_subset=None,
) -> dict | None:
    """Score the val split with the protocol's views; write scores(.shard-i-of-n).npz and, for
    a complete run, metrics.json. Returns the metrics (None for a shard). `checkpoint`: a
    checkpoint file, or a model logged in MLflow (mlflow_models.load_logged_model)."""
    p = Params.from_dict(params)
    raw = p.to_dict() if isinstance(params, Params) else params
    out_dir = Path(out_dir)
    proto = protocol_of(protocol or p.primary_protocol)
    info, dev = D.setup(device)
    explicit_shard = shard is not None
    if shard is None and info.distributed:
        shard = (info.rank, info.world_size)
    model, amp_dtype, amp_eff, channels_last, lineage = _model_for(p, raw, checkpoint, dev)
    dataset = build_dataset(raw, "val", "test", proto.name)
    indices = None if shard is None else range(shard[0], len(dataset), shard[1])
    main = explicit_shard or info.is_main  # the process that writes (and records) this call
    if main:
        if shard is not None:
            _remove_stale([out_dir / f"scores.shard-{shard[0]}-of-{shard[1]}.npz"])
        if shard is None or info.distributed:
            _remove_stale([out_dir / "metrics.json", out_dir / "scores.npz"])
    t0 = time.time()
    run = None
    status = "FAILED"
    try:
        if main:
            run = _start_run(raw, p.id, proto, lineage, out_dir, shard, amp_eff, track, dataset)
        scores = score_views(
            model,
            dataset,
            p,
            dev,
            indices=indices,
            view_subset=view_subset,
            progress=progress and (info.is_main or shard is not None),
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            desc=f"evaluate {p.id} {proto.name}",
        )
        scores["num_clips"] = np.int64(proto.clips if view_subset is None else view_subset[0])
        scores["num_crops"] = np.int64(proto.crops if view_subset is None else view_subset[1])
        extra = {"checkpoint": str(checkpoint), "seconds": time.time() - t0, "amp": amp_eff}
        result = _write_outputs(raw, out_dir, proto, scores, shard, info, run, extra)
        status = "FINISHED"
        return result
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            status = "KILLED"
        if run is not None:
            run.set_tags({"smallbig.error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if run is not None:
            try:
                run.finish(status)
            except Exception as e:
                _stderr_log(f"WARNING: could not close the MLflow run: {e}")
        D.cleanup()


def _model_for(p: Params, raw: dict, checkpoint, dev):
    """The model of the checkpoint (or logged model) on `dev`, with the params' AMP and memory
    format. -> (model, autocast dtype, effective amp, feed channels_last_3d inputs, lineage:
    where it came from, the training run that made it, the logged model's id)."""
    if isinstance(checkpoint, LoadedModel):
        model, ck_params = checkpoint.model, checkpoint.params
        lineage = {
            "source": checkpoint.uri,
            "train_run_id": checkpoint.run_id,
            "model_id": checkpoint.model_id,
        }
    else:
        ckpt = load_checkpoint(checkpoint)  # once: the weights and the training run's id
        ck_params = ckpt["params"]
        model = build_model(ck_params["model"])
        try:
            model.load_state_dict(clean_state_dict(ckpt["model"]))
        except RuntimeError as e:
            raise CheckpointError(
                f"{checkpoint}: weights do not fit the model its params describe: {e}"
            ) from None
        model.eval()
        lineage = {
            "source": str(Path(checkpoint).resolve()),
            "train_run_id": ckpt.get("mlflow_run_id"),
            "model_id": None,
        }
    if ck_params["model"] != raw["model"]:
        raise CheckpointError(
            f"{checkpoint}: trained with different model params than "
            f"{p.id} asks for; evaluate it with its own params"
        )
    amp_dtype, _, amp_eff = amp_settings(p.train.amp, dev)
    channels_last = apply_channels_last(model) if p.train.channels_last else False
    return model.to(dev), amp_dtype, amp_eff, channels_last, lineage


def _start_run(
    raw: dict,
    exp: str,
    proto: Protocol,
    lineage: dict,
    out_dir: Path,
    shard,
    amp_eff: str,
    track: bool,
    dataset,
):
    """The MLflow run of this evaluation (or shard): the params as an artifact, the validation
    split and the logged model (if any) as inputs, the training run as lineage."""
    tag = f"-shard{shard[0]}of{shard[1]}" if shard else ""
    from_model = {"smallbig.model_uri": lineage["source"], "smallbig.model_id": lineage["model_id"] or "none"}
    run = tracking.start_run(
        raw,
        "evaluate",
        run_name=f"{exp}-eval-{proto.name}{tag}",
        enabled=track,
        log=_stderr_log,
        unsent_file=out_dir
        / (f"mlflow-unsent.shard-{shard[0]}-of-{shard[1]}.json" if shard else tracking.UNSENT_FILE),
        extra_tags={
            "protocol": proto.name,
            "checkpoint": lineage["source"],
            "out_dir": str(out_dir.resolve()),
            "amp_effective": amp_eff,
            "shard": f"{shard[0]}/{shard[1]}" if shard else "none",
            **(from_model if lineage["model_id"] else {}),
        },
    )
    if run.enabled and run.run_id:
        with tempfile.TemporaryDirectory() as tmp:
            dump_params(raw, Path(tmp) / "params.yaml")
            run.log_artifact(Path(tmp) / "params.yaml")
        run.link_training(lineage["train_run_id"])
        run.log_inputs(
            [tracking.dataset_input(raw, "val", dataset, "evaluation")],
            [lineage["model_id"]] if lineage["model_id"] else None,
        )
    return run


def _write_outputs(
    raw: dict, out_dir: Path, proto: Protocol, scores: dict, shard, info, run, extra: dict
) -> dict | None:
    """A shard: its scores (rank 0 of a distributed evaluation then merges all shards); else
    scores.npz and metrics.json."""
    if shard is not None:
        save_scores(out_dir / f"scores.shard-{shard[0]}-of-{shard[1]}.npz", scores)
        D.barrier(info)
        if info.distributed and info.is_main:
            return merge(raw, out_dir, run=run, extra=extra)
        return None
    save_scores(out_dir / "scores.npz", scores)
    g = gflops(raw, proto.name)
    result = build_metrics(
        scores, raw["id"], proto.name, g.get("gflops_per_view"), extra, g.get("gflops_per_view_test_crop")
    )
    _finish(out_dir, result, run)
    return result


def _finish(out_dir: Path, result: dict, run) -> None:
    if run is not None and run.enabled and run.run_id:
        result["mlflow_run_id"] = run.run_id  # the report's lineage (verdicts.json eval_run_id)
    _write_json(out_dir / "metrics.json", result)
    if run is not None:
        flat = {
            "top1": result["top1"],
            "top5": result["top5"],
            "mean_class_acc": result["mean_class_acc"],
            "skipped": result["skipped"],
            "num_videos": result["num_videos"],
        }
        if result.get("gflops_x_views") is not None:
            flat["gflops_x_views"] = result["gflops_x_views"]
        for name, s in result["subsets"].items():
            flat[f"top1_{name}"] = s["top1"]
            flat[f"top5_{name}"] = s["top5"]
        run.log_metrics(flat)
        run.log_artifact(out_dir / "metrics.json")


def merge_shards(out_dir: str | Path) -> dict:
    """Combine scores.shard-i-of-n.npz (all n required, no duplicate videos) -> scores dict."""
    out_dir = Path(out_dir)
    found = {}
    for p in sorted(out_dir.glob("scores.shard-*-of-*.npz")):
        m = SHARD_RE.match(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"{out_dir}: no scores.shard-i-of-n.npz files to merge")
    if len(found) > 1:
        raise InputError(
            f"{out_dir}: shard files of different shard counts {sorted(found)}; remove stale ones"
        )
    n, shards = next(iter(found.items()))
    missing = sorted(set(range(n)) - set(shards))
    if missing:
        raise InputError(f"{out_dir}: shards {missing} of {n} are missing; run them first")
    parts = [metrics.load_scores(shards[i]) for i in range(n)]
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        if not (
            np.array_equal(p["clip_idx"], first["clip_idx"])
            and np.array_equal(p["crop_idx"], first["crop_idx"])
        ):
            raise InputError(f"{shards[i]}: its views differ from {shards[0]}'s")
    ids = np.concatenate([p["video_ids"] for p in parts])
    if len(set(ids.tolist())) != len(ids):
        raise InputError(f"{out_dir}: a video appears in more than one shard")
    order = np.argsort(ids, kind="stable")
    return {
        "logits": np.concatenate([p["logits"] for p in parts])[order],
        "labels": np.concatenate([p["labels"] for p in parts])[order],
        "video_ids": ids[order],
        "clip_idx": first["clip_idx"],
        "crop_idx": first["crop_idx"],
        "num_clips": first["num_clips"],
        "num_crops": first["num_crops"],
        "skipped": np.concatenate([p.get("skipped", np.array([], dtype=str)) for p in parts]).astype(str),
    }


def merge(params: dict | Params, out_dir: str | Path, run=None, extra=None) -> dict:
    """scores.npz + metrics.json of OUT from all its shards (merge_shards)."""
    raw = params.to_dict() if isinstance(params, Params) else params
    out_dir = Path(out_dir)
    scores = merge_shards(out_dir)
    save_scores(out_dir / "scores.npz", scores)
    protocol = Protocol(int(scores["num_clips"]), int(scores["num_crops"])).name
    g = gflops(raw, protocol)
    result = build_metrics(
        scores,
        raw["id"],
        protocol,
        g.get("gflops_per_view"),
        dict(extra or {}, merged_shards=True),
        g.get("gflops_per_view_test_crop"),
    )
    _finish(out_dir, result, run)
    return result


# --------------------------------------------------------------------------- ensemble
def ensemble(
    score_paths: list[str | Path], out_dir: str | Path, name: str | None = None, views: str | None = None
) -> dict:
    """Fuse saved scores of several models (mean of each model's view-averaged softmax, videos
    matched by id). `views` (e.g. "4x3") first restricts every member to that view subset."""
    out_dir = Path(out_dir)
    members, gflops_total, skipped = [], 0.0, set()
    clips = crops = None
    if views:
        proto = protocol_of(views)
        clips, crops = proto.clips, proto.crops
    for p in score_paths:
        s = metrics.load_scores(p)
        nclips, ncrops = (
            int(s.get("num_clips", s["clip_idx"].max() + 1)),
            int(s.get("num_crops", s["crop_idx"].max() + 1)),
        )
        if views:
            mask = metrics.select_views(s["clip_idx"], s["crop_idx"], nclips, clips, crops, ncrops)
            s = dict(
                s, logits=s["logits"][:, mask], clip_idx=s["clip_idx"][mask], crop_idx=s["crop_idx"][mask]
            )
        skipped |= set(np.asarray(s.get("skipped", [])).tolist())
        members.append(s)
        mpath = Path(p).with_name("metrics.json")
        gpv = None
        if mpath.exists():
            try:
                gpv = json.loads(mpath.read_text()).get("gflops_per_view")
            except (ValueError, OSError):
                gpv = None
        if gflops_total is not None and gpv is not None:
            gflops_total += float(gpv) * s["logits"].shape[1]
        else:
            gflops_total = None
    fused = metrics.ensemble_scores(members)
    sc, lab = fused["scores"], fused["labels"]
    all_ids = set().union(*[set(m["video_ids"].tolist()) for m in members])
    not_common = sorted(all_ids - set(fused["video_ids"].tolist()))
    pca = metrics.per_class_accuracy(sc, lab, sc.shape[1])
    v = members[0]["logits"].shape[1]
    result = {
        "experiment": name or "+".join(Path(p).parent.name for p in score_paths),
        "protocol": views or "all",
        "num_clips": clips,
        "num_crops": crops,
        "top1": metrics.topk_accuracy(sc, lab, 1),
        "top5": metrics.topk_accuracy(sc, lab, 5),
        "mean_class_acc": float(np.nanmean(pca)) if np.isfinite(pca).any() else float("nan"),
        "per_class_acc": [None if np.isnan(x) else float(x) for x in pca],
        "num_videos": int(len(lab)),
        "skipped": len(skipped | set(not_common)),
        "skipped_ids": sorted(skipped | set(not_common)),
        "gflops_per_view": None,
        "gflops_x_views": gflops_total,
        "num_views_per_member": v,
        "members": [str(p) for p in score_paths],
        "subsets": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_scores(
        out_dir / "ensemble_scores.npz",
        {"scores": sc.astype(np.float32), "labels": lab, "video_ids": fused["video_ids"].astype(str)},
    )
    _write_json(out_dir / "metrics.json", result)
    return result
