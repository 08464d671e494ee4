"""`smallbig plan`: jobs and GPU-hours of the workflow, per table and in total, before anything is
submitted.

GPU-hours:
  training   = train.epochs x train clips / training clips/s per GPU
  evaluation = val videos x views / evaluation clips/s per GPU
Train clips / val videos are the line counts of the prepared `train.txt` / `val.txt` under
`data.root` when they exist, else the datasets' nominal sizes below (capped by
`data.limit_train` / `data.limit_val`). The rates ("GPU rates", `gpu_rates`): measured by
`benchmarks/gpu_suite.py` (benchmarks/results/gpu_*.json, or `--throughput FILE`) for an
experiment it measured at the same shape (`throughput_shape`), at the settings the engine trains
with (`engine_settings`: model.formulation, train.amp, train.channels_last, train.compile);
evaluation from the measured inference clips/s (eager, as `smallbig evaluate`), scaled by
(measured crop / test crop)^2. Otherwise the GUESS `train.clips_per_sec_per_gpu` (params) and,
for evaluation, EVAL_SPEEDUP = 3 times it (a forward without backward), labelled as a guess in
the output. Only JSON is read here: no torch.

GPU memory per training (`smallbig/spec/memory_plan.py`; the measuring is
`smallbig/engine/memory.py`'s, plugged in by the engine: no torch, no engine import here): the
per-GPU memory of each training at its `train.per_gpu_batch` and AMP setting, from activations measured once per configuration on
the meta device and cached in `params/memory.json` (`--measure-memory` writes it; an entry whose
shape fields changed is measured again on the fly and reported as such, never used). With
`--gpu-mem GiB`: the largest per-GPU batch that fits, the per_gpu_batch / accumulation steps that
keep `train.batch_size` on `resources.gpus` GPUs, and exit code 2 naming every training whose
configured per_gpu_batch does not fit.

The workflow (Snakefile) uses `evaluations()` and `datasets()` from here, so the plan and the
DAG always agree on which jobs exist.

Seeds (config `seeds: N`, `smallbig plan --seeds N`): every training, evaluation and ensemble
runs N times; replicate k trains with `train.seed` + k and lives in
`results/<run>/<id>/seed-<k>/` (`seed_subdir`), replicate 0 in `results/<run>/<id>/` itself, so
a one-seed run keeps the paths it always had.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smallbig import config
from smallbig.spec import memory_plan as mem
from smallbig.spec.params import TestSpec
from smallbig.spec.pretrained import workflow_files
from smallbig.spec.protocol import Protocol
from smallbig.spec.tables import load_tables, required_ensembles, required_evaluations

EVAL_SPEEDUP = 3.0
# Nominal sizes (videos) of the full datasets, used until the prepared lists exist.
NOMINAL = {
    "kinetics400": {"train": 240436, "val": 19796},
    "sthv1": {"train": 86017, "val": 11522},
    "sthv2": {"train": 168913, "val": 24777},
}


SEED_PREFIX = "seed-"


def seed_subdir(k: int) -> str:
    """Directory of replicate `k` under results/<run>/<id>/ (and ensembles/<name>/): "" for
    replicate 0, else "seed-<k>"."""
    if k < 0:
        raise ValueError(f"seed replicate {k} < 0")
    return "" if k == 0 else f"{SEED_PREFIX}{k}"


def replicate_run(name: str, k: int) -> str:
    """The workflow's name of replicate `k` of an experiment or ensemble (its {exp} / {name}
    wildcard): the name itself for replicate 0, else "<name>/seed-<k>" (a path under results/<run>/)."""
    sub = seed_subdir(k)
    return f"{name}/{sub}" if sub else name


def split_replicate(run: str) -> tuple[str, int]:
    """Inverse of `replicate_run`: "<name>" -> (name, 0), "<name>/seed-<k>" -> (name, k)."""
    head, sep, k = run.partition("/" + SEED_PREFIX)
    return (head, int(k)) if sep and k.isdigit() else (run, 0)


def replicate_seed(params: dict, k: int) -> int:
    """The `train.seed` replicate `k` of an experiment trains with: its params' seed + k."""
    return int(params["train"]["seed"]) + k


