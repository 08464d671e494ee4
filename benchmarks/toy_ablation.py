"""Does the embedded (toy) dataset answer the paper's question? 2D vs 3D 3x1x1 vs SmallBig.

Trains the embedded default's models (ResNet-23, base width 8, 4 frames, crop 112; the real
`smallbig train` / `smallbig evaluate` entry points on real encoded videos) on a larger sample of
the toy Kinetics-style data than the embedded workflow uses (24 train / 16 val videos per class
by default, same generator), several seeds each, and reports validation top-1 (1 clip x 1 crop
and 10 clips x 3 crops) per run and as mean +- std over seeds.

Run by hand (2-core CPU: about 4-6 min per run with 2 runs in parallel):
    .venv/bin/python benchmarks/toy_ablation.py [--epochs 30] [--seeds 0 1 2] [--jobs 2]
Writes benchmarks/results/toy_ablation.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallbig.config import deep_merge  # noqa: E402

DEFAULT = ["k400-r23-c2d", "k400-r23-i3d311", "k400-r23-sb311", "k400-r23-sb333", "k400-r23-sb-typical"]


def smallbig(*args: str, threads: int | None = None, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "smallbig", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("+", " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        return
    with open(log, "a") as f:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r.returncode}); see {log}")


def run_one(exp: str, seed: int, overlay: dict, work: Path, threads: int) -> dict:
    ov = deep_merge(overlay, {"experiments": {exp: {"train": {"seed": seed}}}})
    p = work / f"overlay-{exp}-{seed}.yaml"
    p.write_text(yaml.safe_dump(ov))
    run = work / f"{exp}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    log = run / "log.txt"
    t0 = time.time()
    smallbig(
        "train",
        exp,
        "--overlay",
        str(p),
        "--out",
        str(run / "train"),
        "--no-mlflow",
        "--no-progress",
        threads=threads,
        log=log,
    )
    t_train = time.time() - t0
    res = {}
    for proto in ("1x1", "10x3"):
        smallbig(
            "evaluate",
            exp,
            "--overlay",
            str(p),
            "--checkpoint",
            str(run / "train" / "checkpoint.pt"),
            "--out",
            str(run / f"eval-{proto}"),
            "--protocol",
            proto,
            "--no-mlflow",
            "--no-progress",
            threads=threads,
            log=log,
        )
        m = json.loads((run / f"eval-{proto}" / "metrics.json").read_text())
        res[proto] = {
            "top1": m["top1"],
            "top5": m["top5"],
            "mean_class_acc": m["mean_class_acc"],
            "per_class_acc": m["per_class_acc"],
        }
    history = json.loads((run / "train" / "history.json").read_text())  # one row per epoch
    last_loss = history[-1]["loss"] if history else None
    row = {
        "experiment": exp,
        "seed": seed,
        "train_s": round(t_train, 1),
        "final_train_loss": last_loss,
        **res,
    }
    print(
        json.dumps(
            {k: row[k] for k in ("experiment", "seed", "train_s")}
            | {p: row[p]["top1"] for p in ("1x1", "10x3")}
        ),
        flush=True,
    )
    return row


def summarise(rows: list[dict], experiments: list[str]) -> list[dict]:
    out = []
    for exp in experiments:
        rs = [r for r in rows if r["experiment"] == exp]
        if not rs:
            continue
        s = {"experiment": exp, "runs": len(rs)}
        for proto in ("1x1", "10x3"):
            v = [r[proto]["top1"] for r in rs]
            s[proto] = {
                "mean": statistics.mean(v),
                "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v),
                "max": max(v),
            }
        out.append(s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiments", nargs="+", default=DEFAULT)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--per-class",
        nargs="+",
        default=["train=24", "val=16"],
        help="toy videos per class (smallbig data toy --per-class)",
    )
    ap.add_argument("--toy-seed", type=int, default=0)
    ap.add_argument(
        "--data",
        default=str(REPO / "data" / "toy-ablation"),
        help="where the toy sample is generated and prepared (reused when present)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with cores/jobs threads)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "toy_ablation"))
    args = ap.parse_args()

    data = Path(args.data)
    overlay = yaml.safe_load((REPO / "params" / "embedded.yaml").read_text())
    extra = {
        "train": {
            "epochs": args.epochs,
            "lr": args.lr,
            "val_every_epochs": args.epochs,
            "checkpoint_every_iters": 1000,
        },
        "data": {"num_frames": args.frames, "limit_val": None},
    }
    overlay["all"] = deep_merge(overlay.get("all") or {}, extra)
    overlay["kinetics400"] = deep_merge(
        overlay.get("kinetics400") or {},
        {
            "data": {
                "root": str(data / "kinetics400"),
                "source": {"base_url": str(data / "source" / "kinetics400")},
            }
        },
    )
    overlay.pop("experiments", None)
    work = Path(tempfile.mkdtemp(prefix="toy-ablation-"))
    ov_path = work / "overlay.yaml"
    ov_path.write_text(yaml.safe_dump(overlay))

    stamp = data / "ablation.json"  # what the sample under `data` was generated with
    want = {"per_class": sorted(args.per_class), "seed": args.toy_seed}
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        smallbig(
            "data",
            "toy",
            "--out",
            str(data / "source"),
            "--datasets",
            "kinetics400",
            "--seed",
            str(args.toy_seed),
            "--per-class",
            *args.per_class,
        )
        shutil.rmtree(data / "kinetics400", ignore_errors=True)
        stamp.write_text(json.dumps(want))
    if not (data / "kinetics400" / "manifest.json").exists():
        smallbig(
            "data", "prepare", "params/experiments/k400-r23-c2d.yaml", "--overlay", str(ov_path), "--quiet"
        )

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.time()
    tasks = [(exp, seed) for seed in args.seeds for exp in args.experiments]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda t: run_one(t[0], t[1], overlay, work, threads), tasks))
    wall = time.time() - t0

    manifest = json.loads((data / "kinetics400" / "manifest.json").read_text())
    summary = summarise(rows, args.experiments)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "epochs": args.epochs,
        "lr": args.lr,
        "frames": args.frames,
        "seeds": args.seeds,
        "per_class": args.per_class,
        "videos": {k: v.get("usable") for k, v in manifest["splits"].items()},
        "overlay": "params/embedded.yaml + the above",
        "wall_s": round(wall),
        "threads_per_run": threads,
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1)
    )
    lines = [
        f"# Toy ablation ({meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        f"{args.epochs} epochs, lr {args.lr}, {args.frames} frames, toy videos per class: "
        f"{' '.join(args.per_class)} (prepared counts: {meta['videos']}); chance = 12.5 %; "
        f"wall {meta['wall_s']} s with {args.jobs} runs in parallel x {threads} thread(s).",
        "",
        "| experiment | runs | top-1 1x1 mean ± std | top-1 10x3 mean ± std | 10x3 min-max |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        a, b = s["1x1"], s["10x3"]
        lines.append(
            f"| {s['experiment']} | {s['runs']} | {a['mean']:.1f} ± {a['std']:.1f} | "
            f"{b['mean']:.1f} ± {b['std']:.1f} | {b['min']:.1f}-{b['max']:.1f} |"
        )
    lines += [
        "",
        "| experiment | seed | top-1 1x1 | top-1 10x3 | top-5 10x3 | final train loss | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = "" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}"
        lines.append(
            f"| {r['experiment']} | {r['seed']} | {r['1x1']['top1']:.1f} | {r['10x3']['top1']:.1f} | "
            f"{r['10x3']['top5']:.1f} | {loss} | {r['train_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
