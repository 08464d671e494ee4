"""Data layer end to end on the embedded dataset: toy generation, acquisition from a local mirror
(file path, file:// and a 127.0.0.1 HTTP server with interrupted downloads), Something-Something
archive parts, frame extraction, and loaders over the prepared directories."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from http_mirror import serve

from smallbig.data import download
from smallbig.data import frames as framesmod
from smallbig.data.dataset import build_dataset, collate
from smallbig.data.lists import DataError, read_list
from smallbig.data.prepare import prepare
from smallbig.data.toy import K400_CLASSES, SS_TEMPLATES, make_toy

torch.set_num_threads(1)
SMALL = {"train": 2, "val": 1, "test": 1, "ss_train": 2, "ss_val": 1}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    summary = make_toy(out, seed=0, per_class=SMALL, progress=False)
    return out, summary


def _params(root, dataset, source, fmt="video", **data):
    d = {
        "dataset": dataset,
        "root": str(root),
        "source": source,
        "format": fmt,
        "num_frames": 4,
        "sampling": "dense" if dataset == "kinetics400" else "segment",
        "frame_stride": 4,
        "train_short_side": [64, 72],
        "crop_size": 56,
        "flip": dataset == "kinetics400",
        "frame_short_side": 64,
    }
    d.update(data)
    return {"data": d, "test": {"short_side": 64, "multi_crop_size": 64, "single_crop_size": 56}}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the embedded dataset
def test_toy_layout_matches_the_real_datasets(toy):
    out, summary = toy
    k = out / "kinetics400"
    for rel in (
        "annotations/train.csv",
        "annotations/val.csv",
        "annotations/test.csv",
        "train/k400_train_path.txt",
        "val/k400_val_path.txt",
        "test/k400_test_path.txt",
        "replacement_for_corrupted_k400.tgz",
        "SHA256SUMS",
    ):
        assert (k / rel).is_file(), rel
    csv_text = (k / "annotations/train.csv").read_text()
    assert csv_text.splitlines()[0] == "label,youtube_id,time_start,time_end,split"
    assert '"handing over, nearby"' in csv_text and '"standing still"' in csv_text
    urls = (k / "train/k400_train_path.txt").read_text().split()
    assert len(urls) == 3 and all(u.endswith(f"part_{i}.tar.gz") for i, u in enumerate(urls))
    with tarfile.open(k / "train/part_0.tar.gz") as t:
        names = t.getnames()
    assert names and all(re.fullmatch(r"[\w-]{11}_\d{6}_\d{6}\.mp4", n) for n in names)
    for line in (k / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ")
        assert _sha(k / rel) == digest
    s2 = out / "sthv2"
    assert sorted(p.name for p in s2.glob("20bn-*")) == [
        "20bn-something-something-v2-00",
        "20bn-something-something-v2-01",
    ]
    labels = json.loads((s2 / "something-something-v2-labels.json").read_text())
    assert len(labels) == len(SS_TEMPLATES) and "Putting something next to something" in labels
    train = json.loads((s2 / "something-something-v2-train.json").read_text())
    assert all("[something]" in it["template"] for it in train)
    s1 = out / "sthv1"
    assert (s1 / "something-something-v1-labels.csv").read_text().splitlines()[0] == SS_TEMPLATES[0].replace(
        "[", ""
    ).replace("]", "")
    assert ";" in (s1 / "something-something-v1-train.csv").read_text().splitlines()[0]
    assert summary["kinetics400"]["videos"] == {"train": 15, "val": 7, "test": 8}


def test_toy_is_deterministic(toy, tmp_path):
    out, _ = toy
    make_toy(tmp_path / "a", seed=0, datasets=("kinetics400",), per_class=SMALL, progress=False)
    make_toy(tmp_path / "b", seed=1, datasets=("kinetics400",), per_class=SMALL, progress=False)
    same = (tmp_path / "a/kinetics400/SHA256SUMS").read_text()
    assert same == (out / "kinetics400/SHA256SUMS").read_text()
    assert same != (tmp_path / "b/kinetics400/SHA256SUMS").read_text()


def test_toy_videos_are_real_encoded_videos(toy, tmp_path):
    import av
    import decord

    out, _ = toy
    with tarfile.open(out / "kinetics400/val/part_0.tar.gz") as t:
        t.extractall(tmp_path, filter="data")
    mp4 = sorted(tmp_path.glob("*.mp4"))[0]
    with av.open(str(mp4)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    vr = decord.VideoReader(str(mp4))
    assert 48 <= len(vr) <= 72 and vr[0].shape == (120, 160, 3)
    assert abs(vr.get_avg_fps() - 25) < 0.1


def test_toy_classes_differ_over_time_not_per_frame():
    """A single frame's statistics do not give the class away: up vs down and near vs far
    hand-over have the same per-frame content distribution; their frame orders differ."""
    from smallbig.data.toy import render

    def disk_rows(kind, seed):
        f = render(kind, 48, np.random.default_rng(seed)).astype(np.int32)
        sat = np.abs(f[..., 0] - f[..., 1]) > 80  # the coloured disk
        return np.array([np.nonzero(m.any(1))[0].mean() for m in sat])

    up = np.stack([disk_rows("up", s) for s in range(6)])
    down = np.stack([disk_rows("down", s) for s in range(6)])
    assert abs(up.mean() - down.mean()) < 8  # same positions overall
    assert (np.diff(up, axis=1).mean(1) < 0).all() and (np.diff(down, axis=1).mean(1) > 0).all()


def test_toy_cli_sizes(tmp_path):
    """`smallbig data toy --per-class`: the sizes reach the generator; bad sizes fail clearly."""
    run = [
        sys.executable,
        "-m",
        "smallbig",
        "data",
        "toy",
        "--out",
        str(tmp_path / "t"),
        "--datasets",
        "kinetics400",
    ]
    r = subprocess.run(run + ["--per-class", "train=x"], capture_output=True, text=True)
    assert r.returncode != 0 and "--per-class 'train=x'" in r.stderr
    r = subprocess.run(run + ["--per-class", "train=1"], capture_output=True, text=True)
    assert r.returncode != 0 and "train >= 2" in r.stderr
    r = subprocess.run(run + ["--per-class", "train=2", "val=1", "test=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "t" / "toy.json").read_text())
    # 8 classes; one train and one val video are made missing from the tarballs
    assert summary["kinetics400"]["videos"] == {"train": 15, "val": 7, "test": 8}
    assert not (tmp_path / "t" / "sthv2").exists()


def _disk_tracks(kind, seeds, n=48):
    """Per frame: area and centroid of the coloured disk(s) (saturated pixels)."""
    from smallbig.data.toy import render

    out = []
    for seed in seeds:
        f = render(kind, n, np.random.default_rng(seed)).astype(np.int32)
        sat = np.abs(f[..., 0] - f[..., 1]) > 80
        yy, xx = np.mgrid[0 : sat.shape[1], 0 : sat.shape[2]]
        area = sat.sum((1, 2)).astype(float)
        cy = (sat * yy).sum((1, 2)) / np.maximum(area, 1)
        cx = (sat * xx).sum((1, 2)) / np.maximum(area, 1)
        out.append(np.stack([area, cy, cx], 1))
    return np.stack(out)  # [seeds, n, 3]


def test_toy_kinetics_classes_are_symmetric_in_time_and_differ_over_time():
    """The Kinetics-style classes carry no direction of time (SmallBig is exactly invariant to
    time reversal, docs/models.md), have similar per-frame content, and differ in how the disk
    behaves across frames. Positive control: the SS kind 'up' does have a direction."""
    from smallbig.data.toy import K400_KIND

    seeds = range(16)
    tracks = {kind: _disk_tracks(kind, seeds) for kind in K400_KIND.values()}
    mean_area = np.mean([t[..., 0].mean() for t in tracks.values()])
    for kind, t in tracks.items():
        area = t[..., 0]
        assert 0.6 < area.mean() / mean_area < 1.6, kind  # per-frame content alike
        # time symmetry: no systematic growth or drift from the first half to the second
        half = area.shape[1] // 2
        trend = (area[:, half:].mean(1) - area[:, :half].mean(1)).mean() / area.mean()
        assert abs(trend) < 0.15, (kind, trend)
        for axis in (1, 2):
            drift = (t[:, half:, axis].mean(1) - t[:, :half, axis].mean(1)).mean()
            assert abs(drift) < 12, (kind, axis, drift)
    up_y = _disk_tracks("up", seeds)[..., 1]
    assert (up_y[:, 24:].mean(1) - up_y[:, :24].mean(1)).mean() < -12

    def step(kind):  # mean centroid displacement between frames 8 apart (the K400 stride)
        t = tracks[kind]
        return np.hypot(t[:, 8:, 1] - t[:, :-8, 1], t[:, 8:, 2] - t[:, :-8, 2]).mean()

    assert step("still") < 2 and step("flicker") < 2 and step("pulse") < 2
    assert step("glide") > 8 and step("glide") < step("teleport")
    assert step("handover_near") < 25 < step("handover_far")
    # pulsing changes the area at one place; flickering changes the colour at one place
    assert tracks["pulse"][..., 0].std(1).mean() > 3 * tracks["still"][..., 0].std(1).mean()


# --------------------------------------------------------------------------- Kinetics acquisition
def test_prepare_kinetics_from_local_mirror(toy, tmp_path):
    out, summary = toy
    root = tmp_path / "k400"
    src = {"base_url": str(out / "kinetics400"), "checksums": "SHA256SUMS"}
    m = prepare(_params(root, "kinetics400", src), progress=False, workers=1)
    assert m["num_classes"] == 8
    assert json.loads((root / "classes.json").read_text()) == sorted(K400_CLASSES)
    assert m["splits"]["train"]["count"] == 15 and m["splits"]["val"]["count"] == 7
    assert m["splits"]["train"]["missing"] == [summary["kinetics400"]["missing"]["train"]]
    assert m["splits"]["val"]["missing"] == [summary["kinetics400"]["missing"]["val"]]
    assert sorted(n.split("/", 1)[1] for n in m["replaced"]) == sorted(summary["kinetics400"]["replaced"])
    # the truncated copies in the tarballs were replaced: nothing is quarantined
    assert json.loads((root / "quarantine.json").read_text()) == {"ok": 22, "bad": []}
    for split in ("train", "val"):
        assert m["splits"][split]["sha256"] == _sha(root / f"{split}.txt")
        for e in read_list(root / f"{split}.txt", "video"):
            assert re.fullmatch(rf"videos/{split}/[\w-]{{11}}_\d{{6}}_\d{{6}}\.mp4", e.path)
            assert (root / e.path).is_file()
    # idempotent: a second run downloads nothing and gives the same manifest
    stamps = {p: p.stat().st_mtime_ns for p in (root / "raw").rglob("*.tar.gz")}
    m2 = prepare(_params(root, "kinetics400", src), progress=False, workers=1)
    assert m2 == m
    assert stamps == {p: p.stat().st_mtime_ns for p in (root / "raw").rglob("*.tar.gz")}


def test_prepare_kinetics_file_url_without_replacement_quarantines(toy, tmp_path):
    out, summary = toy
    root = tmp_path / "k400"
    src = {"base_url": (out / "kinetics400").resolve().as_uri(), "replacement": None}
    m = prepare(_params(root, "kinetics400", src), progress=False, workers=2)
    rep = json.loads((root / "quarantine.json").read_text())
    bad = {Path(b["path"]).name: b["reason"] for b in rep["bad"]}
    assert set(bad) == set(summary["kinetics400"]["replaced"])
    assert all(r.startswith("truncated") for r in bad.values())
    assert m["splits"]["train"]["quarantined"] == 1 and m["splits"]["train"]["usable"] == 14
    assert len(build_dataset(_params(root, "kinetics400", src), "train", "train")) == 14


def test_prepare_cli_reports_a_bad_source(tmp_path):
    p = tmp_path / "p.yaml"
    import yaml

    repo = Path(__file__).resolve().parents[1]
    p.write_text(
        yaml.safe_dump(
            {
                "extends": str(repo / "params/experiments/k400-r23-c2d.yaml"),
                "data": {"root": str(tmp_path / "r"), "source": {"base_url": str(tmp_path / "none")}},
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "smallbig", "data", "prepare", str(p), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "annotations/train.csv" in r.stderr and "not found" in r.stderr


# --------------------------------------------------------------------------- HTTP download with resume
@pytest.fixture()
def mirror(toy):
    out, _ = toy
    with serve(out / "kinetics400") as (base, handler):
        yield base, handler


def test_interrupted_download_resumes_and_verifies(mirror, toy, tmp_path):
    url, h = mirror
    out, _ = toy
    src = out / "kinetics400/train/part_1.tar.gz"
    size = src.stat().st_size
    h.drop_first["train/part_1.tar.gz"] = size // 2
    dest = tmp_path / "part_1.tar.gz"
    with pytest.raises(download.DownloadError, match="incomplete"):
        download.fetch(f"{url}/train/part_1.tar.gz", dest, retries=1, progress=False)
    part = tmp_path / "part_1.tar.gz.part"
    assert part.stat().st_size == size // 2 and not dest.exists()  # partial data kept
    download.fetch(f"{url}/train/part_1.tar.gz", dest, sha256=_sha(src), retries=1, progress=False)
    assert _sha(dest) == _sha(src) and not part.exists()
    assert h.log[-1] == ("train/part_1.tar.gz", f"bytes={size // 2}-")  # continued, not restarted


def test_server_ignoring_range_restarts_cleanly(mirror, toy, tmp_path):
    url, h = mirror
    out, _ = toy
    src = out / "kinetics400/val/part_0.tar.gz"
    h.ignore_range = True
    part = tmp_path / "x.tgz.part"
    part.write_bytes(src.read_bytes()[:100])
    download.fetch(f"{url}/val/part_0.tar.gz", tmp_path / "x.tgz", retries=1, progress=False)
    assert _sha(tmp_path / "x.tgz") == _sha(src)


def test_checksum_mismatch_keeps_data_and_fails(mirror, tmp_path):
    url, _ = mirror
    with pytest.raises(download.DownloadError, match="SHA-256 mismatch"):
        download.fetch(
            f"{url}/val/part_0.tar.gz", tmp_path / "y.tgz", sha256="0" * 64, retries=1, progress=False
        )
    assert (tmp_path / "y.tgz.bad-checksum").stat().st_size > 0 and not (tmp_path / "y.tgz").exists()
    with pytest.raises(download.DownloadError, match="404"):
        download.fetch(f"{url}/nope.tgz", tmp_path / "z", retries=1, progress=False)


def test_prepare_over_http_with_a_dropped_connection(mirror, toy, tmp_path):
    url, h = mirror
    out, _ = toy
    h.drop_first["train/part_2.tar.gz"] = 1000
    root = tmp_path / "k400"
    m = prepare(
        _params(root, "kinetics400", {"base_url": url, "checksums": "SHA256SUMS"}), progress=False, workers=1
    )
    assert m["splits"]["train"]["count"] == 15
    assert ("train/part_2.tar.gz", "bytes=1000-") in h.log  # retried with a resume


# --------------------------------------------------------------------------- Something-Something
def test_prepare_sthv2_videos_and_frames(toy, tmp_path):
    out, _ = toy
    src = {"archive_dir": str(out / "sthv2")}
    m = prepare(_params(tmp_path / "v", "sthv2", src), progress=False, workers=1)
    assert m["splits"]["train"]["count"] == 16 and m["splits"]["val"]["count"] == 8
    classes = json.loads((tmp_path / "v/classes.json").read_text())
    assert classes == [t.replace("[", "").replace("]", "") for t in SS_TEMPLATES]
    e = read_list(tmp_path / "v/val.txt", "video")[0]
    assert e.path.endswith(".webm")
    # the same data as frames
    pf = _params(tmp_path / "f", "sthv2", src, fmt="frames")
    m = prepare(pf, progress=False, workers=2)
    assert m["format"] == "frames" and m["frame_template"] == "img_{:05d}.jpg"
    fe = read_list(tmp_path / "f/val.txt", "frames")
    assert len(fe) == 8 and all((tmp_path / "f" / x.path / "img_00001.jpg").is_file() for x in fe)
    assert json.loads((tmp_path / "f/quarantine.json").read_text())["bad"] == []
    # video and frame loaders see the same clip (up to JPEG loss)
    a = build_dataset(_params(tmp_path / "v", "sthv2", src), "val", "val")
    b = build_dataset(pf, "val", "val")
    va, vb = a[0]["video"].float(), b[0]["video"].float()
    assert va.shape == vb.shape == (3, 4, 56, 56)
    assert (va - vb).abs().mean() < 6


def test_prepare_sthv1_frames(toy, tmp_path):
    out, _ = toy
    p = _params(tmp_path / "v1", "sthv1", {"archive_dir": str(out / "sthv1")}, fmt="frames")
    m = prepare(p, progress=False, workers=1)
    assert m["frame_template"] == "{:05d}.jpg" and m["splits"]["train"]["count"] == 16
    ds = build_dataset(p, "val", "test", "2x3")
    batch = collate([ds[i] for i in range(2)])
    assert batch["video"].shape == (2, 6, 3, 4, 64, 64) and batch["skipped"] == []
    with pytest.raises(DataError, match="frames only|JPEG frames"):
        prepare(_params(tmp_path / "v1b", "sthv1", {"archive_dir": str(out / "sthv1")}), progress=False)


def test_something_missing_part_is_named(toy, tmp_path):
    out, _ = toy
    d = tmp_path / "partial"
    d.mkdir()
    for p in (out / "sthv2").iterdir():
        if not p.name.endswith("-00") and "validation" not in p.name:
            shutil.copy(p, d / p.name)
    with pytest.raises(DataError) as e:
        prepare(_params(tmp_path / "r", "sthv2", {"archive_dir": str(d)}), progress=False)
    msg = str(e.value)
    assert "20bn-something-something-v2-00" in msg and "something-something-v2-validation.json" in msg
    assert "labels.json" not in msg and "train.json" not in msg
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "smallbig",
            "data",
            "check",
            "--list",
            str(d / "nope.txt"),
            "--root",
            str(d),
            "--out",
            str(tmp_path / "o.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    # the last part missing (not detectable by numbering): extraction fails naming the archive
    shutil.copy(out / "sthv2/something-something-v2-validation.json", d)
    shutil.copy(out / "sthv2/20bn-something-something-v2-00", d)
    (d / "20bn-something-something-v2-01").unlink()
    from smallbig.data.archives import ArchiveError

    with pytest.raises(ArchiveError, match="20bn-something-something-v2.*corrupt or incomplete"):
        prepare(_params(tmp_path / "r", "sthv2", {"archive_dir": str(d)}), progress=False)
    assert not (tmp_path / "r/manifest.json").exists()


# --------------------------------------------------------------------------- frame extraction
def test_frame_extraction_is_idempotent_and_redoes_partial_work(toy, tmp_path):
    import decord

    out, _ = toy
    root = tmp_path / "k"
    prepare(_params(root, "kinetics400", {"base_url": str(out / "kinetics400")}), progress=False, workers=1)
    entries = read_list(root / "val.txt", "video")[:3]
    fe, failed = framesmod.extract_frames(root, entries, "frames/val", 64, workers=1, progress=False)
    assert failed == []
    for e, f in zip(entries, fe):
        assert f.num_frames == len(decord.VideoReader(str(root / e.path)))
        from PIL import Image

        with Image.open(root / f.path / "img_00001.jpg") as im:
            assert min(im.size) == 64
    stamps = {p: p.stat().st_mtime_ns for p in (root / "frames").rglob("*.jpg")}
    # a job died half-way through video 1: its final folder is gone, a .tmp folder is left
    victim = root / fe[1].path
    shutil.rmtree(victim)
    tmp = victim.with_name(victim.name + ".tmp")
    tmp.mkdir()
    (tmp / "img_00001.jpg").write_bytes(b"garbage")
    fe2, failed = framesmod.extract_frames(root, entries, "frames/val", 64, workers=1, progress=False)
    assert fe2 == fe and failed == [] and not tmp.exists()
    for p, t in stamps.items():
        if victim in p.parents:
            assert p.exists()
        else:
            assert p.stat().st_mtime_ns == t  # untouched
    with Image.open(victim / "img_00001.jpg") as im:
        im.load()


def test_keep_archives_false_deletes_tarballs_and_rerun_needs_none(toy, tmp_path):
    out, _ = toy
    root = tmp_path / "k"
    p = _params(root, "kinetics400", {"base_url": str(out / "kinetics400"), "keep_archives": False})
    m = prepare(p, progress=False, workers=1)
    assert not list((root / "raw").glob("*/part_*.tar.gz"))
    # a rerun from a mirror that is gone still works: nothing is downloaded again
    p2 = _params(root, "kinetics400", {"base_url": str(tmp_path / "gone"), "keep_archives": False})
    assert prepare(p2, progress=False, workers=1)["splits"] == m["splits"]


def test_resize_videos_reencodes_to_short_side(toy, tmp_path):
    import decord

    out, _ = toy
    root = tmp_path / "k"
    prepare(_params(root, "kinetics400", {"base_url": str(out / "kinetics400")}), progress=False, workers=1)
    entries = read_list(root / "val.txt", "video")[:2]
    res, failed = framesmod.resize_videos(root, entries, "videos96", 96, progress=False)
    assert failed == [] and len(res) == 2
    for e, r in zip(entries, res):
        a, b = decord.VideoReader(str(root / e.path)), decord.VideoReader(str(root / r.path))
        assert b[0].shape == (96, 128, 3) and len(b) == len(a) and r.label == e.label
