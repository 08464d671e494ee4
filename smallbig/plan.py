"""`smallbig plan`: jobs and GPU-hours of the workflow, per table and in total, before anything is
submitted.

GPU-hours are an estimate from params only:
  training   = train.epochs x train clips / train.clips_per_sec_per_gpu
  evaluation = val videos x views / (EVAL_SPEEDUP x train.clips_per_sec_per_gpu)
(a forward pass without backward is about EVAL_SPEEDUP = 3 times faster than a training step).
Train clips / val videos are the line counts of the prepared `train.txt` / `val.txt` under
`data.root` when they exist, else the datasets' nominal sizes below (capped by
`data.limit_train` / `data.limit_val`). Measure `clips_per_sec_per_gpu` on your GPUs with
`benchmarks/train_throughput.py` and put it in params for a better estimate.

The workflow (Snakefile) uses `evaluations()` and `datasets()` from here, so the plan and the
DAG always agree on which jobs exist.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from smallbig import config

EVAL_SPEEDUP = 3.0
# Nominal sizes (videos) of the full datasets, used until the prepared lists exist.
NOMINAL = {
    "kinetics400": {"train": 240436, "val": 19796},
    "sthv1": {"train": 86017, "val": 11522},
    "sthv2": {"train": 168913, "val": 24777},
}


def evaluations(params: dict[str, dict], tables: list[dict] | None) -> list[tuple[str, str]]:
    """(experiment, protocol) pairs to evaluate: every protocol of each experiment's
    `test.protocols`, plus whatever the tables need (in that order, no duplicates)."""
    pairs: list[tuple[str, str]] = []
    for exp in sorted(params):
        for proto in params[exp]["test"]["protocols"]:
            if (exp, proto) not in pairs:
                pairs.append((exp, proto))
    if tables:
        from smallbig.analysis.tables import required_evaluations

        for exp, proto in required_evaluations(tables):
            if exp not in params:
                raise config.ParamsError(
                    f"tables: a row needs experiment {exp!r}, which is not configured")
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
            out[ds] = {"rep": exp, "root": d["root"], "format": d.get("format", "video"),
                       "data": {k: d.get(k) for k in DATA_KEYS}}
            continue
        for k in DATA_KEYS:
            if d.get(k) != out[ds]["data"][k]:
                raise config.ParamsError(
                    f"{config.experiment_path(exp)}: data.{k}: {d.get(k)!r} differs from "
                    f"{out[ds]['rep']}'s {out[ds]['data'][k]!r}; experiments of dataset {ds} "
                    f"share one prepared dataset")
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
    clips, crops = protocol.split("x")
    return int(clips) * int(crops)


def train_gpu_hours(p: dict) -> float:
    clips, _ = split_size(p, "train")
    return p["train"]["epochs"] * clips / p["train"]["clips_per_sec_per_gpu"] / 3600.0


def eval_gpu_hours(p: dict, protocol: str) -> float:
    videos, _ = split_size(p, "val")
    rate = EVAL_SPEEDUP * p["train"]["clips_per_sec_per_gpu"]
    return videos * views(protocol) / rate / 3600.0


def make_plan(overlay: str | None = None, tables_path: str | None = None) -> dict:
    from smallbig.analysis.tables import load_tables, required_ensembles

    params = {e: config.load_params(config.experiment_path(e), overlay=overlay)
              for e in config.experiment_ids()}
    tables = load_tables(tables_path)
    evals = evaluations(params, tables)
    ensembles = required_ensembles(tables)
    dsets = datasets(params)

    def summarise(exps: set[str], ev: set[tuple[str, str]], ens: set[str], n_tables: int) -> dict:
        gh_train = sum(train_gpu_hours(params[e]) for e in exps)
        gh_eval = sum(eval_gpu_hours(params[e], pr) for e, pr in ev)
        used = {params[e]["data"]["dataset"] for e in exps}
        data_jobs = len(used)  # one `data prepare` per dataset
        # its params come from the dataset's first experiment, resolved even if not in `exps`
        data_jobs += sum(1 for ds in used if dsets[ds]["rep"] not in exps)
        return {
            "experiments": len(exps), "train_jobs": len(exps), "eval_jobs": len(ev),
            "ensemble_jobs": len(ens), "data_jobs": data_jobs, "table_jobs": n_tables,
            # + one local `params resolve` job per experiment
            "jobs": 2 * len(exps) + len(ev) + len(ens) + data_jobs + n_tables,
            "gpu_hours_train": gh_train, "gpu_hours_eval": gh_eval,
            "gpu_hours": gh_train + gh_eval,
        }

    per_table = {}
    for t in tables:
        exps, ev, ens = set(), set(), set()
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
    sizes = {ds: {s: split_size(params[info["rep"]], s) for s in ("train", "val")}
             for ds, info in dsets.items()}
    return {"overlay": overlay, "tables": per_table, "total": total,
            "datasets": {ds: {s: {"videos": n, "from": src} for s, (n, src) in v.items()}
                         for ds, v in sizes.items()},
            "eval_speedup": EVAL_SPEEDUP}


def format_plan(plan: dict) -> str:
    head = (f"{'':8}{'exps':>5}{'train':>7}{'eval':>6}{'ens':>5}{'jobs':>6}"
            f"{'GPU-h train':>13}{'GPU-h eval':>12}{'GPU-h':>10}")
    lines = [f"smallbig plan (overlay: {plan['overlay'] or 'none, full scale'})", head]

    def row(name, s):
        return (f"{name:8}{s['experiments']:>5}{s['train_jobs']:>7}{s['eval_jobs']:>6}"
                f"{s['ensemble_jobs']:>5}{s['jobs']:>6}{s['gpu_hours_train']:>13.1f}"
                f"{s['gpu_hours_eval']:>12.1f}{s['gpu_hours']:>10.1f}")

    for n, s in plan["tables"].items():
        lines.append(row(f"table{n}", s))
    lines.append(row("total", plan["total"]))
    lines.append("(tables share experiments, so the table rows do not add up to the total; "
                 "jobs include params resolution, data preparation, tables, figures "
                 "and the report)")
    for ds, v in plan["datasets"].items():
        lines.append(f"{ds}: train {v['train']['videos']} videos ({v['train']['from']}), "
                     f"val {v['val']['videos']} ({v['val']['from']})")
    lines.append("GPU-h = epochs x train clips / train.clips_per_sec_per_gpu; evaluation at "
                 f"{plan['eval_speedup']:g}x that rate per view")
    return "\n".join(lines)


def _run(args) -> int:
    plan = make_plan(args.overlay, args.tables)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="jobs and GPU-hour estimate per table and in total")
    p.add_argument("--overlay", help="params overlay (e.g. params/embedded.yaml)")
    p.add_argument("--tables", help="tables file (default params/tables.yaml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
