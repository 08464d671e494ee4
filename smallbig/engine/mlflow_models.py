"""Weights in MLflow: the final model of every training as an MLflow PyTorch model, and a
logged model loaded back for `smallbig evaluate --model URI`.

What a training logs (`log_final_model`, at the end, with the final metrics): an MLflow 3
LoggedModel named `model` whose source run is the training run (so `runs:/<run_id>/model` and
`models:/<model_id>` both name it), saved by `mlflow.pytorch` in its `pt2` serialization (MLflow
3's default outside Databricks: `torch.export` of the network in eval mode, fp32 on CPU; the
archive holds the traced graph and the weights, no pickled Python objects), with

- the signature: input `[N, 3, T, H, W]` float32 at the params' test shape (T = data.num_frames,
  H = W = the primary protocol's crop), i.e. decoded RGB frames scaled to [0, 1] and normalised
  with data.mean / data.std; output `[N, num_classes]` logits. N is a dynamic dimension;
- the resolved params as `extra_files/params.yaml` (exactly the run directory's params.yaml),
  the run's flattened params as the LoggedModel's params (MLflow copies them) and
  `metadata.smallbig` (experiment, params hash, version, what input/output mean).

Why pt2 and not MLflow's pickle format: MLflow 3.17 refuses to unpickle a model unless
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true, and a pickled model needs this package's classes at
the same import paths. `mlflow.pytorch.load_model(uri)` returns the exported graph module
(checked pickle-free by MLflow) to anyone with torch and MLflow. smallbig itself
(`load_logged_model`) takes the weights from that module and loads them into the explicit
nn.Module its params describe (`smallbig.models.build_model`), so `evaluate --model` runs
exactly the network `evaluate --checkpoint` runs, for any protocol and crop.

Unreachable store: the model goes through `tracking.Run.call`, like every other record: kept and
sent when the store answers again, else listed in OUT/mlflow-unsent.json (the weights are in
OUT/checkpoint.pt in any case). Refused or failing (e.g. a network torch.export cannot trace):
reported, the training is not failed. SMALLBIG_MLFLOW_MODEL=0 skips the model.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from smallbig import __version__, config
from smallbig.config import dump_params, params_hash
from smallbig.engine import tracking
from smallbig.errors import InputError
from smallbig.models import build_model
from smallbig.spec.params import Params

MODEL_NAME = "model"  # runs:/<run_id>/model
PARAMS_FILE = "params.yaml"  # extra_files/params.yaml inside the model
SWITCH_ENV = "SMALLBIG_MLFLOW_MODEL"
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
URI_RE = re.compile(r"^(runs:/[^/\s]+/\S+|models:/\S+)$")
URI_HELP = "runs:/<run_id>/model, models:/<name>/<version> or models:/<model_id>"


def input_shape(params: dict | Params) -> tuple[int, int, int, int]:
    """(3, T, H, W) of one test view: data.num_frames, the primary protocol's crop."""
    p = Params.from_dict(params)
    crop = p.primary_protocol.crop_size(p.test)
    return 3, p.data.num_frames, crop, crop


def model_signature(params: dict | Params):
    """MLflow signature: float32 [-1, 3, T, H, W] -> float32 logits [-1, num_classes]."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    p = Params.from_dict(params)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape(p)), "video")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, p.model.num_classes), "logits")]),
    )


def model_metadata(params: dict) -> dict:
    p = Params.from_dict(params)
    return {
        "smallbig": {
            "experiment": p.id,
            "params_hash": params_hash(params),
            "smallbig_version": __version__,
            "params_file": f"extra_files/{PARAMS_FILE}",
            "input": "float32 [N, 3, T, H, W]: RGB frames scaled to [0, 1], normalised with "
            f"mean {list(p.data.mean)} and std {list(p.data.std)}",
            "output": f"float32 [N, {p.model.num_classes}] logits",
        }
    }


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").lower() not in ("0", "false", "no")


def log_final_model(run, model: torch.nn.Module, params: dict, checkpoint: Path, step: int) -> None:
    """Log `model` (the final weights of the training, equal to `checkpoint`'s) to `run` (a
    tracking.Run) as an MLflow PyTorch model; never raises on a store or export problem."""
    if run is None or not run.enabled or not enabled():
        return
    try:
        cpu = copy.deepcopy(model).to("cpu", torch.float32).eval()
        for t in [*cpu.parameters(), *cpu.buffers()]:
            t.data = t.data.contiguous()  # channels_last weights: the plain layout
    except Exception as e:  # never fail a finished training on its MLflow copy
        run.log(f"WARNING: the final model is not logged in MLflow (copy failed: {tracking._reason(e)})")
        return
    run.call(
        partial(_send, uri=run.uri, model=cpu, params=params, step=step),
        f"model '{MODEL_NAME}' (the weights of {checkpoint})",
        {"model": MODEL_NAME, "checkpoint": str(checkpoint)},
    )


def _send(run_id: str, *, uri: str, model: torch.nn.Module, params: dict, step: int) -> None:
    """The LoggedModel `model` of run `run_id` in store `uri`, in the run's experiment, with the
    run's params; then Model.log (what mlflow.pytorch.log_model calls) saves and uploads it."""
    tracking.disable_telemetry()
    os.environ.setdefault(PROGRESS_ENV, "false")  # no download bars (extra files) in job logs
    import mlflow.pytorch
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = tracking.retry(client.get_run, run_id)
    _drop_failed_attempts(client, run.info.experiment_id, run_id)
    logged = tracking.retry(
        client.create_logged_model,
        run.info.experiment_id,  # MLflow's own default would be the Default experiment
        name=MODEL_NAME,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags={"smallbig.experiment": params["id"], "smallbig.params_hash": params_hash(params)},
    )
    try:
        _save_and_upload(Model, mlflow.pytorch, uri, logged.model_id, run_id, model, params, step)
    except BaseException:
        try:  # a later attempt makes a new one; `runs:/<id>/model` must not find this one
            client.delete_logged_model(logged.model_id)
        except Exception:
            pass
        raise


