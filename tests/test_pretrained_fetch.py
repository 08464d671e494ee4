"""ImageNet initialisation in the pipeline: declared weights in params, `smallbig pretrained fetch`
(resumable download over a loopback HTTP server with Range support, SHA-256 verification before
the atomic rename, mismatches kept aside, exit codes), `make-test-file` (torchvision's key names
and shapes, without torchvision), params validation of `model.pretrained`, the workflow's
download jobs, and the engine loading (and refusing) the verified file for a fresh training.
Nothing here touches the network: the "torchvision" files are generated."""

from __future__ import annotations

import copy
import hashlib
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from http_mirror import serve

from smallbig import cli, config
from smallbig.config import ParamsError, load_params
from smallbig.models import weights as W
from smallbig.models.weights import SOURCE_DEPTH

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
FILE = "data/pretrained/r50-test.pth"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def r50(tmp_path_factory) -> tuple[Path, str]:
    """A small torchvision-format ResNet-50 file (width 8, 1000 classes) and its SHA-256."""
    path = tmp_path_factory.mktemp("src") / "resnet50-test.pth"
    digest = W.write_test_file(path, 50, width=8, seed=1)
    assert digest == _sha(path)
    return path, digest


def _params_file(
    tmp_path: Path, url: str, sha256: str, size: int | None = None, name: str = "test-r50", file: str = FILE
) -> Path:
    entry = {"url": url, "sha256": sha256, "depth": 50, "file": file}
    if size is not None:
        entry["size"] = size
    p = tmp_path / "weights.yaml"
    p.write_text(yaml.safe_dump({"pretrained_weights": {name: entry}}))
    return p


def _fetch(*args: str) -> int:
    return cli.main(["pretrained", "fetch", *args, "--no-progress"])


# --------------------------------------------------------------------------- loopback mirror
@pytest.fixture()
def mirror(r50):
    src, _ = r50
    with serve(src.parent, log_head=False) as (base, handler):
        yield f"{base}/{src.name}", handler


# --------------------------------------------------------------------------- fetch
def test_fetch_downloads_verifies_and_a_second_fetch_does_nothing(r50, mirror, tmp_path, monkeypatch, capsys):
    src, digest = r50
    url, h = mirror
    monkeypatch.chdir(tmp_path)
    pf = _params_file(tmp_path, url, digest, size=src.stat().st_size)
    assert _fetch("test-r50", "--params", str(pf)) == 0
    dest = tmp_path / FILE
    assert _sha(dest) == digest and not (tmp_path / (FILE + ".part")).exists()
    assert h.log == [(src.name, None)]
    assert "verified" in capsys.readouterr().err
    # again: the file is there and verified, nothing is requested
    assert _fetch("--all", "--params", str(pf)) == 0
    assert h.log == [(src.name, None)]
    assert "nothing to download" in capsys.readouterr().err
    # the list shows it verified
    assert cli.main(["pretrained", "list", "--params", str(pf)]) == 0
    assert "verified" in capsys.readouterr().out


def test_interrupted_download_resumes_with_a_range_request(r50, mirror, tmp_path, monkeypatch):
    src, digest = r50
    url, h = mirror
    monkeypatch.chdir(tmp_path)
    size = src.stat().st_size
    h.drop_first[src.name] = size // 2
    pf = _params_file(tmp_path, url, digest)
    assert _fetch("test-r50", "--params", str(pf)) == 0  # the retry continues where it broke off
    assert _sha(tmp_path / FILE) == digest
    assert h.log == [(src.name, None), (src.name, f"bytes={size // 2}-")]