def evaluations(params: dict[str, dict], tables: list[dict] | None) -> list[tuple[str, str]]:
    """(experiment, protocol) pairs to evaluate: every protocol of each experiment's
    `test.protocols`, plus whatever the tables need (in that order, no duplicates)."""
    pairs: list[tuple[str, str]] = []
    for exp in sorted(params):
        for proto in params[exp]["test"]["protocols"]:
            if (exp, proto) not in pairs:
                pairs.append((exp, proto))
    if tables:
        for exp, proto in required_evaluations(tables):
            if exp not in params:
                raise config.ParamsError(f"tables: a row needs experiment {exp!r}, which is not configured")
            if (exp, proto) not in pairs:
                pairs.append((exp, proto))
    return pairs


DATA_KEYS = ("root", "source", "format", "frame_short_side")


def datasets(params: dict[str, dict]) -> dict[str, dict]:
    """dataset -> {"rep": experiment whose params the data rules use, "root", "format"}.
    All experiments of one dataset must agree on DATA_KEYS (they share one prepared copy)."""
    out: dict[str, dict] = {}
    for exp in sorted(params):
        d = params[exp]["data"]
        ds = d["dataset"]
        if ds not in out:
            out[ds] = {
                "rep": exp,
                "root": d["root"],
                "format": d.get("format", "video"),
                "data": {k: d.get(k) for k in DATA_KEYS},
            }
            continue
        for k in DATA_KEYS:
            if d.get(k) != out[ds]["data"][k]:
                raise config.ParamsError(
                    f"{config.experiment_path(exp)}: data.{k}: {d.get(k)!r} differs from "
                    f"{out[ds]['rep']}'s {out[ds]['data'][k]!r}; experiments of dataset {ds} "
                    f"share one prepared dataset"
                )
    return out


def _count_lines(path: Path) -> int | None:
    if not path.exists():
        return None
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def split_size(p: dict, split: str) -> tuple[int, str]:
    """(number of videos of `split`, where the number comes from)."""
    d = p["data"]
    n = _count_lines(config.REPO_ROOT / d["root"] / f"{split}.txt")
    source = f"{d['root']}/{split}.txt"
    if n is None:
        n = NOMINAL.get(d["dataset"], {}).get(split, 0)
        source = f"nominal {d['dataset']}"
    limit = d.get(f"limit_{split}")
    if limit:
        n = min(n, limit)
        source += f", limit_{split}={limit}"
    return n, source


def views(protocol: str) -> int:
    return Protocol.parse(protocol).views


def train_gpu_hours(p: dict, rate: dict | None = None) -> float:
    """`rate`: the experiment's entry of `gpu_rates` (None: the params' guess)."""
    clips, _ = split_size(p, "train")
    per_s = rate["train_clips_s"] if rate else p["train"]["clips_per_sec_per_gpu"]
    return p["train"]["epochs"] * clips / per_s / 3600.0


def eval_clips_per_s(p: dict, protocol: str, rate: dict | None = None) -> float:
    """Evaluation clips (views) per second per GPU at the protocol's test crop: a measured
    inference rate scaled by (measured crop / test crop)^2 (compute grows with the pixels), or
    EVAL_SPEEDUP x the params' guess."""
    if rate is None or rate.get("eval_crop") is None:
        guess = rate["eval_clips_s"] if rate else EVAL_SPEEDUP * p["train"]["clips_per_sec_per_gpu"]
        return guess
    crop = Protocol.parse(protocol).crop_size(TestSpec.from_dict(p["test"]))
    return rate["eval_clips_s"] * (rate["eval_crop"] / crop) ** 2


def eval_gpu_hours(p: dict, protocol: str, rate: dict | None = None) -> float:
    videos, _ = split_size(p, "val")
    return videos * views(protocol) / eval_clips_per_s(p, protocol, rate) / 3600.0


