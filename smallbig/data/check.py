"""`smallbig data check`: open every video of a list and name each bad one with its reason.

Report (JSON): {"ok": N, "bad": [{"path": <as in the list>, "reason": ...}]}, plus
"list_problems": ["FILE:LINE: problem", ...] when lines of the list itself are invalid (see
smallbig/data/lists.py; those lines are not checked further). Reasons start with one of:
"missing", "unreadable" (includes FIFOs, sockets, devices, directories: refused by stat, never
opened), "zero bytes", "not a video", "no video stream", "truncated", "frame size" (declared
size beyond MAX_FRAME_PIXELS), "codec X: not supported by this decord build", "too few frames
for the sampler", "decoder crashed", "decoder hung", "cannot be opened by decord",
"frame folder" (frame lists).

Decoding runs in worker subprocesses (`python -m smallbig.data.check --worker`): decord can
crash the process on some corrupt inputs, and a decoder can stall. Each file gets a deadline
(`--file-timeout`, else $SMALLBIG_CHECK_FILE_TIMEOUT, else FILE_TIMEOUT_S seconds), counted
from the request, once the worker has started and imported its decoders. A worker that
crashes or misses the deadline is killed, that file reported, and a fresh worker checks the
rest. The caller never crashes or hangs on a bad file. Frame folders (JPEG) are read in this
process with PIL after the same stat check (a JPEG decode is bounded by its size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from smallbig.data.lists import Entry, label_bounds, scan_list
from smallbig.data.readers import DecordVideo, VideoError, file_problem, magic, short_error, stream_info
from smallbig.errors import InputError, RunError
from smallbig.fsutil import atomic_write_json

FILE_TIMEOUT_S = 300.0  # per file, default
STARTUP_TIMEOUT_S = 300.0  # a worker's start (imports av and decord) on a loaded machine
TIMEOUT_ENV = "SMALLBIG_CHECK_FILE_TIMEOUT"


def resolve_file_timeout(value: float | None = None) -> float:
    """The per-file deadline: `value`, else $SMALLBIG_CHECK_FILE_TIMEOUT, else FILE_TIMEOUT_S."""
    if value is None:
        env = os.environ.get(TIMEOUT_ENV, "").strip()
        if env:
            try:
                value = float(env)
            except ValueError:
                raise ValueError(f"${TIMEOUT_ENV}={env!r}: expected seconds (a positive number)") from None
        else:
            value = FILE_TIMEOUT_S
    if not value > 0:
        raise ValueError(f"file timeout must be a positive number of seconds, got {value}")
    return float(value)


# --------------------------------------------------------------------------- probing (worker side)
_msg = short_error
_magic = magic


def _count_decodable(path: str) -> tuple[int, int, str | None]:
    """(declared frames, frames PyAV could decode, error) for the first video stream."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        declared = int(s.frames or 0)
        k, err = 0, None
        try:
            for _ in c.decode(s):
                k += 1
        except Exception as e:  # noqa: BLE001
            err = _msg(e)
    return declared, k, err


def _truncated(reason: str) -> str:
    return reason if reason.startswith("truncated") else f"truncated: {reason}"


def probe(path: str, decode_all: bool = False, min_frames: int | None = None) -> dict:
    """Check one video file. Returns {"reason": None or str, "frames": n}."""
    reason = file_problem(path)
    if reason:
        return {"reason": reason, "frames": 0}
    try:
        info = stream_info(path)
    except VideoError as e:
        return {"reason": e.reason, "frames": 0}
    try:
        reader = DecordVideo(path, info)
    except VideoError as e:
        if e.reason.startswith("cannot be opened by decord"):
            declared, k, err = _count_decodable(path)
            if err is not None or (declared and k < declared):
                return {
                    "reason": f"truncated: {k} of {declared} frames decodable ({err or 'stream ends early'})",
                    "frames": k,
                }
        return {"reason": e.reason, "frames": 0}
    n = len(reader)
    if min_frames and n < min_frames:
        return {"reason": f"too few frames for the sampler: {n} < {min_frames}", "frames": n}
    if decode_all:
        for s in range(0, n, 64):
            idx = list(range(s, min(n, s + 64)))
            try:
                reader.get(idx)
            except VideoError as e:
                return {
                    "reason": f"truncated: decoding failed in frames {idx[0]}..{idx[-1]} of {n} "
                    f"({e.reason.removeprefix('truncated: ')})",
                    "frames": n,
                }
        declared, k, err = _count_decodable(path)
        if err is not None or k < n:
            return {
                "reason": f"truncated: {k} of {n} frames decodable ({err or 'stream ends early'})",
                "frames": k,
            }
    else:
        try:
            reader.get([0, n - 1])
        except VideoError as e:
            return {
                "reason": f"truncated: cannot decode the last frame {n - 1} "
                f"({e.reason.removeprefix('truncated: ')})",
                "frames": n,
            }
    return {"reason": None, "frames": n}


class CheckError(RunError):
    """The check itself cannot run (its decoder workers do not start): the environment, not
    the data. Exit 1, printed as `smallbig data ...: cannot run: ...`."""

    label = "cannot run"


class CheckInputError(InputError):
    """`smallbig data check` cannot run on these arguments (a missing root, an unreadable list,
    a report that cannot be written). Exit 2."""

    label = "cannot run"


def _worker_main() -> None:
    """Read JSON requests from stdin, write one JSON result per line to stdout. The first line
    written, once the decoders are imported, is {"ready": true}."""
    import logging

    logging.disable(logging.CRITICAL)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    import av  # noqa: F401  (imported before "ready": the per-file deadline excludes start-up)
    import decord  # noqa: F401

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
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
    """Reasons found without decoding (stat only; nothing but a regular file is opened):
    missing, unreadable (special files, directories, permissions), zero bytes."""
    return file_problem(path)