def test_existing_partial_file_is_continued(r50, mirror, tmp_path, monkeypatch):
    src, digest = r50
    url, h = mirror
    monkeypatch.chdir(tmp_path)
    part = tmp_path / (FILE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(src.read_bytes()[:1000])
    assert _fetch("test-r50", "--params", str(_params_file(tmp_path, url, digest))) == 0
    assert h.log == [(src.name, "bytes=1000-")]
    assert _sha(tmp_path / FILE) == digest and not part.exists()


def test_wrong_hash_exits_2_names_both_hashes_and_keeps_the_download_aside(
    r50, mirror, tmp_path, monkeypatch, capsys
):
    src, digest = r50
    url, _ = mirror
    monkeypatch.chdir(tmp_path)
    wrong = "0" * 64
    assert _fetch("test-r50", "--params", str(_params_file(tmp_path, url, wrong))) == 2
    err = capsys.readouterr().err
    assert wrong in err and digest in err and FILE in err
    assert not (tmp_path / FILE).exists() and not (tmp_path / (FILE + ".part")).exists()
    bad = tmp_path / (FILE + ".bad-sha256")
    assert _sha(bad) == digest and str(bad.name) in err  # kept, not deleted
    # the same through the command line: exit code 2
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "smallbig",
            "pretrained",
            "fetch",
            "test-r50",
            "--params",
            str(tmp_path / "weights.yaml"),
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and wrong in r.stderr and digest in r.stderr


def test_a_present_file_with_a_wrong_hash_is_moved_aside_and_fetched_again(
    r50, mirror, tmp_path, monkeypatch
):
    src, digest = r50
    url, h = mirror
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / FILE
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"something else")
    assert _fetch("test-r50", "--params", str(_params_file(tmp_path, url, digest))) == 0
    assert _sha(dest) == digest and len(h.log) == 1
    assert (tmp_path / (FILE + ".bad-sha256")).read_bytes() == b"something else"


def test_prefix_fallback_and_size_check(r50, mirror, tmp_path, monkeypatch, capsys):
    src, digest = r50
    url, _ = mirror
    monkeypatch.chdir(tmp_path)
    # only the 8-hex prefix (as torchvision's file names): checked as a prefix, full hash printed
    assert _fetch("test-r50", "--params", str(_params_file(tmp_path, url, digest[:8]))) == 0
    assert digest in capsys.readouterr().err
    (tmp_path / FILE).unlink()
    assert _fetch("test-r50", "--params", str(_params_file(tmp_path, url, "deadbeef"))) == 2
    # a declared size that does not match is refused too
    pf = _params_file(tmp_path, url, digest, size=src.stat().st_size + 1)
    assert _fetch("test-r50", "--params", str(pf)) == 2
    assert "bytes" in capsys.readouterr().err and not (tmp_path / FILE).exists()


def test_file_urls_plain_paths_and_from(r50, tmp_path, monkeypatch):
    src, digest = r50
    monkeypatch.chdir(tmp_path)
    for i, url in enumerate((src.as_uri(), str(src))):
        file = f"data/pretrained/copy{i}.pth"
        assert _fetch("test-r50", "--params", str(_params_file(tmp_path, url, digest, file=file))) == 0
        assert _sha(tmp_path / file) == digest
    # --from: a mirror or local copy instead of the declared url (same verification)
    pf = _params_file(tmp_path, "https://unreachable.invalid/x.pth", digest)
    assert _fetch("test-r50", "--params", str(pf), "--from", str(src)) == 0
    assert _sha(tmp_path / FILE) == digest


def test_bad_requests_exit_2(r50, mirror, tmp_path, monkeypatch, capsys):
    src, digest = r50
    url, _ = mirror
    monkeypatch.chdir(tmp_path)
    pf = _params_file(tmp_path, url + ".missing", digest)
    assert _fetch("test-r50", "--params", str(pf)) == 2  # 404
    assert "not found" in capsys.readouterr().err
    assert _fetch("nope", "--params", str(pf)) == 2  # not declared
    assert "not declared" in capsys.readouterr().err
    assert _fetch("--params", str(pf)) == 2  # nothing asked
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"pretrained_weights": {"x": {"url": url, "sha256": "xyz", "depth": 50, "file": FILE}}}
        )
    )
    assert _fetch("x", "--params", str(bad)) == 2  # invalid declaration
    assert "pretrained_weights.x.sha256" in capsys.readouterr().err