# --------------------------------------------------------------------------------------------
# GPU rates: measured by benchmarks/gpu_suite.py where a measurement fits, else the guess
THROUGHPUT_DIR = config.REPO_ROOT / "benchmarks" / "results"
_NOT_SHAPE = ("pretrained", "formulation")  # model keys that do not change a step's cost


def throughput_shape(p: dict) -> dict:
    """What decides the cost of a training step of these params, as JSON: the model section
    (but `pretrained`; `formulation` is a setting of the measurement), frames and crop. The GPU
    suite stores it per model; a measurement applies to an experiment only when they agree."""
    model = {k: v for k, v in p["model"].items() if k not in _NOT_SHAPE}
    shape = {"model": model, "num_frames": p["data"]["num_frames"], "crop_size": p["data"]["crop_size"]}
    return json.loads(json.dumps(shape, sort_keys=True))


def engine_settings(p: dict, device_type: str = "cuda") -> dict:
    """The settings `smallbig train` runs these params with on a `device_type` device: model
    formulation, precision (train.amp; AMP runs on CUDA only, as
    smallbig.engine.runtime.amp_settings), channels-last and torch.compile."""
    tr = p["train"]
    amp = tr.get("amp") or "none"
    precision = {"none": "fp32"}.get(amp, amp) if device_type == "cuda" else "fp32"
    return {
        "formulation": p["model"].get("formulation", "efficient"),
        "precision": precision,
        "channels_last": bool(tr.get("channels_last")),
        "compile": bool(tr.get("compile")),
    }


