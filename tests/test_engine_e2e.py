"""End to end on the real model (SmallBig-R23 full, base width 4) and the real embedded dataset
(`smallbig.data.toy`, Kinetics-style, 4 videos per class, prepared by `smallbig.data.prepare`):
training lowers the loss; SIGTERM mid-epoch and SIGKILL between checkpoints + --resume end with
exactly the weights of an uninterrupted run; the multi-view evaluation saves per-view logits
whose subsets equal fresh evaluations; sharded evaluation merges to the whole; clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smallbig import config
from smallbig.cli import main
from smallbig.engine import metrics
from smallbig.engine.checkpoint import load_checkpoint, load_model_from_checkpoint

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
SMALLBIG = [sys.executable, "-m", "smallbig"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Prepared embedded K400-style dataset + tiny params files."""
    from smallbig.data.prepare import prepare
    from smallbig.data.toy import make_toy

    root = tmp_path_factory.mktemp("engine-e2e")
    make_toy(
        root / "src", datasets=("kinetics400",), per_class={"train": 4, "val": 2, "test": 1}, progress=False
    )
    p = config.load_params(
        config.experiment_path("k400-r23-sb-full"), config.REPO_ROOT / "params" / "embedded.yaml"
    )
    p["data"].update(
        root=str(root / "k400"),
        source={"base_url": str(root / "src" / "kinetics400")},
        crop_size=48,
        train_short_side=[52, 60],
        frame_stride=2,
        num_workers=0,
    )
    p["model"]["base_width"] = 4
    p["test"].update(short_side=52, multi_crop_size=52, single_crop_size=48, batch_size=4)
    p["train"].update(
        epochs=2, batch_size=4, per_gpu_batch=2, lr=0.05, checkpoint_every_iters=3, val_every_epochs=2, seed=0
    )
    prepare(p, progress=False, workers=1)
    config.validate(p)
    config.dump_params(p, root / "params.yaml")
    return root


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("SMALLBIG_NO_MLFLOW", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def reference(toy):
    """An uninterrupted run (2 epochs x 7 iterations, 2 clips x 2 accumulation)."""
    out = toy / "ref"
    with pytest.MonkeyPatch.context() as mp:  # module scope: no leak into later test modules
        mp.setenv("SMALLBIG_NO_MLFLOW", "1")
        assert main(["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress"]) == 0
    return out


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _start_train(toy, out, *extra):
    env = dict(os.environ, SMALLBIG_NO_MLFLOW="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc, timeout=180):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def test_reference_run_outputs(reference):
    ck = load_checkpoint(reference / "checkpoint.pt")
    assert ck["iteration"] == 14 and ck["epoch"] == 2
    assert set(ck) >= {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "epoch",
        "iteration",
        "params",
        "params_hash",
        "smallbig_version",
    }
    assert ck["params_hash"] == config.params_hash(config.load_resolved(reference.parent / "params.yaml"))
    hist = json.loads((reference / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and hist[0]["val_top1"] is None
    assert 0 <= hist[1]["val_top1"] <= 100
    tm = json.loads((reference / "train_metrics.json").read_text())
    assert tm["batch_plan"] == {
        "policy": "accumulate",
        "world_size": 1,
        "per_gpu_batch": 2,
        "accum_steps": 2,
        "total_batch": 4,
        "paper_batch": 4,
        "base_lr": 0.05,
        "lr": 0.05,
    }
    model, params = load_model_from_checkpoint(reference / "checkpoint.pt")
    assert params["id"] == "k400-r23-sb-full" and not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 4, 48, 48)).shape == (1, 8)


def test_sigterm_mid_epoch_then_resume_is_bitwise(toy, reference):
    out = toy / "sigterm"
    proc = _start_train(toy, out)
    _wait_for(out / "last.pt", proc)  # periodic checkpoint at iteration 3 of 7 (epoch 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 3, err[-2000:]
    assert "stop (signal SIGTERM)" in err
    ck = load_checkpoint(out / "last.pt")
    assert 3 <= ck["iteration"] < 14 and ck["iteration"] % 7 != 0, ck["iteration"]  # mid-epoch
    assert not (out / "checkpoint.pt").exists()
    res = subprocess.run(
        SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        env=dict(os.environ, SMALLBIG_NO_MLFLOW="1", OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"iteration {ck['iteration']}/14" in res.stderr
    assert _same_weights(reference / "checkpoint.pt", out / "checkpoint.pt")
    ha = json.loads((reference / "history.json").read_text())
    hb = json.loads((out / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert [h["val_top1"] for h in ha] == [h["val_top1"] for h in hb]


def test_sigkill_between_checkpoints_then_resume(toy, reference):
    out = toy / "sigkill"
    proc = _start_train(toy, out)
    _wait_for(out / "last.prev.pt", proc)  # two checkpoints written (iterations 3 and 6/7)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists()
    killed_at = load_checkpoint(out / "last.pt")["iteration"]
    assert killed_at < 14
    res = subprocess.run(
        SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        env=dict(os.environ, SMALLBIG_NO_MLFLOW="1", OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert _same_weights(reference / "checkpoint.pt", out / "checkpoint.pt")
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind


def test_resume_refuses_different_params(toy, reference, tmp_path, capsys):
    p = config.load_resolved(toy / "params.yaml")
    p["train"]["lr"] = 0.01
    config.dump_params(p, tmp_path / "other.yaml")
    rc = main(["train", str(tmp_path / "other.yaml"), "--out", str(reference), "--resume", "--no-progress"])
    assert rc == 2
    assert "different params" in capsys.readouterr().err


def test_loss_decreases_over_a_few_dozen_iterations(toy, tmp_path):
    p = config.load_resolved(toy / "params.yaml")
    p["data"]["limit_train"] = 8
    p["train"].update(
        epochs=30, batch_size=8, per_gpu_batch=8, lr=0.1, val_every_epochs=30, checkpoint_every_iters=1000
    )
    config.dump_params(p, tmp_path / "fit.yaml")
    assert main(["train", str(tmp_path / "fit.yaml"), "--out", str(tmp_path / "fit"), "--no-progress"]) == 0
    losses = [h["loss"] for h in json.loads((tmp_path / "fit" / "history.json").read_text())]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def _hand_top1(logits, labels):
    """Softmax per view, averaged over the views, argmax: plain Python."""
    hits = 0
    for views, y in zip(logits.tolist(), labels.tolist()):
        avg = [0.0] * len(views[0])
        for v in views:
            m = max(v)
            e = [math.exp(x - m) for x in v]
            s = sum(e)
            avg = [a + x / s / len(views) for a, x in zip(avg, e)]
        hits += max(range(len(avg)), key=lambda c: (avg[c], -c)) == y
    return 100.0 * hits / len(labels)


def test_evaluate_10x3_saves_views_and_subsets_match_fresh_runs(toy, reference):
    from smallbig.data import build_dataset, normalize
    from smallbig.engine.evaluate import evaluate

    out = toy / "eval-10x3"
    assert (
        main(
            [
                "evaluate",
                str(toy / "params.yaml"),
                "--checkpoint",
                str(reference / "checkpoint.pt"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "experiment",
        "protocol",
        "num_clips",
        "num_crops",
        "top1",
        "top5",
        "mean_class_acc",
        "per_class_acc",
        "num_videos",
        "skipped",
        "gflops_per_view",
        "gflops_x_views",
        "subsets",
    ):
        assert key in m, key
    assert (m["protocol"], m["num_clips"], m["num_crops"], m["num_videos"]) == ("10x3", 10, 3, 15)
    assert m["gflops_x_views"] == pytest.approx(m["gflops_per_view"] * 30)
    assert set(m["subsets"]) == {f"{k}x{c}" for k in range(1, 11) for c in (1, 3)}
    s = metrics.load_scores(out / "scores.npz")
    assert s["logits"].shape == (15, 30, 8) and s["logits"].dtype == np.float32
    assert m["top1"] == pytest.approx(_hand_top1(s["logits"], s["labels"]))  # 30-view average
    # every saved view is the model's output on that view of that video
    params = config.load_resolved(toy / "params.yaml")
    ds = build_dataset(params, "val", "test", "10x3")
    model, _ = load_model_from_checkpoint(reference / "checkpoint.pt")
    row = list(s["video_ids"]).index(ds[3]["video_id"])
    item = ds[3]
    assert np.array_equal(item["clip_idx"].numpy(), s["clip_idx"]) and np.array_equal(
        item["crop_idx"].numpy(), s["crop_idx"]
    )
    with torch.no_grad():
        for j in (0, 13, 29):
            x = normalize(item["video"][j : j + 1], params["data"]["mean"], params["data"]["std"])
            np.testing.assert_allclose(model(x)[0].numpy(), s["logits"][row, j], rtol=1e-4, atol=1e-5)
    # subsets computed from the saved logits == a fresh evaluation of only those views
    for clips, crops in ((2, 3), (1, 1), (4, 1)):
        fresh = evaluate(
            params,
            reference / "checkpoint.pt",
            toy / f"fresh-{clips}x{crops}",
            view_subset=(clips, crops),
            track=False,
            progress=False,
        )
        sub = m["subsets"][f"{clips}x{crops}"]
        assert fresh["top1"] == pytest.approx(sub["top1"]) and fresh["top5"] == pytest.approx(sub["top5"])
        assert fresh["num_views"] == sub["num_views"] == clips * crops
        fs = metrics.load_scores(toy / f"fresh-{clips}x{crops}" / "scores.npz")
        mask = metrics.select_views(s["clip_idx"], s["crop_idx"], 10, clips, crops, 3)
        np.testing.assert_allclose(fs["logits"], s["logits"][:, mask], rtol=1e-4, atol=1e-5)


def test_sharded_evaluation_merges_to_the_whole(toy, reference):
    base = [
        "evaluate",
        str(toy / "params.yaml"),
        "--checkpoint",
        str(reference / "checkpoint.pt"),
        "--protocol",
        "1x1",
        "--no-progress",
    ]
    assert main(base + ["--out", str(toy / "whole-1x1")]) == 0
    for i in range(2):
        assert main(base + ["--out", str(toy / "shards-1x1"), "--shard", f"{i}/2"]) == 0
    assert not (toy / "shards-1x1" / "metrics.json").exists()
    assert main(base + ["--out", str(toy / "shards-1x1"), "--merge"]) == 0
    a = metrics.load_scores(toy / "whole-1x1" / "scores.npz")
    b = metrics.load_scores(toy / "shards-1x1" / "scores.npz")
    order = np.argsort(a["video_ids"])
    assert np.array_equal(a["video_ids"][order], b["video_ids"])
    np.testing.assert_allclose(a["logits"][order], b["logits"], rtol=1e-4, atol=1e-5)
    ma = json.loads((toy / "whole-1x1" / "metrics.json").read_text())
    mb = json.loads((toy / "shards-1x1" / "metrics.json").read_text())
    assert ma["top1"] == mb["top1"] and ma["num_videos"] == mb["num_videos"] == 15


def test_bad_checkpoint_path_or_file_gives_clear_error(toy, tmp_path, capsys):
    args = ["evaluate", str(toy / "params.yaml"), "--out", str(tmp_path / "e"), "--no-progress"]
    assert main(args + ["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert f"{tmp_path / 'missing.pt'}: checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert main(args + ["--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable checkpoint" in err


def test_two_process_cpu_ddp_with_torchrun(toy, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): DistributedSampler-style sharding by global
    rank, gradients averaged, rank 0 writes; per-rank RNG states are checkpointed."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    env = dict(os.environ, SMALLBIG_NO_MLFLOW="1", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29400 + os.getpid() % 500),
            "-m",
            "smallbig",
            "train",
            str(toy / "params.yaml"),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tm = json.loads((out / "train_metrics.json").read_text())
    assert tm["world_size"] == 2 and tm["batch_plan"]["accum_steps"] == 1
    assert tm["batch_plan"]["total_batch"] == 4
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["iteration"] == 16  # ceil(31 / 2) = 16 clips per rank, 2 per step -> 8 per epoch
    assert len(ck["rng_per_rank"]) == 2
    assert not torch.equal(ck["rng_per_rank"][0]["torch"], ck["rng_per_rank"][1]["torch"])
    assert res.stderr.count("31 clips, 2 epochs") == 1  # only rank 0 reports


def test_undecodable_videos_are_counted_as_skipped(toy, reference, tmp_path):
    import shutil

    root = tmp_path / "k400"
    shutil.copytree(toy / "k400", root)
    p = config.load_resolved(toy / "params.yaml")
    p["data"]["root"] = str(root)
    config.dump_params(p, tmp_path / "params.yaml")
    victim = (root / "val.txt").read_text().split()[0]
    (root / victim).write_bytes(b"\x00" * 100)  # truncated/corrupted video file
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "params.yaml"),
                "--checkpoint",
                str(reference / "checkpoint.pt"),
                "--out",
                str(tmp_path / "ev"),
                "--protocol",
                "1x1",
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["skipped"] == 1 and m["num_videos"] == 14
    s = metrics.load_scores(tmp_path / "ev" / "scores.npz")
    assert len(s["skipped"]) == 1 and s["skipped"][0] not in set(s["video_ids"].tolist())
