"""Engine mechanics on a tiny BN-free model and an in-memory dataset (fast, CPU):
batch plan, LR schedules, weight-decay groups, deterministic data order, gradient accumulation,
checkpoint errors and fallback, params-hash refusal, NaN detection, shard merge, ensemble.
The real model + embedded dataset path is covered end to end in test_engine_e2e.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from smallbig import config
from smallbig.engine import evaluate as E
from smallbig.engine import metrics
from smallbig.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, prev_path, save_rotating
from smallbig.engine.optim import BatchPolicyError, LRFactor, param_groups, plan_batch
from smallbig.engine.seeding import EpochSampler, SeededDataset
from smallbig.engine.train import NonFiniteLossError, train

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures
def tiny_params(**train_over) -> dict:
    p = config.load_params(config.experiment_path("k400-r23-c2d"))
    p["data"].update(num_frames=2, crop_size=16, num_workers=0, root="/nonexistent-toy")
    p["model"]["num_classes"] = 5
    p["model"]["pretrained"] = "none"  # a BN-free toy model: no ImageNet file
    p["train"].update(
        epochs=2,
        batch_size=8,
        per_gpu_batch=4,
        lr=0.05,
        amp="none",
        checkpoint_every_iters=2,
        val_every_epochs=1,
        seed=3,
        warmup_epochs=0,
    )
    p["train"].update(train_over)
    return p


class ArrayClips(torch.utils.data.Dataset):
    """In-memory uint8 clips with a random crop + flip from NumPy's/torch's global RNG."""

    def __init__(self, n: int, mode: str):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 2, 20, 20), generator=g, dtype=torch.uint8)
        self.y = torch.arange(n) % 5
        self.mode = mode

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        v = self.x[i]
        if self.mode == "train":
            a, b = int(np.random.randint(0, 5)), int(torch.randint(0, 5, ()))
            v = v[:, :, a : a + 16, b : b + 16]
            if np.random.rand() < 0.5:
                v = v.flip(-1)
        else:
            v = v[:, :, 2:18, 2:18]
        return {"video": v, "label": int(self.y[i]), "video_id": f"v{i:03d}"}


def _model(cfg):  # no BatchNorm: accumulation must equal the big batch
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, cfg["num_classes"]),
    )


def _dataset(params, split, mode, protocol=None):
    return ArrayClips(32 if split == "train" else 10, mode)


def _collate(batch):
    good = [b for b in batch if b is not None]
    return {
        "video": torch.stack([b["video"] for b in good]),
        "label": torch.tensor([b["label"] for b in good]),
        "video_id": [b["video_id"] for b in good],
        "skipped": [],
    }


def _normalize(x, mean, std):
    m = torch.tensor(mean).view(1, 3, 1, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1, 1)
    return (x.float() / 255 - m) / s


BUILDERS = (_model, _dataset, _collate, _normalize)


@pytest.fixture(autouse=True)
def _no_mlflow(monkeypatch):
    monkeypatch.setenv("SMALLBIG_NO_MLFLOW", "1")


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


# ----------------------------------------------------------------------------- recipe
def test_batch_plan_accumulate_and_scale_lr():
    tr = {"batch_size": 128, "per_gpu_batch": 16, "lr": 0.02, "batch_policy": "accumulate"}
    assert plan_batch(tr, 8).accum_steps == 1
    p = plan_batch(tr, 2)
    assert (p.accum_steps, p.total_batch, p.lr) == (4, 128, 0.02)
    p = plan_batch(dict(tr, batch_policy="scale_lr"), 2)
    assert (p.accum_steps, p.total_batch) == (1, 32) and p.lr == pytest.approx(0.02 * 32 / 128)
    with pytest.raises(BatchPolicyError, match="not a multiple"):
        plan_batch(tr, 3)
    with pytest.raises(BatchPolicyError, match="exceeds"):
        plan_batch(dict(tr, per_gpu_batch=64), 4)


def test_lr_schedules():
    cos = LRFactor("cosine", iters_per_epoch=10, epochs=10)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    step = LRFactor("step", 10, 50, lr_steps=[30, 40, 45], gamma=0.1)
    assert [step(i * 10) for i in (0, 29, 30, 39, 40, 45)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])
    assert step(299) == 1 and step(300) == pytest.approx(0.1)  # changes exactly at the epoch
    warm = LRFactor("cosine", 10, 10, warmup_epochs=2)
    assert warm(0) == pytest.approx(1 / 20) and warm(19) == pytest.approx(1.0)
    assert warm(20) == 1.0 and warm(100) == pytest.approx(0.0)


def test_weight_decay_groups_exclude_bn_and_bias():
    m = nn.Sequential(nn.Conv3d(3, 4, 1, bias=False), nn.BatchNorm3d(4), nn.Flatten(), nn.Linear(4, 2))
    g = param_groups(m, 1e-4, exclude_bn_bias=True)
    assert [len(x["params"]) for x in g] == [2, 3] and g[1]["weight_decay"] == 0.0
    assert len(param_groups(m, 1e-4, exclude_bn_bias=False)[0]["params"]) == 5


def test_data_order_is_a_function_of_seed_epoch_and_position():
    s = EpochSampler(30, seed=7, rank=0, world_size=1, samples_per_rank=24)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=10)
    assert list(s) == full[10:]
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]
    ranks = []
    for r in range(2):
        d = EpochSampler(30, 7, r, 2)
        d.set_epoch(2)
        ranks.append([i for i, _ in d])
    assert sorted(ranks[0] + ranks[1]) == list(range(30))
    ds = SeededDataset(ArrayClips(4, "train"))
    a = ds[(1, 1234)]["video"]
    np.random.rand(), torch.rand(1)  # unrelated RNG use does not change the augmentation
    assert torch.equal(ds[(1, 1234)]["video"], a)
    state = torch.get_rng_state()
    ds[(2, 99)]
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched


def test_loader_workers_do_not_change_batches():
    from torch.utils.data import DataLoader

    out = []
    for workers in (0, 2):
        s = EpochSampler(16, 1, samples_per_rank=16)
        s.set_epoch(1)
        dl = DataLoader(
            SeededDataset(ArrayClips(16, "train")),
            batch_size=4,
            sampler=s,
            num_workers=workers,
            collate_fn=_collate,
        )
        out.append(torch.cat([b["video"] for b in dl]))
    assert torch.equal(out[0], out[1])


def killing_builders(at_item: int):
    """Builders whose training set sends this process SIGTERM when item number `at_item` is
    loaded: the real signal handler then stops the run at the end of that iteration."""
    import os
    import signal

    calls = {"n": 0}

    class Killing(ArrayClips):
        def __getitem__(self, i):
            calls["n"] += 1
            if calls["n"] == at_item:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__getitem__(i)

    def dataset(params, split, mode, protocol=None):
        return Killing(32, mode) if split == "train" else ArrayClips(10, mode)

    return (_model, dataset, _collate, _normalize)


# ----------------------------------------------------------------------------- training
def test_accumulation_equals_big_batch(tmp_path):
    """Accumulating 4 micro-batches of 2 == one batch of 8 (BN-free model: BN batch statistics
    would differ by construction, see docs/engine.md)."""
    big = train(tiny_params(per_gpu_batch=8), tmp_path / "big", builders=BUILDERS, progress=False)
    acc = train(tiny_params(per_gpu_batch=2), tmp_path / "acc", builders=BUILDERS, progress=False)
    assert big == acc == 0
    wa, wb = _weights(tmp_path / "big" / "checkpoint.pt"), _weights(tmp_path / "acc" / "checkpoint.pt")
    moved = _weights(tmp_path / "big" / "last.prev.pt")  # sanity: training changed the weights
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(wa[k], moved[k]) for k in wa)
    m = json.loads((tmp_path / "acc" / "train_metrics.json").read_text())
    assert m["batch_plan"]["accum_steps"] == 4 and m["batch_plan"]["total_batch"] == 8
    assert m["iterations"] == 8 and m["amp"] == "none"
    hist = json.loads((tmp_path / "acc" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]) >= {"loss", "lr", "val_top1", "clips_per_s", "peak_mem_mb"}


def test_in_process_stop_and_resume_is_bitwise(tmp_path):
    """A stop signal mid-epoch (delivered through the real handler) + resume == uninterrupted."""
    full = train(tiny_params(epochs=3), tmp_path / "full", builders=BUILDERS, progress=False)
    b = killing_builders(13)  # SIGTERM while loading a clip of iteration 2 of epoch 1
    rc = train(tiny_params(epochs=3), tmp_path / "cut", builders=b, progress=False)
    assert full == 0 and rc == 3
    ck = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ck["iteration"] == 2 and ck["epoch"] == 0  # mid-epoch: 4 iterations per epoch
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    assert train(tiny_params(epochs=3), tmp_path / "cut", resume=True, builders=BUILDERS, progress=False) == 0
    wa, wb = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha = json.loads((tmp_path / "full" / "history.json").read_text())
    hb = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_resume_refuses_other_params_and_never_overwrites(tmp_path):
    assert train(tiny_params(epochs=1), tmp_path / "r", builders=BUILDERS, progress=False) == 0
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(tiny_params(epochs=1), tmp_path / "r", builders=BUILDERS, progress=False)
    with pytest.raises(CheckpointError, match="different params"):
        train(tiny_params(epochs=1, lr=0.01), tmp_path / "r", resume=True, builders=BUILDERS, progress=False)


def test_non_finite_loss_names_the_iteration(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at iteration \d+"):
        train(tiny_params(lr=1e30, epochs=2), tmp_path / "nan", builders=BUILDERS, progress=False)


# ----------------------------------------------------------------------------- checkpoints
def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(tmp_path / "empty.pt")
    good = {"model": {"w": torch.ones(3)}, "epoch": 0, "iteration": 5, "params": {}, "params_hash": "x"}
    atomic_save(good, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    atomic_save({"foo": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a smallbig checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert load_checkpoint(tmp_path / "good.pt")["iteration"] == 5


def test_rotation_keeps_previous_and_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    assert train(tiny_params(epochs=2), out, builders=BUILDERS, progress=False) == 0
    last = out / "last.pt"
    good_prev = load_checkpoint(prev_path(last))
    data = last.read_bytes()
    last.write_bytes(data[:100])  # truncated (e.g. a disk filled up)
    (out / "checkpoint.pt").unlink()
    rc = train(tiny_params(epochs=2), out, resume=True, builders=BUILDERS, progress=False)
    assert rc == 0
    kept = list(out.glob("last.pt.corrupt-*"))
    assert len(kept) == 1 and kept[0].stat().st_size == 100  # the bad file is kept, not deleted
    assert good_prev["iteration"] < load_checkpoint(out / "checkpoint.pt")["iteration"]
    # and the run finished with the same weights as an uninterrupted one
    ref = tmp_path / "ref"
    train(tiny_params(epochs=2), ref, builders=BUILDERS, progress=False)
    wa, wb = _weights(ref / "checkpoint.pt"), _weights(out / "checkpoint.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_save_rotating_is_atomic(tmp_path):
    p = tmp_path / "last.pt"
    for i in range(3):
        save_rotating({"model": {}, "epoch": 0, "iteration": i, "params": {}, "params_hash": ""}, p)
    assert load_checkpoint(p)["iteration"] == 2 and load_checkpoint(prev_path(p))["iteration"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


# ----------------------------------------------------------------------------- scores
def _fake_scores(seed, n=12, clips=4, crops=3, k=6, ids=None):
    rng = np.random.default_rng(seed)
    clip_idx = np.repeat(np.arange(clips), crops)
    crop_idx = np.tile(np.arange(crops), clips)
    return {
        "logits": rng.normal(size=(n, clips * crops, k)).astype(np.float32) * 3,
        "labels": rng.integers(0, k, n),
        "video_ids": np.array(ids or [f"v{i:02d}" for i in range(n)]),
        "clip_idx": clip_idx,
        "crop_idx": crop_idx,
        "num_clips": np.int64(clips),
        "num_crops": np.int64(crops),
        "skipped": np.array(["bad1"]),
    }


def _hand_top1(prob_rows, labels):
    hits = 0
    for p, y in zip(prob_rows, labels):
        hits += int(max(range(len(p)), key=lambda c: (p[c], -c)) == y)
    return 100.0 * hits / len(labels)


def _hand_probs(logits_views):
    acc = [0.0] * len(logits_views[0])
    for v in logits_views:
        e = [math.exp(float(x) - max(map(float, v))) for x in v]
        s = sum(e)
        acc = [a + x / s for a, x in zip(acc, e)]
    return [a / len(logits_views) for a in acc]


def test_merge_shards_equals_whole(tmp_path):
    whole = _fake_scores(0)
    for i in range(3):
        sel = np.arange(i, 12, 3)
        part = dict(
            whole,
            logits=whole["logits"][sel],
            labels=whole["labels"][sel],
            video_ids=whole["video_ids"][sel],
            skipped=np.array([f"bad{i}"]),
        )
        E.save_scores(tmp_path / f"scores.shard-{i}-of-3.npz", part)
    merged = E.merge_shards(tmp_path)
    assert np.array_equal(merged["video_ids"], whole["video_ids"])
    assert np.array_equal(merged["logits"], whole["logits"])
    assert sorted(merged["skipped"].tolist()) == ["bad0", "bad1", "bad2"]
    (tmp_path / "scores.shard-1-of-3.npz").unlink()
    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        E.merge_shards(tmp_path)


def test_metrics_json_subsets_match_hand_computation():
    s = _fake_scores(1, clips=10, crops=3)
    m = E.build_metrics(s, "exp", "10x3", 2.0)
    hand = [_hand_probs(s["logits"][i]) for i in range(12)]  # 30 views each
    assert m["top1"] == pytest.approx(_hand_top1(hand, s["labels"]))
    assert m["gflops_x_views"] == 60.0 and m["skipped"] == 1
    assert set(m["subsets"]) == {f"{k}x{c}" for k in range(1, 11) for c in (1, 3)}
    centre = [_hand_probs(s["logits"][i][(s["clip_idx"] == 5) & (s["crop_idx"] == 1)]) for i in range(12)]
    assert m["subsets"]["1x1"]["top1"] == pytest.approx(_hand_top1(centre, s["labels"]))
    assert m["subsets"]["10x3"]["top1"] == m["top1"]
    assert m["subsets"]["2x3"]["gflops_x_views"] == 12.0


def test_ensemble_cli_arithmetic(tmp_path):
    from smallbig.cli import main

    a = _fake_scores(2, clips=4, crops=3)
    b = _fake_scores(3, clips=4, crops=3, k=6)
    b["labels"] = a["labels"].copy()
    b_ids = a["video_ids"][::-1].copy()  # same videos in another order
    b = dict(b, video_ids=b_ids, labels=a["labels"][::-1].copy())
    for name, s in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        E.save_scores(tmp_path / name / "scores.npz", s)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"gflops_per_view": 10.0}))
    rc = main(
        [
            "ensemble",
            str(tmp_path / "a" / "scores.npz"),
            str(tmp_path / "b" / "scores.npz"),
            "--out",
            str(tmp_path / "ens"),
            "--name",
            "a+b",
            "--views",
            "2x3",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    keep = np.isin(a["clip_idx"], [0, 3])  # 2 of 4 clips: the first and the last, 3 crops
    rows_b = {v: i for i, v in enumerate(b["video_ids"])}
    fused = []
    for i, vid in enumerate(a["video_ids"]):
        pa = _hand_probs(a["logits"][i][keep])
        pb = _hand_probs(b["logits"][rows_b[vid]][keep])
        fused.append([(x + y) / 2 for x, y in zip(pa, pb)])
    assert m["top1"] == pytest.approx(_hand_top1(fused, a["labels"]))
    assert m["num_videos"] == 12 and m["experiment"] == "a+b"
    assert m["gflops_x_views"] == pytest.approx(2 * 10.0 * 6)
    assert metrics.load_scores(tmp_path / "a" / "scores.npz")["logits"].shape == (12, 12, 6)


def test_scale_lr_channels_last_and_cpu_amp_are_recorded(tmp_path, capsys):
    p = tiny_params(
        epochs=1, batch_size=16, per_gpu_batch=4, batch_policy="scale_lr", channels_last=True, amp="bf16"
    )
    assert train(p, tmp_path / "s", builders=BUILDERS, progress=False) == 0
    m = json.loads((tmp_path / "s" / "train_metrics.json").read_text())
    assert m["batch_plan"]["accum_steps"] == 1 and m["batch_plan"]["total_batch"] == 4
    assert m["batch_plan"]["lr"] == pytest.approx(0.05 * 4 / 16) and m["amp"] == "none"
    assert m["iterations"] == 8 and m["channels_last"] is True
    assert "AMP disabled" in capsys.readouterr().err
    ck = load_checkpoint(tmp_path / "s" / "checkpoint.pt")
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.0125)


def test_rank_environment_torchrun_and_slurm():
    from smallbig.engine.distributed import env_ranks

    assert env_ranks({}).world_size == 1
    r = env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"})
    assert (r.rank, r.world_size, r.local_rank, r.source) == (3, 8, 3, "torchrun")
    r = env_ranks({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"})
    assert (r.rank, r.world_size, r.local_rank, r.source) == (9, 16, 1, "slurm")
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
