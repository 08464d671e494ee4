"""Read what the workflow left under `results/<run>/` and decide the status of every experiment,
evaluation and ensemble. Never raises on a missing or broken result: a problem becomes a
`failed` status whose detail names the file.

Status of an evaluation `(experiment id, protocol)`:
  done      `<id>/eval-<protocol>/metrics.json` is readable (or, failing that, `scores.npz` is:
            the metrics are then computed here with smallbig.engine.metrics)
  failed    a marker file `FAILED` in `<id>/`, `<id>/train/` or `<id>/eval-<protocol>/` (its first
            line is shown as the reason), or an unreadable metrics.json / scores.npz, or, while
            no final checkpoint / metrics exist, a log containing a Python traceback (the
            workflow's `logs/<run>/train/<id>.log`, `logs/<run>/evaluate/<id>-<protocol>.log`,
            or any `*.log` in `<id>/`, `<id>/logs/`, `<id>/train/`, `<id>/eval-<protocol>/`)
  running   `<id>/train/` or `<id>/eval-<protocol>/` exists but no metrics yet (detail says how far:
            last epoch in history.json, or "trained, not evaluated")
  not run   none of the above (no outputs)
An ensemble row is done when `ensembles/<name>/metrics.json` exists or when every member's
`eval-<protocol>/scores.npz` does (fused here); otherwise failed if a member failed, running if a
member is running or done, else not run (a traceback in `logs/<run>/ensemble/<name>.log`
while the members are done: failed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from smallbig.engine import metrics as M

NOT_RUN, RUNNING, DONE, FAILED = "not run", "running", "done", "failed"
STATUSES = (NOT_RUN, RUNNING, DONE, FAILED)
FAILED_MARKER = "FAILED"
_TRACEBACK = "Traceback (most recent call last)"


class ReportInputError(ValueError):
    """A result file exists but cannot be used; the message names the file and the problem."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{path}: not readable JSON ({e})") from None


def parse_protocol(protocol: str) -> tuple[int, int]:
    clips, crops = protocol.lower().split("x")
    return int(clips), int(crops)


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
    out = []
    for i, e in enumerate(data):
        e = dict(e)
        e.setdefault("epoch", i + 1)
        out.append(e)
    return out


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