def _drop_failed_attempts(client, experiment_id: str, run_id: str) -> None:
    """Delete the run's `model`s that never became READY (an upload cut off by a store that went
    away): `runs:/<run_id>/model` resolves to the first model of that name and run."""
    for m in tracking.retry(
        client.search_logged_models, [experiment_id], filter_string=f"name = '{MODEL_NAME}'"
    ):
        if m.source_run_id == run_id and not str(m.status).upper().endswith("READY"):
            tracking.retry(client.delete_logged_model, m.model_id)


def _save_and_upload(
    Model, flavor, uri: str, model_id: str, run_id: str, model, params: dict, step: int
) -> None:
    # Model.log finalizes the LoggedModel through MLflow's default store
    with tracking.default_store(uri), tempfile.TemporaryDirectory() as tmp:
        dump_params(params, Path(tmp) / PARAMS_FILE)
        Model.log(
            None,
            flavor,
            name=MODEL_NAME,
            model_id=model_id,
            run_id=run_id,
            step=step,
            metadata=model_metadata(params),
            pytorch_model=model,
            signature=model_signature(params),
            # a tensor: torch.export traces with it (batch 2: N stays dynamic); MLflow does not
            # store a tensor example (at full scale it would be megabytes of JSON)
            input_example=torch.zeros(2, *input_shape(params)),
            serialization_format="pt2",
            extra_files=[str(Path(tmp) / PARAMS_FILE)],
            # what loading the pt2 archive needs (MLflow's default adds cloudpickle, for pickles)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A logged model, ready to evaluate: the params' nn.Module (eval mode, CPU) with the logged
    weights, the params stored with it, and where it came from."""

    uri: str
    model: torch.nn.Module
    params: dict
    model_id: str | None
    run_id: str | None  # the training run that logged it

    def __str__(self) -> str:
        return self.uri


def load_logged_model(uri: str, data_root: str | Path | None = None) -> LoadedModel:
    """The model at `uri` (runs:/<run_id>/model, models:/<name>/<version>, models:/<model_id>)
    in the MLflow store tracking.tracking_uri(). `data_root` replaces the params' data.root.
    InputError (exit 2) naming the URI for an unknown run or model, a store that cannot be read,
    a model without smallbig params or whose weights do not fit its params."""
    if not URI_RE.match(uri or ""):
        raise InputError(f"--model {uri!r}: expected {URI_HELP}")
    tracking.disable_telemetry()
    tracking.bound_http_retries()
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    store = tracking.tracking_uri()
    os.environ.setdefault(PROGRESS_ENV, "false")  # no download bars in job logs
    with tracking.default_store(store), tempfile.TemporaryDirectory(prefix="smallbig-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as e:
            raise InputError(
                f"--model {uri}: not found in the MLflow store {store}: {tracking._reason(e)}"
            ) from None
        if not (local / "MLmodel").is_file():
            raise InputError(f"--model {uri}: not an MLflow model (no MLmodel file) in {store}")
        meta = Model.load(str(local))
        if "pytorch" not in meta.flavors:
            raise InputError(f"--model {uri}: not a PyTorch model (flavors {sorted(meta.flavors)})")
        params = _params_of(uri, local / "extra_files" / PARAMS_FILE)
        if data_root is not None:
            params["data"]["root"] = str(data_root)
        try:
            weights = mlflow.pytorch.load_model(str(local)).state_dict()
        except Exception as e:
            raise InputError(f"--model {uri}: cannot load its weights: {tracking._reason(e)}") from None
    model = build_model(params["model"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputError(f"--model {uri}: weights do not fit the model its params describe: {e}") from None
    return LoadedModel(uri, model.eval(), params, getattr(meta, "model_id", None), meta.run_id)


def _params_of(uri: str, path: Path) -> dict:
    if not path.is_file():
        raise InputError(
            f"--model {uri}: an MLflow model without smallbig params (no extra_files/{PARAMS_FILE}); "
            f"only models logged by `smallbig train` can be evaluated this way"
        )
    try:
        return config.load_resolved(path)
    except InputError as e:
        raise InputError(f"--model {uri}: its {PARAMS_FILE} is not valid params: {e}") from None
