"""Resumable downloads (http(s) with Range requests, file:// and plain local paths).

A download goes to `<dest>.part`; an interrupted one keeps the partial file and the next call
continues from its size (HTTP `Range: bytes=N-`; a server that ignores Range restarts from 0).
The finished file is checked against the expected size (Content-Length / Content-Range, or the
source file's size) and, where known, its SHA-256, before it is renamed to `<dest>`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from smallbig.errors import InputError

CHUNK = 1 << 20


class DownloadError(InputError):
    """A file could not be fetched or failed verification (names the URL and the problem).
    Exit 2 (the source is missing, unreachable or wrong: `smallbig data prepare`); `smallbig
    pretrained fetch` tells a missing file (exit 2) from a failed transfer (exit 1) itself."""


def join_url(base: str, *parts: str) -> str:
    """Join a base URL or local path with relative parts ("/"-separated)."""
    base = str(base).rstrip("/")
    return "/".join([base] + [p.strip("/") for p in parts])


def is_local(url: str) -> bool:
    return url.startswith("file:") or "://" not in url


def local_path(url: str) -> Path:
    if url.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            # file://relative/path is a common mistake: treat netloc + path as relative
            return Path(urllib.parse.unquote(parsed.netloc + parsed.path))
        return Path(urllib.parse.unquote(parsed.path))
    return Path(url)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (resumable, verified). Returns dest. Idempotent: an existing
    dest that matches `sha256` (when given) is kept; without a checksum, an existing dest is
    trusted (it was renamed into place only after its size was verified)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        bad = dest.with_name(dest.name + ".bad-checksum")
        dest.replace(bad)  # keep the data, never lose it; fetch again
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            if is_local(url):
                expected = _copy_local(url, part, progress)
            else:
                expected = _http(url, part, timeout, progress)
            size = part.stat().st_size
            if expected is not None and size != expected:
                raise DownloadError(
                    f"{url}: incomplete: got {size} of {expected} bytes (kept {part}; run again to resume)"
                )
            if sha256 is not None:
                got = sha256_file(part)
                if got != sha256:
                    bad = part.with_name(dest.name + ".bad-checksum")
                    part.replace(bad)
                    raise DownloadError(
                        f"{url}: SHA-256 mismatch: expected {sha256}, got {got} (moved to {bad})"
                    )
            part.replace(dest)
            return dest
        except DownloadError as e:
            last = e
            if "SHA-256 mismatch" in str(e) or "not found" in str(e):
                raise
        except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
            last = e
        if attempt + 1 < retries:
            time.sleep(min(2**attempt, 10) * 0.5)
    raise DownloadError(f"{url}: download failed after {retries} attempt(s): {last}") from None


def _copy_local(url: str, part: Path, progress: bool) -> int:
    src = local_path(url)
    if not src.is_file():
        raise DownloadError(f"{url}: not found ({src})")
    total = src.stat().st_size
    have = part.stat().st_size if part.exists() else 0
    if have > total:
        part.unlink()
        have = 0
    with open(src, "rb") as fin, open(part, "ab") as fout:
        fin.seek(have)
        bar = _bar(total, have, part.name, progress)
        while True:
            chunk = fin.read(CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            bar.update(len(chunk))
        bar.close()
    return total


def _http(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "smallbig-data/1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: we may already have everything
            head = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(head, timeout=timeout) as r:
                total = int(r.headers.get("Content-Length", -1))
            if total == have:
                return total
            part.unlink()
            raise DownloadError(
                f"{url}: server refused to resume; partial file discarded, run again"
            ) from None
        if e.code == 404:
            raise DownloadError(f"{url}: not found (HTTP 404)") from None
        raise
    with resp:
        if have and resp.status == 200:  # Range ignored: start over
            have = 0
            mode = "wb"
        else:
            mode = "ab" if have else "wb"
        total = None
        cr = resp.headers.get("Content-Range")
        if cr and "/" in cr and cr.rsplit("/", 1)[1].isdigit():
            total = int(cr.rsplit("/", 1)[1])
        elif resp.headers.get("Content-Length") is not None:
            total = have + int(resp.headers["Content-Length"])
        bar = _bar(total, have, part.name, progress)
        with open(part, mode) as f:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        bar.close()
    return total


def _bar(total, initial, name, enabled):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, desc=name, disable=not enabled, leave=False
    )


def read_text(url: str, dest: str | Path | None = None, retries: int = 3) -> str:
    """Fetch a small text file (to `dest` if given, so it is kept with the download)."""
    if dest is not None:
        return fetch(url, dest, retries=retries, progress=False).read_text()
    if is_local(url):
        p = local_path(url)
        if not p.is_file():
            raise DownloadError(f"{url}: not found ({p})")
        return p.read_text()
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read().decode()


def copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