WORKER_CMD = [sys.executable, "-m", "smallbig.data.check", "--worker"]


class _Worker:
    def __init__(self, timeout: float = FILE_TIMEOUT_S):
        self.proc = None
        self.timeout = timeout

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            list(WORKER_CMD),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = _readline_timeout(self.proc, STARTUP_TIMEOUT_S)
        try:
            ready = json.loads(line).get("ready") if line else False
        except ValueError:
            ready = False
        if not ready:
            self._kill()
            raise CheckError(
                f"the decoder worker ({' '.join(WORKER_CMD)}) did not start within "
                f"{STARTUP_TIMEOUT_S:g} s (got {(line or '').strip()[:200]!r}); is PyAV/decord installed?"
            )

    def _kill(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self.proc = None
        return code

    def ask(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        timed_out = False
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = _readline_timeout(self.proc, self.timeout)
            # None = no answer in time (hung); "" = the pipe closed (the worker died, perhaps
            # not reaped yet, so poll() cannot tell the two apart)
            timed_out = line is None
            line = line or ""
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            try:
                return json.loads(line)
            except ValueError:
                self._kill()
                return {
                    "reason": f"cannot be checked: the decoder worker wrote {line.strip()[:200]!r}",
                    "frames": 0,
                }
        # the worker died (or hung) on this file: kill it; the next file gets a fresh one
        code = self._kill()
        if timed_out:
            return {
                "reason": f"decoder hung: no result within {self.timeout:g} s (the file timeout); "
                "worker killed",
                "frames": 0,
            }
        if code is not None and code < 0:
            return {"reason": f"decoder crashed (signal {-code}) on this file", "frames": 0}
        return {"reason": f"decoder crashed (exit code {code}) on this file", "frames": 0}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _readline_timeout(proc, timeout: float) -> str | None:
    """The next line; "" at end of output (the worker died); None when `timeout` passed first."""
    result = []
    t = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def check_frames_entry(
    root: Path, e: Entry, template: str, decode_all: bool, min_frames: int | None
) -> str | None:
    from PIL import Image

    folder = root / e.path
    reason = file_problem(folder)
    if reason and reason.startswith("missing"):
        return reason
    if not (reason or "").startswith("unreadable: is a directory"):  # a folder is what we want here
        return "frame folder: not a directory" + (f" ({reason})" if reason else "")
    if min_frames and e.num_frames < min_frames:
        return f"too few frames for the sampler: {e.num_frames} < {min_frames}"
    idx = range(1, e.num_frames + 1) if decode_all else sorted({1, e.num_frames})
    for i in idx:
        p = folder / template.format(i)
        why = file_problem(p)
        if why == "missing":
            return f"frame folder: {p.name} missing ({e.num_frames} frames listed)"
        if why == "zero bytes":
            return f"frame folder: {p.name} is zero bytes"
        if why:
            return f"frame folder: {p.name}: {why}"
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as ex:  # noqa: BLE001
            return f"frame folder: {p.name} is not a readable JPEG ({_msg(ex)})"
    return None


def check_entries(
    root: Path,
    entries: list[Entry],
    decode_all: bool = False,
    min_frames: int | None = None,
    workers: int | None = None,
    frame_template: str = "img_{:05d}.jpg",
    progress: bool = True,
    file_timeout: float | None = None,
) -> dict:
    """Check entries (videos or frame folders); return the report dict. Each video is decoded in a
    worker process under the per-file deadline `file_timeout` (seconds; see `resolve_file_timeout`)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    timeout = resolve_file_timeout(file_timeout)
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
    pool = [_Worker(timeout) for _ in range(workers)]
    free = list(pool)
    lock = threading.Lock()

    def run(i: int):
        with lock:
            w = free.pop()
        try:
            res = w.ask(
                {"path": str(root / entries[i].path), "decode_all": decode_all, "min_frames": min_frames}
            )
        finally:
            with lock:
                free.append(w)
        return i, res["reason"]

    try:
        with (
            ThreadPoolExecutor(workers) as ex,
            tqdm(
                total=len(entries), initial=len(results), desc="check", unit="video", disable=not progress
            ) as bar,
        ):
            for i, reason in ex.map(run, video_jobs):
                results[i] = reason
                bar.update(1)
    finally:
        for w in pool:
            w.close()
    bad = [{"path": entries[i].path, "reason": results[i]} for i in range(len(entries)) if results[i]]
    return {"ok": len(entries) - len(bad), "bad": bad}


def check_list(
    list_path: Path,
    root: Path,
    out: Path | None = None,
    decode_all: bool = False,
    min_frames: int | None = None,
    workers: int | None = None,
    frame_template: str = "img_{:05d}.jpg",
    progress: bool = True,
    num_classes=None,
    file_timeout: float | None = None,
) -> dict:
    """Check a list and its videos. Labels are checked against ROOT/classes.json (if present) and
    `num_classes`; invalid lines go to report["list_problems"] (as `FILE:LINE: problem`)."""
    bounds = label_bounds(root) + ([] if num_classes is None else [num_classes])
    entries, problems = scan_list(list_path, None, bounds)
    report = check_entries(
        root, entries, decode_all, min_frames, workers, frame_template, progress, file_timeout
    )
    if problems:
        report["list_problems"] = problems
    if out is not None:
        write_json(out, report)
    return report


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        print("internal: use `smallbig data check`", file=sys.stderr)
        sys.exit(2)
