"""Reading frames: videos through decord, or JPEG frame folders. One small interface:

    reader = open_video(path) / open_frames(folder, num_frames, template)
    len(reader)               number of frames
    reader.get(indices)       uint8 numpy [len(indices), H, W, 3]

Any failure raises VideoError naming the file and the problem (`err.reason` holds the problem
alone). Before anything opens a file, `file_problem` refuses what is not a regular file
(FIFO, socket, device, directory, a symlink to one of those, a dangling symlink): opening a
FIFO would block forever. Before decord opens a video, its header is read with PyAV (cheap,
no decoding): streams, codec and frame size, so a codec this decord build cannot decode (AV1,
say) is named as such and an absurd declared frame size (MAX_FRAME_PIXELS) is refused before
anything is allocated for it.

decord bug (dmlc/decord#336): decord takes a frame's channel count as the RGB row stride
divided by the width; FFmpeg pads RGB rows, so for the widths where the padded stride is an
exact multiple of the width (2, 4, 6, 8, 12, 16, 24, 48, 72 px) decord believes the frame has
4 to 48 channels and `get_batch` fails ("DECORDArrayCopyFromTo: The size must exactly match").
Only widths below 96 px can be affected. Such videos are read with PyAV instead (decoded in
order up to the last wanted frame; cheap at these sizes).

A decoder that stalls on a regular file is not interrupted here (a thread stuck in C cannot be
stopped); `smallbig data check` (run by `smallbig data prepare`) decodes every file in a worker
process under a deadline and quarantines such files, and the datasets skip quarantined files.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np

MAX_FRAME_PIXELS = 7680 * 4320  # 8K UHD; a larger declared frame size is refused


class VideoError(RuntimeError):
    """A video or frame folder could not be read. The message names the file and the problem."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _fail(path, reason: str) -> VideoError:
    return VideoError(f"{path}: {reason}", reason)


# --------------------------------------------------------------------------- files
_KINDS = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a data file, or None. Uses stat only, then (for a regular
    file) a non-blocking open to test read permission: a FIFO is never opened."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            return f"missing: dangling symlink to {os.readlink(p)}"
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    via = f" (symlink to {os.readlink(p)})" if os.path.islink(p) else ""
    if stat.S_ISDIR(st.st_mode):
        return f"unreadable: is a directory, not a file{via}"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
        return f"unreadable: not a regular file: {kind}{via}"
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    try:
        st = os.fstat(fd)  # what was opened (the path may have changed since the stat)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        return "unreadable: not a regular file"
    if st.st_size == 0:
        return "zero bytes"
    return None


def magic(path: str) -> str:
    """What the first bytes look like: mp4, webm, mp3, text or binary."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[4:8] == b"ftyp" or head[4:8] in (b"mdat", b"moov", b"free", b"wide"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:3] == b"ID3" or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


def short_error(e: Exception) -> str:
    """The informative line of an exception message (decord prefixes C++ locations)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    return re.sub(r"^\[Errno -?\d+\] ", "", text)[:240]  # PyAV prefixes FFmpeg's error number


# --------------------------------------------------------------------------- header (PyAV)
class StreamInfo:
    """The first video stream as the container declares it (no frames decoded)."""

    def __init__(self, codec: str, width: int, height: int, frames: int, naudio: int):
        self.codec, self.width, self.height, self.frames, self.naudio = codec, width, height, frames, naudio


def _is_cover_art(s) -> bool:
    try:
        import av

        return bool(s.disposition & av.stream.Disposition.attached_pic)
    except Exception:  # noqa: BLE001 (older PyAV: no disposition flags)
        return False


