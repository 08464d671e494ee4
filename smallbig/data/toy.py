"""The embedded dataset: small, deterministic, real encoded videos in the real datasets' layouts.

`make_toy(out_dir, seed)` writes three source trees (see docs/data.md):

  <out>/kinetics400/   a Kinetics-400 mirror with the CVD Foundation layout:
                         annotations/{train,val,test}.csv
                         {train,val,test}/k400_<split>_path.txt  (URLs of the tarballs)
                         {train,val,test}/part_<N>.tar.gz        (flat <ytid>_<s:06d>_<e:06d>.mp4)
                         replacement_for_corrupted_k400.tgz
                         SHA256SUMS                              (sha256sum format, optional)
  <out>/sthv2/         Something-Something V2 as the user downloads it:
                         20bn-something-something-v2-00, -01     (parts of one tar.gz of webm)
                         something-something-v2-{labels,train,validation,test}.json
  <out>/sthv1/         Something-Something V1:
                         20bn-something-something-v1-00, -01     (parts of one tar.gz of JPEG dirs)
                         something-something-v1-{labels,train,validation}.csv

Every frame shows one (or, for two SS classes, two) coloured disk(s) on a textured, noisy
background, drawn from the same distribution in every class: a single frame says almost
nothing about the class. Classes differ in how the disks move, pulse or hand over across
frames, so per-frame (2D) models must fall clearly below temporal ones. The Kinetics-style
classes are all symmetric in time (SmallBig networks cannot see the direction of time, see
docs/models.md): evidence spread over neighbouring frames and positions (hand-over near vs far,
gliding vs swaying vs teleporting, pulsing vs flickering) is what a max over a 3D
neighbourhood (the SmallBig big view) sees. The SS-style classes keep direction (left/right,
closer/away): the paper's SS models have 3x1x1 temporal convs.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

W, H = 160, 120
K400_FPS = 25
SS_FPS = 12
RED = np.array([225, 40, 40], np.float32)
GREEN = np.array([40, 200, 60], np.float32)

# Kinetics-style classes: all symmetric in time (a clip played backwards belongs to the same
# class) and under horizontal flips (Kinetics is trained with flips). SmallBig networks are
# exactly invariant to time reversal (docs/models.md), so direction-of-time classes such as
# "moving up" / "moving down" would test the wrong thing; these differ in what happens at nearby
# places over neighbouring frames instead. Names contain spaces and commas on purpose (quoted in
# the CSV, as in the real annotations).
K400_CLASSES = [
    "standing still",
    "gliding",
    "swaying back and forth",
    "teleporting",
    "pulsing",
    "flickering",
    "handing over, nearby",
    "handing over, far away",
]
K400_KIND = {
    "standing still": "still",
    "gliding": "glide",
    "swaying back and forth": "sway",
    "teleporting": "teleport",
    "pulsing": "pulse",
    "flickering": "flicker",
    "handing over, nearby": "handover_near",
    "handing over, far away": "handover_far",
}
# Something-Something-style templates (left/right classes: never flipped).
SS_TEMPLATES = [
    "Moving [something] from left to right",
    "Moving [something] from right to left",
    "Moving [something] up",
    "Moving [something] down",
    "Holding [something]",
    "Moving [something] closer to [something]",
    "Moving [something] away from [something]",
    "Putting [something] next to [something]",
]
SS_KIND = {
    "Moving [something] from left to right": "right",
    "Moving [something] from right to left": "left",
    "Moving [something] up": "up",
    "Moving [something] down": "down",
    "Holding [something]": "still",
    "Moving [something] closer to [something]": "approach",
    "Moving [something] away from [something]": "separate",
    "Putting [something] next to [something]": "handover_near",
}
SS_OBJECTS = ["a cup", "pen", "book", "phone", "box", "spoon", "bottle", "remote"]

# Sizes (per class): small on purpose, the embedded workflow trains 25 models on a CPU.
K400_TRAIN_PER_CLASS = 12
K400_VAL_PER_CLASS = 6
K400_TEST_PER_CLASS = 1
K400_FRAMES = (48, 72)
SS_TRAIN_PER_CLASS = 12
SS_VAL_PER_CLASS = 6
SS_FRAMES = (32, 48)


# --------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour gradient with a low-frequency texture, float32 [H, W, 3]."""
    base = rng.uniform(70, 150, size=3)
    tint = rng.uniform(-30, 30, size=(2, 3))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    fy, fx = rng.uniform(0.02, 0.08, size=2)
    ph = rng.uniform(0, 2 * np.pi, size=2)
    tex = 12 * np.sin(fx * xx + ph[0]) * np.cos(fy * yy + ph[1])
    bg = base[None, None, :] + tint[0] * (xx / W)[..., None] + tint[1] * (yy / H)[..., None] + tex[..., None]
    return bg.astype(np.float32)


