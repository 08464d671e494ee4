"""ImageNet initialisation files: declared in params, fetched, verified, resolved for a training.

Every number of the paper comes from networks initialised from ImageNet-trained 2-D ResNets
(torchvision's ``resnet50-19c8e357.pth`` / ``resnet101-5d3b4d8f.pth``). The params declare the
files in a top-level section (``params/base.yaml``)::

    pretrained_weights:
      torchvision-resnet50:
        url: https://download.pytorch.org/models/resnet50-19c8e357.pth
        sha256: 19c8e357...      # the full 64-hex SHA-256 (or, only as a fallback, its 8-hex prefix)
        size: 102502400          # bytes (optional, checked too)
        depth: 50                # the ResNet depth inside (R23/R50 load 50, R101 loads 101)
        file: data/pretrained/resnet50-19c8e357.pth   # relative to the working directory

and ``model.pretrained`` is one of those names, the path of a local torchvision-format file, or
``none`` (train from scratch, explicitly). ``null`` is refused by the params validation.

- ``smallbig pretrained fetch NAME... | --all``: download (resumable: HTTP Range into
  ``<file>.part``; ``file://`` URLs and plain paths work too), verify the SHA-256, then rename
  into place; a file already there with the right hash is kept; a mismatch keeps the bad bytes
  aside (``<file>.bad-sha256``) and exits 2.
- ``resolve_pretrained(params) -> Path | None``: what a fresh training loads; checks the file's
  hash against the declaration (cached in ``<file>.verified.json``, keyed by size, mtime, inode).
- ``smallbig pretrained make-test-file --depth 50|101 --out FILE``: a torchvision-format ResNet
  state dict with seeded random weights (same key names and shapes as torchvision's, written
  without torchvision), for tests and full-shape rehearsals.

Nothing here imports torch at module level (the CLI path stays light). Errors become messages
and exit codes in `smallbig.cli.main`: a missing, undeclared or mismatching file exits 2, a
failed transfer 1.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import sys
import time
import urllib.error
from pathlib import Path

import jsonschema

from smallbig import config
from smallbig.config import NONE, SOURCE_DEPTH, classify, looks_like_path  # noqa: F401 (re-exported)
from smallbig.data import download as dl
from smallbig.errors import InputError, SmallbigError
from smallbig.spec.pretrained import required_files, workflow_files  # noqa: F401 (re-exported)

# torchvision's blocks per stage for the depths we write test files of
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class PretrainedError(InputError):
    """The pretrained file is missing, unreadable, fails verification or does not fit the model.
    Bad input: exit 2."""


class ChecksumError(PretrainedError):
    """A downloaded (or present) file's SHA-256 differs from the declared one."""


class FetchError(SmallbigError):
    """`smallbig pretrained fetch` could not fetch some of the names asked for (each fetched in
    turn; this names every failure). Exit 2 when one is a bad input (a file not found at its url,
    a hash that differs from the declaration), else 1 (a failed transfer: run again to resume)."""

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__("\n".join(str(e) for e in failures))
        bad_input = any(isinstance(e, ChecksumError) or "not found" in str(e) for e in failures)
        self.exit_code = EXIT_BAD_INPUT if bad_input else EXIT_FAILED


# ----------------------------------------------------------------------------- declarations
def hash_matches(expected: str, actual: str) -> bool:
    """Full 64-hex: equal. An 8+-hex prefix (fallback, as torchvision's own check_hash): prefix."""
    expected, actual = expected.lower(), actual.lower()
    return actual == expected if len(expected) == 64 else actual.startswith(expected)


def default_params_file() -> Path:
    return config.REPO_ROOT / "params" / "base.yaml"


