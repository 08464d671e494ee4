"""Cluster faults: a job killed mid-work and rerun (issue 11).

Each test runs the real command as a subprocess in its own session, waits until it is
genuinely mid-work (output partly written), kills it at a seeded random point, reruns it to
completion and compares the result with an uninterrupted run, file by file:

* `smallbig data frames` SIGKILLed three times while writing JPEG folders (the main process
  alone, as `kill -9 PID` does, and the whole session, as Slurm does);
* `smallbig data prepare` over HTTP SIGKILLed mid-download and again mid-extraction of the
  same tarball;
* `dvc push` to a local remote SIGKILLed and SIGINTed mid-transfer, then `git clone` +
  `dvc pull` elsewhere.

The measured numbers (where each kill landed, rerun times) are printed (`pytest -s`).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from http_mirror import serve

from smallbig.data.toy import make_toy

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SEED = 11
SMALL = {"train": 2, "val": 1, "test": 1, "ss_train": 2, "ss_val": 1}


# --------------------------------------------------------------------------- helpers
def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid` (the job and any child it left behind)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(d.name))
    return pids


def _start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _kill_when(
    proc: subprocess.Popen, ready, sig=signal.SIGKILL, group=True, timeout=120.0, snapshot=None
) -> float:
    """Poll `ready()` until true, then send `sig` (to the whole session, or the main process
    alone); wait for the process to end and for every process of its session to be gone.
    `snapshot()`, if given, is taken as soon as the main process has ended and must be the
    same once the session is gone (nothing goes on writing after the job died). Returns the
    seconds from the start to the kill."""
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() - t0 < timeout, "the kill point was never reached"
        time.sleep(0.003)
    at = time.monotonic() - t0
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    proc.wait(timeout=60)
    first = snapshot() if snapshot else None
    deadline = time.monotonic() + 5
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    left = _session(proc.pid)
    if left:  # never leave processes behind, even when failing
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} of the killed job are still running"
    if snapshot:
        time.sleep(0.3)
        assert snapshot() == first, "the output changed after the job was killed"
    return at


def _finish(cmd: list[str], log: Path, timeout: float = 300, **kw) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    with open(log, "a") as f:
        f.write(r.stdout + r.stderr)
    assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return time.monotonic() - t0, r.stdout + r.stderr


def _tree(root: Path, skip=()) -> dict[str, str]:
    """{relative path: SHA-256} of every file under root (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _count(d: Path, pattern=None) -> int:
    try:
        return sum(1 for e in os.scandir(d) if pattern is None or pattern(e.name))
    except OSError:
        return 0


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy(out, seed=0, datasets=("kinetics400",), per_class=SMALL, progress=False)
    return out / "kinetics400"


# --------------------------------------------------------------------------- frame extraction
def _jpgs(out: Path) -> tuple[int, int]:
    """(JPEGs under out, JPEGs in unfinished `.tmp` folders)."""
    n = tmp = 0
    try:
        dirs = list(os.scandir(out))
    except OSError:
        return 0, 0
    for d in dirs:
        k = _count(Path(d.path), lambda s: s.endswith(".jpg"))
        n += k
        if d.name.endswith(".tmp"):
            tmp += k
    return n, tmp


def test_frame_extraction_killed_and_rerun_equals_an_uninterrupted_one(toy, tmp_path):
    from smallbig.data.prepare import prepare

    root = tmp_path / "k400"
    data = {
        "dataset": "kinetics400",
        "root": str(root),
        "format": "video",
        "source": {"base_url": str(toy), "checksums": "SHA256SUMS"},
    }
    prepare({"data": data}, progress=False, workers=1)
    listing = root / "all.txt"
    listing.write_text((root / "train.txt").read_text() + (root / "val.txt").read_text())
    n_videos = len(listing.read_text().splitlines())

    def cmd(subdir):  # upscaled to short side 256: a few seconds of work on 2 cores
        return [
            PY,
            "-m",
            "smallbig",
            "data",
            "frames",
            "--list",
            str(listing),
            "--root",
            str(root),
            "--out-list",
            str(root / f"{subdir}.txt"),
            "--subdir",
            subdir,
            "--short-side",
            "256",
            "--workers",
            "2",
            "--quiet",
        ]

    log = tmp_path / "frames.log"
    ref_s, _ = _finish(cmd("ref"), log)
    ref = _tree(root / "ref")
    total = sum(1 for k in ref if k.endswith(".jpg"))
    assert sum(1 for v in ref.values() if v == "dir") == n_videos and total > 20 * n_videos

    out = root / "killed"
    rng = random.Random(SEED)
    fractions = sorted(rng.uniform(0.15, 0.8) for _ in range(3))
    report = []
    for i, (frac, group) in enumerate(zip(fractions, (False, True, False))):

        def ready(frac=frac):
            n, partial = _jpgs(out)
            return n >= frac * total and partial > 0

        t = _kill_when(_start(cmd("killed"), log), ready, group=group, snapshot=lambda: _tree(out))
        state = _tree(out)
        done = {k: v for k, v in state.items() if k.split("/")[0] in ref}
        partial = sorted({k.split("/")[0] for k in state if k.split("/")[0].endswith(".tmp")})
        in_partial = sum(1 for k in state if k.split("/")[0].endswith(".tmp") and k.endswith(".jpg"))
        # genuinely mid-write: a half-written folder is there, under its temporary name only
        assert partial and in_partial > 0
        for p in partial:
            assert p[:-4] not in state
        # every folder under a final name is complete and exactly the uninterrupted result
        assert all(ref[k] == v for k, v in done.items())
        assert {k.split("/")[0] for k in done} <= set(ref)
        for f in {k.split("/")[0] for k in done}:  # ... with all its frames
            assert {k for k in done if k.startswith(f + "/")} == {k for k in ref if k.startswith(f + "/")}, f
        assert not (root / "killed.txt").exists()  # the list is written only by a finished run
        report.append(
            {
                "kill": i + 1,
                "whole_session": group,
                "after_s": round(t, 2),
                "target": round(frac, 3),
                "jpgs_done": len(done) - sum(v == "dir" for v in done.values()),
                "folders_done": sum(v == "dir" for v in done.values()),
                "partial_folders": len(partial),
                "jpgs_in_partial": in_partial,
            }
        )
    kept = {
        p: p.stat().st_mtime_ns for p in out.glob("*/img_00001.jpg") if not p.parent.name.endswith(".tmp")
    }
    rerun_s, text = _finish(cmd("killed"), log)
    assert f"{n_videos} videos extracted, 0 failed" in text
    assert _tree(out) == ref  # byte-identical JPEGs, same folders, nothing half-written left
    assert (root / "killed.txt").read_text() == (root / "ref.txt").read_text().replace("ref/", "killed/")
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished folders were kept
    print(
        json.dumps(
            {
                "frames": {
                    "videos": n_videos,
                    "jpgs": total,
                    "uninterrupted_s": round(ref_s, 2),
                    "kills": report,
                    "rerun_s": round(rerun_s, 2),
                }
            },
            indent=1,
        )
    )


# --------------------------------------------------------------------------- download + extraction
class _Slow:
    """A socket writer that sends at most `rate` bytes per second (counted in `handler.sent`)."""

    def __init__(self, w, handler):
        self.w, self.handler = w, handler

    def write(self, b) -> int:
        mv = memoryview(b)
        for i in range(0, len(mv), 16384):
            self.w.write(mv[i : i + 16384])
            self.handler.sent += min(16384, len(mv) - i)
            time.sleep(min(16384, len(mv) - i) / self.handler.rate)
        return len(mv)

    def __getattr__(self, name):
        return getattr(self.w, name)


def _throttled_setup(self):
    http.server.BaseHTTPRequestHandler.setup(self)
    if type(self).rate:
        self.wfile = _Slow(self.wfile, type(self))


def _quiet_handle(self):
    try:
        http.server.BaseHTTPRequestHandler.handle(self)
    except ConnectionError:  # the client was killed mid-response: expected here
        pass


FILLERS = 1500  # 8 KiB files of random bytes added to a tarball: ~12 MB, a second to extract


@pytest.fixture(scope="module")
def big_mirror(toy, tmp_path_factory):
    """The toy Kinetics mirror with train/part_0.tar.gz grown to ~12 MB (the videos plus
    FILLERS files that stay in the extracted tree) and SHA256SUMS updated."""
    m = tmp_path_factory.mktemp("mirror") / "kinetics400"
    shutil.copytree(toy, m)
    tgz = m / "train/part_0.tar.gz"
    rng = np.random.default_rng(SEED)
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tgz.read_bytes()), mode="r:gz") as src,
        tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as dst,
    ):
        for member in src:
            dst.addfile(member, src.extractfile(member))
        for i in range(FILLERS):
            blob = rng.bytes(8192)
            info = tarfile.TarInfo(f"filler/{i:05d}.bin")
            info.size, info.mtime = len(blob), 0
            dst.addfile(info, io.BytesIO(blob))
    tgz.write_bytes(buf.getvalue())
    sums = m / "SHA256SUMS"
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    sums.write_text(re.sub(r"^\w+(  train/part_0\.tar\.gz)$", digest + r"\1", sums.read_text(), flags=re.M))
    assert digest in sums.read_text()
    return m


