"""`smallbig data check`: open every video of a list and name each bad one with its reason.

Report (JSON): {"ok": N, "bad": [{"path": <as in the list>, "reason": ...}]}. Reasons start
with one of: "missing", "unreadable", "zero bytes", "not a video", "no video stream",
"truncated", "too few frames for the sampler", "decoder crashed", "cannot be opened by decord",
"frame folder" (frame lists).

Decoding runs in worker subprocesses (`python -m smallbig.data.check --worker`): decord can
crash the process on some corrupt inputs; a crash is reported as the reason for that file and
the worker is restarted. The caller never crashes on a bad file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from smallbig.data.lists import Entry, read_list

FILE_TIMEOUT_S = 300


# --------------------------------------------------------------------------- probing (worker side)
def _msg(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return text[:240]


def _magic(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3"):
        return "mp3"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


def _count_decodable(path: str) -> tuple[int, int, str | None]:
    """(declared frames, frames PyAV could decode, error) for the first video stream."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        declared = int(s.frames or 0)
        k, err = 0, None
        try:
            for _ in c.decode(s):
                k += 1
        except Exception as e:  # noqa: BLE001
            err = _msg(e)
    return declared, k, err


def probe(path: str, decode_all: bool = False, min_frames: int | None = None) -> dict:
    """Check one video file. Returns {"reason": None or str, "frames": n}."""
    import av
    import decord

    try:
        with av.open(path) as c:
            nvideo, naudio = len(c.streams.video), len(c.streams.audio)
    except Exception as e:  # noqa: BLE001
        kind = _magic(path)
        if kind in ("mp4", "webm"):
            return {"reason": f"truncated ({kind} container damaged: {_msg(e)})", "frames": 0}
        return {"reason": f"not a video ({kind} content: {_msg(e)})", "frames": 0}
    if nvideo == 0:
        what = "audio only" if naudio else "no streams"
        return {"reason": f"no video stream ({what})", "frames": 0}
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
    except Exception as e:  # noqa: BLE001
        declared, k, err = _count_decodable(path)
        if err is not None or (declared and k < declared):
            return {"reason": f"truncated: {k} of {declared} frames decodable ({err or 'stream ends early'})",
                    "frames": k}
        return {"reason": f"cannot be opened by decord: {_msg(e)}", "frames": 0}
    if n < 1:
        return {"reason": "too few frames for the sampler: the video has no frames", "frames": 0}
    if min_frames and n < min_frames:
        return {"reason": f"too few frames for the sampler: {n} < {min_frames}", "frames": n}
    try:
        if decode_all:
            for s in range(0, n, 64):
                idx = list(range(s, min(n, s + 64)))
                try:
                    vr.get_batch(idx).asnumpy()
                except Exception as e:  # noqa: BLE001
                    return {"reason": f"truncated: decoding failed in frames {idx[0]}..{idx[-1]} of {n} "
                                      f"({_msg(e)})", "frames": n}
            declared, k, err = _count_decodable(path)
            if err is not None or k < n:
                return {"reason": f"truncated: {k} of {n} frames decodable ({err or 'stream ends early'})",
                        "frames": k}
        else:
            vr.get_batch([0, n - 1]).asnumpy()
    except Exception as e:  # noqa: BLE001
        return {"reason": f"truncated: cannot decode the last frame {n - 1} ({_msg(e)})", "frames": n}
    return {"reason": None, "frames": n}


def _worker_main() -> None:
    """Read JSON requests from stdin, write one JSON result per line to stdout."""
    import logging

    logging.disable(logging.CRITICAL)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = probe(req["path"], req.get("decode_all", False), req.get("min_frames"))
        except Exception as e:  # noqa: BLE001
            res = {"reason": f"cannot be checked: {_msg(e)}", "frames": 0}
        out.write(json.dumps(res) + "\n")
        out.flush()


# --------------------------------------------------------------------------- parent side
def precheck(path: Path) -> str | None:
    """Reasons found without decoding: missing, unreadable, zero bytes."""
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "unreadable: is a directory, not a file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if path.stat().st_size == 0:
        return "zero bytes"
    return None


WORKER_CMD = [sys.executable, "-m", "smallbig.data.check", "--worker"]


class _Worker:
    def __init__(self):
        self.proc = None

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(list(WORKER_CMD),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)

    def ask(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = _readline_timeout(self.proc, FILE_TIMEOUT_S)
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)
        # the worker died (or hung) on this file
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self.proc = None
        if code is not None and code < 0:
            return {"reason": f"decoder crashed (signal {-code}) on this file", "frames": 0}
        return {"reason": f"decoder crashed or hung (exit code {code}) on this file", "frames": 0}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _readline_timeout(proc, timeout: float) -> str:
    result = []
    t = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else ""


def check_frames_entry(root: Path, e: Entry, template: str, decode_all: bool, min_frames: int | None) -> str | None:
    from PIL import Image

    folder = root / e.path
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "frame folder: not a directory"
    if min_frames and e.num_frames < min_frames:
        return f"too few frames for the sampler: {e.num_frames} < {min_frames}"
    idx = range(1, e.num_frames + 1) if decode_all else sorted({1, e.num_frames})
    for i in idx:
        p = folder / template.format(i)
        if not p.is_file():
            return f"frame folder: {p.name} missing ({e.num_frames} frames listed)"
        if p.stat().st_size == 0:
            return f"frame folder: {p.name} is zero bytes"
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as ex:  # noqa: BLE001
            return f"frame folder: {p.name} is not a readable JPEG ({_msg(ex)})"
    return None


def check_entries(root: Path, entries: list[Entry], decode_all: bool = False, min_frames: int | None = None,
                  workers: int | None = None, frame_template: str = "img_{:05d}.jpg",
                  progress: bool = True) -> dict:
    """Check entries (videos or frame folders); return the report dict."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    root = Path(root)
    results: dict[int, str | None] = {}
    video_jobs = []
    for i, e in enumerate(entries):
        if e.is_frames:
            results[i] = check_frames_entry(root, e, frame_template, decode_all, min_frames)
        else:
            reason = precheck(root / e.path)
            if reason:
                results[i] = reason
            else:
                video_jobs.append(i)
    workers = max(1, min(workers or os.cpu_count() or 1, len(video_jobs) or 1, 16))
    pool = [_Worker() for _ in range(workers)]
    free = list(pool)
    lock = threading.Lock()

    def run(i: int):
        with lock:
            w = free.pop()
        try:
            res = w.ask({"path": str(root / entries[i].path), "decode_all": decode_all, "min_frames": min_frames})
        finally:
            with lock:
                free.append(w)
        return i, res["reason"]

    try:
        with ThreadPoolExecutor(workers) as ex, tqdm(total=len(entries), initial=len(results),
                                                        desc="check", unit="video", disable=not progress) as bar:
            for i, reason in ex.map(run, video_jobs):
                results[i] = reason
                bar.update(1)
    finally:
        for w in pool:
            w.close()
    bad = [{"path": entries[i].path, "reason": results[i]} for i in range(len(entries)) if results[i]]
    return {"ok": len(entries) - len(bad), "bad": bad}


def check_list(list_path: Path, root: Path, out: Path | None = None, decode_all: bool = False,
               min_frames: int | None = None, workers: int | None = None,
               frame_template: str = "img_{:05d}.jpg", progress: bool = True) -> dict:
    entries = read_list(list_path)
    report = check_entries(root, entries, decode_all, min_frames, workers, frame_template, progress)
    if out is not None:
        write_json(out, report)
    return report


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        print("internal: use `smallbig data check`", file=sys.stderr)
        sys.exit(2)
