#!/usr/bin/env python
"""Efficient vs reference formulation, side by side (hand-run; results in benchmarks/results/).

  python benchmarks/formulations.py                       # R23 + R50 full, 2 x 8 x 112^2, 1 thread
  python benchmarks/formulations.py --models k400-r23-sb-full --rounds 5 --profile

Both formulations run in ONE process on the SAME weights (one model, switched with
``set_formulation``), in interleaved rounds (efficient, reference, efficient, ...), timed with
process CPU time (``time.process_time``: robust to other load on the machine) on 1 thread:
* training step = forward + cross-entropy + backward (train mode, fresh grads each step);
* inference = eval-mode forward under ``torch.no_grad``.
The ratio is the reference's median seconds over the efficient one's (> 1: efficient faster).

Memory, two measures, each formulation in its own subprocess:
* ``saved_mb``: bytes of the distinct tensor storages autograd keeps for backward after one
  training forward (``torch.autograd.graph.saved_tensors_hooks``) — the activation memory;
* ``peak_rss_mb``: the process's peak resident set size over one training step, minus its RSS
  just before the step (after a warm-up step; includes the backward's transient buffers).
``--profile`` adds a per-operator CPU table (torch.profiler, one training step each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["k400-r23-sb-full", "k400-r50-sb-full"]
FORMS = ("efficient", "reference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="experiment ids")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="per-operator tables (torch.profiler)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "formulations_cpu"))
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "FORM"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(exp: str):
    import torch

    from smallbig.config import experiment_path, load_params
    from smallbig.models import build_model

    params = load_params(experiment_path(exp))
    torch.manual_seed(0)
    model = build_model(dict(params["model"], pretrained="none"))
    # non-trivial BN statistics and big-view BNs (zero at initialisation) so that every path counts
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                assert m.running_mean is not None and m.running_var is not None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model, params["model"]["num_classes"]


def inputs(args, num_classes: int):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.frames, args.crop, args.crop, generator=g)
    y = torch.randint(0, num_classes, (args.batch,), generator=g)
    return x, y


def train_step(model, x, y) -> None:
    import torch.nn.functional as F

    model.train()
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def infer(model, x) -> None:
    import torch

    model.eval()
    with torch.no_grad():
        model(x)


def timed(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def speed(args, exp: str) -> dict:
    from smallbig.models import set_formulation

    model, nc = build(exp)
    x, y = inputs(args, nc)
    times: dict[str, dict[str, list[float]]] = {f: {"train": [], "infer": []} for f in FORMS}
    for f in FORMS:  # warm-up (first-call allocations, oneDNN primitive caches)
        set_formulation(model, f)
        train_step(model, x, y)
        infer(model, x)
    for _ in range(args.rounds):
        for f in FORMS:
            set_formulation(model, f)
            times[f]["train"].append(timed(lambda: train_step(model, x, y)))
            times[f]["infer"].append(timed(lambda: infer(model, x)))
    out: dict = {}
    for f in FORMS:
        for k in ("train", "infer"):
            med = statistics.median(times[f][k])
            out[f"{f}_{k}_s"] = round(med, 4)
            out[f"{f}_{k}_clips_per_s"] = round(args.batch / med, 3)
    for k in ("train", "infer"):
        out[f"{k}_speedup"] = round(out[f"reference_{k}_s"] / out[f"efficient_{k}_s"], 3)
    return out


def memory_child(args) -> dict:
    import torch

    from smallbig.models import set_formulation

    exp, form = args.memory_child
    model, nc = build(exp)
    set_formulation(model, form)
    x, y = inputs(args, nc)
    train_step(model, x, y)  # warm-up
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    saved = sum(storages.values()) - sum(p.numel() * p.element_size() for p in model.parameters())
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
    rss0 = _rss_now_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_step(model, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "saved_mb": round(saved / 2**20, 1),
        "peak_rss_mb": round(max(peak, peak0) - rss0, 1),
        "rss_before_mb": round(rss0, 1),
    }


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(args, exp: str) -> dict:
    out: dict = {}
    for f in FORMS:
        cmd = [sys.executable, __file__, "--memory-child", exp, f]
        cmd += ["--batch", str(args.batch), "--frames", str(args.frames), "--crop", str(args.crop)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        for k, v in json.loads(line[7:]).items():
            out[f"{f}_{k}"] = v
    for k in ("saved_mb", "peak_rss_mb"):
        out[f"{k}_ratio"] = round(out[f"efficient_{k}"] / out[f"reference_{k}"], 3)
    return out


def profile_table(args, exp: str) -> dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    from smallbig.models import set_formulation

    model, nc = build(exp)
    x, y = inputs(args, nc)
    tables = {}
    for f in FORMS:
        set_formulation(model, f)
        train_step(model, x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, x, y)
        tables[f] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return tables


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        print("RESULT " + json.dumps(memory_child(args)))
        return 0
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "shape": f"{args.batch} x {args.frames} x {args.crop}^2",
        "rounds": args.rounds,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "command": " ".join(["python", "benchmarks/formulations.py", *(argv or sys.argv[1:])]),
    }
    rows, profiles = [], {}
    for exp in args.models:
        row = {"model": exp, **speed(args, exp), **memory(args, exp)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.profile:
            profiles[exp] = profile_table(args, exp)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    Path(args.out + ".md").write_text(to_markdown(meta, rows, profiles))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def to_markdown(meta: dict, rows: list[dict], profiles: dict) -> str:
    lines = [
        "# Efficient vs reference formulation (CPU, side by side)",
        "",
        f"`{meta['command']}` — {meta['date']}; torch {meta['torch']}, {meta['threads']} thread(s), "
        f"batch {meta['shape']}, median of {meta['rounds']} interleaved rounds of process CPU time; "
        f"load average at start {meta['load_average_at_start']}.",
        "",
        "| model | train s/step eff / ref | **train speed-up** | infer s eff / ref | **infer speed-up** "
        "| saved activations MB eff / ref | peak RSS MB eff / ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['efficient_train_s']} / {r['reference_train_s']} | "
            f"**{r['train_speedup']}×** | {r['efficient_infer_s']} / {r['reference_infer_s']} | "
            f"**{r['infer_speedup']}×** | {r['efficient_saved_mb']} / {r['reference_saved_mb']} "
            f"({r['saved_mb_ratio']}×) | {r['efficient_peak_rss_mb']} / {r['reference_peak_rss_mb']} "
            f"({r['peak_rss_mb_ratio']}×) |"
        )
    for exp, tabs in profiles.items():
        for f, tab in tabs.items():
            lines += ["", f"## {exp}, {f}: one training step, top operators by self CPU time", "", "```", tab, "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