def test_download_and_extraction_killed_and_rerun(big_mirror, tmp_path):
    size = (big_mirror / "train/part_0.tar.gz").stat().st_size
    rng = random.Random(SEED + 1)
    log = tmp_path / "prepare.log"
    with serve(big_mirror, log_head=False) as (url, h):
        h.setup, h.handle, h.rate, h.sent = _throttled_setup, _quiet_handle, None, 0

        def cmd(name):
            p = tmp_path / f"{name}.yaml"
            p.write_text(
                json.dumps(
                    {  # JSON is YAML
                        "extends": str(REPO / "params/experiments/k400-r23-c2d.yaml"),
                        "data": {
                            "root": str(tmp_path / name),
                            "format": "video",
                            "source": {"base_url": url, "checksums": "SHA256SUMS"},
                        },
                    }
                )
            )
            return [PY, "-m", "smallbig", "data", "prepare", str(p), "--quiet", "--workers", "1"]

        ref_s, _ = _finish(cmd("ref"), log)
        ref = _tree(tmp_path / "ref")
        assert f"raw/extract/train/tree-part_0.tar.gz/filler/{FILLERS - 1:05d}.bin" in ref

        root = tmp_path / "killed"
        part = root / "raw/train/part_0.tar.gz.part"
        final = root / "raw/train/part_0.tar.gz"
        h.rate = size / 2.0  # the tarball takes ~2 s to download
        # 1. SIGKILL mid-download (the server has sent a seeded random share of the tarball)
        frac = rng.uniform(0.2, 0.7)
        h.sent = 0
        t1 = _kill_when(_start(cmd("killed"), log), lambda: h.sent >= frac * size)
        assert not final.exists(), "a partial download under the final name"
        have = part.stat().st_size if part.exists() else 0
        assert 0 < have < size  # the partial data is kept (under the .part name) to resume from
        # 2. rerun, SIGKILL mid-extraction of that tarball (after its download is complete)
        work = root / "raw/extract/train"
        fillers = work / ".tmp-part_0.tar.gz/filler"
        k = rng.randint(FILLERS // 5, FILLERS * 7 // 10)
        h.log.clear()
        t2 = _kill_when(_start(cmd("killed"), log), lambda: _count(fillers) >= k)
        assert ("train/part_0.tar.gz", f"bytes={have}-") in h.log  # resumed, not restarted
        assert ("train/part_0.tar.gz", None) not in h.log
        assert (
            not part.exists()
            and hashlib.sha256(final.read_bytes()).hexdigest() == ref["raw/train/part_0.tar.gz"]
        )
        extracted = _count(fillers)
        assert k <= extracted < FILLERS  # genuinely mid-extraction
        assert not (work / ".extracted-part_0.tar.gz").exists() and not (work / "tree-part_0.tar.gz").exists()
        assert not (root / "manifest.json").exists()
        # 3. rerun to completion
        h.log.clear()
        rerun_s, _ = _finish(cmd("killed"), log)
        assert ("train/part_0.tar.gz", None) not in h.log and all(
            r != "train/part_0.tar.gz" for r, _ in h.log
        )  # the verified download was kept
    got = _tree(root)
    assert got == ref  # same files, same bytes: no .part, no .tmp-*, nothing half-extracted
    print(
        json.dumps(
            {
                "download": {
                    "tarball_bytes": size,
                    "uninterrupted_s": round(ref_s, 2),
                    "kill1_after_s": round(t1, 2),
                    "kill1_part_bytes": have,
                    "kill1_fraction": round(have / size, 3),
                    "kill2_after_s": round(t2, 2),
                    "kill2_files_extracted": extracted,
                    "kill2_of": FILLERS,
                    "rerun_s": round(rerun_s, 2),
                }
            },
            indent=1,
        )
    )


# --------------------------------------------------------------------------- dvc push
DVC = str(Path(PY).with_name("dvc"))
N_DVC = 3000
HEX = re.compile(r"[0-9a-f]{30}(\.dir)?")


def _objects(remote: Path) -> dict[str, Path]:
    out = {}
    base = remote / "files/md5"
    try:
        subs = list(os.scandir(base))
    except OSError:
        return out
    for d in subs:
        try:
            for e in os.scandir(d.path):
                if HEX.fullmatch(e.name):
                    out[d.name + e.name] = Path(e.path)
        except OSError:
            pass
    return out


def _check_remote(remote: Path) -> None:
    """Every object under its final name holds exactly the content its name (MD5) says."""
    for name, p in _objects(remote).items():
        assert hashlib.md5(p.read_bytes()).hexdigest() == name.removesuffix(".dir"), p


def test_dvc_push_interrupted_and_rerun(tmp_path):
    env = dict(
        os.environ,
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(tmp_path / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(tmp_path / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
        GIT_CONFIG_NOSYSTEM="1",
    )
    repo, remote, log = tmp_path / "repo", tmp_path / "remote", tmp_path / "dvc.log"
    repo.mkdir()

    def run(*cmd, cwd=repo, timeout=300):
        return _finish(list(cmd), log, timeout=timeout, cwd=cwd, env=env)[1]

    run("git", "init", "-q")
    run(DVC, "init", "-q")
    run(DVC, "config", "core.analytics", "false")
    run(DVC, "remote", "add", "-d", "store", str(remote))
    rng = np.random.default_rng(SEED)
    for i in range(N_DVC):  # ~24 MB in 3000 files
        d = repo / "data" / f"d{i % 30:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(rng.bytes(8192))
    run(DVC, "add", "-q", "data")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "data")
    total = N_DVC + 1  # the files and the directory's .dir object
    push = [DVC, "push", "-j", "2"]
    r = random.Random(SEED + 2)
    kills = []
    for sig in (signal.SIGKILL, signal.SIGINT):
        before = len(_objects(remote))
        # early (10-30 % of what is left): on SIGINT DVC drains the transfers already queued
        target = before + r.uniform(0.1, 0.3) * (total - before)
        proc = _start(push, log, cwd=repo, env=env)
        t = _kill_when(proc, lambda target=target: len(_objects(remote)) >= target, sig=sig)
        got = len(_objects(remote))
        assert before < got < total, (before, got, total)  # interrupted mid-transfer
        assert proc.returncode != 0
        _check_remote(remote)
        kills.append(
            {
                "signal": sig.name,
                "after_s": round(t, 2),
                "rc": proc.returncode,
                "objects_before": before,
                "objects_at_end": got,
                "of": total,
            }
        )
    status = json.loads(run(DVC, "status", "-c", "--json").strip().splitlines()[-1])
    assert status, "dvc status -c must report the objects the interrupted pushes did not send"
    t0 = time.monotonic()
    out = run(*push)
    rerun_s = time.monotonic() - t0
    pushed = int(re.search(r"(\d+) files? pushed", out).group(1))
    assert pushed == total - kills[-1]["objects_at_end"]  # only what was missing was sent
    assert json.loads(run(DVC, "status", "-c", "--json").strip().splitlines()[-1]) == {}
    assert len(_objects(remote)) == total
    _check_remote(remote)
    leftovers = [p for p in remote.rglob("*") if p.is_file() and not HEX.fullmatch(p.name)]
    # a fresh clone elsewhere gets exactly the data
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    run(DVC, "pull", "-q", cwd=clone)
    assert _tree(clone / "data") == _tree(repo / "data")
    assert sum(1 for p in (clone / "data").rglob("*.bin")) == N_DVC
    print(
        json.dumps(
            {
                "dvc_push": {
                    "objects": total,
                    "kills": kills,
                    "rerun_pushed": pushed,
                    "rerun_s": round(rerun_s, 2),
                    "temp_files_left_in_remote": len(leftovers),
                }
            },
            indent=1,
        )
    )
