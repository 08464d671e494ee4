"""Read what the workflow left under `results/<run>/` and decide the status of every experiment,
evaluation and ensemble. Never raises on a missing or broken result: a problem becomes a
`failed` status whose detail names the file.

The status comes from the workflow's outputs (the files its rules declare) and MLflow:
  done      `<id>/eval-<protocol>/metrics.json` is readable (or, failing that, `scores.npz` is:
            the metrics are then computed with smallbig.engine.metrics)
  failed    a `FAILED` marker file in `<id>/`, `<id>/train/` or `<id>/eval-<protocol>/` (its first
            line is the reason); an unreadable metrics.json / scores.npz; or, while no final
            checkpoint / metrics exist, the training's MLflow run (`train/mlflow-run.json`)
            ended FAILED, or the rule's own log (`logs/<run>/train/<id>.log`,
            `logs/<run>/evaluate/<id>-<protocol>.log`) ends in a Python traceback
  running   `<id>/train/` or `<id>/eval-<protocol>/` exists but no metrics yet (detail says how far:
            last epoch in history.json, or "trained, not evaluated")
  not run   none of the above
An ensemble row is done when the engine's `ensembles/<name>/metrics.json` exists, or when every
member's `eval-<protocol>/scores.npz` does (fused with the engine's `ensemble_scores`, detail
"fused here"); otherwise failed if a member failed (or the rule's log
`logs/<run>/ensemble/<name>.log` ends in a traceback), running if a member is running or done,
else not run.

Seeds: replicate k > 0 of an experiment lives in `<id>/seed-<k>/` (the same layout: params.yaml,
train/, eval-<protocol>/; its rule logs `logs/<run>/train/<id>/seed-<k>.log`,
`logs/<run>/evaluate/<id>/seed-<k>-<protocol>.log`), of an ensemble in
`ensembles/<name>/seed-<k>/`; replicate 0 is `<id>/` itself (smallbig.spec.plan.seed_subdir).
`Results(seeds=N)` reads replicates 0..N-1; without `seeds`, whatever replicates exist.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from smallbig.config import ParamsError, experiment_path, load_params, load_resolved
from smallbig.engine import metrics as M
from smallbig.errors import InputError
from smallbig.spec.params import DataSpec, TrainSpec
from smallbig.spec.plan import SEED_PREFIX, seed_subdir
from smallbig.spec.protocol import Protocol

NOT_RUN, RUNNING, DONE, FAILED = "not run", "running", "done", "failed"
STATUSES = (NOT_RUN, RUNNING, DONE, FAILED)
FAILED_MARKER = "FAILED"
MLFLOW_RUN_FILE = "mlflow-run.json"  # written by `smallbig train` (smallbig/engine/train.py)
_TRACEBACK = "Traceback (most recent call last)"

# (mlflow-run.json record) -> the run's MLflow status ("RUNNING", "FAILED", ...) or None
RunStateLookup = Callable[[dict], "str | None"]
# (params mapping) -> `smallbig model-info` JSON (smallbig.models.model_info; torch)
ModelInfo = Callable[[dict], dict]


class ReportInputError(InputError):
    """A result file exists but cannot be used; the message names the file and the problem."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{path}: not readable JSON ({e})") from None


