"""Hostile but fair input to the data path (issue 11): special files, broken and unusual videos,
bad list files. Every command runs as a subprocess under a timeout: no hang, no traceback,
every bad item named with its reason, the unusual but valid ones accepted.

The corpus is generated here with the ffmpeg binary of imageio-ffmpeg (and Python for the
special files); see docs/reliability.md for the table of kinds and outcomes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smallbig.data.lists import DataError

SMALLBIG = [sys.executable, "-m", "smallbig"]
CLASSES = [f"class {i}" for i in range(8)]
ENV = dict(os.environ, SMALLBIG_NO_MLFLOW="1", OMP_NUM_THREADS="1")
ENV.pop("SMALLBIG_CHECK_FILE_TIMEOUT", None)


def _ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (cmd, r.stderr)


def _video(path: Path, size: str, frames: int, *codec: str, src: str = "testsrc2") -> Path:
    codec = codec or ("-c:v", "libx264", "-pix_fmt", "yuv420p")
    _ffmpeg("-f", "lavfi", "-i", f"{src}=size={size}:rate=25", "-frames:v", str(frames), *codec, str(path))
    return path


def _run(cmd, timeout=180, **kw):
    """A command that must end by itself (a hang fails the test) and never print a traceback."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", ENV), **kw)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    return r


