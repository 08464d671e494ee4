"""The full-scale rehearsal (workflow/config/rehearsal.yaml + params/rehearsal.yaml): the full
DAG of four experiments whose shapes span the paper (R23 and R50 at 8 x 224, R101 at 32 x 224,
SS-V2 R50 at 16 frames) with every shape kept and only counts cut, run through a real
single-node Slurm with the user's slurm profile: ImageNet initialisation through the
`pretrained` rule (generated files, SHA-256 checked), 2-GPU DDP trainings (torchrun in the
job), the tables' test protocols (10x3, 4x3, 2x3, 1x1 at 256 / 224 crops), the R50+R101
ensemble, tables, figures, feature maps and the report; the R23 training is preempted
(`scancel --signal=TERM --full`) mid-run and resumes. Wall time and peak memory per job are
printed and written to results/rehearsal/rehearsal-measurements.json of the scratch copy."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm.cluster import SlurmCluster, make_test_profile, missing_binaries
from slurm.workspace import REPO, VENV_BIN, copy_repo, env
from tracking_server import TrackingServer

EXPERIMENTS = ["k400-r23-sb-full", "k400-r50-sb-full", "k400-r101-sb-typical-32f", "sthv2-r50-sb-16f"]
SHAPES = {  # frames, training crop, GPUs (world size)
    "k400-r23-sb-full": (8, 224, 2),
    "k400-r50-sb-full": (8, 224, 2),
    "k400-r101-sb-typical-32f": (32, 224, 1),
    "sthv2-r50-sb-16f": (16, 224, 2),
}


def test_the_generated_imagenet_files_have_the_pinned_hashes(tmp_path):
    """params/rehearsal.yaml pins the SHA-256 of `make-test-file --deterministic`: the bytes
    depend only on seed, shapes and torch version (a torch upgrade shows up here)."""
    from smallbig.models.weights import write_test_file

    declared = yaml.safe_load((REPO / "params/rehearsal.yaml").read_text())["all"]["pretrained_weights"]
    for name, depth in (("torchvision-resnet50", 50), ("torchvision-resnet101", 101)):
        out = tmp_path / f"{depth}" / f"resnet{depth}.pth"
        digest = write_test_file(out, depth, deterministic=True)
        assert digest == declared[name]["sha256"], (name, digest)
        assert out.stat().st_size == declared[name]["size"]
        assert write_test_file(tmp_path / "again" / out.name, depth, deterministic=True) == digest


def test_the_rehearsal_keeps_every_shape_of_the_full_run():
    from smallbig import config

    for exp in EXPERIMENTS:
        full = config.load_params(config.experiment_path(exp))
        reh = config.load_params(config.experiment_path(exp), overlay=REPO / "params/rehearsal.yaml")
        for key in ("depth", "base_width", "num_classes", "stages", "unit", "formulation", "pretrained"):
            assert reh["model"][key] == full["model"][key], (exp, key)
        for key in (
            "num_frames",
            "crop_size",
            "train_short_side",
            "frame_short_side",
            "sampling",
            "frame_stride",
            "mean",
            "std",
        ):
            assert reh["data"].get(key) == full["data"].get(key), (exp, key)
        for key in ("short_side", "multi_crop_size", "single_crop_size"):
            assert reh["test"][key] == full["test"][key], (exp, key)
        assert set(reh["test"]["protocols"]) <= set(full["test"]["protocols"]), exp
        assert reh["train"]["amp"] == full["train"]["amp"]
        assert (reh["data"]["num_frames"], reh["data"]["crop_size"], reh["resources"]["gpus"]) == SHAPES[exp]


@pytest.mark.slow
def test_full_scale_rehearsal_through_slurm(tmp_path):
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)}): run `make system-deps`")
    root = copy_repo(tmp_path / "repo")
    with SlurmCluster(tmp_path / "slurm", gpus=2), TrackingServer(tmp_path / "mlflow") as server:
        profile = make_test_profile(
            REPO / "slurm/config.yaml", root / "profile", MAX_RUNTIME_MIN=60, MLFLOW_URI=f'"{server.uri}"'
        )
        log_path = root / "snakemake-rehearsal.log"
        t0 = time.time()
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                [
                    str(VENV_BIN / "snakemake"),
                    "--profile",
                    str(profile),
                    "--configfile",
                    "workflow/config/rehearsal.yaml",
                ],
                cwd=root,
                env=env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            preempted = _preempt_mid_run(root, "k400-r23-sb-full", proc)
            proc.wait(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
        wall = time.time() - t0
        text = log_path.read_text(errors="replace")
        assert proc.returncode == 0, text[-6000:]
        _check_results(root, server, text, preempted, wall)


def _train_log(root: Path, exp: str) -> str:
    f = root / f"logs/rehearsal/train/{exp}.log"
    return f.read_text(errors="replace") if f.exists() else ""


def _events(root: Path, exp: str) -> str:
    f = root / f"results/rehearsal/{exp}/train/train.log"
    return f.read_text(errors="replace") if f.exists() else ""


def _preempt_mid_run(root: Path, exp: str, proc) -> int:
    """scancel --signal=TERM --full the training job of `exp` once it has done an iteration."""
    end = time.time() + 2400
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError("the rehearsal ended before the preemption")
        found = re.findall(r"(\d+)/(\d+) \[", _train_log(root, exp))
        if found and 1 <= int(found[-1][0]) < int(found[-1][1]):
            out = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True).stdout
            jobs = [
                ln.split("|")[0]
                for ln in out.splitlines()
                if ln.split("|")[1:] == [f"rule_train_wildcards_{exp}"]
            ]
            if jobs:
                subprocess.run(["scancel", "--signal=TERM", "--full", jobs[0]], check=True)
                return int(found[-1][0])
        time.sleep(0.2)
    raise AssertionError(f"{exp} never reached its first iteration:\n{_train_log(root, exp)[-3000:]}")


def _check_results(root: Path, server: TrackingServer, text: str, preempted: int, wall: float):
    from smallbig import config

    res = root / "results/rehearsal"
    measured = {"wall_s": round(wall), "preempted_at_iteration": preempted, "jobs": {}}
    for exp in EXPERIMENTS:
        frames, crop, gpus = SHAPES[exp]
        p = yaml.safe_load((res / exp / "params.yaml").read_text())
        full = config.load_params(config.experiment_path(exp))
        assert p["model"]["base_width"] == 64 == full["model"]["base_width"]
        assert p["model"]["num_classes"] == full["model"]["num_classes"]  # 400 K400, 174 SS-V2
        assert (p["data"]["num_frames"], p["data"]["crop_size"]) == (frames, crop)
        m = json.loads((res / exp / "train/train_metrics.json").read_text())
        assert m["world_size"] == gpus and m["iterations"] >= 2, m
        log = _events(root, exp)
        name = "torchvision-resnet101" if "r101" in exp else "torchvision-resnet50"
        assert re.search(rf"initialised from {name} \(data/pretrained/rehearsal-resnet\d+-\w+\.pth", log), (
            log[-2000:]
        )
        for proto in p["test"]["protocols"]:
            ev = json.loads((res / exp / f"eval-{proto}/metrics.json").read_text())
            assert ev["num_videos"] >= 1 and ev["num_views"] == _views(proto), ev
    r23 = _events(root, "k400-r23-sb-full")
    assert re.search(r"stop \(signal SIGTERM\): checkpointed \S+last.pt at iteration \d+; exit 3", r23), r23[
        -3000:
    ]
    assert "resuming" in r23
    ens = json.loads((res / "ensembles/k400-sb-en-r50-r101-4x3/metrics.json").read_text())
    assert ens["num_videos"] >= 1
    assert (res / "reports/index.html").is_file()
    summary = json.loads((res / "reports/tables/summary.json").read_text())
    assert {t["number"] for t in summary["tables"]} == {8, 10, 11}
    for t in summary["tables"]:
        for r in t["rows"]:
            assert r["status"] == "done", (t["number"], r["label"], r["status"])
    # the pretrained files were "downloaded" by the rule and verified
    for f in ("rehearsal-resnet50-2a0d1413.pth", "rehearsal-resnet101-9b72d77f.pth"):
        assert (root / "data/pretrained" / f).is_file(), f
    # every training and evaluation logged to the tracking server on loopback
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sum(r.info.status == "FINISHED" for r in runs) >= 4 + 6, [r.info.status for r in runs]
    # peak memory (max RSS of the job's processes, Snakemake benchmarks) and time per job
    for bench in sorted((root / "logs/rehearsal/benchmarks").glob("*.tsv")):
        rows = bench.read_text().splitlines()
        head, vals = rows[0].split("\t"), rows[-1].split("\t")
        row = dict(zip(head, vals))
        measured["jobs"][bench.stem] = {
            "s": round(float(row["s"]), 1),
            "max_rss_mb": round(float(row["max_rss"]), 0),
        }
    for exp in EXPERIMENTS:
        hist = json.loads((res / exp / "train/history.json").read_text())
        measured["jobs"].setdefault(f"train-{exp}", {})["rank0_peak_rss_mb"] = round(hist[-1]["peak_mem_mb"])
    (res / "rehearsal-measurements.json").write_text(json.dumps(measured, indent=1))
    print(f"\nfull-scale rehearsal through Slurm: {wall:.0f} s\n" + json.dumps(measured, indent=1))


def _views(proto: str) -> int:
    c, k = proto.split("x")
    return int(c) * int(k)