def normalize_history(data: Any, source: Path | str = "history.json") -> list[dict]:
    """history.json as a list of per-epoch dicts (accepts a list, {"epochs": [...]}, or a dict
    of equal-length lists). Each entry gets an `epoch` (1-based) if it has none."""
    if isinstance(data, dict) and isinstance(data.get("epochs"), list):
        data = data["epochs"]
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        n = max(len(v) for v in data.values())
        data = [{k: (v[i] if i < len(v) else None) for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ReportInputError(f"{source}: expected a list of per-epoch records")
    return [{"epoch": i + 1, **e} for i, e in enumerate(data)]


def _marker(*dirs: Path) -> str | None:
    for d in dirs:
        f = d / FAILED_MARKER
        if f.is_file():
            try:
                text = f.read_text(errors="replace").strip().splitlines()
            except OSError:
                text = []
            return f"{f}: {text[0] if text else 'marked failed'}"
    return None


def _log_error(log: Path) -> str | None:
    """ "log: last line" when the rule's log holds a Python traceback."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    if _TRACEBACK not in text:
        return None
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f"{log}: {last.strip()[:200]}"


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _section(params: Any, name: str, spec):
    """A typed section (TrainSpec, DataSpec) of a run's params.yaml, defaults from base.yaml;
    None when the file or the section is unusable."""
    if not isinstance(params, dict):
        return None
    try:
        return spec.from_dict(params.get(name) or {})
    except (ParamsError, KeyError, TypeError, ValueError):
        return None


class Results:
    """Cached view of `results/<run>/` (any part of it may be missing)."""

    def __init__(
        self,
        run_dir: str | Path,
        run: str | None = None,
        logs_dir: str | Path | None = None,
        run_state: RunStateLookup | None = None,
        model_info: ModelInfo | None = None,
        seeds: int | None = None,
    ):
        """`run_dir` = results/<run>; `logs_dir` = the workflow's logs/<run> (default:
        <run_dir>/../../logs/<run>); `run_state`: MLflow status of a training's
        `mlflow-run.json` record; `model_info`: computes model info no file gives (the CLI
        passes both; None: MLflow is not asked, model info only read from files); `seeds`:
        the replicates of every experiment (None: those that exist)."""
        self.dir = Path(run_dir)
        self.run = run or self.dir.name
        self.logs = Path(logs_dir) if logs_dir else self.dir.parent.parent / "logs" / self.dir.name
        self.run_state = run_state
        self.compute_info = model_info
        self.seeds = seeds
        self._exp: dict[tuple[str, int], dict] = {}
        self._eval: dict[tuple[str, str, int], dict] = {}
        self._scores: dict[tuple[str, str, int], dict] = {}
        self._info: dict[str, dict | None] = {}

    def _rule_log_error(self, *parts: str) -> str | None:
        return _log_error(self.logs.joinpath(*parts))

    # ------------------------------------------------------------------ seeds
    def replicate_dir(self, exp_id: str, seed: int = 0) -> Path:
        """results/<run>/<id>/ (replicate 0) or results/<run>/<id>/seed-<k>/."""
        sub = seed_subdir(seed)
        return self.dir / exp_id / sub if sub else self.dir / exp_id

    def seeds_of(self, *dirs: Path) -> list[int]:
        """Replicates to read: 0..seeds-1, or (seeds unset) 0 and every seed-<k> directory that
        exists under any of `dirs`."""
        if self.seeds is not None:
            return list(range(self.seeds))
        found = {0}
        for d in dirs:
            if d.is_dir():
                for sub in d.glob(f"{SEED_PREFIX}*"):
                    k = sub.name[len(SEED_PREFIX) :]
                    if sub.is_dir() and k.isdigit() and int(k) > 0:
                        found.add(int(k))
        return sorted(found)

    def experiment_seeds(self, exp_ids: list[str]) -> list[int]:
        return self.seeds_of(*(self.dir / i for i in exp_ids))

    def _log(self, kind: str, name: str, seed: int, suffix: str = "") -> str | None:
        """The rule log of replicate `seed`: logs/<run>/<kind>/<name><suffix>.log or
        logs/<run>/<kind>/<name>/seed-<k><suffix>.log."""
        sub = seed_subdir(seed)
        if sub:
            return self._rule_log_error(kind, name, f"{sub}{suffix}.log")
        return self._rule_log_error(kind, f"{name}{suffix}.log")

    def run_ids(self, exp_id: str, protocol: str, seed: int = 0) -> dict:
        """{"seed", "train_run_id", "eval_run_id"}: the MLflow runs of one replicate, from
        train/mlflow-run.json and eval-<protocol>/mlflow-run.json (or metrics.json's
        `mlflow_run_id`); None where unknown. `seed` is the training seed its params.yaml
        records (else the replicate index)."""
        d = self.replicate_dir(exp_id, seed)
        e = self.experiment(exp_id, seed)
        train_seed = e["train"].seed if e["train"] is not None and "train" in (e["params"] or {}) else seed

        def run_id(path: Path, key: str = "run_id") -> str | None:
            try:
                rec = read_json(path)
            except (FileNotFoundError, ReportInputError):
                return None
            v = rec.get(key) if isinstance(rec, dict) else None
            return str(v) if v else None

        ev = d / f"eval-{protocol}"
        return {
            "seed": int(train_seed),
            "train_run_id": run_id(d / "train" / MLFLOW_RUN_FILE),
            "eval_run_id": run_id(ev / MLFLOW_RUN_FILE) or run_id(ev / "metrics.json", "mlflow_run_id"),
        }

    # ------------------------------------------------------------------ experiments
    def experiment(self, exp_id: str, seed: int = 0) -> dict:
        """Training-side facts of one replicate: params (raw + typed `train`/`data`), history,
        checkpoint, train metrics, problems, `failed` (why the training failed, or None)."""
        if (exp_id, seed) in self._exp:
            return self._exp[(exp_id, seed)]
        d = self.replicate_dir(exp_id, seed)
        train = d / "train"
        info: dict[str, Any] = {
            "id": exp_id,
            "seed": seed,
            "dir": d,
            "exists": d.is_dir(),
            "params": None,
            "history": None,
            "train_metrics": None,
            "problems": [],
        }
        pfile = d / "params.yaml"
        if pfile.is_file():
            try:
                info["params"] = yaml.safe_load(pfile.read_text())
            except (OSError, yaml.YAMLError) as e:
                info["problems"].append(f"{pfile}: not readable YAML ({e})")
        info["train"] = _section(info["params"], "train", TrainSpec)
        info["data"] = _section(info["params"], "data", DataSpec)
        for key, name in (("history", "history.json"), ("train_metrics", "train_metrics.json")):
            f = train / name
            if f.is_file():
                try:
                    data = read_json(f)
                    info[key] = normalize_history(data, f) if key == "history" else data
                except ReportInputError as e:
                    info["problems"].append(str(e))
        ck = train / "checkpoint.pt"
        info["checkpoint"] = ck if ck.is_file() else None
        info["train_started"] = train.is_dir()
        info["failed"] = _marker(d, train) or (
            None if info["checkpoint"] else (self._mlflow_failed(train) or self._log("train", exp_id, seed))
        )
        self._exp[(exp_id, seed)] = info
        return info

    def _mlflow_failed(self, train: Path) -> str | None:
        """The training's MLflow run ended FAILED (an unfinished training only)."""
        f = train / MLFLOW_RUN_FILE
        if self.run_state is None or not f.is_file():
            return None
        try:
            record = read_json(f)
        except ReportInputError:
            return None
        state = self.run_state(record) if isinstance(record, dict) else None
        return f"{f}: MLflow run {record.get('run_id')} is {state}" if state == "FAILED" else None

    def progress(self, exp_id: str, seed: int = 0) -> str:
        e = self.experiment(exp_id, seed)
        total = e["train"].epochs if e["train"] is not None and "train" in e["params"] else None
        if e["history"]:
            last = e["history"][-1].get("epoch", len(e["history"]))
            return f"epoch {last}/{total}" if total else f"epoch {last}"
        return "started"

    # ------------------------------------------------------------------ evaluations
    def evaluation(self, exp_id: str, protocol: str, seed: int = 0) -> dict:
        """{"status", "detail", "top1", "top5", "views", "num_videos", "skipped", "metrics",
        "scores_path"} of one experiment (replicate `seed`) at one protocol."""
        key = (exp_id, protocol, seed)
        if key in self._eval:
            return self._eval[key]
        e = self.experiment(exp_id, seed)
        ev = e["dir"] / f"eval-{protocol}"
        out: dict[str, Any] = {
            "status": NOT_RUN,
            "detail": "",
            "top1": None,
            "top5": None,
            "views": None,
            "num_videos": None,
            "skipped": None,
            "metrics": None,
            "scores_path": None,
            "eval_dir": ev,
        }
        self._eval[key] = out
        proto = Protocol.parse(protocol)
        mfile, sfile = ev / "metrics.json", ev / "scores.npz"
        if sfile.is_file():
            out["scores_path"] = sfile
        try:
            marker = _marker(e["dir"], e["dir"] / "train", ev)
            if marker:
                raise ReportInputError(marker)
            if mfile.is_file():
                m = _checked_metrics(mfile)
            elif sfile.is_file():
                m = self._metrics_from_scores(exp_id, protocol, seed)
            else:
                m = None
        except ReportInputError as err:
            out.update(status=FAILED, detail=str(err))
            return out
        if m is not None:
            skipped = m.get("skipped")
            out.update(
                status=DONE,
                metrics=m,
                top1=_finite(m.get("top1")),
                top5=_finite(m.get("top5")),
                views=int(m.get("num_clips") or proto.clips) * int(m.get("num_crops") or proto.crops),
                num_videos=m.get("num_videos"),
                skipped=len(skipped) if isinstance(skipped, list) else skipped,
                detail="" if mfile.is_file() else f"metrics computed from {sfile}",
            )
            return out
        failed = self._log("evaluate", exp_id, seed, f"-{protocol}") or e["failed"]
        if failed:
            out.update(status=FAILED, detail=failed)
        elif e["train_started"] or ev.is_dir():
            if ev.is_dir() and e["checkpoint"]:
                detail = f"evaluating at {protocol}"
            elif e["checkpoint"]:
                detail = f"trained, not evaluated at {protocol}"
            else:
                detail = f"training ({self.progress(exp_id, seed)})"
            out.update(status=RUNNING, detail=detail)
        elif e["problems"]:
            out.update(status=FAILED, detail="; ".join(e["problems"]))
        return out

    def scores(self, exp_id: str, protocol: str, seed: int = 0) -> dict:
        """The saved per-view logits of an evaluation (raises ReportInputError/FileNotFoundError)."""
        key = (exp_id, protocol, seed)
        if key not in self._scores:
            path = self.replicate_dir(exp_id, seed) / f"eval-{protocol}" / "scores.npz"
            try:
                self._scores[key] = M.load_scores(path)
            except ValueError as e:
                raise ReportInputError(str(e)) from None
        return self._scores[key]

    def _metrics_from_scores(self, exp_id: str, protocol: str, seed: int = 0) -> dict:
        s = self.scores(exp_id, protocol, seed)
        m = M.compute_metrics(s["logits"], s["labels"])
        m.update(
            num_clips=int(s.get("num_clips", s["clip_idx"].max() + 1)),
            num_crops=int(s.get("num_crops", s["crop_idx"].max() + 1)),
            skipped=[str(x) for x in s.get("skipped", np.array([])).tolist()],
        )
        return m

    # ------------------------------------------------------------------ ensembles
    def ensemble(self, name: str, members: list[str], protocol: str, seed: int = 0) -> dict:
        """An ensemble of the members' replicate `seed` (results/<run>/ensembles/<name>/, or
        its seed-<k>/)."""
        out: dict[str, Any] = {
            "status": NOT_RUN,
            "detail": "",
            "top1": None,
            "top5": None,
            "views": Protocol.parse(protocol).views,
            "num_videos": None,
            "skipped": None,
            "metrics": None,
        }
        sub = seed_subdir(seed)
        edir = self.dir / "ensembles" / name
        mfile = (edir / sub if sub else edir) / "metrics.json"
        marker = _marker(mfile.parent)
        if marker:
            out.update(status=FAILED, detail=marker)
            return out
        if mfile.is_file():  # the engine's ensemble (the workflow's `ensemble` rule)
            try:
                m = _checked_metrics(mfile)
            except ReportInputError as err:
                out.update(status=FAILED, detail=str(err))
                return out
            out.update(
                status=DONE,
                metrics=m,
                top1=_finite(m.get("top1")),
                top5=_finite(m.get("top5")),
                num_videos=m.get("num_videos"),
            )
            return out
        evals = {i: self.evaluation(i, protocol, seed) for i in members}
        if all(ev["status"] == DONE and ev["scores_path"] for ev in evals.values()):
            try:
                fused = M.ensemble_scores([self.scores(i, protocol, seed) for i in members])
            except (ReportInputError, ValueError, KeyError) as err:
                out.update(status=FAILED, detail=f"fusing {', '.join(members)}: {err}")
                return out
            labels = fused["labels"]
            out.update(
                status=DONE,
                top1=M.topk_accuracy(fused["scores"], labels, 1),
                top5=M.topk_accuracy(fused["scores"], labels, 5),
                num_videos=int(len(labels)),
                detail=f"fused here from the members' eval-{protocol}/scores.npz",
            )
            return out
        bad = [f"{i}: {ev['detail']}" for i, ev in evals.items() if ev["status"] == FAILED]
        log_err = self._log("ensemble", name, seed)
        if log_err and all(ev["status"] == DONE for ev in evals.values()):
            out.update(status=FAILED, detail=log_err)
        elif bad:
            out.update(status=FAILED, detail="member failed: " + "; ".join(bad))
        elif any(ev["status"] in (RUNNING, DONE) for ev in evals.values()):
            waiting = [i for i, ev in evals.items() if ev["status"] != DONE]
            out.update(status=RUNNING, detail="waiting for " + ", ".join(waiting))
        return out

    # ------------------------------------------------------------------ model info
    def model_info(
        self, exp_id: str, info_dirs: list[Path] | None = None, compute: bool = False, paper_size: bool = True
    ) -> dict | None:
        """`smallbig model-info` JSON of the experiment's configuration, read from (in order)
        `<dir>/<id>.json` for each of info_dirs, `results/<run>/model-info/<id>.json`,
        `results/<run>/model-info.json` (the list `smallbig model-info --all --json` prints);
        computed with `self.compute_info` when `compute` is set (from the run's resolved
        `<id>/params.yaml`, else, when `paper_size`, the paper-size params/experiments/<id>.yaml);
        else None."""
        if exp_id in self._info and (self._info[exp_id] is not None or not compute):
            return self._info[exp_id]  # a miss without computing is retried when asked to compute
        dirs = list(info_dirs or []) + [self.dir / "model-info"]
        found = None
        for path in [Path(d) / f"{exp_id}.json" for d in dirs] + [self.dir / "model-info.json"]:
            if not path.is_file():
                continue
            try:
                data = read_json(path)
            except ReportInputError:
                continue
            if isinstance(data, list):  # `model-info --all --json`
                data = next((x for x in data if isinstance(x, dict) and x.get("id") == exp_id), None)
            elif isinstance(data, dict) and isinstance(data.get(exp_id), dict):
                data = data[exp_id]
            if isinstance(data, dict) and data.get("id", exp_id) == exp_id:
                found = data
                break
        resolved = self.dir / exp_id / "params.yaml"
        if found is None and compute and self.compute_info and (paper_size or resolved.is_file()):
            try:
                params = (
                    load_resolved(resolved) if resolved.is_file() else load_params(experiment_path(exp_id))
                )
                found = self.compute_info(params)
            except Exception as e:  # noqa: BLE001 — a report never dies on model info
                found = {"error": f"model_info({exp_id}): {e}"}
        self._info[exp_id] = found
        return found


def _checked_metrics(path: Path) -> dict:
    m = read_json(path)
    if not isinstance(m, dict) or _finite(m.get("top1")) is None:
        raise ReportInputError(f"{path}: no numeric `top1`")
    return m