_YY, _XX = np.mgrid[0:H, 0:W].astype(np.float32)


def _draw(img: np.ndarray, x: float, y: float, r: float, colour: np.ndarray) -> None:
    y0, y1 = max(0, int(y - r - 2)), min(H, int(y + r + 3))
    x0, x1 = max(0, int(x - r - 2)), min(W, int(x + r + 3))
    if y0 >= y1 or x0 >= x1:
        return
    d = np.sqrt((_XX[y0:y1, x0:x1] - x) ** 2 + (_YY[y0:y1, x0:x1] - y) ** 2)
    alpha = np.clip(r + 0.5 - d, 0.0, 1.0)[..., None]  # anti-aliased disk
    patch = img[y0:y1, x0:x1]
    patch *= 1 - alpha
    patch += alpha * colour


def _reflect(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold positions back into [lo, hi] as a ball bouncing off walls (a triangle wave)."""
    span = hi - lo
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u < span, u, 2 * span - u)


def _path(n: int, start: float, end: float) -> np.ndarray:
    return np.linspace(start, end, n, dtype=np.float32)


def _handover(rng, n: int, near: bool, colour0: int):
    """Alternating red/green events of 5-7 frames; each event is near (10-20 px) or far
    (>= 60 px) from the previous one. Every frame holds exactly one disk."""
    xs, ys, cs = [], [], []
    r = rng.uniform(11, 15)
    x, y = rng.uniform(20, W - 20), rng.uniform(20, H - 20)
    c = colour0
    while len(xs) < n:
        length = int(rng.integers(5, 8))
        xs += [x] * length
        ys += [y] * length
        cs += [c] * length
        c = 1 - c
        for _ in range(200):
            if near:
                ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(10, 20)
                nx, ny = x + dist * np.cos(ang), y + dist * np.sin(ang)
            else:
                nx, ny = rng.uniform(20, W - 20), rng.uniform(20, H - 20)
            ok = 20 <= nx <= W - 20 and 20 <= ny <= H - 20
            if ok and (near or np.hypot(nx - x, ny - y) >= 60):
                x, y = nx, ny
                break
    return np.array(xs[:n]), np.array(ys[:n]), np.full(n, r), np.array(cs[:n])


def render(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Frames uint8 [n, H, W, 3] of one video of the given class kind."""
    bg = _background(rng)
    c0 = int(rng.integers(0, 2))
    cols = np.full(n, c0)
    r = np.full(n, rng.uniform(8, 20))
    margin = 18
    x = np.full(n, rng.uniform(margin, W - margin))
    y = np.full(n, rng.uniform(margin, H - margin))
    two = None  # second disk for approach/separate
    if kind in ("up", "down"):
        a, b = H - margin, margin
        if kind == "down":
            a, b = b, a
        y = _path(n, a, b) + rng.uniform(-4, 4)
        x = x + _path(n, 0, rng.uniform(-10, 10))
    elif kind in ("right", "left"):
        a, b = margin, W - margin
        if kind == "left":
            a, b = b, a
        x = _path(n, a, b) + rng.uniform(-4, 4)
        y = y + _path(n, 0, rng.uniform(-8, 8))
    elif kind == "still":
        x = x + rng.normal(0, 0.6, n)
        y = y + rng.normal(0, 0.6, n)
    elif kind == "teleport":
        hold = 3
        k = -(-n // hold)
        px = rng.uniform(margin, W - margin, k)
        py = rng.uniform(margin, H - margin, k)
        x, y = np.repeat(px, hold)[:n], np.repeat(py, hold)[:n]
    elif kind in ("handover_near", "handover_far"):
        x, y, r, cols = _handover(rng, n, kind == "handover_near", c0)
    elif kind == "flicker":  # stays, colour toggles every 5-7 frames
        t, c = 0, c0
        while t < n:
            length = int(rng.integers(5, 8))
            cols[t : t + length] = c
            c, t = 1 - c, t + length
        x = x + rng.normal(0, 0.6, n)
        y = y + rng.normal(0, 0.6, n)
    elif kind == "glide":  # constant speed in a random direction, bouncing off the borders
        ang, speed = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 2.5)
        t = np.arange(n, dtype=np.float32)
        x = _reflect(x + speed * np.cos(ang) * t, margin, W - margin)
        y = _reflect(y + speed * np.sin(ang) * t, margin, H - margin)
    elif kind == "sway":  # back and forth along a random axis
        ang, amp = rng.uniform(0, np.pi), rng.uniform(15, 25)
        phase = np.sin(2 * np.pi * np.arange(n) / rng.uniform(12, 20) + rng.uniform(0, 2 * np.pi))
        x = np.clip(x + amp * np.cos(ang) * phase, margin, W - margin)
        y = np.clip(y + amp * np.sin(ang) * phase, margin, H - margin)
    elif kind == "pulse":  # radius oscillates 8 <-> 20 px at a fixed place
        r = 14 + 6 * np.sin(2 * np.pi * np.arange(n) / rng.uniform(16, 24) + rng.uniform(0, 2 * np.pi))
        x = np.full(n, rng.uniform(26, W - 26))
        y = np.full(n, rng.uniform(26, H - 26))
    elif kind in ("approach", "separate"):
        cy = rng.uniform(35, H - 35)
        cx = rng.uniform(50, W - 50)
        # half the distance between the two disk centres, far and near
        gap_far, gap_near = rng.uniform(38, 44), rng.uniform(12, 15)
        g = _path(n, gap_far, gap_near) if kind == "approach" else _path(n, gap_near, gap_far)
        ang = rng.uniform(0, np.pi)
        x = cx + g * np.cos(ang)
        y = cy + 0.5 * g * np.sin(ang)
        two = (cx - g * np.cos(ang), cy - 0.5 * g * np.sin(ang))
        r = np.full(n, rng.uniform(9, 12))
    else:
        raise ValueError(f"unknown toy class kind {kind!r}")
    frames = np.empty((n, H, W, 3), np.uint8)
    noise_rng = np.random.default_rng(rng.integers(2**32))
    noise = noise_rng.normal(0, 3, size=(6, H, W, 1)).astype(np.float32)  # sensor noise, cycled
    for t in range(n):
        img = bg.copy()
        colour = GREEN if cols[t] else RED
        _draw(img, float(x[t]), float(y[t]), float(r[t]), colour)
        if two is not None:
            _draw(img, float(two[0][t]), float(two[1][t]), float(r[t]), RED if cols[t] else GREEN)
        img += noise[t % len(noise)]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


# --------------------------------------------------------------------------- encoding
def encode_video(frames: np.ndarray, path: Path, fps: int, codec: str) -> None:
    """Encode uint8 [T, H, W, 3] frames (libx264 for .mp4, libvpx for .webm) with the ffmpeg
    binary of imageio-ffmpeg, one encoder thread, bit-exact flags, no metadata: the bytes depend
    only on the frames. (Through PyAV the same encoder settings gave load-dependent bytes when
    several videos were encoded at once, measured: 2-4 of 12 videos differed between runs.)"""
    import subprocess

    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w = frames.shape[:3]
    if codec == "libx264":
        enc = [
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "23",
            "-threads",
            "1",
            "-x264-params",
            "threads=1:lookahead-threads=1",
            "-movflags",
            "+faststart",
        ]
    else:
        enc = [
            "-c:v",
            "libvpx",
            "-crf",
            "10",
            "-b:v",
            "400k",
            "-threads",
            "1",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
        ]
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-v",
        "error",
        "-nostdin",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        str(fps),
        "-i",
        "-",
        *enc,
        "-pix_fmt",
        "yuv420p",
        "-map_metadata",
        "-1",
        "-fflags",
        "+bitexact",
        "-flags:v",
        "+bitexact",
        str(path),
    ]
    r = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"{path}: ffmpeg failed ({r.returncode}): {r.stderr.decode(errors='replace')[-500:]}"
        )