def _read_measurement(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise config.ParamsError(f"{path}: not a readable GPU suite result: {e}") from None
    kinds = {"device": dict, "models": dict, "results": list}
    missing = [k for k in kinds if not isinstance(m, dict) or k not in m]
    if missing:
        raise config.ParamsError(
            f"{path}: not a GPU suite result (benchmarks/gpu_suite.py): missing {', '.join(missing)}"
        )
    wrong = [k for k, t in kinds.items() if not isinstance(m[k], t)]
    wrong += ["results[]" for r in m["results"] if not isinstance(r, dict)][:1]
    if wrong:
        raise config.ParamsError(f"{path}: not a GPU suite result: wrong type of {', '.join(wrong)}")
    m["file"] = str(path)
    return m


def load_throughput(
    throughput: str | None = None, gpu: str | None = None, results_dir: Path | None = None
) -> dict | None:
    """The GPU suite measurement the plan uses: `throughput` = a file, or "none" (use the
    guesses); default: benchmarks/results/gpu_*.json (smoke runs left out) whose device name or
    file name contains `gpu` (case-insensitive), the newest (`date`) when several match.
    -> the measurement (with "file" and "others": the files not chosen) or None."""
    if throughput == "none":
        return None
    if throughput:
        path = Path(throughput)
        if not path.is_file():
            raise config.ParamsError(f"--throughput {throughput}: no such file")
        m = _read_measurement(path)
        if gpu and not _device_matches(m, gpu):
            raise config.ParamsError(f"--gpu {gpu}: {path} measured {m['device'].get('name')!r}")
        m["others"] = []
        return m
    directory = results_dir or THROUGHPUT_DIR
    found = [_read_measurement(f) for f in sorted(directory.glob("gpu_*.json"))]
    found = [m for m in found if not m.get("smoke")]
    chosen = [m for m in found if not gpu or _device_matches(m, gpu)]
    if gpu and not chosen:
        have = ", ".join(f"{Path(m['file']).name} ({m['device'].get('name')})" for m in found) or "none"
        raise config.ParamsError(f"--gpu {gpu}: no measurement of that device in {directory} (have: {have})")
    if not chosen:
        return None
    best = max(chosen, key=lambda m: str(m.get("date", "")))
    best["others"] = [m["file"] for m in found if m is not best]
    return best


def _device_matches(m: dict, gpu: str) -> bool:
    text = f"{m['device'].get('name', '')} {Path(m['file']).stem}".lower()
    return gpu.lower() in text


def _row_label(r: dict) -> str:
    mode = r["precision"] + (" channels-last" if r["channels_last"] else "")
    return f"{r['formulation']} {mode} {'compiled' if r['compile'] else 'eager'}, batch {r.get('batch')}"


def _find_row(m: dict, exp: str, want: dict) -> dict | None:
    for r in m["results"]:
        if r.get("model") == exp and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def measured_rate(p: dict, m: dict) -> tuple[dict | None, str]:
    """(the rate of experiment `p` from measurement `m`, or None; why not)."""
    exp = p["id"]
    model = m["models"].get(exp)
    if model is None:
        return None, "not measured"
    if model.get("shape") != throughput_shape(p):
        return None, "measured at another shape: " + _shape_diff(
            model.get("shape") or {}, throughput_shape(p)
        )
    want = engine_settings(p, m["device"].get("type", "cuda"))
    row = _find_row(m, exp, want)
    if row is None or row.get("status") != "ok" or not row.get("train_clips_s"):
        status = "not measured" if row is None else f"{row.get('status')}"
        label = _row_label(dict(want, batch=model.get("batch")))
        return None, f"no measurement at the engine's settings ({label}: {status})"
    evaluation = _find_row(m, exp, dict(want, compile=False))  # `smallbig evaluate` never compiles
    name = Path(m["file"]).name
    label = _row_label(row)
    if row.get("batch") != p["train"]["per_gpu_batch"]:
        label += f" (params: per_gpu_batch {p['train']['per_gpu_batch']})"
    rate = {
        "measured": True,
        "train_clips_s": row["train_clips_s"],
        "train_source": f"measured: {name}, {label}",
    }
    if evaluation is not None and evaluation.get("status") == "ok" and evaluation.get("infer_clips_s"):
        rate.update(
            eval_clips_s=evaluation["infer_clips_s"],
            eval_crop=evaluation.get("crop", model.get("crop")),
            eval_source=f"measured: {name}, inference {_row_label(evaluation)}, scaled to the test crop",
        )
    else:
        rate.update(
            eval_clips_s=EVAL_SPEEDUP * row["train_clips_s"],
            eval_crop=None,
            eval_source=f"{EVAL_SPEEDUP:g} x the measured training rate (no inference measurement)",
        )
    return rate, ""


def _shape_diff(measured: dict, want: dict) -> str:
    """'4 x 112², base_width 8 (these params: 8 x 224², base_width 64)'."""
    got, need = [], []
    for key, name in (("num_frames", "frames"), ("crop_size", "crop")):
        if measured.get(key) != want.get(key):
            got.append(f"{name} {measured.get(key)}")
            need.append(f"{name} {want.get(key)}")
    mm, wm = measured.get("model") or {}, want.get("model") or {}
    for key in sorted(set(mm) | set(wm)):
        if mm.get(key) != wm.get(key):
            scalar = not isinstance(mm.get(key), (dict, list)) and not isinstance(wm.get(key), (dict, list))
            got.append(f"model.{key} {mm.get(key)}" if scalar else f"model.{key}")
            need.append(f"model.{key} {wm.get(key)}" if scalar else f"model.{key} differs")
    return f"{', '.join(got)} (these params: {', '.join(need)})"


def gpu_rates(params: dict[str, dict], measurement: dict | None) -> dict[str, dict]:
    """experiment -> {"measured", "train_clips_s", "train_source", "eval_clips_s",
    "eval_crop" (None: not crop-scaled), "eval_source"}."""
    out = {}
    for exp, p in params.items():
        rate, why = measured_rate(p, measurement) if measurement else (None, "no measurement file")
        if rate is None:
            guess = p["train"]["clips_per_sec_per_gpu"]
            rate = {
                "measured": False,
                "train_clips_s": guess,
                "train_source": f"GUESS train.clips_per_sec_per_gpu: {why}",
                "eval_clips_s": EVAL_SPEEDUP * guess,
                "eval_crop": None,
                "eval_source": f"GUESS {EVAL_SPEEDUP:g} x train.clips_per_sec_per_gpu",
            }
        out[exp] = rate
    return out


def pretrained_files(params: dict[str, dict]) -> dict:
    """The declared ImageNet files these experiments load (the workflow's `pretrained` jobs,
    workflow/rules/pretrained.smk)."""
    return workflow_files(params)


def load_all(overlay: str | None = None) -> dict[str, dict]:
    return {
        e: config.load_params(config.experiment_path(e), overlay=overlay) for e in config.experiment_ids()
    }


def memory_section(params: dict[str, dict], gpu_mem: float | None = None, cache_path=None) -> dict:
    """The plan's "memory" entry: per experiment the estimate (GiB) at its per-GPU batch, and
    with ``gpu_mem`` what fits; ``error``: the refusal message (None when everything fits)."""
    rows = mem.memory_plan(params, gpu_mem, cache_path or mem.MEMORY_JSON)
    exps = {}
    for exp, r in rows.items():
        est = r["estimate"]
        e = {
            "status": r["status"],
            "frames": r["num_frames"],
            "crop": r["crop_size"],
            "precision": r["precision"],
            "gpus": r["gpus"],
            "per_gpu_batch": r["per_gpu_batch"],
            "accum_steps": r["accum_steps"],
            "batch_size": r["batch_size"],
            "params": r["entry"]["params"],
            "static_gib": round(r["static_gib"], 4),
            "activations_per_clip_gib": round(r["activation_per_clip_gib"], 4),
            "total_gib": round(r["total_gib"], 3),
            "terms_gib": {
                k: round(v / mem.GIB, 4)
                for k, v in est.items()
                if k not in ("batch", "precision", "static", "total")
            },
        }
        if gpu_mem is not None:
            e.update(
                {
                    "max_batch": r["max_batch"],
                    "fits": r["fits"],
                    "use_per_gpu_batch": r["use"][0] if r["use"] else None,
                    "use_accum_steps": r["use"][1] if r["use"] else None,
                }
            )
        exps[exp] = e
    return {
        "gpu_mem_gb": gpu_mem,
        "cache": str(mem.MEMORY_JSON.relative_to(config.REPO_ROOT))
        if cache_path is None
        else str(cache_path),
        "formula": mem.FORMULA,
        "experiments": exps,
        "error": (
            mem.memory_error_message(rows, gpu_mem)
            if gpu_mem is not None and mem.memory_errors(rows)
            else None
        ),
    }


def make_plan(
    overlay: str | None = None,
    tables_path: str | None = None,
    gpu_mem: float | None = None,
    memory: bool = True,
    throughput: str | None = None,
    gpu: str | None = None,
    results_dir: Path | None = None,
    seeds: int = 1,
) -> dict:
    """`throughput` / `gpu` / `results_dir`: which GPU suite measurement gives the rates
    (`load_throughput`); `seeds`: trainings (and their evaluations) per experiment."""
    if seeds < 1:
        raise config.ParamsError(f"--seeds: must be >= 1, got {seeds}")
    params = load_all(overlay)
    measurement = load_throughput(throughput, gpu, results_dir)
    rates = gpu_rates(params, measurement)
    tables = load_tables(tables_path)
    evals = evaluations(params, tables)
    ensembles = required_ensembles(tables)
    dsets = datasets(params)

    def summarise(exps: set[str], ev: set[tuple[str, str]], ens: set[str], n_tables: int) -> dict:
        gh_train = seeds * sum(train_gpu_hours(params[e], rates[e]) for e in exps)
        gh_eval = seeds * sum(eval_gpu_hours(params[e], pr, rates[e]) for e, pr in ev)
        used = {params[e]["data"]["dataset"] for e in exps}
        data_jobs = len(used)  # one `data prepare` per dataset
        # its params come from the dataset's first experiment, resolved even if not in `exps`
        data_jobs += sum(1 for ds in used if dsets[ds]["rep"] not in exps)
        # one `pretrained` download per declared ImageNet file the trainings load
        pretrained_jobs = len(pretrained_files({e: params[e] for e in exps}))
        runs = seeds * len(exps)
        return {
            "experiments": len(exps),
            "train_jobs": runs,
            "eval_jobs": seeds * len(ev),
            "ensemble_jobs": seeds * len(ens),
            "data_jobs": data_jobs,
            "table_jobs": n_tables,
            "pretrained_jobs": pretrained_jobs,
            # + one local `params resolve` job per experiment and seed (workflow/rules/train.smk)
            "jobs": 2 * runs + seeds * (len(ev) + len(ens)) + data_jobs + pretrained_jobs + n_tables,
            "gpu_hours_train": gh_train,
            "gpu_hours_eval": gh_eval,
            "gpu_hours": gh_train + gh_eval,
        }

    per_table = {}
    for t in tables:
        exps: set[str] = set()
        ev: set[tuple[str, str]] = set()
        ens: set[str] = set()
        for r in t["rows"]:
            if r["kind"] == "external":
                continue
            exps.update(r["members"])
            ev.update((m, r["protocol"]) for m in r["members"])
            if r["kind"] == "ensemble":
                ens.add(r["name"])
        per_table[t["number"]] = summarise(exps, ev, ens, 1)
    total = summarise(set(params), set(evals), set(ensembles), 1)
    total["jobs"] += 3  # figures, feature maps, the HTML report
    sizes = {
        ds: {s: split_size(params[info["rep"]], s) for s in ("train", "val")} for ds, info in dsets.items()
    }
    out = {
        "overlay": overlay,
        "seeds": seeds,
        "tables": per_table,
        "total": total,
        "datasets": {
            ds: {s: {"videos": n, "from": src} for s, (n, src) in v.items()} for ds, v in sizes.items()
        },
        "eval_speedup": EVAL_SPEEDUP,
        "rates": {
            "file": measurement["file"] if measurement else None,
            "device": measurement["device"].get("name") if measurement else None,
            "date": measurement.get("date") if measurement else None,
            "smoke": bool(measurement.get("smoke")) if measurement else False,
            "others": measurement["others"] if measurement else [],
            "measured": sum(r["measured"] for r in rates.values()),
            "guessed": sum(not r["measured"] for r in rates.values()),
            "experiments": rates,
        },
    }
    if memory:
        out["memory"] = memory_section(params, gpu_mem)
    return out


def format_plan(plan: dict) -> str:
    head = (
        f"{'':8}{'exps':>5}{'train':>7}{'eval':>6}{'ens':>5}{'jobs':>6}"
        f"{'GPU-h train':>13}{'GPU-h eval':>12}{'GPU-h':>10}"
    )
    lines = [
        f"smallbig plan (overlay: {plan['overlay'] or 'none, full scale'}; seeds: {plan.get('seeds', 1)})",
        head,
    ]

    def row(name, s):
        return (
            f"{name:8}{s['experiments']:>5}{s['train_jobs']:>7}{s['eval_jobs']:>6}"
            f"{s['ensemble_jobs']:>5}{s['jobs']:>6}{s['gpu_hours_train']:>13.1f}"
            f"{s['gpu_hours_eval']:>12.1f}{s['gpu_hours']:>10.1f}"
        )

    for n, s in plan["tables"].items():
        lines.append(row(f"table{n}", s))
    lines.append(row("total", plan["total"]))
    lines.append(
        "(tables share experiments, so the table rows do not add up to the total; "
        "jobs include params resolution, data preparation, ImageNet weight downloads, "
        "tables, figures and the report)"
    )
    for ds, v in plan["datasets"].items():
        lines.append(
            f"{ds}: train {v['train']['videos']} videos ({v['train']['from']}), "
            f"val {v['val']['videos']} ({v['val']['from']})"
        )
    lines.append(
        "GPU-h = epochs x train clips / training clips/s per GPU; evaluation = val videos x views / "
        "evaluation clips/s per GPU (rates and their sources below)"
    )
    lines.append("")
    lines.extend(format_rates(plan["rates"], plan["eval_speedup"]))
    if plan.get("memory"):
        lines.append("")
        lines.extend(format_memory(plan["memory"], plan["overlay"]))
    return "\n".join(lines)


def format_rates(r: dict, eval_speedup: float) -> list[str]:
    """The rates behind the GPU-hours, each with its source: M = measured by
    benchmarks/gpu_suite.py, G = GUESS (train.clips_per_sec_per_gpu)."""
    exps = r["experiments"]
    hint = "run `bash benchmarks/gpu_suite.sh` on a GPU (docs/workflow.md)"
    if r["measured"] == 0:
        guesses = sorted({e["train_clips_s"] for e in exps.values()})
        where = r["file"] or f"no benchmarks/results/gpu_*.json ({hint})"
        lines = [
            f"GPU rates: every rate is a GUESS: train.clips_per_sec_per_gpu = "
            f"{', '.join(f'{g:g}' for g in guesses)} clips/s per GPU for training, {eval_speedup:g}x "
            f"that per view for evaluation, for all {len(exps)} experiments; measurement: {where}"
        ]
        if r["file"]:
            whys = sorted({e["train_source"].split(": ", 1)[-1] for e in exps.values()})
            lines.append(
                "  it has no measurement of these experiments at their shape and settings: " + "; ".join(whys)
            )
        return lines
    lines = [
        f"GPU rates (clips/s per GPU) from {r['file']} ({r['device']}, {r['date']}"
        + (", SMOKE RUN: tiny models on a CPU, not a GPU" if r["smoke"] else "")
        + f"): {r['measured']} measured (M), {r['guessed']} GUESSED (G: train.clips_per_sec_per_gpu, "
        f"evaluation {eval_speedup:g}x it)",
        f"{'experiment':28}{'train':>9}  {'eval':>9}       source",
    ]
    for exp, e in exps.items():
        tag = "M" if e["measured"] else "G"
        crop = f"@{e['eval_crop']}" if e["eval_crop"] else ""
        if e["measured"]:
            source = e["train_source"] + ("" if e["eval_crop"] else f"; evaluation: {e['eval_source']}")
        else:
            source = e["train_source"].replace("GUESS train.clips_per_sec_per_gpu: ", "GUESS: ")
        lines.append(
            f"{exp:28}{e['train_clips_s']:>7.1f} {tag}  {e['eval_clips_s']:>7.1f} {tag}{crop:5} {source}"
        )
    lines.append(
        "eval@N: measured inference clips/s (eager, the same settings) at N x N, scaled per protocol "
        "by (N / test crop)^2; G: the guess, eval = "
        f"{eval_speedup:g} x train"
    )
    if r["others"]:
        lines.append(f"other measurements (choose with --gpu NAME): {', '.join(r['others'])}")
    return lines


def format_memory(m: dict, overlay: str | None = None) -> list[str]:
    gpu_mem = m["gpu_mem_gb"]
    lines = [
        "GPU memory per GPU of each training (GiB = 2^30 bytes; estimate at its "
        "train.per_gpu_batch and AMP setting, smallbig/engine/memory.py)"
    ]
    head = (
        f"{'experiment':28}{'T x crop':>10}{'amp':>6}{'gpus':>5}{'batch x accum':>15}"
        f"{'static':>8}{'act/clip':>9}{'total':>8}"
    )
    if gpu_mem is not None:
        head += f"  {'max batch':>9}  at {gpu_mem:g} GiB"
    lines.append(head)
    for exp, e in m["experiments"].items():
        accum = e["accum_steps"] if e["accum_steps"] is not None else "?"
        row = (
            f"{exp:28}{str(e['frames']) + ' x ' + str(e['crop']):>10}{e['precision']:>6}"
            f"{e['gpus']:>5}{str(e['per_gpu_batch']) + ' x ' + str(accum):>15}"
            f"{e['static_gib']:>8.2f}{e['activations_per_clip_gib']:>9.2f}"
            f"{e['total_gib']:>8.1f}"
        )
        if gpu_mem is not None:
            if e["fits"]:
                verdict = "fits"
            elif e["use_per_gpu_batch"]:
                verdict = (
                    f"DOES NOT FIT: use per_gpu_batch {e['use_per_gpu_batch']} x "
                    f"{e['use_accum_steps']} accumulation"
                )
            elif e["max_batch"] == 0:
                verdict = "DOES NOT FIT: not even 1 clip"
            else:
                verdict = "DOES NOT FIT: no batch keeps train.batch_size exactly"
            row += f"  {e['max_batch']:>9}  {verdict}"
        lines.append(row)
    fresh = [x for x, e in m["experiments"].items() if e["status"] != "cached"]
    if fresh:
        why = (
            "an overlay changes the shapes; params/memory.json holds the full-scale ones"
            if overlay
            else "run `smallbig plan --measure-memory` to update it"
        )
        lines.append(
            f"measured now, not taken from {m['cache']} (missing or shape changed since "
            f"measured; {why}): {', '.join(fresh)}"
        )
    else:
        lines.append(
            f"activations: {m['cache']} (measured once per configuration on the meta "
            "device; current for every experiment)"
        )
    lines.append(
        "total = weights + grads + momentum (+ DDP buckets) + saved activations x batch "
        "+ gradients in flight + input + 10% fragmentation + 2 GiB workspace"
    )
    return lines


def _run(args) -> int:
    if args.measure_memory:
        if args.overlay:
            raise config.ParamsError(
                f"--measure-memory writes {mem.MEMORY_JSON}, which holds the full-scale shapes "
                "of params/experiments; run it without --overlay (an overlay's shapes are "
                "measured on the fly by every `smallbig plan --overlay`)"
            )
        mem.measure_all(
            load_all(), force=args.measure_memory == "all", say=lambda msg: print(msg, file=sys.stderr)
        )
        print(f"wrote {mem.MEMORY_JSON}", file=sys.stderr)
    if args.gpu_mem is not None and args.gpu_mem <= 0:
        raise config.ParamsError(f"--gpu-mem: must be > 0 GiB, got {args.gpu_mem:g}")
    plan = make_plan(
        args.overlay,
        args.tables,
        gpu_mem=args.gpu_mem,
        memory=not args.no_memory,
        throughput=args.throughput,
        gpu=args.gpu,
        seeds=args.seeds,
    )
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    error = (plan.get("memory") or {}).get("error")
    if error:
        sys.stdout.flush()
        raise config.ParamsError(error)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="jobs and GPU-hour estimate per table and in total")
    p.add_argument("--overlay", help="params overlay (e.g. params/embedded.yaml)")
    p.add_argument("--tables", help="tables file (default params/tables.yaml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="trainings per experiment (the workflow config's `seeds`; default 1)",
    )
    p.add_argument(
        "--gpu-mem",
        type=float,
        metavar="GiB",
        help="memory of one GPU in GiB (A100 40GB: 40, H100 80GB: 80): report the "
        "largest per-GPU batch that fits and exit 2 naming every training whose "
        "train.per_gpu_batch does not fit",
    )
    p.add_argument(
        "--throughput",
        metavar="FILE",
        help="GPU suite measurement (benchmarks/gpu_suite.py json) for the GPU-hours; default: "
        "benchmarks/results/gpu_*.json (the newest, or the one --gpu names); `none`: the params' "
        "guess train.clips_per_sec_per_gpu for every experiment",
    )
    p.add_argument(
        "--gpu",
        metavar="NAME",
        help="which measured device when several benchmarks/results/gpu_*.json exist (a part of "
        "the device or file name, e.g. h200; default: the newest measurement)",
    )
    p.add_argument(
        "--measure-memory",
        nargs="?",
        const="stale",
        choices=("stale", "all"),
        help="measure the activation memory of the missing or stale (or all) "
        "experiments at full scale and write params/memory.json",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="leave out the GPU-memory section (which imports torch to measure "
        "where params/memory.json is not current)",
    )
    p.set_defaults(func=_run)
