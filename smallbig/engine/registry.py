"""`smallbig register VERDICTS`: a model registry entry per reproduced row of the report.

The verdict file (`reports/verdicts.json`, written by the report) lists every table row with its
verdict and the MLflow runs behind it::

    {"rows": [{"table": "table2", "row": "<row label>", "experiment": "<id>", "protocol": "10x3",
               "verdict": "reproduced" | "not reproduced" | "inconclusive" | "not comparable",
               "top1": <mean>, "paper_top1": <float or null>,
               "runs": [{"seed": 0, "train_run_id": "<id or null>", "eval_run_id": "<id or null>"}]}]}

For every row whose verdict is "reproduced" (every row with `--all`), the model logged by each of
its training runs (`runs:/<train_run_id>/model`, smallbig/engine/mlflow_models.py) becomes a
version of the registered model `<prefix><experiment>` (default prefix `smallbig-`), with the
tags table, row, protocol, top1, paper_top1, verdict, seed, train_run_id, eval_run_id. Running it
again registers nothing twice: a training already registered under that name keeps its version
and gets the current tags. Registry = the tracking store (tracking.tracking_uri()).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from smallbig.engine import tracking
from smallbig.engine.mlflow_models import MODEL_NAME
from smallbig.errors import InputError, RunError
from smallbig.fsutil import not_regular

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not comparable")
MAX_BYTES = 20 << 20


@dataclass
class Registered:
    name: str
    version: str
    row: dict
    run: dict
    model_id: str
    new: bool


def read_verdicts(path: str | Path) -> list[dict]:
    """The rows of a verdict file, checked; InputError naming the file and the entry."""
    path = Path(path)
    kind = not_regular(path)
    if kind:
        raise InputError(f"{path}: {'not found' if kind.startswith('missing') else 'is ' + kind}")
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"{path}: {path.stat().st_size / 1e6:.1f} MB; a verdict file may be at most 20 MB")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a JSON verdict file: {e}") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise InputError(f'{path}: expected {{"rows": [...]}} at the top')
    for i, row in enumerate(rows):
        _check_row(path, i, row)
    return rows


def _check_row(path: Path, i: int, row) -> None:
    where = f"{path}: rows[{i}]"
    if not isinstance(row, dict):
        raise InputError(f"{where}: must be an object")
    for key in ("table", "row", "experiment", "protocol"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise InputError(f"{where}.{key}: must be a non-empty string, got {row.get(key)!r}")
    if row.get("verdict") not in VERDICTS:
        raise InputError(f"{where}.verdict: {row.get('verdict')!r} is not one of {', '.join(VERDICTS)}")
    for key, optional in (("top1", False), ("paper_top1", True)):
        v = row.get(key)
        ok = (v is None and optional) or (isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok or (v is not None and not math.isfinite(v)):
            raise InputError(
                f"{where}.{key}: must be a finite number{' or null' if optional else ''}, got {v!r}"
            )
    runs = row.get("runs")
    if not isinstance(runs, list):
        raise InputError(f"{where}.runs: must be a list")
    for j, run in enumerate(runs):
        if not isinstance(run, dict):
            raise InputError(f"{where}.runs[{j}]: must be an object")
        for key in ("train_run_id", "eval_run_id"):
            if run.get(key) is not None and not isinstance(run[key], str):
                raise InputError(f"{where}.runs[{j}].{key}: must be a run id or null, got {run[key]!r}")


def version_tags(row: dict, run: dict) -> dict:
    return {
        "table": row["table"],
        "row": row["row"],
        "protocol": row["protocol"],
        "top1": f"{row['top1']:.4f}",
        "paper_top1": "none" if row.get("paper_top1") is None else f"{row['paper_top1']:.4f}",
        "verdict": row["verdict"],
        "seed": str(run.get("seed", "unknown")),
        "train_run_id": run.get("train_run_id") or "none",
        "eval_run_id": run.get("eval_run_id") or "none",
    }


def register_verdicts(
    path: str | Path, all_rows: bool = False, prefix: str = "smallbig-", log=print
) -> list[Registered]:
    """Register the trained model of every run of every reproduced row (every row: `all_rows`).
    Reports each one with `log`; InputError when a run or its model is not in the store (after
    registering all others), RunError when the store cannot be used."""
    rows = [r for r in read_verdicts(path) if all_rows or r["verdict"] == "reproduced"]
    tracking.disable_telemetry()
    tracking.bound_http_retries()
    from mlflow.tracking import MlflowClient

    store = tracking.tracking_uri()
    try:
        client = tracking.retry(MlflowClient, store)
        tracking.retry(client.search_experiments, max_results=1)
    except Exception as e:
        raise RunError(f"MLflow store {store}: {tracking._reason(e)}") from None
    done, problems = [], []
    for row in rows:
        for run in row["runs"]:
            label = f"{row['table']} {row['row']!r} seed {run.get('seed')}"
            if not run.get("train_run_id"):
                problems.append(f"{label}: no train_run_id (trained without MLflow)")
                continue
            try:
                reg = _register_one(client, prefix + row["experiment"], row, run)
            except InputError as e:
                problems.append(f"{label}: {e}")
                continue
            done.append(reg)
            log(
                f"{'registered' if reg.new else 'already registered'} {reg.name} version {reg.version}: "
                f"{label}, verdict {row['verdict']}, training run {run['train_run_id']}, model {reg.model_id}"
            )
    if not rows:
        log(
            f"{path}: no row to register ({'no rows' if all_rows else 'no row reads reproduced; --all registers every row'})"
        )
    if problems:
        raise InputError(
            f"{path}: {len(problems)} run(s) not registered (store {store}):\n  " + "\n  ".join(problems)
        )
    return done


def _register_one(client, name: str, row: dict, run: dict) -> Registered:
    from mlflow.exceptions import MlflowException

    run_id = run["train_run_id"]
    try:
        model_id = _model_of(client, run_id)
    except MlflowException as e:
        if tracking.transient(e):
            raise RunError(f"MLflow store {tracking.tracking_uri()}: {tracking._reason(e)}") from None
        raise InputError(f"training run {run_id}: {tracking._reason(e)}") from None
    tags = version_tags(row, run)
    for mv in tracking.retry(client.search_model_versions, f"name='{name}'"):
        if mv.source == f"models:/{model_id}" or getattr(mv, "model_id", None) == model_id:
            for k, v in tags.items():
                tracking.retry(client.set_model_version_tag, name, mv.version, k, v)
            return Registered(name, str(mv.version), row, run, model_id, new=False)
    import mlflow

    with tracking.default_store(tracking.tracking_uri()):
        mv = mlflow.register_model(f"models:/{model_id}", name, tags=tags, await_registration_for=0)
    tracking.retry(
        client.update_model_version,
        name,
        mv.version,
        description=f"{row['table']} row {row['row']!r} ({row['protocol']}): top-1 {row['top1']:.2f}"
        + ("" if row.get("paper_top1") is None else f" vs paper {row['paper_top1']:.2f}")
        + f", verdict {row['verdict']}; training run {run_id}, seed {run.get('seed')}",
    )
    return Registered(name, str(mv.version), row, run, model_id, new=True)


def _model_of(client, run_id: str) -> str:
    """The id of the LoggedModel named `model` that training run `run_id` logged (the newest)."""
    run = tracking.retry(client.get_run, run_id)
    outputs = list((run.outputs.model_outputs if run.outputs else []) or [])
    best = None
    for o in sorted(outputs, key=lambda o: o.step):
        m = tracking.retry(client.get_logged_model, o.model_id)
        if m.name == MODEL_NAME and str(m.status).upper().endswith("READY"):
            best = m.model_id
    if best is None:
        raise InputError(
            f"training run {run_id} has no logged model '{MODEL_NAME}' (trained before models were "
            f"logged, or its upload failed: see OUT/mlflow-unsent.json of that training)"
        )
    return best