def stream_info(path: str) -> StreamInfo:
    """Read the container header with PyAV. VideoError reasons: "not a video (...)",
    "truncated (... container damaged ...)", "no video stream (...)", "frame size ..."."""
    import av

    try:
        with av.open(path) as c:
            videos = [s for s in c.streams.video if not _is_cover_art(s)]
            naudio = len(c.streams.audio)
            covers = len(c.streams.video) - len(videos)
            if not videos:
                what = "audio only" if naudio else "no streams"
                if covers:
                    what += ", a still cover picture"
                raise _fail(path, f"no video stream ({what})")
            s = videos[0]
            cc = s.codec_context
            codec = getattr(cc.codec, "canonical_name", None) or cc.name  # av1, not libdav1d
            info = StreamInfo(codec, int(cc.width or 0), int(cc.height or 0), int(s.frames or 0), naudio)
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 (av.error.*: FFmpeg could not parse the file)
        kind = magic(path)
        if kind in ("mp4", "webm"):
            raise _fail(path, f"truncated ({kind} container damaged: {short_error(e)})") from None
        raise _fail(path, f"not a video ({kind} content: {short_error(e)})") from None
    if info.width * info.height > MAX_FRAME_PIXELS:
        raise _fail(
            path,
            f"frame size {info.width}x{info.height} declared by the {info.codec} stream "
            f"exceeds the limit of {MAX_FRAME_PIXELS} pixels (8K UHD); refused before decoding",
        )
    return info


_DECORD_AVCODEC = None


def decord_has_decoder(codec: str) -> bool | None:
    """Whether the FFmpeg inside decord (its own libavcodec) has a decoder for `codec`
    (an FFmpeg codec name such as h264, av1). None when that library cannot be asked."""
    global _DECORD_AVCODEC
    try:
        import ctypes

        import decord

        if _DECORD_AVCODEC is None:
            _DECORD_AVCODEC = _find_decord_avcodec(decord)
        if not _DECORD_AVCODEC:
            return None
        lib = ctypes.CDLL(_DECORD_AVCODEC)
        lib.avcodec_descriptor_get_by_name.restype = ctypes.POINTER(ctypes.c_int)
        lib.avcodec_descriptor_get_by_name.argtypes = [ctypes.c_char_p]
        lib.avcodec_find_decoder.restype = ctypes.c_void_p
        lib.avcodec_find_decoder.argtypes = [ctypes.c_int]
        desc = lib.avcodec_descriptor_get_by_name(codec.encode())
        if not desc:
            return False  # this FFmpeg does not even know the codec's name
        return bool(lib.avcodec_find_decoder(desc[0]))  # AVCodecDescriptor starts with its AVCodecID
    except Exception:  # noqa: BLE001
        return None


def _find_decord_avcodec(decord) -> str:
    libs = Path(decord.__file__).resolve().parent.parent / "decord.libs"  # manylinux wheel
    found = sorted(libs.glob("libavcodec*.so*")) if libs.is_dir() else []
    if found:
        return str(found[0])
    try:  # decord built against a system FFmpeg: the libavcodec mapped next to libdecord
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libavcodec" in ln}
        av_dir = None
        try:
            import av

            av_dir = str(Path(av.__file__).resolve().parent.parent)
        except Exception:  # noqa: BLE001
            pass
        paths = sorted(p for p in paths if not (av_dir and p.startswith(av_dir)))
        return paths[0] if len(paths) == 1 else ""
    except OSError:
        return ""


# --------------------------------------------------------------------------- videos
def _decord_size_bug(e: Exception | None = None, out=None) -> bool:
    if out is not None:
        return out.ndim == 4 and out.shape[-1] != 3
    return e is not None and ("DECORDArrayCopyFromTo" in str(e) or "size must exactly match" in str(e))