# --------------------------------------------------------------------------- test files
def test_make_test_file_has_torchvision_keys_and_shapes(tmp_path):
    # parameter counts of torchvision's resnet50 / resnet101 (running statistics not counted)
    for depth, n_keys, n_params in ((50, 267, 25_557_032), (101, 522, 44_549_160)):
        shapes = W.state_dict_shapes(depth)
        assert len(shapes) == n_keys
        assert sum(math.prod(s) for k, s in shapes.items() if "running" not in k) == n_params
    shapes = W.state_dict_shapes(50)
    assert list(shapes)[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert shapes["fc.weight"] == (1000, 2048) and "layer3.6.conv1.weight" not in shapes
    assert "layer3.22.conv3.weight" in W.state_dict_shapes(101)
    # the CLI writes the file and prints its SHA-256; torch reads it as a weights-only state dict
    out = tmp_path / "t.pth"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "smallbig",
            "pretrained",
            "make-test-file",
            "--depth",
            "101",
            "--width",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.split()[0] == _sha(out)
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == W.state_dict_shapes(101, width=4)
    again = W.make_state_dict(101, width=4)
    assert all(torch.equal(sd[k], again[k]) for k in sd)  # seeded


def test_test_file_loads_into_the_video_nets(r50, tmp_path):
    from smallbig.models import build_model, load_pretrained_2d

    src, _ = r50
    cfg = copy.deepcopy(load_params(config.experiment_path("k400-r23-sb-full"))["model"])
    cfg.update(base_width=8, num_classes=5)
    summary = load_pretrained_2d(build_model(cfg), src)  # the legacy (2017) serialisation
    assert summary["source_depth"] == 50 and summary["loaded"] > 100
    path101 = tmp_path / "r101.pth"
    W.write_test_file(path101, 101, width=8, zip_format=True)
    cfg = copy.deepcopy(load_params(config.experiment_path("k400-r101-sb-typical-32f"))["model"])
    cfg.update(base_width=8, num_classes=5)
    assert not load_pretrained_2d(build_model(cfg), path101)["unused"]


# --------------------------------------------------------------------------- params
def test_every_experiment_loads_a_declared_file_of_its_depth():
    base = yaml.safe_load((REPO / "params/base.yaml").read_text())
    declared = base["pretrained_weights"]
    assert set(declared) == {"torchvision-resnet50", "torchvision-resnet101"}
    for name, e in declared.items():
        # torchvision names its files <arch>-<first 8 hex of the SHA-256>.pth
        arch, prefix = re.fullmatch(r"data/pretrained/(resnet\d+)-([0-9a-f]{8})\.pth", e["file"]).groups()
        assert e["sha256"].startswith(prefix) and e["url"].endswith(Path(e["file"]).name)
        assert name == f"torchvision-{arch}" and arch == f"resnet{e['depth']}"
    assert len(declared["torchvision-resnet50"]["sha256"]) == 64
    seen = set()
    for exp in config.experiment_ids():
        p = load_params(config.experiment_path(exp))
        name, depth = p["model"]["pretrained"], p["model"]["depth"]
        assert name in declared and declared[name]["depth"] == SOURCE_DEPTH[depth], exp
        assert (name == "torchvision-resnet101") == (depth == 101), exp
        assert p["pretrained_weights"] == {name: declared[name]}  # only its own declaration
        seen.add(name)
        # the embedded default trains from scratch, explicitly, and declares nothing
        e = load_params(config.experiment_path(exp), overlay=REPO / "params/embedded.yaml")
        assert e["model"]["pretrained"] == "none" and "pretrained_weights" not in e
    assert seen == set(declared)


def _exp(tmp_path: Path, exp: str = "k400-r23-c2d", **model) -> Path:
    path = tmp_path / f"{exp}-test.yaml"
    path.write_text(yaml.safe_dump({"extends": str(config.experiment_path(exp)), "id": exp, "model": model}))
    return path


def test_validation_of_model_pretrained(tmp_path):
    # null: refused, naming the file and key, and saying how to train from scratch
    null = _exp(tmp_path, pretrained=None)
    with pytest.raises(ParamsError) as e:
        load_params(null)
    msg = str(e.value)
    assert (
        str(null) in msg and "model.pretrained" in msg and "`none`" in msg and "torchvision-resnet50" in msg
    )
    r = subprocess.run(
        [sys.executable, "-m", "smallbig", "params", "validate", str(null)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "model.pretrained" in r.stderr and "none" in r.stderr
    # none and a path are accepted
    r = subprocess.run(
        [sys.executable, "-m", "smallbig", "params", "validate", str(_exp(tmp_path, pretrained="none"))],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert load_params(_exp(tmp_path, pretrained="weights/my-resnet50.pth"))["model"]["pretrained"].endswith(
        ".pth"
    )
    # an undeclared name; the wrong depth
    with pytest.raises(ParamsError, match=r"model.pretrained: 'resnet50' is not declared"):
        load_params(_exp(tmp_path, pretrained="resnet50"))
    with pytest.raises(ParamsError, match="ResNet-101, but an R23 model loads ResNet-50"):
        load_params(_exp(tmp_path, pretrained="torchvision-resnet101"))
    with pytest.raises(ParamsError, match="ResNet-50, but an R101 model loads ResNet-101"):
        load_params(_exp(tmp_path, "k400-r101-sb-typical-32f", pretrained="torchvision-resnet50"))
    # missing in a resolved file
    p = load_params(config.experiment_path("k400-r23-c2d"))
    del p["model"]["pretrained"]
    resolved = tmp_path / "resolved.yaml"
    config.dump_params(p, resolved)
    with pytest.raises(ParamsError, match="model.pretrained: not set .missing."):
        config.load_resolved(resolved)
    # a bad declaration
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "extends": str(config.experiment_path("k400-r23-c2d")),
                "pretrained_weights": {"torchvision-resnet50": {"file": "/etc/x.pth"}},
            }
        )
    )
    with pytest.raises(ParamsError, match="pretrained_weights.torchvision-resnet50"):
        load_params(bad)


# --------------------------------------------------------------------------- workflow
def test_workflow_downloads_once_per_file_before_the_trainings(tmp_path_factory):
    from slurm.workspace import copy_repo, job_counts, jobs_of, snakemake

    repo = copy_repo(tmp_path_factory.mktemp("wf") / "repo")
    out = snakemake(repo, "--profile", "slurm", "-n", "all", timeout=300).stdout  # the full run
    counts = job_counts(out)
    assert counts["pretrained"] == 2 and counts["train"] == 25
    assert sorted(jobs_of(out, "pretrained")) == ["file=resnet101-5d3b4d8f.pth", "file=resnet50-19c8e357.pth"]
    for block in re.split(r"\n(?=\[)", out):
        if re.search(r"^rule train:", block, re.M):
            exp = re.search(r"wildcards: exp=(\S+)", block).group(1)
            want = "resnet101-5d3b4d8f" if "r101" in exp else "resnet50-19c8e357"
            assert f"data/pretrained/{want}.pth" in re.search(r"input: (.*)", block).group(1), exp
    assert counts["train"] == len(
        [
            b
            for b in re.split(r"\n(?=\[)", out)
            if "data/pretrained/" in b and re.search(r"^rule train:", b, re.M)
        ]
    )
    emb = snakemake(repo, "--profile", "embedded", "-n", timeout=300).stdout
    assert "pretrained" not in job_counts(emb) and job_counts(emb)["train"] == 25


# --------------------------------------------------------------------------- engine
class _Clips(torch.utils.data.Dataset):
    def __init__(self, n: int, mode: str):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, 2, 32, 32), generator=g, dtype=torch.uint8)
        self.mode = mode

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"video": self.x[i], "label": i % 5, "video_id": f"v{i:03d}"}


