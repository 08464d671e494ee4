"""benchmarks/gpu_suite.py on the CPU (`--device cpu --smoke`: the same code path as on a GPU,
tiny models) and `smallbig plan` reading its json (measured rates instead of the guess).

One smoke run per module (SmokeRun, ~30 s of CPU): SmallBig-R23 (embedded widths, 4 x 112²,
batch 2) over the eager grid + one torch.compile (backend eager), SmallBig-R101 with an
impossible batch (every configuration must be recorded as out of memory, not crash the suite),
the data loader on real encoded toy videos (frames and video, 1 worker)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smallbig import cli, config
from smallbig.engine.runtime import amp_settings
from smallbig.models.info import build_meta_model, count_macs
from smallbig.spec import plan as planmod
from smallbig.spec.tables import load_tables

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
R23, R101 = "k400-r23-sb-full", "k400-r101-sb-typical-32f"
IMPOSSIBLE = 2**32  # clips: the input alone would be ~1 PB
EMBEDDED = str(config.REPO_ROOT / "params" / "embedded.yaml")


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gs = _suite_module()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    cmd = [
        sys.executable,
        str(SUITE),
        "--device",
        "cpu",
        "--smoke",
        "--models",
        R23,
        R101,
        "--batch",
        f"{R101}={IMPOSSIBLE}",
        "--iters",
        "1",
        "--loader-workers",
        "1",
        "--loader-seconds",
        "1",
        "--peak-tflops",
        "0.5",
        "--out",
        str(out / "gpu_cpu"),
        "--work",
        str(out / "work"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    path = out / "gpu_cpu.json"
    return path, json.loads(path.read_text()), (out / "gpu_cpu.md").read_text()


@pytest.mark.slow
def test_smoke_run_measures_every_configuration(smoke):
    _, res, md = smoke
    assert res["status"] == "complete" and res["smoke"] is True
    assert res["device"]["type"] == "cpu" and res["torch"] == torch.__version__
    assert res["command"].endswith(f"--work {Path(smoke[0]).parent / 'work'}") and res["date"]
    m = res["models"][R23]
    assert (m["frames"], m["crop"], m["batch"]) == (4, 112, 2)
    p23 = config.load_params(config.experiment_path(R23), EMBEDDED)
    assert m["shape"] == planmod.throughput_shape(p23)
    macs = count_macs(build_meta_model(dict(p23["model"], pretrained="none")), 4, 112)
    assert m["gmacs_per_clip"] == pytest.approx(macs / 1e9, rel=1e-3)
    rows = [r for r in res["results"] if r["model"] == R23]
    eager = [r for r in rows if not r["compile"]]
    assert len(eager) == 8 and {r["formulation"] for r in eager} == {"efficient", "reference"}
    assert {(r["precision"], r["channels_last"]) for r in eager} == {
        (p, cl) for p in ("bf16", "fp32") for cl in (False, True)
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert r["train_clips_s"] > 0 and r["infer_clips_s"] > 0 and r["batch"] == 2
        assert r["train_clips_s"] * r["train_step_ms"] == pytest.approx(2 * 1000, rel=1e-6)
        # MFU = clips/s x 3 x 2 x MACs / peak (training), x 2 x MACs (inference)
        assert r["mfu"] == pytest.approx(r["train_clips_s"] * 6 * macs / 0.5e12, rel=1e-6)
        assert r["infer_mfu"] == pytest.approx(r["infer_clips_s"] * 2 * macs / 0.5e12, rel=1e-6)
        assert r["loss_finite"] and r["peak_mem_gib"] is None  # no CUDA allocator on a CPU
    # the engine's settings on a CPU: efficient, fp32 (AMP is CUDA-only), channels-last
    # (train.channels_last: true in params/base.yaml), eager
    engine = [r for r in rows if r["engine"]]
    assert len(engine) == 1
    assert (engine[0]["formulation"], engine[0]["precision"], engine[0]["channels_last"]) == (
        "efficient",
        "fp32",
        True,
    )
    # torch.compile ran (backend eager in a smoke run) at the fastest eager setting
    compiled = [r for r in rows if r["compile"]]
    best = max(eager, key=lambda r: r["train_clips_s"])
    assert len(compiled) == 1 and compiled[0]["formulation"] == "efficient"
    assert (compiled[0]["precision"], compiled[0]["channels_last"]) == (
        best["precision"],
        best["channels_last"],
    )
    assert res["settings"]["compile_backend"] == "eager"
    assert "| k400-r23-sb-full | efficient | fp32 +cl (engine) |" in md and "SMOKE RUN" in md
    assert "Efficient vs reference" in md


@pytest.mark.slow
def test_a_failing_configuration_is_recorded_and_the_suite_goes_on(smoke):
    _, res, md = smoke
    rows = [r for r in res["results"] if r["model"] == R101]
    assert len(rows) == 8 and all(r["status"] == "oom" for r in rows), rows
    assert all("allocate" in r["error"] and r.get("train_clips_s") is None for r in rows)
    assert any("k400-r101-sb-typical-32f: no successful eager configuration" in n for n in res["notes"])
    assert f"| {R101} | efficient | fp32 +cl (engine) | – | – |" in md and "| oom: " in md
    # R23 after it still measured (the R101 rows come between R23's eager and compiled rows)
    order = [r["model"] for r in res["results"]]
    assert order.index(R101) < len(order) - 1 and order[-1] == R23


@pytest.mark.slow
def test_loader_rates_from_real_videos(smoke):
    _, res, md = smoke
    loader = res["loader"]
    assert loader["status"] == "ok" and "smallbig.data.toy" in loader["source"]
    for fmt in ("frames", "video"):
        (x,) = loader["formats"][fmt]
        assert x["workers"] == 1 and x["clips_s"] > 0 and x["batch_shape"] == [8, 3, 4, 112, 112]
    need = res["loader_vs_gpu"][R23]["workers_needed"]["frames"]
    assert need["engine"] == pytest.approx(
        res["loader_vs_gpu"][R23]["engine_train_clips_s"] / loader["formats"]["frames"][0]["clips_s"]
    )
    assert "## Data loader" in md


@pytest.mark.slow
def test_plan_uses_the_measured_rates(smoke):
    path, res, _ = smoke
    plan = planmod.make_plan(EMBEDDED, memory=False, throughput=str(path))
    rates = plan["rates"]["experiments"]
    row = next(r for r in res["results"] if r["model"] == R23 and r["engine"])
    assert rates[R23]["measured"] and rates[R23]["train_clips_s"] == row["train_clips_s"]
    assert rates[R23]["eval_clips_s"] == row["infer_clips_s"] and rates[R23]["eval_crop"] == 112
    assert "efficient fp32 channels-last eager, batch 2" in rates[R23]["train_source"]
    # R101: measured only as failures -> the guess, saying why
    assert not rates[R101]["measured"] and "oom" in rates[R101]["train_source"]
    assert rates[R101]["train_source"].startswith("GUESS")
    assert plan["rates"]["measured"] == 1 and plan["rates"]["guessed"] == 24

    # GPU-hours, by hand: epochs x train clips / rate; val videos x views / eval rate at the crop
    params = planmod.load_all(EMBEDDED)
    p = params[R23]
    train_clips, _ = planmod.split_size(p, "train")
    val_videos, _ = planmod.split_size(p, "val")
    train_h = p["train"]["epochs"] * train_clips / row["train_clips_s"] / 3600
    crop = p["test"]["multi_crop_size"]  # 10x3: three crops of multi_crop_size
    assert p["test"]["protocols"] == ["10x3"]
    eval_h = val_videos * 30 / (row["infer_clips_s"] * (112 / crop) ** 2) / 3600
    guess_h = sum(
        q["train"]["epochs"] * planmod.split_size(q, "train")[0] / q["train"]["clips_per_sec_per_gpu"] / 3600
        for e, q in params.items()
        if e != R23
    )
    assert plan["total"]["gpu_hours_train"] == pytest.approx(guess_h + train_h, rel=1e-9)
    evals = planmod.evaluations(params, load_tables(None))
    guess_eval = sum(
        planmod.split_size(params[e], "val")[0]
        * planmod.views(proto)
        / (3 * params[e]["train"]["clips_per_sec_per_gpu"])
        / 3600
        for e, proto in evals
        if e != R23
    )
    assert [proto for e, proto in evals if e == R23] == ["10x3"]
    assert plan["total"]["gpu_hours_eval"] == pytest.approx(guess_eval + eval_h, rel=1e-9)

    text = planmod.format_plan(plan)
    assert f"{R23}" in text and " M " in text and "GUESS: not measured" in text
    assert f"from {path}" in text and "SMOKE RUN" in text


@pytest.mark.slow
def test_plan_full_scale_does_not_take_a_smoke_measurement(smoke, capsys):
    """The smoke json measured embedded widths: at full scale every rate stays the guess."""
    path, _, _ = smoke
    assert cli.main(["plan", "--no-memory", "--throughput", str(path)]) == 0
    out = capsys.readouterr().out
    assert "every rate is a GUESS" in out and "measured at another shape" in out
    assert "model.base_width 8" in out


def test_plan_without_a_measurement_uses_the_labelled_guess(tmp_path):
    plan = planmod.make_plan(memory=False, results_dir=tmp_path)  # no gpu_*.json there
    assert plan["rates"]["file"] is None and plan["rates"]["measured"] == 0
    p = planmod.load_all()["k400-r23-c2d"]
    r = plan["rates"]["experiments"]["k400-r23-c2d"]
    assert r["train_clips_s"] == p["train"]["clips_per_sec_per_gpu"] == 40
    assert r["train_source"].startswith("GUESS train.clips_per_sec_per_gpu")
    assert planmod.train_gpu_hours(p, r) == planmod.train_gpu_hours(p)
    text = planmod.format_plan(plan)
    assert "every rate is a GUESS: train.clips_per_sec_per_gpu = 40 clips/s" in text
    assert "benchmarks/gpu_suite.sh" in text


def _measurement(tmp_path: Path, name: str, device: str, date: str, smoke: bool = False) -> Path:
    m = {
        "device": {"type": "cuda", "name": device},
        "models": {},
        "results": [],
        "date": date,
        "smoke": smoke,
    }
    path = tmp_path / name
    path.write_text(json.dumps(m))
    return path


def test_plan_chooses_the_measurement(tmp_path):
    _measurement(tmp_path, "gpu_h200.json", "NVIDIA H200", "2026-12-01 10:00 UTC")
    _measurement(tmp_path, "gpu_a100-sxm4-80gb.json", "NVIDIA A100-SXM4-80GB", "2026-11-01 10:00 UTC")
    _measurement(tmp_path, "gpu_smoke_cpu.json", "CPU", "2026-12-31 10:00 UTC", smoke=True)
    newest = planmod.load_throughput(results_dir=tmp_path)
    assert newest is not None and newest["device"]["name"] == "NVIDIA H200"  # smoke runs left out
    assert len(newest["others"]) == 1
    a100 = planmod.load_throughput(gpu="a100", results_dir=tmp_path)
    assert a100 is not None and Path(a100["file"]).name == "gpu_a100-sxm4-80gb.json"
    with pytest.raises(config.ParamsError, match="--gpu v100: no measurement of that device"):
        planmod.load_throughput(gpu="v100", results_dir=tmp_path)
    assert planmod.load_throughput("none", results_dir=tmp_path) is None


def test_plan_refuses_a_bad_throughput_file(tmp_path, capsys):
    bad = tmp_path / "gpu_x.json"
    bad.write_text("{not json")
    assert cli.main(["plan", "--no-memory", "--throughput", str(bad)]) == 2
    assert f"{bad}: not a readable GPU suite result" in capsys.readouterr().err
    bad.write_text('{"device": {}}')
    assert cli.main(["plan", "--no-memory", "--throughput", str(bad)]) == 2
    assert "missing models, results" in capsys.readouterr().err
    bad.write_text('{"device": {}, "models": [], "results": [1]}')
    assert cli.main(["plan", "--no-memory", "--throughput", str(bad)]) == 2
    assert "wrong type of models, results[]" in capsys.readouterr().err
    assert cli.main(["plan", "--no-memory", "--throughput", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_engine_settings_follow_the_engine(amp, device):
    p = config.load_params(config.experiment_path(R23))
    assert p["train"]["channels_last"] is True
    p["train"]["amp"] = amp
    _, _, effective = amp_settings(amp, torch.device(device))
    want = {"none": "fp32"}.get(effective, effective)
    assert planmod.engine_settings(p, device) == {
        "formulation": "efficient",
        "precision": want,
        "channels_last": p["train"]["channels_last"],  # params/base.yaml: true
        "compile": False,
    }


def test_peaks_by_device_name():
    assert gs.peak_table("NVIDIA H200")["bf16"] == 989.4
    assert gs.peak_table("NVIDIA H200 NVL")["label"] == "H200 NVL"
    assert gs.peak_table("NVIDIA H100 80GB HBM3")["label"] == "H100 SXM"
    assert gs.peak_table("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert gs.peak_table("NVIDIA A100-SXM4-80GB")["tf32"] == 156.0
    assert gs.peak_table("NVIDIA A10")["label"] == "A10"
    assert gs.peak_table("NVIDIA L40S")["label"] == "L40S" and gs.peak_table("NVIDIA L4")["label"] == "L4"
    assert gs.peak_table("NVIDIA A10G") is None and gs.peak_table("AMD Instinct MI300X") is None
    assert gs.peak_table("Tesla V100-SXM2-32GB")["bf16"] is None
    cpu = gs.peaks_for(torch.device("cpu"), "CPU x86_64", None)
    assert cpu["fp32"] is None and cpu["bf16"] is None and "MFU left blank" in cpu["note"]
    assert gs.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gs.device_slug("Tesla V100-SXM2-32GB") == "v100-sxm2-32gb"


def test_budget_exhausted_skips_and_says_so(tmp_path):
    out = tmp_path / "gpu_cpu"
    argv = ["--device", "cpu", "--smoke", "--models", R23, "--budget-s", "0", "--out", str(out)]
    assert gs.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["status"] == "budget exhausted" and len(res["results"]) == 8
    assert all(r["status"] == "skipped" and r["error"].startswith("budget") for r in res["results"])
    assert any("loader not measured: budget" in n for n in res["notes"])
    md = out.with_suffix(".md").read_text()
    assert "budget exhausted" in md and "skipped: budget" in md
