"""Data layer: sampling, views, parsers, bad files, loaders (fast; no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smallbig.data import sampling
from smallbig.data.check import check_entries, check_list
from smallbig.data.dataset import BadSample, VideoDataset, build_dataset, collate, normalize
from smallbig.data.kinetics import class_names, parse_annotations, parse_checksums, video_name
from smallbig.data.lists import DataError, Entry, read_list, write_list
from smallbig.data.something import (
    locate,
    parse_v1_labels,
    parse_v1_split,
    parse_v2_labels,
    parse_v2_split,
    strip_template,
)
from smallbig.data.toy import encode_video, render

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- temporal sampling
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, 300])
@pytest.mark.parametrize("T,s", [(8, 8), (8, 4), (4, 8), (16, 4), (32, 2)])
def test_dense_indices_in_bounds_and_ordered(n, T, s):
    rng = np.random.default_rng(n * 100 + T)
    for _ in range(20):
        idx = sampling.dense_train(n, T, s, rng)
        assert idx.shape == (T,) and idx.min() >= 0 and idx.max() < n
        assert (np.diff(idx) >= 0).all()
    for k in (1, 2, 4, 10):
        clips = sampling.dense_test(n, T, s, k)
        assert len(clips) == k
        for c in clips:
            assert c.shape == (T,) and c.min() >= 0 and c.max() < n


def test_dense_long_video_uses_stride_and_random_start():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = sampling.dense_train(300, 8, 8, rng)
        assert (np.diff(idx) == 8).all()  # 8 frames from 64 consecutive with stride 8
        assert idx[0] + 63 < 300
        starts.add(int(idx[0]))
    assert min(starts) < 20 and max(starts) > 216  # starts cover [0, 236]
    assert len(starts) > 100


def test_dense_short_video_rule():
    # n < T*s: largest stride that fits, n // T
    idx = sampling.dense_train(40, 8, 8, np.random.default_rng(0))
    assert (np.diff(idx) == 5).all() and idx.max() < 40
    assert sampling.dense_test(40, 8, 8, 1)[0].tolist() == list(range(0, 40, 5))
    # n < T: spread over the whole video, repeated frames in order
    assert sampling.dense_train(5, 8, 8, np.random.default_rng(0)).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    assert sampling.dense_test(1, 8, 8, 3)[0].tolist() == [0] * 8
    with pytest.raises(ValueError, match="0 frames"):
        sampling.dense_train(0, 8, 8, np.random.default_rng(0))


def test_dense_deterministic_under_seed():
    a = [sampling.dense_train(250, 8, 8, np.random.default_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    b = {tuple(sampling.dense_train(250, 8, 8, np.random.default_rng(s))) for s in range(20)}
    assert len(b) > 1


def test_dense_test_clips_evenly_spaced_and_centre():
    clips = sampling.dense_test(300, 8, 8, 10)
    starts = np.array([c[0] for c in clips])
    assert starts[0] >= 0 and clips[-1][-1] < 300
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1 and gaps.min() > 0
    # 1 clip = the centre window, as the validation clip
    (c,) = sampling.dense_test(300, 8, 8, 1)
    assert c[0] == (300 - 64) // 2


@pytest.mark.parametrize("n", [1, 5, 8, 9, 17, 48, 120])
@pytest.mark.parametrize("T", [8, 16])
def test_segment_indices_in_bounds(n, T):
    rng = np.random.default_rng(n)
    for _ in range(20):
        idx = sampling.segment_train(n, T, rng)
        assert idx.shape == (T,) and idx.min() >= 0 and idx.max() < n and (np.diff(idx) >= 0).all()
    for k in (1, 2, 4):
        for c in sampling.segment_test(n, T, k):
            assert c.shape == (T,) and c.min() >= 0 and c.max() < n


def test_segment_one_frame_per_segment_and_two_test_clips():
    n, T = 80, 8
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = sampling.segment_train(n, T, rng)
        assert ((idx // 10) == np.arange(8)).all()  # one frame inside each segment of 10
    starts, centres = sampling.segment_test(n, T, 2)
    assert starts.tolist() == list(range(0, 80, 10))
    assert centres.tolist() == list(range(5, 80, 10))
    (val,) = sampling.segment_test(n, T, 1)
    assert val.tolist() == centres.tolist()


# --------------------------------------------------------------------------- spatial views
def _frames(T=4, H=120, W=160):
    """Frames whose pixel values encode position and time (asymmetric left/right)."""
    yy, xx = np.mgrid[0:H, 0:W]
    f = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        f[t, ..., 0] = xx * 255 // (W - 1)
        f[t, ..., 1] = yy * 255 // (H - 1)
        f[t, ..., 2] = t * 40
    return f


def test_crop_boxes_three_crops_landscape_and_portrait():
    assert sampling.crop_boxes(256, 340, 256, 3) == [(0, 0), (0, 42), (0, 84)]
    assert sampling.crop_boxes(340, 256, 256, 3) == [(0, 0), (42, 0), (84, 0)]
    assert sampling.crop_boxes(256, 340, 224, 1) == [(16, 58)]
    assert sampling.crop_boxes(256, 340, 224, 3) == [(16, 0), (16, 58), (16, 116)]
    with pytest.raises(ValueError, match="larger than"):
        sampling.crop_boxes(200, 300, 256, 3)


def test_test_views_count_order_and_geometry():
    f = _frames(T=6)
    clips = [np.array([0, 2, 4]), np.array([1, 3, 5])]
    views, clip_idx, crop_idx = sampling.test_views(f, clips, short=64, size=64, num_crops=3)
    assert views.shape == (6, 3, 3, 64, 64) and views.dtype == torch.uint8
    assert clip_idx.tolist() == [0, 0, 0, 1, 1, 1]
    assert crop_idx.tolist() == [0, 1, 2, 0, 1, 2]
    resized = sampling.resize_short(sampling.frames_tensor(f), 64)  # [T, 3, 64, 85]
    assert tuple(resized.shape[-2:]) == (64, 85)
    for v in range(6):
        c, k = v // 3, v % 3
        x0 = [0, (85 - 64) // 2, 85 - 64][k]
        expect = resized[torch.as_tensor(clips[c])][..., :, x0 : x0 + 64].permute(1, 0, 2, 3)
        assert torch.equal(views[v], expect)
    # crop 0 starts at the left edge, crop 2 ends at the right edge (red channel = x position)
    assert views[0, 0, 0, :, 0].float().mean() < 10 and views[2, 0, 0, :, -1].float().mean() > 245
    # 1 crop: centre crop of the single crop size
    v1, ci, cr = sampling.test_views(f, clips[:1], short=64, size=56, num_crops=1)
    assert v1.shape == (1, 3, 3, 56, 56) and cr.tolist() == [0] and ci.tolist() == [0]


def test_train_view_scale_crop_and_flip_only_when_enabled():
    f = _frames(T=2)
    rng = np.random.default_rng(0)
    flipped_seen = False
    for seed in range(40):
        v = sampling.train_view(f, (64, 80), 56, False, np.random.default_rng(seed))
        assert v.shape == (3, 2, 56, 56)
        # red increases left -> right: never flipped without flip
        assert v[0, 0, :, -1].float().mean() > v[0, 0, :, 0].float().mean()
        vf = sampling.train_view(f, (64, 80), 56, True, np.random.default_rng(seed))
        if vf[0, 0, :, -1].float().mean() < vf[0, 0, :, 0].float().mean():
            flipped_seen = True
    assert flipped_seen
    del rng


def test_center_view_and_normalize():
    f = _frames(T=3)
    v = sampling.center_view(f, 64, 56)
    assert v.shape == (3, 3, 56, 56)
    x = normalize(v.unsqueeze(0), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert x.dtype == torch.float32 and x.shape == (1, 3, 3, 56, 56)
    ref = (v[1].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x[0, 1], ref)
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 4, 3, 8, 8, dtype=torch.uint8), [0, 0, 0], [1, 1, 1])


def test_parse_protocol():
    assert sampling.parse_protocol("10x3") == (10, 3)
    assert sampling.parse_protocol("1x1") == (1, 1)
    for bad in ("10x2", "x3", "ten"):
        with pytest.raises(ValueError):
            sampling.parse_protocol(bad)


# --------------------------------------------------------------------------- parsers
def test_kinetics_csv_quoted_labels(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        '"passing American football (in game)",-abc_def-12,13,23,train\n'
        '"dancing, ballet",xyz0123456_,0,10,train\n'
        "abseiling,zzzzzzzzzzz,100.0,110.0,train\n"
    )
    rows = parse_annotations(p)
    assert [r["label"] for r in rows] == [
        "passing American football (in game)",
        "dancing, ballet",
        "abseiling",
    ]
    assert rows[0]["name"] == "-abc_def-12_000013_000023.mp4"
    assert rows[2]["name"] == "zzzzzzzzzzz_000100_000110.mp4"
    assert class_names(rows) == ["abseiling", "dancing, ballet", "passing American football (in game)"]
    assert video_name("a", 5, 15) == "a_000005_000015.mp4"
    bad = tmp_path / "bad.csv"
    bad.write_text("name,youtube_id\nx,y\n")
    with pytest.raises(DataError, match="bad.csv: missing column"):
        parse_annotations(bad)


def test_checksums_format():
    sums = parse_checksums("# comment\nABC  train/part_0.tar.gz\ndef *val/x.tgz\n")
    assert sums == {"train/part_0.tar.gz": "abc", "val/x.tgz": "def"}


def test_sthv2_parsers(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Putting something next to something": "1", "Holding something": "0"}))
    lab = parse_v2_labels(labels)
    assert lab == {"Putting something next to something": 1, "Holding something": 0}
    train = tmp_path / "train.json"
    train.write_text(
        json.dumps(
            [
                {
                    "id": "78687",
                    "label": "putting a cup next to a pen",
                    "template": "Putting [something] next to [something]",
                    "placeholders": ["a cup", "a pen"],
                },
                {
                    "id": 42,
                    "label": "holding pen",
                    "template": "Holding [something]",
                    "placeholders": ["pen"],
                },
            ]
        )
    )
    assert parse_v2_split(train, lab) == [("78687", 1), ("42", 0)]
    assert (
        strip_template("Moving [something] away from [something]") == "Moving something away from something"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "1", "template": "Dropping [something]"}]))
    with pytest.raises(DataError, match="bad.json: item 0 .*not in the labels"):
        parse_v2_split(bad, lab)


def test_sthv1_parsers(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("Holding something\nPutting something next to something\n")
    names = parse_v1_labels(labels)
    assert names == ["Holding something", "Putting something next to something"]
    split = tmp_path / "train.csv"
    split.write_text("100218;Putting something next to something\n42;Holding something\n")
    assert parse_v1_split(split, names) == [("100218", 1), ("42", 0)]
    split.write_text("100218,Holding something\n")
    with pytest.raises(DataError, match="train.csv:1: expected 'id;label'"):
        parse_v1_split(split, names)


def test_something_locate_names_every_missing_file(tmp_path):
    (tmp_path / "20bn-something-something-v2-00").write_bytes(b"x")
    (tmp_path / "20bn-something-something-v2-02").write_bytes(b"x")
    (tmp_path / "something-something-v2-labels.json").write_text("{}")
    with pytest.raises(DataError) as e:
        locate(tmp_path, 2)
    msg = str(e.value)
    assert "20bn-something-something-v2-01" in msg
    assert "something-something-v2-train.json" in msg and "something-something-v2-validation.json" in msg
    assert "labels.json" not in msg.replace("something-something-v2-labels.json", "").replace(
        "labels/train.json", ""
    )


def test_lists_roundtrip(tmp_path):
    v = [Entry("videos/a b.mp4", 3, None), Entry("videos/c.mp4", 0, None)]
    write_list(tmp_path / "v.txt", v, "video")
    assert read_list(tmp_path / "v.txt", "video") == v
    fr = [Entry("frames/x", 40, 2)]
    write_list(tmp_path / "f.txt", fr, "frames")
    assert read_list(tmp_path / "f.txt", "frames") == fr
    (tmp_path / "bad.txt").write_text("videos/a.mp4\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        read_list(tmp_path / "bad.txt", "video")


# --------------------------------------------------------------------------- bad files
def _audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        samples = (np.sin(np.arange(16000) / 5) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def _no_faststart(frames, path: Path) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A dataset directory with good videos and every kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    v = root / "videos"
    v.mkdir()
    rng = np.random.default_rng(0)
    frames = render("up", 40, rng)
    encode_video(frames, v / "good_a.mp4", 25, "libx264")
    encode_video(render("down", 40, rng), v / "good_b.mp4", 25, "libx264")
    encode_video(frames[:1], v / "one_frame.mp4", 25, "libx264")
    (v / "zero.mp4").write_bytes(b"")
    data = (v / "good_a.mp4").read_bytes()
    (v / "truncated.mp4").write_bytes(data[: len(data) // 3])
    _no_faststart(frames, v / "moov_at_end.mp4")
    d2 = (v / "moov_at_end.mp4").read_bytes()
    (v / "truncated_tail.mp4").write_bytes(d2[: len(d2) // 2])
    (v / "text.mp4").write_text("this is not a video\n" * 20)
    _audio_only(v / "audio_only.mp4")
    (v / "directory.mp4").mkdir()
    entries = [
        Entry(f"videos/{n}", i % 2, None)
        for i, n in enumerate(
            [
                "good_a.mp4",
                "good_b.mp4",
                "one_frame.mp4",
                "zero.mp4",
                "truncated.mp4",
                "truncated_tail.mp4",
                "text.mp4",
                "audio_only.mp4",
                "directory.mp4",
                "missing.mp4",
            ]
        )
    ]
    write_list(root / "val.txt", entries, "video")
    write_list(root / "train.txt", entries, "video")
    return root


EXPECTED_REASONS = {
    "videos/one_frame.mp4": "too few frames for the sampler: 1 < 8",
    "videos/zero.mp4": "zero bytes",
    "videos/truncated.mp4": "truncated",
    "videos/truncated_tail.mp4": "truncated",
    "videos/text.mp4": "not a video",
    "videos/audio_only.mp4": "no video stream (audio only)",
    "videos/directory.mp4": "unreadable",
    "videos/missing.mp4": "missing",
}


def test_check_reports_every_bad_file_with_its_reason(corpus):
    report = check_list(
        corpus / "val.txt", corpus, corpus / "report.json", min_frames=8, workers=2, progress=False
    )
    assert report["ok"] == 2
    got = {b["path"]: b["reason"] for b in report["bad"]}
    assert set(got) == set(EXPECTED_REASONS)
    for path, reason in EXPECTED_REASONS.items():
        assert got[path].startswith(reason), (path, got[path])
    assert json.loads((corpus / "report.json").read_text()) == report


def test_check_cli_exit_codes(corpus, tmp_path):
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "smallbig",
        "data",
        "check",
        "--list",
        str(corpus / "val.txt"),
        "--root",
        str(corpus),
        "--out",
        str(out),
        "--decode-all",
        "--quiet",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert set(rep) == {"ok", "bad"} and rep["ok"] == 3 and len(rep["bad"]) == 7  # no --min-frames
    assert "videos/one_frame.mp4" not in {b["path"] for b in rep["bad"]}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "smallbig",
            "data",
            "check",
            "--list",
            str(tmp_path / "nope.txt"),
            "--root",
            str(corpus),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "nope.txt" in r.stderr


CRASHING_WORKER = """
import os, signal, sys
import smallbig.data.check as chk
real = chk.probe
def probe(path, *a, **k):
    if path.endswith("text.mp4"):
        os.kill(os.getpid(), signal.SIGSEGV)  # as decord does on some corrupt inputs
    return real(path, *a, **k)