class DecordVideo:
    def __init__(self, path: str | Path, info: StreamInfo | None = None):
        import decord

        self.path = str(path)
        reason = file_problem(self.path)
        if reason:
            raise _fail(self.path, reason)
        self.info = info or stream_info(self.path)
        self.backend = "decord"
        try:
            self.vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises DECORDError (a RuntimeError subclass)
            if decord_has_decoder(self.info.codec) is False:
                raise _fail(
                    self.path,
                    f"codec {self.info.codec}: not supported by this decord build "
                    f"(its FFmpeg has no {self.info.codec} decoder); re-encode the "
                    "video (e.g. to h264)",
                ) from None
            raise _fail(self.path, f"cannot be opened by decord: {short_error(e)}") from None
        self.n = len(self.vr)
        if self.n < 1:
            raise _fail(self.path, "no frames")

    def __len__(self) -> int:
        return self.n

    def get(self, indices) -> np.ndarray:
        idx = [int(i) for i in indices]
        if not idx:
            raise _fail(self.path, "no frame indices asked for")
        if min(idx) < 0 or max(idx) >= self.n:
            raise _fail(self.path, f"frame indices {min(idx)}..{max(idx)} outside 0..{self.n - 1}")
        if self.backend == "decord":
            try:
                out = self.vr.get_batch(idx).asnumpy()
            except Exception as e:  # noqa: BLE001
                if not _decord_size_bug(e):
                    raise _fail(self.path, f"truncated: decoding frames failed: {short_error(e)}") from None
                out = None
            if out is None or _decord_size_bug(out=out):
                self.backend = "pyav"  # decord mis-shapes this frame width (module docstring)
        if self.backend == "pyav":
            out = pyav_frames(self.path, idx)
        if out.ndim != 4 or out.shape[0] != len(idx) or out.shape[-1] != 3:
            raise _fail(self.path, f"decoder returned shape {out.shape}")
        return out


def pyav_frames(path: str, idx: list[int]) -> np.ndarray:
    """Frames `idx` (in presentation order, as decord counts them) decoded in order with PyAV."""
    import av

    want = set(idx)
    last = max(idx)
    got: dict[int, np.ndarray] = {}
    k = -1
    try:
        with av.open(path) as c:
            s = [v for v in c.streams.video if not _is_cover_art(v)][0]
            s.codec_context.thread_count = 1
            for k, frame in enumerate(c.decode(s)):
                if k in want:
                    got[k] = frame.to_ndarray(format="rgb24")
                if k >= last:
                    break
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"truncated: decoding frames failed after frame {k}: {short_error(e)}") from None
    if len(got) < len(want):
        raise _fail(path, f"truncated: only {k + 1} frames decodable, frame {last} asked for")
    return np.stack([got[i] for i in idx])


class FrameFolder:
    def __init__(self, folder: str | Path, num_frames: int, template: str = "img_{:05d}.jpg"):
        self.folder = Path(folder)
        self.n = int(num_frames)
        self.template = template
        if not self.folder.is_dir():
            raise _fail(self.folder, "frame folder missing")
        if self.n < 1:
            raise _fail(self.folder, f"list says {self.n} frames")

    def __len__(self) -> int:
        return self.n

    def get(self, indices) -> np.ndarray:
        from PIL import Image

        frames = []
        cache: dict[int, np.ndarray] = {}
        for i in indices:
            i = int(i)
            if i not in cache:
                p = self.folder / self.template.format(i + 1)  # files are numbered from 1
                reason = file_problem(p)
                if reason == "missing":
                    raise _fail(p, f"frame missing ({self.n} frames listed)")
                if reason:
                    raise _fail(p, reason)
                try:
                    with Image.open(p) as im:
                        cache[i] = np.asarray(im.convert("RGB"))
                except Exception as e:  # noqa: BLE001
                    raise _fail(p, f"cannot read JPEG: {_short(e)}") from None
            frames.append(cache[i])
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise _fail(self.folder, f"frames of different sizes {sorted(shapes)}")
        return np.stack(frames)


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    msg = [m for m in msg if m.strip()]
    text = msg[0] if msg else type(e).__name__
    # decord prefixes a C++ stack trace; keep the informative last line if present
    for m in reversed(msg):
        if "ERROR" in m or "Error" in m or "error" in m:
            text = m
            break
    return text.strip()[:300]


def open_video(path) -> DecordVideo:
    return DecordVideo(path)


def open_frames(folder, num_frames: int, template: str) -> FrameFolder:
    return FrameFolder(folder, num_frames, template)