def declared_weights(params_file: str | Path | None = None, overlay: str | Path | None = None) -> dict:
    """The `pretrained_weights` section of a params file (following `extends`, plus an overlay),
    validated against its part of the schema. Default: params/base.yaml."""
    path = Path(params_file) if params_file else default_params_file()
    if params_file and not str(params_file).endswith((".yaml", ".yml")) and not path.exists():
        path = config.experiment_path(str(params_file))
    data = config._load_chain(path)
    if overlay:
        data = config._apply_overlay(data, Path(overlay))
    section = data.get("pretrained_weights") or {}
    sub = config.schema()["properties"]["pretrained_weights"]
    errors = list(jsonschema.Draft202012Validator(sub).iter_errors(section))
    if errors:
        e = errors[0]
        key = ".".join(["pretrained_weights", *map(str, e.absolute_path)])
        raise config.ParamsError(f"{path}: {key}: {e.message}")
    return section


# ----------------------------------------------------------------------------- verification
def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


_MEMO: dict[tuple, str] = {}


def _write_stamp(path: Path, digest: str) -> None:
    key = _stat_key(path)
    _MEMO[(str(path.resolve()), key["size"], key["mtime_ns"], key["inode"])] = digest
    stamp = _stamp_path(path)
    try:  # best effort: a read-only directory just means no cache
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "sha256": digest}) + "\n")
        os.replace(tmp, stamp)
    except OSError:
        pass


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, cached: in this process and in `<file>.verified.json` next to it (valid
    while size, mtime and inode are unchanged), so every training start does not re-hash 170 MB."""
    path = Path(path)
    key = _stat_key(path)
    memo_key = (str(path.resolve()), key["size"], key["mtime_ns"], key["inode"])
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    try:
        cached = json.loads(_stamp_path(path).read_text())
        if {k: cached.get(k) for k in key} == key and re.fullmatch(r"[0-9a-f]{64}", cached.get("sha256", "")):
            _MEMO[memo_key] = cached["sha256"]
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    digest = dl.sha256_file(path)
    _write_stamp(path, digest)
    return digest


def _mismatch(entry: dict, name: str, size: int, actual: str | None) -> str | None:
    """Why a file of `size` bytes and SHA-256 `actual` is not `entry` (None when it is)."""
    if entry.get("size") is not None and size != entry["size"]:
        return (
            f"{size} bytes, but pretrained_weights.{name} declares {entry['size']} "
            f"(expected SHA-256 {entry['sha256']}); truncated or another file"
        )
    if actual is not None and not hash_matches(entry["sha256"], actual):
        return f"SHA-256 mismatch for {name}: expected {entry['sha256']}, got {actual}"
    return None


def verify(path: str | Path, entry: dict, name: str = "?") -> str:
    """Check a present file against its declaration (size when declared, then SHA-256, cached);
    returns the file's full SHA-256 or raises ChecksumError naming the file, expected and actual."""
    path = Path(path)
    size = path.stat().st_size
    problem = _mismatch(entry, name, size, None) or _mismatch(entry, name, size, file_sha256(path))
    if problem:
        raise ChecksumError(f"{path}: {problem}")
    return file_sha256(path)


def resolve_pretrained(params: dict) -> Path | None:
    """The verified local file a fresh training of `params` loads (None for `none`).

    A declared name -> its `file` (relative to the working directory), which must exist and match
    the declared SHA-256; a path -> that file (must exist; nothing to verify it against)."""
    value = params.get("model", {}).get("pretrained")
    declared = params.get("pretrained_weights") or {}
    kind = classify(value, declared)
    if kind == "unset":
        raise PretrainedError(
            "model.pretrained: not set (null); give a name declared under pretrained_weights "
            f"({', '.join(sorted(declared)) or 'none declared'}), a local .pth path, or `none` to "
            "train from scratch"
        )
    if kind == "none":
        return None
    if kind == "unknown":
        raise PretrainedError(
            f"model.pretrained: {value!r} is not declared under pretrained_weights "
            f"({', '.join(sorted(declared)) or 'none declared'}) and is not a path"
        )
    if kind == "path":
        path = Path(value)
        if not path.is_file():
            raise PretrainedError(f"{path}: pretrained weights file not found (model.pretrained)")
        return path
    entry = declared[value]
    path = Path(entry["file"])
    if not path.is_file():
        raise PretrainedError(
            f"{path}: ImageNet weights {value!r} not found (in {Path.cwd()}); run "
            f"`smallbig pretrained fetch {value}` first (the workflow's `pretrained` rule does)"
        )
    try:
        verify(path, entry, value)
    except ChecksumError as e:
        raise ChecksumError(
            f"{e}; refusing to train from it: remove the file and run `smallbig pretrained fetch {value}`"
        ) from None
    return path


