"""Frame extraction: videos -> JPEG folders `img_{:05d}.jpg` (from 1) at a given short side.

Each video is decoded with decord in worker processes, resized (short side, bilinear with
antialiasing, as PIL does) and written to `<out>/<video id>.tmp/`; the folder is renamed to
`<out>/<video id>/` only when complete, and a `.tmp` folder left by a job that died is removed
and redone, so a half-extracted video is never used. Already-extracted videos are kept.
Worker processes die with the job (Linux: a parent-death signal), so a job killed with SIGKILL
leaves no worker behind that would finish a video and rename its folder into place while a rerun
redoes it (tests/test_killed_jobs.py).

Also `resize_videos`: re-encode videos to a short side instead (ffmpeg from imageio-ffmpeg).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from smallbig.data.lists import Entry

log = logging.getLogger("smallbig.data")
TEMPLATE = "img_{:05d}.jpg"
CHUNK = 32


def _resize_size(h: int, w: int, short: int | None) -> tuple[int, int]:
    if not short or min(h, w) == short:
        return h, w
    if h <= w:
        return short, max(1, int(round(w * short / h)))
    return max(1, int(round(h * short / w))), short


def extract_one(
    video: str, out_dir: str, short_side: int | None, quality: int = 90, template: str = TEMPLATE
) -> tuple[str, int, str | None]:
    """Extract one video. Returns (out_dir, num_frames, error or None). Never raises."""
    import decord
    from PIL import Image

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if out.is_dir():
        n = len(list(out.glob("*.jpg")))
        if n:
            return str(out), n, None
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        vr = decord.VideoReader(str(video), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        if n < 1:
            raise RuntimeError("no frames")
        written = 0
        for s in range(0, n, CHUNK):
            batch = vr.get_batch(list(range(s, min(n, s + CHUNK)))).asnumpy()
            for f in batch:
                im = Image.fromarray(f)
                h, w = f.shape[:2]
                nh, nw = _resize_size(h, w, short_side)
                if (nh, nw) != (h, w):
                    im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
                written += 1
                im.save(tmp / template.format(written), quality=quality)
        tmp.replace(out)
        return str(out), written, None
    except Exception as e:  # noqa: BLE001 - reported per video, never crashes the run
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e).strip().splitlines()
        return str(out), 0, (msg[-1] if msg else type(e).__name__)[:300]


def _star(args):
    return extract_one(*args)


def _die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker as soon as the job that started it is gone.

    A pool worker outlives a parent killed with SIGKILL: it would go on decoding its video and
    rename the finished folder into place, racing a rerun that removes and redoes the same
    `.tmp` folder (frames from two writers in one folder, then taken as complete). On Linux the
    kernel sends the worker SIGKILL when its parent dies (PR_SET_PDEATHSIG); elsewhere a thread
    polls the parent pid. The pid check after arming covers a parent that died before that.
    (The signal follows the thread that started the worker: the pool starts its workers from
    the calling thread, replacements from its own handler thread, both alive while it is.)"""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:

        def watch():
            while os.getppid() == parent:
                time.sleep(0.05)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def extract_frames(
    root: Path,
    entries: list[Entry],
    out_rel: str,
    short_side: int | None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[Entry], list[dict]]:
    """Extract every video of `entries` (paths relative to `root`) into `root/out_rel/<id>/`.

    Returns (frame entries `frame_dir num_frames label`, one per video, 0 frames where the
    extraction failed; failures [{path (the frame folder), reason}])."""
    from tqdm import tqdm

    outdir = root / out_rel
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / e.path), str(outdir / e.video_id), short_side) for e in entries]
    workers = workers or min(8, os.cpu_count() or 1)
    results = []
    if workers <= 1 or len(jobs) < 4:
        it = map(_star, jobs)
        results = list(
            tqdm(it, total=len(jobs), desc=f"frames {out_rel}", unit="video", disable=not progress)
        )
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(
            workers, initializer=_die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            results = list(
                tqdm(
                    pool.imap(_star, jobs, chunksize=4),
                    total=len(jobs),
                    desc=f"frames {out_rel}",
                    unit="video",
                    disable=not progress,
                )
            )
    out, failed = [], []
    for e, (_folder, n, err) in zip(entries, results):
        rel = f"{out_rel}/{e.video_id}"
        if err or n == 0:
            # kept in the list with 0 frames (never a silent drop); the reason goes to the report
            failed.append({"path": rel, "reason": f"frame extraction failed from {e.path}: {err}"})
            log.warning("%s: frame extraction failed: %s", e.path, err)
            n = 0
        out.append(Entry(rel, e.label, n))
    return out, failed


def resize_videos(
    root: Path, entries: list[Entry], out_rel: str, short_side: int, progress: bool = True
) -> tuple[list[Entry], list[dict]]:
    """Re-encode videos to `short_side` (h264, ffmpeg) into `root/out_rel/` (idempotent)."""
    import imageio_ffmpeg
    from tqdm import tqdm

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    outdir = root / out_rel
    outdir.mkdir(parents=True, exist_ok=True)
    out, failed = [], []
    for e in tqdm(entries, desc=f"resize {out_rel}", unit="video", disable=not progress):
        target = outdir / (e.video_id + ".mp4")
        if not target.exists():
            tmp = target.with_name(target.stem + ".tmp.mp4")
            scale = f"scale='if(lt(iw,ih),{short_side},-2)':'if(lt(iw,ih),-2,{short_side})'"
            cmd = [
                ffmpeg,
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(root / e.path),
                "-vf",
                scale,
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                "20",
                "-an",
                str(tmp),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                failed.append({"path": e.path, "reason": f"re-encoding failed: {r.stderr.strip()[-300:]}"})
                continue
            tmp.replace(target)
        out.append(Entry(f"{out_rel}/{target.name}", e.label, None))
    return out, failed