def _collate(batch):
    return {
        "video": torch.stack([b["video"] for b in batch]),
        "label": torch.tensor([b["label"] for b in batch]),
        "video_id": [b["video_id"] for b in batch],
        "skipped": [],
    }


def _normalize(x, mean, std):
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)


def _builders():
    from smallbig.models import build_model

    return (
        build_model,
        lambda params, split, mode, protocol=None: _Clips(8 if split == "train" else 4, mode),
        _collate,
        _normalize,
    )


def _train_params(digest: str) -> dict:
    p = load_params(config.experiment_path("k400-r23-c2d"))
    p["model"].update(base_width=8, num_classes=5, pretrained="test-r50")
    p["pretrained_weights"] = {
        "test-r50": {"url": "https://unused.invalid/x.pth", "sha256": digest, "depth": 50, "file": FILE}
    }
    p["data"].update(num_frames=2, crop_size=32, num_workers=0, root="/nonexistent")
    p["train"].update(
        epochs=1,
        batch_size=4,
        per_gpu_batch=4,
        lr=1e-9,
        weight_decay=0.0,
        amp="none",
        checkpoint_every_iters=100,
        val_every_epochs=1,
        seed=0,
        warmup_epochs=0,
    )
    config.validate(p)
    return p


def test_training_loads_the_verified_file_and_refuses_a_missing_or_wrong_one(r50, tmp_path, monkeypatch):
    from smallbig.engine.train import train
    from smallbig.models.pretrained import PretrainedError

    src, digest = r50
    monkeypatch.setenv("SMALLBIG_NO_MLFLOW", "1")
    monkeypatch.chdir(tmp_path)
    params = _train_params(digest)
    logs: list[str] = []
    kw = {"device": "cpu", "track": False, "progress": False, "builders": _builders(), "log": logs.append}
    # missing: a clear error that says how to get it
    with pytest.raises(PretrainedError, match=r"not found.*smallbig pretrained fetch test-r50"):
        train(params, tmp_path / "run0", **kw)
    # present and verified: loaded into the fresh model (1x7x7 from the 7x7 stem, lr ~ 0)
    dest = tmp_path / FILE
    dest.parent.mkdir(parents=True)
    dest.write_bytes(src.read_bytes())
    assert train(params, tmp_path / "run", **kw) == 0
    assert any("initialised from test-r50" in m for m in logs)
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", map_location="cpu", weights_only=True)
    sd = torch.load(src, map_location="cpu", weights_only=True)
    torch.testing.assert_close(ckpt["model"]["stem.conv.weight"], sd["conv1.weight"][:, :, None])
    torch.testing.assert_close(
        ckpt["model"]["res3.0.conv2.conv.weight"], sd["layer2.0.conv2.weight"][:, :, None]
    )
    # the verification is cached (next to the file): no second hash of the whole file
    assert (tmp_path / (FILE + ".verified.json")).is_file()
    with monkeypatch.context() as m:
        m.setattr("smallbig.data.download.sha256_file", lambda p: pytest.fail("hashed again"))
        W._MEMO.clear()
        assert W.resolve_pretrained(params) == Path(FILE)
    # a resumed run does not need the file any more
    dest.rename(tmp_path / "elsewhere.pth")
    assert train(params, tmp_path / "run", resume=True, **kw) == 0
    # another file under the declared name: refused, naming both hashes
    dest.write_bytes(src.read_bytes()[:-1] + b"\0")
    with pytest.raises(W.ChecksumError) as e:
        train(params, tmp_path / "run2", **kw)
    assert (
        digest in str(e.value) and _sha(dest) in str(e.value) and "smallbig pretrained fetch" in str(e.value)
    )
    # none: from scratch, no file needed
    dest.unlink()
    scratch = copy.deepcopy(params)
    scratch["model"]["pretrained"] = "none"
    assert train(scratch, tmp_path / "run3", **kw) == 0
    first = torch.load(tmp_path / "run3/checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert not torch.allclose(first["stem.conv.weight"], sd["conv1.weight"][:, :, None])
    # through the command line: exit 2 and the message
    config.dump_params(params, tmp_path / "params.yaml")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "smallbig",
            "train",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "run4"),
            "--no-mlflow",
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "smallbig pretrained fetch test-r50" in r.stderr
