"""Weights and lineage in MLflow, end to end on the real model and the embedded toy data, with a
real SQLite store: a `smallbig train` logs its final weights as an MLflow PyTorch model (pt2, with
signature and params) and its datasets as inputs; `smallbig evaluate --model runs:/<id>/model`
(also models:/<model_id>, models:/<name>/<version>) needs only the store and gives exactly the
scores of `smallbig evaluate --checkpoint`; the evaluation run names its training run
(smallbig.train_run_id, mlflow.parentRunId) and its inputs; `smallbig register --all` makes a
registry entry per row of a verdict file; bad URIs, models and verdict files are exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_engine import BUILDERS, tiny_params

from smallbig import config
from smallbig.cli import main
from smallbig.engine import metrics, tracking
from smallbig.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Embedded K400-style toy data (8 classes, 2 train / 1 val videos each), params of a
    SmallBig-R23 full (width 4, 2 frames of 48 px, 1 epoch), a fresh SQLite store, and one real
    tracked `smallbig train` (system metrics sampled every second)."""
    from mlflow.tracking import MlflowClient

    from smallbig.data.prepare import prepare
    from smallbig.data.toy import make_toy

    root = tmp_path_factory.mktemp("mlflow-models")
    make_toy(
        root / "src", datasets=("kinetics400",), per_class={"train": 2, "val": 1, "test": 1}, progress=False
    )
    p = config.load_params(
        config.experiment_path("k400-r23-sb-full"), config.REPO_ROOT / "params" / "embedded.yaml"
    )
    p["id"] = "mlflow-models-test"
    p["data"].update(
        root=str(root / "k400"),
        source={"base_url": str(root / "src" / "kinetics400")},
        num_frames=2,
        crop_size=48,
        train_short_side=[52, 60],
        frame_stride=2,
        num_workers=0,
    )
    p["model"].update(base_width=4, pretrained="none")
    p["test"].update(
        protocols=["2x3", "1x1"], short_side=52, multi_crop_size=52, single_crop_size=48, batch_size=4
    )
    p["train"].update(epochs=1, batch_size=4, per_gpu_batch=4, lr=0.05, val_every_epochs=1, seed=0)
    prepare(p, progress=False, workers=1)
    config.validate(p)
    config.dump_params(p, root / "params.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("SMALLBIG_NO_MLFLOW", raising=False)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        assert main(["train", str(root / "params.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    run_id = json.loads((root / "run" / "train_metrics.json").read_text())["mlflow_run_id"]
    return root, uri, run_id, MlflowClient(uri)


@pytest.fixture(autouse=True)
def _store(world, monkeypatch):
    monkeypatch.delenv("SMALLBIG_NO_MLFLOW", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world[1])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _scores_equal(a, b) -> None:
    sa, sb = metrics.load_scores(a), metrics.load_scores(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = np.asarray(sa[k]), np.asarray(sb[k])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def _eval_run(client, out):
    """The newest evaluation run of that out dir (get_run: search_runs omits model inputs)."""
    exp = client.get_experiment_by_name("mlflow-models-test")
    runs = client.search_runs(
        [exp.experiment_id], f"tags.out_dir = '{out.resolve()}'", order_by=["start_time DESC"]
    )
    return client.get_run(runs[0].info.run_id)


def test_training_logs_its_model_with_signature_params_and_datasets(world):
    import mlflow.pytorch
    from mlflow.models import Model

    root, uri, run_id, client = world
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    (out,) = run.outputs.model_outputs
    logged = client.get_logged_model(out.model_id)
    assert logged.name == "model" and logged.source_run_id == run_id
    assert str(logged.status).endswith("READY")
    assert logged.params["train.lr"] == "0.05" and logged.tags["smallbig.experiment"] == "mlflow-models-test"
    # the model page shows the last epoch's metrics
    assert {m.key for m in logged.metrics} >= {"loss", "val_top1"}
    with tracking.default_store(uri):
        local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model")
    meta = Model.load(local)
    assert meta.model_id == logged.model_id and meta.run_id == run_id
    sig = meta.signature.to_dict()
    assert json.loads(sig["inputs"]) == [
        {"name": "video", "type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 2, 52, 52]}}
    ]
    assert json.loads(sig["outputs"])[0]["tensor-spec"]["shape"] == [-1, 8]
    assert meta.metadata["smallbig"]["params_hash"] == config.params_hash(
        config.load_resolved(root / "params.yaml")
    )
    assert (root / "params.yaml").read_text() == (root / "run" / "params.yaml").read_text()
    assert config.load_resolved(f"{local}/extra_files/params.yaml") == config.load_resolved(
        root / "params.yaml"
    )
    # MLflow's own loader (pt2, pickle-free): the exported graph gives the checkpoint's logits
    net = mlflow.pytorch.load_model(local)
    from smallbig.engine.checkpoint import load_model_from_checkpoint

    ref, _ = load_model_from_checkpoint(root / "run" / "checkpoint.pt")
    x = torch.randn(3, 3, 2, 52, 52, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = net(x), ref(x)
    # (the exported graph was traced from the training's channels-last frames, the checkpoint model
    # runs NCHW frames: the same maths, float32 sums in another order)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    weights = load_checkpoint(root / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    # datasets as inputs: train and val, digest + counts
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"kinetics400-train", "kinetics400-val"}
    ctx = {n: {t.key: t.value for t in d.tags}["mlflow.data.context"] for n, d in inputs.items()}
    assert ctx == {"kinetics400-train": "training", "kinetics400-val": "validation"}
    manifest = json.loads((root / "k400" / "manifest.json").read_text())
    prof = json.loads(inputs["kinetics400-train"].dataset.profile)
    assert prof["videos_in_list"] == manifest["splits"]["train"]["count"]
    assert prof["videos_used"] == manifest["splits"]["train"]["usable"] > 0
    assert prof["list_sha256"] == manifest["splits"]["train"]["sha256"]
    assert prof["manifest_sha256"] == tracking.sha256_file(root / "k400" / "manifest.json")
    assert len(inputs["kinetics400-train"].dataset.digest) == 20
    # system metrics (psutil; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1 s in this training)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)


def test_evaluate_from_runs_uri_equals_evaluate_from_checkpoint(world, capsys):
    root, uri, run_id, client = world
    ck, lm = root / "eval-ckpt", root / "eval-model"
    args = ["--protocol", "2x3", "--no-progress"]
    assert (
        main(
            [
                "evaluate",
                str(root / "params.yaml"),
                "--checkpoint",
                str(root / "run" / "checkpoint.pt"),
                "--out",
                str(ck),
                *args,
            ]
        )
        == 0
    )
    assert main(["evaluate", "--model", f"runs:/{run_id}/model", "--out", str(lm), *args]) == 0
    _scores_equal(ck / "scores.npz", lm / "scores.npz")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ck, lm))
    assert a["top1"] == b["top1"] and a["subsets"] == b["subsets"]
    assert b["checkpoint"] == f"runs:/{run_id}/model"
    # lineage: both evaluation runs name the training run and are its children
    model_id = client.get_run(run_id).outputs.model_outputs[0].model_id
    for out in (ck, lm):
        ev = _eval_run(client, out)
        assert ev.data.tags["smallbig.train_run_id"] == run_id
        # metrics.json names its evaluation run (the report's verdicts.json eval_run_id)
        assert json.loads((out / "metrics.json").read_text())["mlflow_run_id"] == ev.info.run_id
        assert ev.data.tags["mlflow.parentRunId"] == run_id
        (ds,) = ev.inputs.dataset_inputs
        assert ds.dataset.name == "kinetics400-val"
        assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "evaluation"
        assert json.loads(ds.dataset.profile)["videos_used"] == b["num_videos"] + b["skipped"]
    ev = _eval_run(client, lm)
    assert ev.data.tags["smallbig.model_id"] == model_id
    assert [m.model_id for m in ev.inputs.model_inputs] == [model_id]


def test_evaluate_from_model_id_and_registry_and_register_all(world, tmp_path, capsys):
    root, uri, run_id, client = world
    model_id = client.get_run(run_id).outputs.model_outputs[0].model_id
    verdicts = tmp_path / "verdicts.json"
    row = {
        "table": "table2",
        "row": "SmallBig R23 (toy)",
        "experiment": "mlflow-models-test",
        "protocol": "2x3",
        "verdict": "not comparable",
        "top1": 12.5,
        "paper_top1": 71.0,
        "runs": [{"seed": 0, "train_run_id": run_id, "eval_run_id": None}],
    }
    verdicts.write_text(json.dumps({"rows": [row]}))
    assert main(["register", str(verdicts)]) == 0  # no row reads reproduced: nothing registered
    assert "no row reads reproduced" in capsys.readouterr().out
    assert not client.search_registered_models("name='smallbig-mlflow-models-test'")
    assert main(["register", str(verdicts), "--all"]) == 0
    (mv,) = client.search_model_versions("name='smallbig-mlflow-models-test'")
    # a SQLite registry keeps the model as the version's source (no model_id column)
    assert mv.source == f"models:/{model_id}" and mv.run_id == run_id and str(mv.version) == "1"
    assert {k: mv.tags[k] for k in ("table", "row", "protocol", "verdict", "seed", "train_run_id")} == {
        "table": "table2",
        "row": "SmallBig R23 (toy)",
        "protocol": "2x3",
        "verdict": "not comparable",
        "seed": "0",
        "train_run_id": run_id,
    }
    assert float(mv.tags["top1"]) == 12.5 and float(mv.tags["paper_top1"]) == 71.0
    verdicts.write_text(json.dumps({"rows": [dict(row, verdict="reproduced")]}))
    assert main(["register", str(verdicts)]) == 0  # again: the same version, tags updated
    assert "already registered smallbig-mlflow-models-test version 1" in capsys.readouterr().out
    (mv,) = client.search_model_versions("name='smallbig-mlflow-models-test'")
    assert mv.tags["verdict"] == "reproduced"
    # the registry entry and the model id evaluate like the run URI (1x1: another protocol)
    outs = {}
    for name, u in (
        ("reg", "models:/smallbig-mlflow-models-test/1"),
        ("id", f"models:/{model_id}"),
        ("run", f"runs:/{run_id}/model"),
    ):
        outs[name] = tmp_path / name
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    u,
                    "--out",
                    str(outs[name]),
                    "--protocol",
                    "1x1",
                    "--no-progress",
                    "--no-mlflow",
                ]
            )
            == 0
        )
    _scores_equal(outs["reg"] / "scores.npz", outs["run"] / "scores.npz")
    _scores_equal(outs["id"] / "scores.npz", outs["run"] / "scores.npz")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("/tmp/model.pt", "expected runs:/<run_id>/model"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "not found in the MLflow store"),
        ("models:/no-such-model/1", "not found in the MLflow store"),
        ("models:/m-00000000000000000000000000000000", "not found in the MLflow store"),
        ("runs:/{run_id}/history.json", "not an MLflow model"),
    ],
)
def test_bad_model_uri_is_exit_2(world, tmp_path, capsys, uri, message):
    uri = uri.format(run_id=world[2])
    assert main(["evaluate", "--model", uri, "--out", str(tmp_path / "o"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "scores.npz").exists()


def test_model_without_params_and_bad_option_mixes_are_exit_2(world, tmp_path, capsys):
    import mlflow
    import mlflow.pytorch

    root, uri, run_id, client = world
    from mlflow.models import Model, infer_signature

    exp_id = client.get_experiment_by_name("mlflow-models-test").experiment_id
    run = client.create_run(exp_id)
    logged = client.create_logged_model(exp_id, name="model", source_run_id=run.info.run_id)
    with tracking.default_store(uri):  # a plain MLflow model: no smallbig params with it
        Model.log(
            None,
            mlflow.pytorch,
            name="model",
            model_id=logged.model_id,
            run_id=run.info.run_id,
            pytorch_model=torch.nn.Linear(3, 2),
            input_example=torch.zeros(2, 3),
            signature=infer_signature(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.float32)),
            serialization_format="pt2",
            pip_requirements=["torch"],
        )
    assert main(["evaluate", "--model", f"runs:/{run.info.run_id}/model", "--out", str(tmp_path / "o")]) == 2
    assert "an MLflow model without smallbig params" in capsys.readouterr().err
    for argv in (
        ["evaluate", str(root / "params.yaml"), "--model", f"runs:/{run_id}/model", "--out", str(tmp_path)],
        ["evaluate", "--out", str(tmp_path)],
        ["evaluate", str(root / "params.yaml"), "--out", str(tmp_path)],
    ):
        assert main(argv) == 2, argv
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", 'expected {"rows": [...]}'),
        ("{not json", "not a JSON verdict file"),
        ('{"rows": [{"table": "t"}]}', "rows[0].row: must be a non-empty string"),
        (
            '{"rows": [{"table": "t", "row": "r", "experiment": "e", "protocol": "1x1", "verdict": "maybe", "top1": 1, "paper_top1": null, "runs": []}]}',
            "rows[0].verdict: 'maybe' is not one of",
        ),
        (
            '{"rows": [{"table": "t", "row": "r", "experiment": "e", "protocol": "1x1", "verdict": "reproduced", "top1": 1, "paper_top1": null, "runs": [{"seed": 0, "train_run_id": "0123456789abcdef0123456789abcdef"}]}]}',
            "1 run(s) not registered",
        ),
    ],
)
def test_bad_verdict_file_is_exit_2(world, tmp_path, capsys, content, message):
    f = tmp_path / "verdicts.json"
    f.write_text(content)
    assert main(["register", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(f) in err and "Traceback" not in err, err


@pytest.mark.parametrize("failure", ["unreachable", "back", "refused"])
def test_model_upload_failure_does_not_fail_the_training_and_is_reported(
    world, monkeypatch, tmp_path, failure
):
    """The store stops answering while the model is sent: kept, then listed as unsent
    (`unreachable`), or sent when it answers again, the cut-off attempt deleted (`back`); the
    model cannot be logged at all, e.g. torch.export fails (`refused`): reported, dropped. The
    training ends 0 with its checkpoint every time."""
    from smallbig.engine import mlflow_models
    from smallbig.engine.train import train

    p = tiny_params(epochs=1)  # in-memory toy data and model (tests/test_engine.py), world's store
    p["id"] = f"mlflow-model-{failure}"
    logs: list[str] = []
    real, calls = mlflow_models._save_and_upload, []

    def cut_off(*args):
        calls.append(1)
        if failure == "refused":
            raise RuntimeError("torch.export could not trace the model (injected)")
        if failure == "unreachable" or len(calls) == 1:  # `back`: the second attempt goes through
            raise ConnectionError("connection refused (injected while uploading the model)")
        return real(*args)

    monkeypatch.setattr(mlflow_models, "_save_and_upload", cut_off)
    assert train(p, tmp_path / "run", builders=BUILDERS, progress=False, log=logs.append) == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    unsent = tmp_path / "run" / "mlflow-unsent.json"
    client = world[3]
    run_id = json.loads((tmp_path / "run" / "train_metrics.json").read_text())["mlflow_run_id"]
    models = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    if failure == "unreachable":
        records = json.loads(unsent.read_text())["records"]
        assert {"model": "model", "checkpoint": str(tmp_path / "run" / "checkpoint.pt")} in records
        assert any("still unreachable at the end" in m and "model 'model'" in m for m in logs), logs
        assert not models  # the attempts that were cut off are deleted
    elif failure == "back":
        assert not unsent.exists() and len(calls) == 2
        assert any("answers again" in m for m in logs), logs
        (model,) = models
        assert str(model.status).endswith("READY") and model.source_run_id == run_id
        assert client.get_run(run_id).info.status == "FINISHED"
    else:
        assert not unsent.exists() and not models
        assert any("refused model 'model'" in m and "torch.export could not trace" in m for m in logs), logs