chk.probe = probe
chk._worker_main()
"""


def test_check_survives_a_crashing_decoder(corpus, monkeypatch):
    """A worker that dies on a file: that file is reported, the worker restarted, the rest checked."""
    import smallbig.data.check as chk

    monkeypatch.setattr(chk, "WORKER_CMD", [sys.executable, "-c", CRASHING_WORKER])
    rep = check_entries(corpus, read_list(corpus / "val.txt"), min_frames=8, workers=1, progress=False)
    got = {b["path"]: b["reason"] for b in rep["bad"]}
    assert got["videos/text.mp4"].startswith("decoder crashed (signal 11)")
    assert rep["ok"] == 2 and len(rep["bad"]) == 8
    assert got["videos/audio_only.mp4"].startswith("no video stream")  # checked after the crash


def _params(root, dataset="kinetics400", **data):
    d = {
        "dataset": dataset,
        "root": str(root),
        "format": "video",
        "num_frames": 4,
        "sampling": "dense" if dataset == "kinetics400" else "segment",
        "frame_stride": 4,
        "train_short_side": [64, 72],
        "crop_size": 56,
        "flip": dataset == "kinetics400",
    }
    d.update(data)
    return {"data": d, "test": {"short_side": 64, "multi_crop_size": 64, "single_crop_size": 56}}


def test_loaders_skip_bad_samples_and_count_them(corpus):
    params = _params(corpus)
    for mode, proto in (("train", None), ("val", None), ("test", "2x3")):
        ds = build_dataset(params, "val", mode, proto)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=0)
        good, skipped = [], []
        for b in loader:
            good += b["video_id"]
            skipped += b["skipped"]
            assert len(b["skipped_reasons"]) == len(b["skipped"])
            if b["video"].shape[0]:
                if mode == "test":
                    assert b["video"].shape[1:] == (6, 3, 4, 64, 64)
                    assert b["clip_idx"].tolist() == [0, 0, 0, 1, 1, 1]
                else:
                    assert b["video"].shape[1:] == (3, 4, 56, 56)
        # one_frame.mp4 is readable (short-video rule); the other 7 bad files are skipped
        assert sorted(good) == ["good_a", "good_b", "one_frame"]
        assert len(skipped) == 7 and "missing" in skipped and "text" in skipped


def test_quarantine_left_out_of_training_and_counted_in_eval(corpus, tmp_path):
    import shutil

    root = tmp_path / "q"
    shutil.copytree(corpus, root, symlinks=True)
    rep = check_list(
        root / "val.txt", root, root / "quarantine.json", min_frames=8, workers=1, progress=False
    )
    assert len(rep["bad"]) == 8
    params = _params(root)
    train = build_dataset(params, "train", "train")
    assert len(train) == 2 and len(train.quarantined) == 8
    val = build_dataset(params, "val", "val")
    assert len(val) == 10
    items = [val[i] for i in range(len(val))]
    bad = [it for it in items if not it]
    assert len(bad) == 8 and all(isinstance(b, BadSample) and b.reason.startswith("quarantined") for b in bad)
    b = collate(items)
    assert b["video"].shape[0] == 2 and len(b["skipped"]) == 8


def test_collate_all_bad_and_none():
    b = collate([BadSample("a", "missing"), None])
    assert b["video"].shape[0] == 0 and b["skipped"] == ["a", "<unknown>"]
    assert b["label"].shape == (0,)


def test_test_mode_decodes_each_video_once(corpus, monkeypatch):
    from smallbig.data import readers

    calls = []
    real_get = readers.DecordVideo.get

    def get(self, idx):
        calls.append(len(idx))
        return real_get(self, idx)

    monkeypatch.setattr(readers.DecordVideo, "get", get)
    ds = build_dataset(_params(corpus), "val", "test", "10x3")
    item = ds[0]
    assert item["video"].shape == (30, 3, 4, 64, 64)
    assert item["clip_idx"].tolist() == [c for c in range(10) for _ in range(3)]
    assert item["crop_idx"].tolist() == [0, 1, 2] * 10
    assert len(calls) == 1 and calls[0] <= 40  # one decode of the unique frames


def test_dataset_flip_follows_params(corpus, monkeypatch):
    seen = []
    real = sampling.train_view

    def spy(frames, short_range, size, flip, rng):
        seen.append(flip)
        return real(frames, short_range, size, flip, rng)

    monkeypatch.setattr(sampling, "train_view", spy)
    build_dataset(_params(corpus, "sthv2", flip=False), "train", "train")[0]
    build_dataset(_params(corpus), "train", "train")[0]
    assert seen == [False, True]


def test_something_experiments_never_flip():
    from smallbig.config import experiment_ids, load_params

    for exp in experiment_ids():
        p = load_params(REPO / "params" / "experiments" / f"{exp}.yaml")
        if p["data"]["dataset"].startswith("sth"):
            assert p["data"]["flip"] is False, exp
            assert p["data"]["sampling"] == "segment", exp


def test_train_items_deterministic_under_torch_seed(corpus):
    ds = build_dataset(_params(corpus), "val", "train")
    torch.manual_seed(3)
    a = ds[0]["video"]
    torch.manual_seed(3)
    b = ds[0]["video"]
    assert torch.equal(a, b)


def test_format_mismatch_is_a_clear_error(corpus, tmp_path):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(corpus, root, symlinks=True)
    (root / "manifest.json").write_text(json.dumps({"format": "frames"}))
    with pytest.raises(DataError, match="prepared as format 'frames'"):
        build_dataset(_params(root), "val", "val")


def test_balanced_limit(corpus):
    ds = build_dataset(_params(corpus, limit_val=4), "val", "val")
    assert len(ds) == 4 and sorted(ds.labels) == [0, 0, 1, 1]
    assert isinstance(ds, VideoDataset)