def _log_error(*dirs: Path, files: list[Path] | tuple = ()) -> str | None:
    """First log (given files, then *.log in dirs) that holds a Python traceback: "file: last line"."""
    logs = list(files)
    for d in dirs:
        if d.is_dir():
            logs += sorted(d.glob("*.log"))
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        if _TRACEBACK in text:
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            return f"{log}: {last.strip()[:200]}"
    return None


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class Results:
    """Cached view of `results/<run>/` (any part of it may be missing)."""

    def __init__(self, run_dir: str | Path, run: str | None = None,
                 logs_dir: str | Path | None = None):
        """`run_dir` = results/<run> (any part of it may be missing); `logs_dir` = the workflow's
        logs/<run> (default: <run_dir>/../../logs/<run>, used when it exists)."""
        self.dir = Path(run_dir)
        self.run = run or self.dir.name
        self.logs = Path(logs_dir) if logs_dir else self.dir.parent.parent / "logs" / self.dir.name
        self._exp: dict[str, dict] = {}
        self._eval: dict[tuple[str, str], dict] = {}
        self._scores: dict[tuple[str, str], dict] = {}
        self._info: dict[str, dict | None] = {}

    def _logs(self, *parts: str) -> list[Path]:
        """Workflow log files logs/<run>/<parts> (existing ones only)."""
        p = self.logs.joinpath(*parts)
        return [p] if p.is_file() else []

    # ------------------------------------------------------------------ experiments
    def experiment(self, exp_id: str) -> dict:
        """Training-side facts: params, history, checkpoint, train metrics, problems."""
        if exp_id in self._exp:
            return self._exp[exp_id]
        d = self.dir / exp_id
        train = d / "train"
        info: dict[str, Any] = {"id": exp_id, "dir": d, "exists": d.is_dir(), "params": None,
                                "history": None, "train_metrics": None, "checkpoint": None,
                                "problems": []}
        pfile = d / "params.yaml"
        if pfile.is_file():
            try:
                info["params"] = yaml.safe_load(pfile.read_text())
            except (OSError, yaml.YAMLError) as e:
                info["problems"].append(f"{pfile}: not readable YAML ({e})")
        hfile = train / "history.json"
        if hfile.is_file():
            try:
                info["history"] = normalize_history(read_json(hfile), hfile)
            except ReportInputError as e:
                info["problems"].append(str(e))
        tm = train / "train_metrics.json"
        if tm.is_file():
            try:
                info["train_metrics"] = read_json(tm)
            except ReportInputError as e:
                info["problems"].append(str(e))
        ck = train / "checkpoint.pt"
        info["checkpoint"] = ck if ck.is_file() else None
        info["train_started"] = train.is_dir()
        info["failed"] = _marker(d, train) or (None if info["checkpoint"] else _log_error(
            d, d / "logs", train, files=self._logs("train", f"{exp_id}.log")))
        self._exp[exp_id] = info
        return info

    def progress(self, exp_id: str) -> str:
        e = self.experiment(exp_id)
        hist = e["history"] or []
        total = None
        if isinstance(e["params"], dict):
            total = e["params"].get("train", {}).get("epochs")
        if hist:
            last = hist[-1].get("epoch", len(hist))
            return f"epoch {last}/{total}" if total else f"epoch {last}"
        return "started"

    # ------------------------------------------------------------------ evaluations
    def evaluation(self, exp_id: str, protocol: str) -> dict:
        """{"status", "detail", "top1", "top5", "views", "num_videos", "skipped", "metrics",
        "scores_path"} of one experiment at one protocol."""
        key = (exp_id, protocol)
        if key in self._eval:
            return self._eval[key]
        e = self.experiment(exp_id)
        ev = e["dir"] / f"eval-{protocol}"
        out: dict[str, Any] = {"status": NOT_RUN, "detail": "", "top1": None, "top5": None,
                               "views": None, "num_videos": None, "skipped": None,
                               "metrics": None, "scores_path": None, "eval_dir": ev}
        clips, crops = parse_protocol(protocol)
        mfile, sfile = ev / "metrics.json", ev / "scores.npz"
        if sfile.is_file():
            out["scores_path"] = sfile
        marker = _marker(e["dir"], e["dir"] / "train", ev)
        try:
            if marker:
                raise ReportInputError(marker)
            if mfile.is_file():
                m = read_json(mfile)
                if not isinstance(m, dict) or _finite(m.get("top1")) is None:
                    raise ReportInputError(f"{mfile}: no numeric `top1`")
            elif sfile.is_file():
                m = self._metrics_from_scores(exp_id, protocol)
            else:
                m = None
        except ReportInputError as err:
            out.update(status=FAILED, detail=str(err))
            self._eval[key] = out
            return out
        if m is not None:
            n_clips = int(m.get("num_clips") or clips)
            n_crops = int(m.get("num_crops") or crops)
            skipped = m.get("skipped")
            out.update(status=DONE, metrics=m, top1=_finite(m.get("top1")),
                       top5=_finite(m.get("top5")), views=n_clips * n_crops,
                       num_videos=m.get("num_videos"),
                       skipped=len(skipped) if isinstance(skipped, list) else skipped)
            out["detail"] = "" if mfile.is_file() else f"metrics computed from {sfile}"
        else:
            log_err = _log_error(ev, files=self._logs("evaluate", f"{exp_id}-{protocol}.log")) \
                or e["failed"]
            if log_err:
                out.update(status=FAILED, detail=log_err)
            elif e["train_started"] or ev.is_dir():
                detail = (f"trained, not evaluated at {protocol}" if e["checkpoint"]
                          else f"training ({self.progress(exp_id)})")
                if ev.is_dir() and e["checkpoint"]:
                    detail = f"evaluating at {protocol}"
                out.update(status=RUNNING, detail=detail)
            elif e["problems"]:
                out.update(status=FAILED, detail="; ".join(e["problems"]))
        self._eval[key] = out
        return out

    def scores(self, exp_id: str, protocol: str) -> dict:
        """The saved per-view logits of an evaluation (raises ReportInputError/FileNotFoundError)."""
        key = (exp_id, protocol)
        if key not in self._scores:
            path = self.dir / exp_id / f"eval-{protocol}" / "scores.npz"
            try:
                self._scores[key] = M.load_scores(path)
            except ValueError as e:
                raise ReportInputError(str(e)) from None
        return self._scores[key]

    def _metrics_from_scores(self, exp_id: str, protocol: str) -> dict:
        s = self.scores(exp_id, protocol)
        m = M.compute_metrics(s["logits"], s["labels"])
        m.update(num_clips=int(s.get("num_clips", s["clip_idx"].max() + 1)),
                 num_crops=int(s.get("num_crops", s["crop_idx"].max() + 1)),
                 skipped=[str(x) for x in s.get("skipped", np.array([])).tolist()])
        return m

    # ------------------------------------------------------------------ ensembles
    def ensemble(self, name: str, members: list[str], protocol: str) -> dict:
        out: dict[str, Any] = {"status": NOT_RUN, "detail": "", "top1": None, "top5": None,
                               "views": None, "num_videos": None, "skipped": None,
                               "metrics": None}
        clips, crops = parse_protocol(protocol)
        mfile = self.dir / "ensembles" / name / "metrics.json"
        marker = _marker(mfile.parent)
        if marker:
            out.update(status=FAILED, detail=marker)
            return out
        if mfile.is_file():
            try:
                m = read_json(mfile)
                if not isinstance(m, dict) or _finite(m.get("top1")) is None:
                    raise ReportInputError(f"{mfile}: no numeric `top1`")
            except ReportInputError as err:
                out.update(status=FAILED, detail=str(err))
                return out
            out.update(status=DONE, metrics=m, top1=_finite(m.get("top1")),
                       top5=_finite(m.get("top5")), views=clips * crops,
                       num_videos=m.get("num_videos"))
            return out
        evals = {i: self.evaluation(i, protocol) for i in members}
        if all(ev["status"] == DONE and ev["scores_path"] for ev in evals.values()):
            try:
                fused = M.ensemble_scores([self.scores(i, protocol) for i in members])
            except (ReportInputError, ValueError, KeyError) as err:
                out.update(status=FAILED, detail=f"fusing {', '.join(members)}: {err}")
                return out
            labels = fused["labels"]
            out.update(status=DONE, top1=M.topk_accuracy(fused["scores"], labels, 1),
                       top5=M.topk_accuracy(fused["scores"], labels, 5), views=clips * crops,
                       num_videos=int(len(labels)),
                       detail=f"fused here from the members' eval-{protocol}/scores.npz")
            return out
        bad = [f"{i}: {ev['detail']}" for i, ev in evals.items() if ev["status"] == FAILED]
        log_err = _log_error(files=self._logs("ensemble", f"{name}.log"))
        if log_err and all(ev["status"] == DONE for ev in evals.values()):
            out.update(status=FAILED, detail=log_err)
        elif bad:
            out.update(status=FAILED, detail="member failed: " + "; ".join(bad))
        elif any(ev["status"] in (RUNNING, DONE) for ev in evals.values()):
            waiting = [i for i, ev in evals.items() if ev["status"] != DONE]
            out.update(status=RUNNING, detail="waiting for " + ", ".join(waiting))
        return out

    # ------------------------------------------------------------------ model info
    def model_info(self, exp_id: str, info_dirs: list[Path] | None = None,
                   compute: bool = False, paper_size: bool = True) -> dict | None:
        """`smallbig model-info` JSON of the experiment's paper-size configuration, read from
        (in order) `<dir>/<id>.json` for each of info_dirs, `results/<run>/model-info/<id>.json`,
        `results/<run>/model-info.json` (the list `smallbig model-info --all --json` prints);
        computed with smallbig.models.model_info when `compute` is set (from the run's resolved
        `<id>/params.yaml`, else, when `paper_size`, the paper-size params/experiments/<id>.yaml);
        else None."""
        if exp_id in self._info:
            return self._info[exp_id]
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
        if found is None and compute and (paper_size or resolved.is_file()):
            try:
                from smallbig.config import experiment_path, load_params, load_resolved
                from smallbig.models import model_info
                params = (load_resolved(resolved) if resolved.is_file()
                          else load_params(experiment_path(exp_id)))
                found = model_info(params)
            except Exception as e:  # noqa: BLE001 — a report never dies on model info
                found = {"error": f"model_info({exp_id}): {e}"}
        self._info[exp_id] = found
        return found