def _encode_jpegs(frames: np.ndarray, folder: Path, template: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames, 1):
        Image.fromarray(f).save(folder / template.format(i), quality=90)


def _tar_gz(path: Path, files: list[tuple[str, Path]]) -> None:
    """Deterministic tar.gz (fixed mtimes, sorted names) of (arcname, source) pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs_done = set()
        for arcname, src in sorted(files):
            parts = arcname.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs_done:
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(ti)
                    dirs_done.add(d)
            data = src.read_bytes()
            ti = tarfile.TarInfo(arcname)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tar.addfile(ti, io.BytesIO(data))
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ytid(rng: np.random.Generator) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 11))


# --------------------------------------------------------------------------- Kinetics
def _sizes(per_class: dict | None) -> dict:
    sizes = {
        "train": K400_TRAIN_PER_CLASS,
        "val": K400_VAL_PER_CLASS,
        "test": K400_TEST_PER_CLASS,
        "ss_train": SS_TRAIN_PER_CLASS,
        "ss_val": SS_VAL_PER_CLASS,
    }
    sizes.update(per_class or {})
    return sizes


def make_kinetics(out: Path, seed: int = 0, progress=None, per_class: dict | None = None) -> dict:
    """The Kinetics-400-style mirror. Returns a summary dict."""
    rng = np.random.default_rng([seed, 400])
    staging = out / ".staging"
    rows = []  # (label, ytid, start, end, split)
    videos: dict[str, list[tuple[str, Path]]] = {"train": [], "val": [], "test": []}
    sizes = _sizes(per_class)
    per_split = {"train": sizes["train"], "val": sizes["val"], "test": sizes["test"]}
    corrupted = []  # (split, name, good path) replaced by the replacement tarball
    jobs = []
    for split, count in per_split.items():
        for label in K400_CLASSES:
            for _ in range(count):
                ytid = _ytid(rng)
                start = int(rng.integers(0, 300))
                n = int(rng.integers(K400_FRAMES[0], K400_FRAMES[1] + 1))
                end = start + 10
                name = f"{ytid}_{start:06d}_{end:06d}.mp4"
                path = staging / split / name
                jobs.append((K400_KIND[label], n, int(rng.integers(2**63)), str(path), "mp4"))
                rows.append((label, ytid, start, end, split))
                videos[split].append((name, path))
    _run_jobs(jobs, progress)
    # Realistic defects: one train and one val video listed in the CSV but absent from the
    # tarballs (missing on YouTube), and one train + one val video stored truncated in the
    # tarballs whose good copy is in the replacement tarball.
    missing = {"train": videos["train"].pop(5)[0], "val": videos["val"].pop(3)[0]}
    replacement = []
    for split, idx in (("train", 7), ("val", 2)):
        name, good = videos[split][idx]
        bad = staging / f"{split}-corrupted" / name
        bad.parent.mkdir(parents=True, exist_ok=True)
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
        videos[split][idx] = (name, bad)
        replacement.append((f"replacement_for_corrupted_k400/{name}", good))
        corrupted.append(name)
    base_url = (out / "kinetics400").resolve().as_uri()
    mirror = out / "kinetics400"
    ann = mirror / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        with open(ann / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
            w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for label, ytid, s, e, sp in rows:
                if sp == split:
                    # the real CSVs quote labels with spaces too
                    w.writerow([label, ytid, s, e, sp])
    # quote every label containing a space, as the real files do
    for split in ("train", "val", "test"):
        p = ann / f"{split}.csv"
        lines = p.read_text().splitlines()
        fixed = [lines[0]]
        for line in lines[1:]:
            if not line.startswith('"') and " " in line.split(",")[0]:
                label, rest = line.split(",", 1)
                line = f'"{label}",{rest}'
            fixed.append(line)
        p.write_text("\n".join(fixed) + "\n")
    parts = {"train": 3, "val": 2, "test": 1}
    for split, nparts in parts.items():
        d = mirror / split
        d.mkdir(parents=True, exist_ok=True)
        urls = []
        vids = sorted(videos[split])
        for i in range(nparts):
            chunk = vids[i::nparts]
            tar = d / f"part_{i}.tar.gz"
            _tar_gz(tar, chunk)
            urls.append(f"{base_url}/{split}/part_{i}.tar.gz")
        (d / f"k400_{split}_path.txt").write_text("\n".join(urls) + "\n")
    _tar_gz(mirror / "replacement_for_corrupted_k400.tgz", replacement)
    sums = []
    for p in sorted(mirror.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS" and p.suffix in (".gz", ".tgz"):
            sums.append(f"{_sha256(p)}  {p.relative_to(mirror).as_posix()}")
    (mirror / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    _rmtree(staging)
    return {
        "classes": len(K400_CLASSES),
        "videos": {k: len(v) for k, v in videos.items()},
        "missing": missing,
        "replaced": corrupted,
    }


# --------------------------------------------------------------------------- Something-Something
def _ss_samples(rng, version: int, per_class: dict | None = None):
    """[(id, template, placeholders, split, num_frames)] for train/validation (+ test ids)."""
    out = []
    next_id = 1000 * version + 1
    sizes = _sizes(per_class)
    for split, count in (("train", sizes["ss_train"]), ("validation", sizes["ss_val"])):
        for tmpl in SS_TEMPLATES:
            for _ in range(count):
                k = tmpl.count("[something]")
                objs = [SS_OBJECTS[i] for i in rng.choice(len(SS_OBJECTS), k, replace=False)]
                n = int(rng.integers(SS_FRAMES[0], SS_FRAMES[1] + 1))
                out.append((str(next_id), tmpl, objs, split, n))
                next_id += int(rng.integers(1, 40))
    return out


def _fill(tmpl: str, objs: list[str]) -> str:
    s = tmpl
    for o in objs:
        s = s.replace("[something]", o, 1)
    return s


def _split_parts(blob_path: Path, prefix: Path, nparts: int) -> list[Path]:
    data = blob_path.read_bytes()
    size = -(-len(data) // nparts)
    paths = []
    for i in range(nparts):
        p = prefix.parent / f"{prefix.name}-{i:02d}"
        p.write_bytes(data[i * size : (i + 1) * size])
        paths.append(p)
    return paths


def make_sthv2(out: Path, seed: int = 0, progress=None, per_class: dict | None = None) -> dict:
    rng = np.random.default_rng([seed, 2])
    d = out / "sthv2"
    staging = out / ".staging-sthv2"
    d.mkdir(parents=True, exist_ok=True)
    samples = _ss_samples(rng, 2, per_class)
    files = []
    jobs = []
    for vid, tmpl, _objs, _split, n in samples:
        p = staging / f"{vid}.webm"
        jobs.append((SS_KIND[tmpl], n, int(rng.integers(2**63)), str(p), "webm"))
        files.append((f"20bn-something-something-v2/{vid}.webm", p))
    _run_jobs(jobs, progress)
    # the real labels file maps the template without brackets to the index (as a string)
    labels = {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(SS_TEMPLATES)}
    (d / "something-something-v2-labels.json").write_text(json.dumps(labels, indent=1))
    for split in ("train", "validation"):
        entries = [
            {"id": vid, "label": _fill(t, o), "template": t, "placeholders": o}
            for vid, t, o, sp, _ in samples
            if sp == split
        ]
        (d / f"something-something-v2-{split}.json").write_text(json.dumps(entries, indent=1))
    (d / "something-something-v2-test.json").write_text(json.dumps([]))
    tar = staging / "all.tar.gz"
    _tar_gz(tar, files)
    _split_parts(tar, d / "20bn-something-something-v2", 2)
    _rmtree(staging)
    return {"classes": len(SS_TEMPLATES), "videos": len(samples)}


def make_sthv1(out: Path, seed: int = 0, progress=None, per_class: dict | None = None) -> dict:
    rng = np.random.default_rng([seed, 1])
    d = out / "sthv1"
    staging = out / ".staging-sthv1"
    d.mkdir(parents=True, exist_ok=True)
    samples = _ss_samples(rng, 1, per_class)
    files = []
    jobs = []
    for vid, tmpl, _objs, _split, n in samples:
        jobs.append((SS_KIND[tmpl], n, int(rng.integers(2**63)), str(staging / vid), "jpg"))
    _run_jobs(jobs, progress)
    for vid, *_ in samples:
        files += [(f"20bn-something-something-v1/{vid}/{p.name}", p) for p in (staging / vid).iterdir()]
    # V1: labels CSV (line number = index, templates with "something" unbracketed), `id;label`
    names = [t.replace("[", "").replace("]", "") for t in SS_TEMPLATES]
    (d / "something-something-v1-labels.csv").write_text("\n".join(names) + "\n")
    for split in ("train", "validation"):
        lines = [
            f"{vid};{t.replace('[', '').replace(']', '')}" for vid, t, _, sp, _ in samples if sp == split
        ]
        (d / f"something-something-v1-{split}.csv").write_text("\n".join(lines) + "\n")
    tar = staging / "all.tar.gz"
    _tar_gz(tar, files)
    _split_parts(tar, d / "20bn-something-something-v1", 2)
    _rmtree(staging)
    return {"classes": len(SS_TEMPLATES), "videos": len(samples)}


def _job(job) -> None:
    kind, n, seed, path, fmt = job
    frames = render(kind, n, np.random.default_rng(seed))
    if fmt == "mp4":
        encode_video(frames, Path(path), K400_FPS, "libx264")
    elif fmt == "webm":
        encode_video(frames, Path(path), SS_FPS, "libvpx")
    else:
        _encode_jpegs(frames, Path(path), "{:05d}.jpg")


def _run_jobs(jobs: list, progress=None, workers: int | None = None) -> None:
    """Render + encode videos; in parallel processes (results do not depend on the order)."""
    import multiprocessing as mp
    import os

    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(jobs) < 8:
        for j in jobs:
            _job(j)
            if progress:
                progress.update(1)
        return
    # spawn, not fork: a fork of a process with threads (pytest, MLflow, a jemalloc background
    # thread) can deadlock in the child before it runs anything (seen in CI)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for _ in pool.imap_unordered(_job, jobs, chunksize=4):
            if progress:
                progress.update(1)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def make_toy(
    out: str | Path,
    seed: int = 0,
    datasets=("kinetics400", "sthv2", "sthv1"),
    per_class: dict | None = None,
    progress: bool = True,
) -> dict:
    """Generate the embedded dataset under `out` (each dataset tree is regenerated whole).

    `per_class` overrides the videos per class ({"train", "val", "test", "ss_train", "ss_val"};
    tests use a smaller dataset of the same layout)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(per_class)
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
    if bad or ("kinetics400" in datasets and sizes["train"] < 2):
        # the Kinetics mirror makes one train video missing and another truncated: >= 2 per class
        raise ValueError(f"toy videos per class must be integers >= 1 (train >= 2 for kinetics400): {sizes}")
    total = 0
    if "kinetics400" in datasets:
        total += len(K400_CLASSES) * (sizes["train"] + sizes["val"] + sizes["test"])
    for v in ("sthv1", "sthv2"):
        if v in datasets:
            total += len(SS_TEMPLATES) * (sizes["ss_train"] + sizes["ss_val"])
    summary = {"seed": seed}
    with tqdm(total=total, desc="toy videos", unit="video", disable=not progress) as bar:
        for name, fn in (("kinetics400", make_kinetics), ("sthv2", make_sthv2), ("sthv1", make_sthv1)):
            if name in datasets:
                _rmtree(out / name)
                summary[name] = fn(out, seed, bar, per_class)
    (out / "toy.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