# --------------------------------------------------------------------------- the corpus
# name -> what the check must say (prefix of the reason); None: a valid video, accepted
VIDEO_KINDS = {
    "good.mp4": None,
    "tiny16x16.mp4": None,  # decord mis-shapes 16 px wide frames: read with PyAV
    "tiny72x40.mp4": None,  # the width of dmlc/decord#336
    "odd17x9.mp4": None,  # odd width and height (yuv444p)
    "one_frame.mp4": None,
    "two_frames.mp4": None,
    "vp9.webm": None,
    "space and ünïcode clip.mp4": None,
    "fifo.mp4": "unreadable: not a regular file: FIFO (named pipe)",
    "socket.mp4": "unreadable: not a regular file: socket",
    "directory.mp4": "unreadable: is a directory, not a file",
    "link_to_fifo.mp4": "unreadable: not a regular file: FIFO (named pipe) (symlink to fifo.mp4)",
    "link_to_dev_zero.mp4": "unreadable: not a regular file: character device (symlink to /dev/zero)",
    "dangling_link.mp4": "missing: dangling symlink to nowhere.mp4",
    "missing.mp4": "missing",
    "zero_bytes.mp4": "zero bytes",
    "text.mp4": "not a video (text content",
    "random_bytes.mp4": "not a video (binary content",
    "cut_in_header.mp4": "truncated (mp4 container damaged",
    "cut_at_half.mp4": "truncated: ",
    "cut_near_end.mp4": "truncated: ",
    "moov_missing.mp4": "truncated (mp4 container damaged",
    "mp3_audio_only.mp4": "no video stream (audio only)",
    "mp3_with_cover_art.mp4": "no video stream (audio only, a still cover picture)",
    "av1.mp4": "codec av1: not supported by this decord build",
    "huge_8192x8192.mp4": "frame size 8192x8192 declared by the h264 stream exceeds the limit",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "classes.json").write_text(json.dumps(CLASSES))
    v = root / "videos"
    v.mkdir()
    _video(v / "good.mp4", "64x48", 16)
    _video(v / "tiny16x16.mp4", "16x16", 12)
    _video(v / "tiny72x40.mp4", "72x40", 12)
    _video(v / "odd17x9.mp4", "17x9", 12, "-c:v", "libx264", "-pix_fmt", "yuv444p")
    _video(v / "one_frame.mp4", "64x48", 1)
    _video(v / "two_frames.mp4", "64x48", 2)
    _video(v / "vp9.webm", "64x48", 10, "-c:v", "libvpx-vp9")
    shutil.copy(v / "good.mp4", v / "space and ünïcode clip.mp4")
    os.mkfifo(v / "fifo.mp4")
    with socket.socket(socket.AF_UNIX) as s:  # the socket file stays after close
        s.bind(str(v / "socket.mp4"))
    (v / "directory.mp4").mkdir()
    (v / "link_to_fifo.mp4").symlink_to("fifo.mp4")
    (v / "link_to_dev_zero.mp4").symlink_to("/dev/zero")
    (v / "dangling_link.mp4").symlink_to("nowhere.mp4")
    (v / "zero_bytes.mp4").write_bytes(b"")
    (v / "text.mp4").write_text("not a video at all\n" * 30)
    (v / "random_bytes.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    fast = _video(
        root / "faststart.mp4",
        "96x64",
        48,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-g",
        "12",
        "-movflags",
        "+faststart",
    ).read_bytes()
    (v / "cut_in_header.mp4").write_bytes(fast[: len(fast) // 20])
    (v / "cut_at_half.mp4").write_bytes(fast[: len(fast) // 2])
    (v / "cut_near_end.mp4").write_bytes(fast[: len(fast) * 95 // 100])
    end = _video(root / "moov_at_end.mp4", "96x64", 24).read_bytes()
    (v / "moov_missing.mp4").write_bytes(end[: end.rfind(b"moov") - 4])  # everything but the moov atom
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=1",
        "-c:a",
        "libmp3lame",
        "-f",
        "mp3",
        str(v / "mp3_audio_only.mp4"),
    )
    _ffmpeg(
        "-i",
        str(v / "mp3_audio_only.mp4"),
        "-f",
        "lavfi",
        "-i",
        "color=c=red:size=32x32:d=0.04",
        "-map",
        "0:a",
        "-map",
        "1:v",
        "-c:a",
        "copy",
        "-c:v",
        "mjpeg",
        "-disposition:v",
        "attached_pic",
        "-id3v2_version",
        "3",
        "-f",
        "mp3",
        str(v / "mp3_with_cover_art.mp4"),
    )
    _video(v / "av1.mp4", "64x48", 8, "-c:v", "libaom-av1", "-cpu-used", "8")
    _video(
        v / "huge_8192x8192.mp4",
        "8192x8192",
        1,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        src="color",
    )
    names = sorted(VIDEO_KINDS)
    lines = [f"videos/{n} {i % 8}" for i, n in enumerate(names)]
    (root / "all.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def check_report(corpus):
    """One `smallbig data check` of every video kind (a subprocess, under a timeout)."""
    out = corpus / "report.json"
    t0 = time.time()
    r = _run(
        SMALLBIG
        + [
            "data",
            "check",
            "--list",
            str(corpus / "all.txt"),
            "--root",
            str(corpus),
            "--out",
            str(out),
            "--quiet",
            "--workers",
            "2",
        ],
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    return {"report": report, "stdout": r.stdout, "seconds": time.time() - t0}


@pytest.mark.parametrize("name", sorted(VIDEO_KINDS))
def test_data_check_video_kind(check_report, name):
    """Each kind: a bad one is named with its reason, a valid unusual one is accepted."""
    got = {b["path"]: b["reason"] for b in check_report["report"]["bad"]}
    want = VIDEO_KINDS[name]
    path = f"videos/{name}"
    if want is None:
        assert path not in got, f"{name} rejected: {got.get(path)}"
    else:
        assert path in got, f"{name} accepted"
        assert got[path].startswith(want), (name, got[path])
        assert "cannot be opened" not in got[path]


def test_data_check_whole_corpus_fast_and_complete(check_report):
    rep = check_report["report"]
    n_good = sum(1 for w in VIDEO_KINDS.values() if w is None)
    assert rep["ok"] == n_good and len(rep["bad"]) == len(VIDEO_KINDS) - n_good
    assert "list_problems" not in rep
    assert check_report["seconds"] < 120  # nothing waited on a FIFO or a decoder
    assert "videos/fifo.mp4: unreadable: not a regular file: FIFO" in check_report["stdout"]


# --------------------------------------------------------------------------- train/evaluate readers
DATASET_SCRIPT = r"""
import json, sys, time
import torch
from smallbig.data.dataset import BadSample, build_dataset, collate
root = sys.argv[1]
params = {"data": {"dataset": "kinetics400", "root": root, "format": "video", "num_frames": 4,
                   "sampling": "dense", "frame_stride": 2, "train_short_side": [64, 72], "crop_size": 56,
                   "flip": False},
          "test": {"short_side": 64, "multi_crop_size": 64, "single_crop_size": 56},
          "model": {"num_classes": 8}}
out = {}
for mode, proto in (("train", None), ("val", None), ("test", "2x3")):
    ds = build_dataset(params, "val", mode, proto)
    for i, e in enumerate(ds.entries):
        t0 = time.time()
        item = ds[i]
        dt = time.time() - t0
        if isinstance(item, BadSample):
            out[f"{mode} {e.path}"] = {"bad": item.reason, "s": dt}
        else:
            out[f"{mode} {e.path}"] = {"shape": list(item["video"].shape), "s": dt}
    b = collate([ds[i] for i in range(len(ds))])
    out[f"{mode} skipped"] = b["skipped"]
print(json.dumps(out))
"""


def test_dataset_refuses_special_files_fast_and_reads_tiny_videos(corpus, tmp_path):
    """What train/evaluate read: special files are BadSamples at once (named), tiny and odd-sized
    videos are decoded and upscaled by the normal resize/crop path."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    (root / "videos").symlink_to(corpus / "videos")
    names = [
        "good.mp4",
        "tiny16x16.mp4",
        "tiny72x40.mp4",
        "odd17x9.mp4",
        "one_frame.mp4",
        "two_frames.mp4",
        "space and ünïcode clip.mp4",
        "fifo.mp4",
        "link_to_fifo.mp4",
        "socket.mp4",
        "link_to_dev_zero.mp4",
        "directory.mp4",
        "av1.mp4",
        "huge_8192x8192.mp4",
    ]
    (root / "val.txt").write_text(
        "".join(f"videos/{n} {i % 8}\n" for i, n in enumerate(names)), encoding="utf-8"
    )
    r = _run([sys.executable, "-c", DATASET_SCRIPT, str(root)], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    shapes = {"train": [3, 4, 56, 56], "val": [3, 4, 56, 56], "test": [6, 3, 4, 64, 64]}
    for mode in shapes:
        for n in names[:7]:
            assert got[f"{mode} videos/{n}"].get("shape") == shapes[mode], (
                mode,
                n,
                got[f"{mode} videos/{n}"],
            )
        expect = {
            "fifo.mp4": "not a regular file: FIFO",
            "link_to_fifo.mp4": "FIFO (named pipe) (symlink to",
            "socket.mp4": "not a regular file: socket",
            "link_to_dev_zero.mp4": "character device",
            "directory.mp4": "is a directory",
            "av1.mp4": "codec av1: not supported by this decord build",
            "huge_8192x8192.mp4": "frame size 8192x8192",
        }
        for n, reason in expect.items():
            item = got[f"{mode} videos/{n}"]
            assert reason in item.get("bad", ""), (mode, n, item)
            assert f"videos/{n}" in item["bad"]  # the message names the file
            if n != "huge_8192x8192.mp4":
                assert item["s"] < 5, (n, item)  # refused by stat, before any open
        assert sorted(got[f"{mode} skipped"]) == sorted(Path(n).stem for n in expect)


# --------------------------------------------------------------------------- deadlines
HANGING_WORKER = """
import time
import smallbig.data.check as chk
real = chk.probe
def probe(path, *a, **k):
    if path.endswith("stall.mp4"):
        time.sleep(3600)  # a decoder stuck for good on this one file
    return real(path, *a, **k)
chk.probe = probe
chk._worker_main()
"""


def test_hung_decoder_is_killed_at_the_deadline_and_the_run_goes_on(corpus, tmp_path, monkeypatch):
    import smallbig.data.check as chk
    from smallbig.data.lists import Entry

    root = tmp_path / "stall"
    (root / "videos").mkdir(parents=True)
    for n in ("good.mp4", "tiny16x16.mp4"):
        shutil.copy(corpus / "videos" / n, root / "videos" / n)
    shutil.copy(corpus / "videos" / "good.mp4", root / "videos" / "stall.mp4")
    entries = [Entry(f"videos/{n}", 0, None) for n in ("good.mp4", "stall.mp4", "tiny16x16.mp4")]
    monkeypatch.setattr(chk, "WORKER_CMD", [sys.executable, "-c", HANGING_WORKER])
    for how in ("argument", "environment"):
        t0 = time.time()
        if how == "argument":
            rep = chk.check_entries(root, entries, workers=1, progress=False, file_timeout=2)
        else:
            monkeypatch.setenv("SMALLBIG_CHECK_FILE_TIMEOUT", "2")
            rep = chk.check_entries(root, entries, workers=1, progress=False)
        elapsed = time.time() - t0
        got = {b["path"]: b["reason"] for b in rep["bad"]}
        assert list(got) == ["videos/stall.mp4"], got
        assert got["videos/stall.mp4"].startswith("decoder hung: no result within 2 s"), got
        assert rep["ok"] == 2  # tiny16x16.mp4 was checked by a fresh worker after the kill
        assert elapsed < 60, elapsed


def test_worker_that_cannot_start_stops_the_check_with_a_message(corpus, monkeypatch):
    """Not every file reported as "decoder crashed" (a quarantine of everything): CheckError."""
    import smallbig.data.check as chk
    from smallbig.data.lists import Entry

    monkeypatch.setattr(chk, "WORKER_CMD", [sys.executable, "-c", "raise SystemExit(3)"])
    t0 = time.time()
    with pytest.raises(chk.CheckError, match="decoder worker .* did not start"):
        chk.check_entries(corpus, [Entry("videos/good.mp4", 0, None)], workers=1, progress=False)
    assert time.time() - t0 < 30


def test_file_timeout_option_kills_a_slow_real_decode(corpus, tmp_path):
    """A real file whose full decode takes seconds, checked with --decode-all under a 0.5 s
    deadline: reported as hung, the other file still checked; the same file passes without."""
    root = tmp_path / "slow"
    (root / "videos").mkdir(parents=True)
    _video(
        root / "videos" / "slow.mp4",
        "1280x720",
        600,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
    )
    shutil.copy(corpus / "videos" / "good.mp4", root / "videos" / "good.mp4")
    (root / "l.txt").write_text("videos/slow.mp4 0\nvideos/good.mp4 1\n")
    out = root / "r.json"
    base = SMALLBIG + [
        "data",
        "check",
        "--list",
        str(root / "l.txt"),
        "--root",
        str(root),
        "--out",
        str(out),
        "--quiet",
        "--workers",
        "1",
    ]
    t0 = time.time()
    r = _run(base + ["--decode-all", "--file-timeout", "0.5"], timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["ok"] == 1 and [b["path"] for b in rep["bad"]] == ["videos/slow.mp4"]
    assert rep["bad"][0]["reason"].startswith("decoder hung: no result within 0.5 s"), rep
    assert time.time() - t0 < 60
    r = _run(base, timeout=120)  # default deadline, first and last frame only: fine
    assert r.returncode == 0 and json.loads(out.read_text()) == {"ok": 2, "bad": []}, r.stderr
    for bad in ("0", "-1", "soon"):
        r = _run(base + ["--file-timeout", bad], timeout=60)
        assert r.returncode == 2 and "--file-timeout" in r.stderr and "positive number" in r.stderr
    r = _run(base, timeout=60, env=dict(ENV, SMALLBIG_CHECK_FILE_TIMEOUT="soon"))
    assert r.returncode == 2 and "SMALLBIG_CHECK_FILE_TIMEOUT='soon'" in r.stderr


def test_unreadable_file_is_named(corpus, tmp_path):
    """chmod 000. Root reads any file (CAP_DAC_OVERRIDE), so as root the check and the reader run
    without the two capabilities that bypass file permissions (setpriv), as an ordinary user would."""
    root = tmp_path / "perm"
    (root / "videos").mkdir(parents=True)
    shutil.copy(corpus / "videos" / "good.mp4", root / "videos" / "secret.mp4")
    shutil.copy(corpus / "videos" / "good.mp4", root / "videos" / "good.mp4")
    (root / "videos" / "secret.mp4").chmod(0)
    (root / "l.txt").write_text("videos/secret.mp4 0\nvideos/good.mp4 1\n")
    prefix = []
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "running as root: need util-linux setpriv to drop CAP_DAC_OVERRIDE"
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    out = root / "r.json"
    r = _run(
        prefix
        + SMALLBIG
        + ["data", "check", "--list", str(root / "l.txt"), "--root", str(root), "--out", str(out), "--quiet"],
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["ok"] == 1 and rep["bad"] == [
        {"path": "videos/secret.mp4", "reason": "unreadable: Permission denied"}
    ]
    r = _run(
        prefix
        + [
            sys.executable,
            "-c",
            "import sys\nfrom smallbig.data.readers import VideoError, open_video\n"
            "try:\n    open_video(sys.argv[1])\nexcept VideoError as e:\n    print(e)\n",
            str(root / "videos" / "secret.mp4"),
        ],
        timeout=60,
    )
    assert r.stdout.strip() == f"{root / 'videos' / 'secret.mp4'}: unreadable: Permission denied"


# --------------------------------------------------------------------------- list files
# kind -> (line as bytes, problem expected in `FILE:LINE: problem`, or None: accepted)
LIST_KINDS = {
    "label_out_of_range": (b"videos/good.mp4 99", "label 99 is out of range [0, 8)"),
    "label_equal_to_num_classes": (b"videos/good.mp4 8", "label 8 is out of range [0, 8)"),
    "negative_label": (b"videos/good.mp4 -1", "label -1 is negative"),
    "non_integer_label": (b"videos/good.mp4 abc", "label 'abc' is not an integer"),
    "float_label": (b"videos/good.mp4 3.0", "label '3.0' is not an integer"),
    "missing_label_field": (b"videos/good.mp4", "expected `path label`"),
    "non_utf8_bytes": (b"videos/caf\xe9.mp4 1", "not valid UTF-8 (byte 0xe9 at column 11)"),
    "nul_byte": (b"videos/go\x00od.mp4 1", "contains a NUL byte"),
    "duplicate_line": (
        b"videos/tiny16x16.mp4 1",
        "duplicate entry 'videos/tiny16x16.mp4' (already on line 2)",
    ),
    "bad_frame_count": (b"frames/x 0 1", "number of frames '0' is not a positive integer"),  # frame lists
    "crlf_line_end": (b"videos/two_frames.mp4 2\r", None),
    "tab_separator": (b"videos/one_frame.mp4\t3", None),
    "blank_and_whitespace_lines": (b"   \t ", None),
    "trailing_whitespace": (b"videos/odd17x9.mp4 4   ", None),
    "path_with_spaces_and_unicode": ("videos/space and ünïcode clip.mp4 5".encode(), None),
}
HEAD = b"videos/good.mp4 0\nvideos/tiny16x16.mp4 1\n"  # lines 1 and 2; the kind's line is line 3


def _list_root(base: Path, corpus: Path, body: bytes) -> Path:
    base.mkdir(parents=True)
    (base / "classes.json").write_text(json.dumps(CLASSES))
    (base / "videos").symlink_to(corpus / "videos")
    (base / "val.txt").write_bytes(body)
    (base / "train.txt").write_bytes(body)
    return base


@pytest.mark.parametrize("kind", sorted(LIST_KINDS))
def test_list_kind_in_build_dataset(corpus, tmp_path, kind):
    """train/evaluate read their lists through build_dataset: a bad line is refused before any
    work with DataError `FILE:LINE: problem`; the harmless variants are read correctly."""
    from smallbig.data.dataset import build_dataset

    line, problem = LIST_KINDS[kind]
    fmt, head = "video", HEAD
    if kind == "bad_frame_count":  # in a video list `frames/x 0 1` is the path "frames/x 0"
        fmt, head = "frames", b"frames/a 4 0\nframes/b 4 1\n"
    root = _list_root(tmp_path / kind, corpus, head + line + b"\n\n")
    params = {
        "data": {"dataset": "kinetics400", "root": str(root), "format": fmt, "num_frames": 2},
        "model": {"num_classes": 8},
    }
    if problem is None:
        ds = build_dataset(params, "val", "val")
        assert all("\r" not in e.path and e.path == e.path.strip() for e in ds.entries)
        assert len(ds) == (2 if kind == "blank_and_whitespace_lines" else 3)
        if len(ds) == 3:
            assert (root / ds.entries[2].path).exists() and ds.entries[2].label == int(line.split()[-1])
    else:
        with pytest.raises(DataError) as e:
            build_dataset(params, "val", "val")
        assert str(e.value) == f"{root / 'val.txt'}:3: {problem}" or str(e.value).startswith(
            f"{root / 'val.txt'}:3: {problem}"
        ), str(e.value)


def test_windows_style_list_is_read(corpus, tmp_path):
    """A list saved by a Windows editor: UTF-8 byte-order mark, CRLF everywhere, tabs."""
    from smallbig.data.dataset import build_dataset

    body = "\ufeffvideos/good.mp4\t0\r\nvideos/space and ünïcode clip.mp4\t1\r\n\r\n".encode()
    root = _list_root(tmp_path / "w", corpus, body)
    params = {
        "data": {
            "dataset": "kinetics400",
            "root": str(root),
            "format": "video",
            "num_frames": 2,
            "sampling": "segment",
        },
        "test": {"short_side": 64, "single_crop_size": 56},
        "model": {"num_classes": 8},
    }
    ds = build_dataset(params, "val", "val")
    assert [(e.path, e.label) for e in ds.entries] == [
        ("videos/good.mp4", 0),
        ("videos/space and ünïcode clip.mp4", 1),
    ]
    assert all(ds[i]["video"].shape == (3, 2, 56, 56) for i in range(2))


def test_label_bound_from_model_num_classes_too(corpus, tmp_path):
    """No classes.json (a hand-made list): model.num_classes still bounds the labels."""
    from smallbig.data.dataset import build_dataset

    root = _list_root(tmp_path / "r", corpus, HEAD + b"videos/good.mp4 5\n")
    (root / "classes.json").unlink()
    params = {
        "data": {"dataset": "kinetics400", "root": str(root), "format": "video", "num_frames": 2},
        "model": {"num_classes": 4},
    }
    with pytest.raises(
        DataError, match=r"val.txt:3: label 5 is out of range \[0, 4\) \(model.num_classes is 4\)"
    ):
        build_dataset(params, "val", "val")


def test_data_check_cli_reports_every_list_problem(corpus, tmp_path):
    """One list with every kind: exit 2, each bad line as FILE:LINE: problem on stderr and in the
    report; the good lines (the harmless variants too) are still checked."""
    body = HEAD
    lineno, expect = 3, []
    for kind in sorted(LIST_KINDS):
        line, problem = LIST_KINDS[kind]
        if kind == "duplicate_line":
            problem = "duplicate entry 'videos/tiny16x16.mp4' (already on line 2)"
        body += line + b"\n"
        if problem:
            expect.append(f"{tmp_path / 'c' / 'all.txt'}:{lineno}: {problem}")
        lineno += 1
    root = _list_root(tmp_path / "c", corpus, b"")
    (root / "all.txt").write_bytes(body)
    out = root / "r.json"
    r = _run(
        SMALLBIG
        + [
            "data",
            "check",
            "--list",
            str(root / "all.txt"),
            "--root",
            str(root),
            "--out",
            str(out),
            "--quiet",
        ],
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    rep = json.loads(out.read_text())
    assert len(rep["list_problems"]) == len(expect)
    for want, got in zip(expect, rep["list_problems"]):
        assert got.startswith(want), (want, got)
        assert want in r.stderr
    assert "invalid list" in r.stderr
    assert rep["ok"] == 6 and rep["bad"] == []  # 2 head lines + the 4 accepted variant lines
    assert "smallbig data check: invalid list: 10 bad line(s)" in r.stderr


@pytest.mark.parametrize("which", ["list", "classes.json", "manifest.json"])
def test_fifo_in_place_of_a_list_or_dataset_file(corpus, tmp_path, which):
    """A FIFO where the list, classes.json or manifest.json should be: refused by name, no hang."""
    from smallbig.data.dataset import build_dataset

    root = _list_root(tmp_path / "f", corpus, HEAD)
    target = root / ("val.txt" if which == "list" else which)
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    r = _run(
        SMALLBIG
        + [
            "data",
            "check",
            "--list",
            str(root / "val.txt"),
            "--root",
            str(root),
            "--out",
            str(root / "r.json"),
            "--quiet",
        ],
        timeout=60,
    )
    if which == "manifest.json":  # data check --list does not read the manifest
        assert r.returncode == 0, r.stderr
        with pytest.raises(DataError, match=f"{target}: not a regular file"):
            build_dataset({"data": {"root": str(root), "format": "video"}}, "val", "val")
    else:
        assert r.returncode == 2 and f"{target}: " in r.stderr and "not a regular file" in r.stderr, r.stderr


# --------------------------------------------------------------------------- train / evaluate CLI
def _tiny_params(root: Path, out: Path) -> Path:
    from smallbig import config

    p = config.load_params(
        config.experiment_path("k400-r23-sb-full"), config.REPO_ROOT / "params" / "embedded.yaml"
    )
    p["data"].update(
        root=str(root), crop_size=48, train_short_side=[52, 60], frame_stride=2, num_workers=0, limit_val=None
    )
    p["model"]["base_width"] = 4
    p["test"].update(short_side=52, multi_crop_size=52, single_crop_size=48, batch_size=4, protocols=["1x1"])
    p["train"].update(
        epochs=1,
        batch_size=4,
        per_gpu_batch=4,
        lr=0.05,
        checkpoint_every_iters=100,
        val_every_epochs=100,
        seed=0,
    )
    config.validate(p)
    config.dump_params(p, out)
    return out


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny model trained for one epoch on 8 good and tiny videos (checkpoint for evaluate)."""
    base = tmp_path_factory.mktemp("train")
    root = base / "data"
    root.mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    (root / "videos").symlink_to(corpus / "videos")
    good = [
        "good.mp4",
        "tiny16x16.mp4",
        "tiny72x40.mp4",
        "odd17x9.mp4",
        "one_frame.mp4",
        "two_frames.mp4",
        "vp9.webm",
        "space and ünïcode clip.mp4",
    ]
    (root / "train.txt").write_text(
        "".join(f"videos/{n} {i}\n" for i, n in enumerate(good)), encoding="utf-8"
    )
    (root / "val.txt").write_text(
        "".join(f"videos/{n} {i}\n" for i, n in enumerate(good[:4])), encoding="utf-8"
    )
    params = _tiny_params(root, base / "params.yaml")
    r = _run(
        SMALLBIG
        + [
            "train",
            str(params),
            "--out",
            str(base / "run"),
            "--no-progress",
            "--no-mlflow",
            "--device",
            "cpu",
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = base / "run" / "checkpoint.pt"
    assert ckpt.exists()
    return {"base": base, "ckpt": ckpt}


def test_evaluate_with_a_fifo_and_a_tiny_video(corpus, trained, tmp_path):
    """No hang: the FIFO is a skipped sample named in the log and in metrics.json; the tiny and
    odd-sized videos are scored."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    (root / "videos").symlink_to(corpus / "videos")
    (root / "train.txt").write_text("videos/good.mp4 0\n")
    (root / "val.txt").write_text(
        "videos/fifo.mp4 0\nvideos/tiny16x16.mp4 1\nvideos/odd17x9.mp4 2\n"
        "videos/link_to_fifo.mp4 3\nvideos/good.mp4 4\n"
    )
    params = _tiny_params(root, tmp_path / "params.yaml")
    out = tmp_path / "eval"
    t0 = time.time()
    r = _run(
        SMALLBIG
        + [
            "evaluate",
            str(params),
            "--checkpoint",
            str(trained["ckpt"]),
            "--out",
            str(out),
            "--protocol",
            "1x1",
            "--no-progress",
            "--no-mlflow",
            "--device",
            "cpu",
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t0 < 240
    assert "(3 videos, 2 skipped)" in r.stdout, r.stdout
    assert "videos/fifo.mp4: unreadable: not a regular file: FIFO (named pipe)" in r.stderr, r.stderr[-3000:]
    assert "videos/link_to_fifo.mp4: unreadable: not a regular file: FIFO (named pipe)" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["skipped_ids"]) == ["fifo", "link_to_fifo"] and metrics["num_videos"] == 3


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_label_list_refused_by_train_and_evaluate(corpus, trained, tmp_path, command):
    """Label 99 of 8 classes on line 2: exit 2 with FILE:LINE: problem, no traceback, nothing run."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    (root / "videos").symlink_to(corpus / "videos")
    bad = "videos/good.mp4 0\nvideos/tiny16x16.mp4 99\nvideos/odd17x9.mp4 -3\n"
    (root / "train.txt").write_text(bad)
    (root / "val.txt").write_text(bad)
    params = _tiny_params(root, tmp_path / "params.yaml")
    out = tmp_path / "out"
    cmd = SMALLBIG + [
        command,
        str(params),
        "--out",
        str(out),
        "--no-progress",
        "--no-mlflow",
        "--device",
        "cpu",
    ]
    if command == "evaluate":
        cmd += ["--checkpoint", str(trained["ckpt"]), "--protocol", "1x1"]
    r = _run(cmd, timeout=180)
    split = "train" if command == "train" else "val"
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert f"{root / (split + '.txt')}:2: label 99 is out of range [0, 8)" in r.stderr, r.stderr
    assert f"{root / (split + '.txt')}:3: label -3 is negative" in r.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