def check_declared_in(
    files: dict[str, tuple[str, dict, str]], params_file: str | Path, overlay: str | Path | None = None
) -> None:
    """Every file of `workflow_files(...)` is declared identically in `params_file` (+ overlay),
    where the workflow's download job reads it; else PretrainedError naming both."""
    declared = declared_weights(params_file, overlay)
    for _file, (name, entry, exp) in sorted(files.items()):
        if declared.get(name) != entry:
            raise PretrainedError(
                f"{exp}: pretrained_weights.{name}: differs from (or is missing in) {params_file}"
                f"{' + ' + str(overlay) if overlay else ''}, where the workflow's download reads "
                f"it; declare ImageNet files in {params_file}"
            )


# ----------------------------------------------------------------------------- download
def _aside(path: Path, suffix: str) -> Path:
    """Rename a bad file out of the way (never deleted); returns its new name."""
    bad = path.with_name(path.name.removesuffix(".part") + suffix)
    if bad.exists():
        bad = bad.with_name(f"{bad.name}.{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, bad)
    return bad


def fetch(
    name: str,
    entry: dict,
    root: str | Path = ".",
    url: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    log=lambda m: print(f"smallbig pretrained: {m}", file=sys.stderr, flush=True),
) -> Path:
    """Download one declared file into `root/<file>`: resumable, verified before the atomic
    rename. An existing file with the right hash is kept (nothing downloaded); one with a wrong
    hash is moved aside and fetched again. Raises ChecksumError (kept aside as
    `<file>.bad-sha256`) or DownloadError."""
    url = url or entry["url"]
    dest = Path(root) / entry["file"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            verify(dest, entry, name)
            log(f"{name}: {dest} present, SHA-256 verified; nothing to download")
            return dest
        except ChecksumError as e:
            bad = _aside(dest, ".bad-sha256")
            log(f"WARNING: {e}; kept as {bad}, downloading again")
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        log(f"{name}: resuming {part} at {part.stat().st_size} bytes")
    last: Exception | None = None
    for attempt in range(max(1, retries)):
        try:
            total: int | None = (
                dl._copy_local(url, part, progress)
                if dl.is_local(url)
                else dl._http(url, part, timeout, progress)
            )
            size = part.stat().st_size
            if total is not None and size != total:
                raise dl.DownloadError(f"{url}: incomplete: got {size} of {total} bytes")
            last = None
            break
        except dl.DownloadError as e:
            if "not found" in str(e):
                raise
            last = e
        except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
            last = e
        if attempt + 1 < retries:
            time.sleep(min(2**attempt, 10) * 0.5)
    if last is not None:
        raise dl.DownloadError(
            f"{url}: download failed after {retries} attempt(s): {last} "
            f"(partial data kept in {part}; run again to resume)"
        )
    size = part.stat().st_size
    actual = dl.sha256_file(part)
    problem = _mismatch(entry, name, size, actual)
    if problem:
        bad = _aside(part, ".bad-sha256")
        raise ChecksumError(
            f"{dest}: {problem} (downloaded from {url}); the download is kept as "
            f"{bad}, not deleted; check pretrained_weights.{name} (url, sha256) "
            f"or fetch again"
        )
    os.replace(part, dest)  # only a verified file ever has the final name
    _write_stamp(dest, actual)
    log(f"{name}: {dest} downloaded, SHA-256 {actual} verified")
    if len(entry["sha256"]) != 64:
        log(
            f"NOTE: pretrained_weights.{name}.sha256 gives only the prefix {entry['sha256']}; the full "
            f"SHA-256 of this file is {actual} (record it in the params)"
        )
    return dest


# ----------------------------------------------------------------------------- test files
def state_dict_shapes(depth: int, width: int = 64, num_classes: int = 1000) -> dict[str, tuple]:
    """Key -> shape of torchvision's ResNet-50/101 state dict (v1.5 bottlenecks: stride on the
    3×3; a projection shortcut on each stage's first block), in torchvision's order; like the
    2017 files, without `num_batches_tracked`. width 64 = torchvision's shapes."""
    if depth not in LAYERS:
        raise PretrainedError(f"depth {depth}: test files exist for ResNet-50 and ResNet-101 only")
    shapes: dict[str, tuple] = {}

    def bn(key, n):
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{k}"] = (n,)

    shapes["conv1.weight"] = (width, 3, 7, 7)
    bn("bn1", width)
    cin = width
    for i, n in enumerate(LAYERS[depth]):
        planes = width * 2**i
        for j in range(n):
            pre = f"layer{i + 1}.{j}"
            shapes[f"{pre}.conv1.weight"] = (planes, cin, 1, 1)
            bn(f"{pre}.bn1", planes)
            shapes[f"{pre}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{pre}.bn2", planes)
            shapes[f"{pre}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{pre}.bn3", planes * 4)
            if j == 0:
                shapes[f"{pre}.downsample.0.weight"] = (planes * 4, cin, 1, 1)
                bn(f"{pre}.downsample.1", planes * 4)
            cin = planes * 4
    shapes["fc.weight"] = (num_classes, cin)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def make_state_dict(depth: int, width: int = 64, num_classes: int = 1000, seed: int = 0) -> dict:
    """A torchvision-format ResNet state dict (`state_dict_shapes`) with seeded random weights:
    convs He-normal, BN affine and running statistics non-trivial, classifier small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in state_dict_shapes(depth, width, num_classes).items():
        if key == "fc.weight":
            sd[key] = torch.randn(*shape, generator=g) * 0.01
        elif key == "fc.bias":
            sd[key] = torch.zeros(*shape)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(*shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith(".weight"):
            sd[key] = torch.rand(*shape, generator=g) * 0.5 + 0.5
        elif key.endswith(".bias") or key.endswith(".running_mean"):
            sd[key] = torch.rand(*shape, generator=g) * 0.2 - 0.1
        else:  # running_var
            sd[key] = torch.rand(*shape, generator=g) * 0.5 + 0.75
    return sd


def write_test_file(
    out: str | Path,
    depth: int,
    width: int = 64,
    num_classes: int = 1000,
    seed: int = 0,
    zip_format: bool = False,
    deterministic: bool = False,
) -> str:
    """Write `make_state_dict(...)` with torch.save (legacy, non-zip serialisation by default, as
    torchvision's 2017 files) and return the file's SHA-256. The tensors are the same for a seed;
    the bytes are not (the legacy serialiser embeds storage addresses; the zip one names its
    records after the file), so use the printed hash of the file written — or
    `deterministic=True`: zip format serialised in memory (records under `archive/`), whose bytes
    depend only on the seed, the shapes and the torch version (the full-scale rehearsal pins
    their SHA-256 in params/rehearsal.yaml; a test checks it)."""
    import torch  # only here: the CLI path stays light

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sd = make_state_dict(depth, width, num_classes, seed)
    if deterministic:
        buf = io.BytesIO()
        torch.save(sd, buf)
        tmp.write_bytes(buf.getvalue())
    else:
        torch.save(sd, tmp, _use_new_zipfile_serialization=zip_format)
    os.replace(tmp, out)
    return dl.sha256_file(out)


# ----------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """`smallbig pretrained fetch | list | make-test-file`."""
    p = sub.add_parser(
        "pretrained",
        help="ImageNet initialisation files: fetch, list, test files",
        description="The ImageNet-trained 2-D ResNets the trainings start from, "
        "declared under `pretrained_weights:` in the params.",
    )
    psub = p.add_subparsers(dest="pretrained_command", metavar="ACTION")
    psub.required = True

    q = psub.add_parser("fetch", help="download and verify declared weights into data/pretrained/")
    q.add_argument("names", nargs="*", metavar="NAME", help="declared names (e.g. torchvision-resnet50)")
    q.add_argument("--all", action="store_true", help="every declared name")
    q.add_argument(
        "--params",
        help="params file whose pretrained_weights to use (default params/base.yaml; "
        "follows `extends`; an experiment id works too)",
    )
    q.add_argument("--overlay", help="overlay applied to --params (e.g. params/embedded.yaml)")
    q.add_argument(
        "--from",
        dest="source",
        metavar="URL_OR_PATH",
        help="fetch from here instead of the declared url (one NAME; a mirror, a local copy)",
    )
    q.add_argument(
        "--root", default=".", help="directory the declared `file` paths are relative to (default: .)"
    )
    q.add_argument("--retries", type=int, default=3)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_fetch)

    q = psub.add_parser("list", help="declared weights and whether each file is present and verified")
    q.add_argument("--params")
    q.add_argument("--overlay")
    q.add_argument("--root", default=".")
    q.set_defaults(func=_list)

    q = psub.add_parser(
        "make-test-file",
        help="write a torchvision-format ResNet with seeded random weights and print its SHA-256",
    )
    q.add_argument("--depth", type=int, choices=sorted(LAYERS), required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--width", type=int, default=64, help="stem width (64 = torchvision's shapes)")
    q.add_argument("--num-classes", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--deterministic",
        action="store_true",
        help="bytes that depend only on seed, shapes and torch version (zip format)",
    )
    q.add_argument(
        "--zip",
        action="store_true",
        help="torch's zip serialisation (default: the legacy format of torchvision's 2017 files)",
    )
    q.set_defaults(func=_make_test_file)


def _fetch(args) -> int:
    declared = declared_weights(args.params, args.overlay)
    names = sorted(declared) if args.all else list(args.names)
    if not names:
        raise PretrainedError(
            "give one or more NAMEs or --all (declared: " + (", ".join(sorted(declared)) or "none") + ")"
        )
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise PretrainedError(
            f"not declared under pretrained_weights in {args.params or default_params_file()}: "
            f"{', '.join(unknown)} (declared: {', '.join(sorted(declared)) or 'none'})"
        )
    if args.source and len(names) != 1:
        raise PretrainedError("--from takes exactly one NAME")
    failures: list[Exception] = []
    for name in names:  # one failure does not stop the others
        try:
            fetch(
                name,
                declared[name],
                root=args.root,
                url=args.source,
                retries=args.retries,
                progress=not args.no_progress,
            )
        except (ChecksumError, dl.DownloadError) as e:
            failures.append(e)
    if failures:
        raise FetchError(failures)
    return EXIT_OK


def _list(args) -> int:
    declared = declared_weights(args.params, args.overlay)
    for name, entry in sorted(declared.items()):
        path = Path(args.root) / entry["file"]
        if not path.exists():
            state = "missing (smallbig pretrained fetch " + name + ")"
        else:
            try:
                verify(path, entry, name)
                state = "verified"
            except ChecksumError as e:
                state = f"BAD: {e}"
        print(f"{name:24s} ResNet-{entry['depth']:<4d} {entry['file']}  {state}")
    return 0


def _make_test_file(args) -> int:
    digest = write_test_file(
        args.out,
        args.depth,
        args.width,
        args.num_classes,
        args.seed,
        args.zip,
        deterministic=args.deterministic,
    )
    print(f"{digest}  {args.out}")
    return 0
