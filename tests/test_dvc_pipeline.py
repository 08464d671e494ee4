"""The DVC pipeline (dvc.yaml, params.yaml): hyper-parameters as DVC params that reach the
resolved params (one source of truth, schema-checked), `dvc exp show` with every experiment's
top-1 in one column, the scale switch (full scale points at a prepared dataset, makes no toy
data), the prepared-dataset fingerprint, and a lab's SSH remote against a local sshd.

Each DVC test works in a scratch copy of the repository (tests/slurm/workspace.py)."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm.workspace import REPO, VENV_BIN, copy_repo

from smallbig import cli
from tests.test_workflow_e2e import run as e2e_run

DVC = str(VENV_BIN / "dvc")


def run(cmd: list[str], cwd: Path, timeout: float = 600, check: bool = True, **extra):
    """tests/test_workflow_e2e.py's `run` (git identity, failure with the output), DVC analytics off."""
    return e2e_run(cmd, cwd, timeout, check, **{"DVC_NO_ANALYTICS": "1", **extra})


def git_repo_copy(dest: Path) -> Path:
    root = copy_repo(dest)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "code"], root)
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_prepared_root(root: Path, dataset: str = "kinetics400", fmt: str = "frames") -> Path:
    """The files `smallbig data prepare` leaves that identify a prepared dataset (lists, check
    report, manifest last); no videos: the fingerprint never reads them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("frames/train/a 64 0\nframes/train/b 64 1\n")
    (root / "val.txt").write_text("frames/val/c 64 0\n")
    (root / "quarantine.json").write_text('{"ok": 3, "bad": []}\n')
    splits = {
        s: {"list": f"{s}.txt", "sha256": _sha(root / f"{s}.txt"), "count": n, "usable": n,
            "quarantined": 0, "num_missing": 0}
        for s, n in (("train", 2), ("val", 1))
    }  # fmt: skip
    manifest = {"dataset": dataset, "format": fmt, "num_classes": 400, "splits": splits,
                "check": {"report": "quarantine.json"}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --------------------------------------------------------------------------- params (fast)
def test_dvc_params_are_the_last_overlay_and_schema_checked(tmp_path, capsys):
    exp = str(REPO / "params/experiments/k400-r23-c2d.yaml")
    overlay = str(REPO / "params/embedded.yaml")
    dvc_params = tmp_path / "params.yaml"
    dvc_params.write_text(
        "experiment: k400-r23-c2d\nscale: embedded\nprotocol: 1x1\n"
        "train: {lr: 0.0123, epochs: null, seed: 7}\nmodel: {dropout: 0.5}\n"
    )
    out = tmp_path / "resolved.yaml"
    args = ["params", "resolve", exp, "--overlay", overlay, "--dvc-params", str(dvc_params)]
    assert cli.main([*args, "--out", str(out)]) == 0
    p = yaml.safe_load(out.read_text())
    assert p["train"]["lr"] == 0.0123 and p["train"]["seed"] == 7 and p["model"]["dropout"] == 0.5
    assert p["train"]["epochs"] == 2  # null: the embedded overlay's value is kept
    assert p["model"]["base_width"] == 8 and "experiment" not in p and "scale" not in p
    # --set comes after the DVC params
    assert cli.main([*args, "--set", "train.lr=0.5", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["train"]["lr"] == 0.5
    capsys.readouterr()
    assert cli.main([*args, "--set", "train.lr=.inf", "--out", str(out)]) == 2
    assert "--set train.lr=.inf: inf is not a finite number" in capsys.readouterr().err
    # an unknown or mistyped key is refused, naming the key and where it came from
    dvc_params.write_text("experiment: k400-r23-c2d\ntrain: {lrr: 0.01}\n")
    capsys.readouterr()
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train: unknown key(s) 'lrr'" in err and f"(+ {dvc_params})" in err
    dvc_params.write_text("experiment: k400-r23-c2d\ntrain: {lr: fast}\n")
    assert cli.main([*args, "--out", str(out)]) == 2
    assert "train.lr: 'fast' is not of type 'number'" in capsys.readouterr().err


def test_the_repository_params_yaml_overrides_nothing():
    """params.yaml only lists the hyper-parameters (null): the resolved experiment is exactly the
    one Snakemake trains (`smallbig params resolve` with the same overlay)."""
    from smallbig import config, config_cli

    dvc = yaml.safe_load((REPO / "params.yaml").read_text())
    assert dvc["scale"] == "embedded" and dvc["experiment"] in config.experiment_ids()
    assert set(dvc["train"]) >= {"lr", "epochs", "batch_size", "weight_decay"}
    assert config_cli.dvc_overrides(str(REPO / "params.yaml")) == {}
    for scale in ("embedded", "full"):
        assert (REPO / f"params/{scale}.yaml").is_file()
    exp = config.experiment_path(dvc["experiment"])
    assert config.load_params(exp, overlay=REPO / "params/full.yaml") == config.load_params(exp)


# --------------------------------------------------------------------------- data fingerprint
def test_the_data_fingerprint_checks_the_prepared_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    resolved = ["params", "resolve", "k400-r23-c2d", "--set", "data.root=prep", "--out", str(params)]
    assert cli.main(resolved) == 0
    root = fake_prepared_root(tmp_path / "prep")
    out = tmp_path / "data.json"
    assert cli.main(["dvc", "data", str(params), "--out", str(out)]) == 0
    fp = json.loads(out.read_text())
    assert fp["root"] == "prep" and fp["dataset"] == "kinetics400"
    assert fp["manifest_sha256"] == _sha(root / "manifest.json")
    assert fp["splits"]["train"]["list_sha256"] == _sha(root / "train.txt")
    capsys.readouterr()
    (root / "train.txt").write_text("frames/train/a 64 0\n")  # changed behind the manifest
    assert cli.main(["dvc", "data", str(params), "--out", str(out)]) == 2
    assert "prep/train.txt: changed since prep/manifest.json was written" in capsys.readouterr().err
    fake_prepared_root(root, fmt="video")  # prepared as videos, the params want frames
    assert cli.main(["dvc", "data", str(params), "--out", str(out)]) == 2
    assert "format is 'video', but data.format" in capsys.readouterr().err
    (root / "manifest.json").unlink()
    assert cli.main(["dvc", "data", str(params), "--out", str(out)]) == 2
    assert "prep: not a prepared dataset (no manifest.json)" in capsys.readouterr().err


# --------------------------------------------------------------------------- the scale switch
@pytest.mark.slow
def test_scale_full_points_at_the_prepared_dataset(tmp_path):
    """`scale: full`: the experiment's own params (no embedded overlay) and its data.root, a
    prepared dataset that is checked, never re-made; no toy data is generated. Then the full
    run's snapshot versions that dataset's sources, lists and manifest, not its frames."""
    root = git_repo_copy(tmp_path / "repo")
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("\nscale: embedded", "\nscale: full"))
    run([DVC, "repro", "params"], root)
    p = yaml.safe_load((root / "results/dvc/params.yaml").read_text())
    assert p["data"]["root"] == "data/kinetics400" and p["model"]["base_width"] == 64
    assert p["train"]["epochs"] == 110 and p["model"]["pretrained"] == "torchvision-resnet50"
    # no prepared dataset yet: the data stage says so, and makes nothing
    r = run([DVC, "repro", "data"], root, check=False)
    assert r.returncode != 0
    assert "data/kinetics400: not a prepared dataset (no manifest.json)" in r.stdout + r.stderr
    fake_prepared_root(root / "data/kinetics400")
    r = run([DVC, "repro", "data"], root)
    assert "snakemake" not in r.stdout + r.stderr
    fp = json.loads((root / "results/dvc/data.json").read_text())
    assert fp["root"] == "data/kinetics400"
    assert fp["manifest_sha256"] == _sha(root / "data/kinetics400/manifest.json")
    assert not (root / "data/embedded").exists()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "params/full.yaml" in [d["path"] for d in lock["params"]["deps"]]
    # what `dvc repro` would run next: the full-scale training of the same params file
    r = run([DVC, "repro", "--dry"], root, check=False)
    text = r.stdout + r.stderr
    assert "smallbig train results/dvc/params.yaml --out results/dvc/full/k400-r23-sb-full/train" in text

    # versioning the full run's data: sources, lists, manifest; not frames nor extraction work
    k400 = root / "data/kinetics400"
    for rel, content in (
        ("raw/train/part_0.tar.gz", b"tarball"),
        ("raw/annotations/train.csv", b"label,youtube_id\n"),
        ("raw/extract/train/tree-part_0.tar.gz/x.mp4", b"extracted"),
        ("videos/train/x.mp4", b"extracted video"),
        ("frames/train/x/img_00001.jpg", b"derived frame"),
    ):
        (k400 / rel).parent.mkdir(parents=True, exist_ok=True)
        (k400 / rel).write_bytes(content)
    (root / "results/full/k400-r23-c2d/train").mkdir(parents=True)
    (root / "results/full/k400-r23-c2d/train/checkpoint.pt").write_bytes(b"weights")
    (root / ".snakemake/metadata").mkdir(parents=True)
    (root / ".snakemake/metadata/record").write_text("{}")
    remote = tmp_path / "remote"
    run([DVC, "remote", "modify", "--local", "local", "url", str(remote)], root)
    run(["bash", "workflow/scripts/dvc-snapshot.sh", "full"], root)
    outs = [
        o["path"] for o in yaml.safe_load((root / "workflow/dvc/data-kinetics400.dvc").read_text())["outs"]
    ]
    rel = sorted(o.removeprefix("../../data/kinetics400/") for o in outs)
    assert rel == ["manifest.json", "quarantine.json", "raw/annotations", "raw/train", "train.txt", "val.txt"]
    stored = {p.read_bytes() for p in remote.rglob("*") if p.is_file()}
    assert b"tarball" in stored and b"weights" in stored
    assert not {b"extracted", b"extracted video", b"derived frame"} & stored


# --------------------------------------------------------------------------- experiments
@pytest.mark.slow
def test_dvc_exp_show_lists_every_experiment_top1_in_one_column(tmp_path):
    """Two real `dvc exp run` at the embedded scale (C2D, 1 epoch, 1x1 views, toy K400 only):
    -S train.lr reaches the training, the second run starts afresh (its last.pt of other
    params is set aside), and `dvc exp show` has both top-1 values under the same key."""
    root = git_repo_copy(tmp_path / "repo")
    e = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    # the toy source trees of Kinetics only, fewer videos (the data stage prepares them)
    toy = ["smallbig", "data", "toy", "--out", "data/embedded/source", "--datasets", "kinetics400"]
    run([*toy, "--per-class", "train=4", "val=2"], root, **e)
    base = ["-S", "experiment=k400-r23-c2d", "-S", "protocol=1x1", "-S", "train.epochs=1"]
    runs = {}
    for name, lr in (("lr-a", 0.05), ("lr-b", 0.01)):
        r = run([DVC, "exp", "run", "metrics", "-n", name, *base, "-S", f"train.lr={lr}"], root, **e)
        runs[name] = r.stdout + r.stderr
        plan = json.loads((root / "results/dvc/embedded/k400-r23-c2d/train/train_metrics.json").read_text())
        assert plan["batch_plan"]["lr"] == lr, plan["batch_plan"]  # what the training used
    assert "lr 0.01" in runs["lr-b"] and "the training starts afresh" in runs["lr-b"]
    show = json.loads(run([DVC, "exp", "show", "--json"], root).stdout)
    exps = {}
    for row in show:
        for x in row.get("experiments") or []:
            for rev in x["revs"]:
                exps[rev["name"]] = rev["data"]
    assert {"lr-a", "lr-b"} <= set(exps), list(exps)
    for name, lr in (("lr-a", 0.05), ("lr-b", 0.01)):
        data = exps[name]
        m = data["metrics"]["results/dvc/metrics.json"]["data"]
        assert m["experiment"] == "k400-r23-c2d" and m["protocol"] == "1x1"
        assert 0 <= m["top1"] <= 100 and m["top1"] <= m["top5"] <= 100
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        assert data["params"]["results/dvc/params.yaml"]["data"]["train"]["lr"] == lr
    # the training curves of both experiments in one plot (fixed paths: DVC overlays them)
    plots = json.loads(run([DVC, "plots", "diff", "lr-a", "lr-b", "--json"], root).stdout)["data"]
    for path, y in (("results/dvc/plots/loss.json", "loss"), ("results/dvc/plots/val_top1.json", "val_top1")):
        values = plots[path][0]["content"]["data"]["values"]
        assert {v["rev"] for v in values} == {"lr-a", "lr-b"}, values
        assert all(v["epoch"] == 1 and v[y] is not None for v in values), values


# --------------------------------------------------------------------------- SSH remote
SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """A throwaway sshd on a free loopback port, in the foreground (killed at the end): its own
    host key and config, and a generated user key, the only one it accepts."""
    if not Path(SSHD).is_file():
        pytest.fail("sshd is not installed (openssh-server): run `make system-deps`")
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation (as the package does)
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.time() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"sshd did not start: {(d / 'sshd.log').read_text()}") from None
                time.sleep(0.1)
        # the client's HOME: nothing of the user's ~/.ssh (keys, config, agent) is used. (The
        # server's host key is not checked by dvc-ssh at all: docs/workflow.md, "Remotes".)
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        yield {"port": port, "key": d / "user_key", "home": home, "log": d / "sshd.log"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_ssh_remote_push_then_pull_into_a_fresh_clone(sshd, tmp_path):
    r = subprocess.run([str(VENV_BIN / "python"), "-c", "import dvc_ssh"], capture_output=True)
    assert r.returncode == 0, "the dvc-ssh plugin is missing (pyproject.toml lists it)"
    e = {"HOME": str(sshd["home"]), "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc-global")}
    repo, clone, store = tmp_path / "repo", tmp_path / "clone", tmp_path / "lab-store"
    repo.mkdir()
    run(["git", "init", "-q"], repo, **e)
    run([DVC, "init", "-q"], repo, **e)
    url = f"ssh://127.0.0.1:{sshd['port']}{store}"
    run([DVC, "remote", "add", "-d", "lab", url], repo, **e)
    (repo / "data/lists").mkdir(parents=True)
    (repo / "data/lists/train.txt").write_text("a 1\nb 2\n")
    (repo / "data/part_0.tar.gz").write_bytes(os.urandom(300_000))
    run([DVC, "add", "data"], repo, **e)
    run(["git", "add", "-A"], repo, **e)
    run(["git", "commit", "-q", "-m", "data"], repo, **e)

    def credentials(where: Path) -> None:  # per user, never committed (.dvc/config.local)
        run([DVC, "remote", "modify", "--local", "lab", "user", getpass.getuser()], where, **e)
        run([DVC, "remote", "modify", "--local", "lab", "keyfile", str(sshd["key"])], where, **e)

    credentials(repo)
    run([DVC, "push"], repo, timeout=120, **e)
    assert sum(1 for p in store.rglob("*") if p.is_file()) == 3  # 2 files + the directory listing
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, **e)
    assert not (clone / "data").exists()
    credentials(clone)
    run([DVC, "pull"], clone, timeout=120, **e)
    for rel in ("data/lists/train.txt", "data/part_0.tar.gz"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert "Accepted publickey for" in sshd["log"].read_text()  # both went through this sshd
