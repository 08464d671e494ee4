"""Does the embedded (toy) dataset answer the paper's question? Train 2D, 3D 3x1x1 and SmallBig
models of the embedded default on the toy Kinetics-style data with a longer schedule than the
embedded workflow, and report validation accuracy (1 clip x 1 crop and the 10x3 protocol).

Run by hand (CPU, ~minutes per model):
    .venv/bin/python benchmarks/toy_ablation.py [--epochs 12] [--experiments a b ...]
Writes benchmarks/results/toy_ablation.json and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallbig.config import deep_merge  # noqa: E402

DEFAULT = ["k400-r23-c2d", "k400-r23-i3d311", "k400-r23-sb311", "k400-r23-sb333", "k400-r23-sb-full"]


def smallbig(*args: str) -> None:
    cmd = [sys.executable, "-m", "smallbig", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiments", nargs="+", default=DEFAULT)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "toy_ablation"))
    args = ap.parse_args()

    overlay = yaml.safe_load((REPO / "params" / "embedded.yaml").read_text())
    extra = {"train": {"epochs": args.epochs, "lr": args.lr, "val_every_epochs": args.epochs},
             "data": {"num_frames": args.frames}}
    overlay["all"] = deep_merge(overlay.get("all") or {}, extra)
    overlay.pop("experiments", None)
    work = Path(tempfile.mkdtemp(prefix="toy-ablation-"))
    ov_path = work / "overlay.yaml"
    ov_path.write_text(yaml.safe_dump(overlay))

    root = REPO / overlay["kinetics400"]["data"]["root"]
    if not (root / "manifest.json").exists():
        src = REPO / "data" / "embedded" / "source"
        if not (src / "toy.json").exists():
            smallbig("data", "toy", "--out", str(src))
        smallbig("data", "prepare", "params/experiments/k400-r23-c2d.yaml", "--overlay", str(ov_path))

    rows = []
    for exp in args.experiments:
        for seed in args.seeds:
            ov = deep_merge(overlay, {"experiments": {exp: {"train": {"seed": seed}}}})
            p = work / f"overlay-{exp}-{seed}.yaml"
            p.write_text(yaml.safe_dump(ov))
            run = work / f"{exp}-s{seed}"
            t0 = time.time()
            smallbig("train", exp, "--overlay", str(p), "--out", str(run / "train"), "--no-mlflow", "--no-progress")
            t_train = time.time() - t0
            res = {}
            for proto in ("1x1", "10x3"):
                smallbig("evaluate", exp, "--overlay", str(p), "--checkpoint", str(run / "train" / "checkpoint.pt"),
                         "--out", str(run / f"eval-{proto}"), "--protocol", proto, "--no-mlflow", "--no-progress")
                m = json.loads((run / f"eval-{proto}" / "metrics.json").read_text())
                res[proto] = {"top1": m["top1"], "top5": m["top5"], "mean_class_acc": m["mean_class_acc"],
                              "per_class_acc": m["per_class_acc"]}
            rows.append({"experiment": exp, "seed": seed, "train_s": round(t_train, 1), **res})
            print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "epochs": args.epochs, "lr": args.lr, "frames": args.frames,
            "overlay": "params/embedded.yaml + the above", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Toy ablation ({meta['date']})", "", f"`{meta['command']}`", "",
             "| experiment | seed | top-1 1x1 | top-1 10x3 | top-5 10x3 | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['seed']} | {r['1x1']['top1']:.1f} | {r['10x3']['top1']:.1f} | "
                     f"{r['10x3']['top5']:.1f} | {r['train_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
