#!/usr/bin/env python
"""Efficient vs reference formulation, side by side (hand-run; results in benchmarks/results/).

  python benchmarks/formulations.py                       # R23 + R50 full, 2 x 8 x 112^2, 1 thread
  python benchmarks/formulations.py --models k400-r23-sb-full --rounds 5 --profile

Three variants run in ONE process on the SAME weights (copies of one model), as the engine runs
them (``train.channels_last: true``): efficient (frames channels-last), reference (NCTHW) and
reference-cl3d (channels_last_3d); interleaved rounds (efficient, reference, reference-cl3d, ...),
timed with
process CPU time (``time.process_time``: robust to other load on the machine) on 1 thread:
* training step = forward + cross-entropy + backward (train mode, fresh grads each step);
* inference = eval-mode forward under ``torch.no_grad``.
The speed-up is the faster reference layout's median seconds over the efficient one's (> 1:
efficient faster); memory ratios are against the leaner reference layout (< 1: efficient leaner).

Memory, two measures, each formulation in its own subprocess:
* ``saved_mb``: bytes of the distinct tensor storages autograd keeps for backward after one
  training forward (``torch.autograd.graph.saved_tensors_hooks``) — the activation memory;
* ``peak_rss_mb``: the process's peak resident set size during one training step (VmHWM, reset
  just before it through /proc/self/clear_refs) minus its RSS before the step (after a warm-up
  step; includes the backward's transient buffers). glibc
  is told to mmap every block of >= 64 KiB and to trim on free (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``), so the RSS follows the live tensors instead of the heap's history.
``--profile`` adds a per-operator CPU table (torch.profiler, one training step each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["k400-r23-sb-full", "k400-r50-sb-full"]
FORMS = ("efficient", "reference", "reference-cl3d")


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


def variant(model, form: str):
    """The model as the engine runs it (``train.channels_last: true``, params/base.yaml):
    efficient = frames channels-last (``set_channels_last``); reference = NCTHW, and
    reference-cl3d = channels_last_3d weights and inputs (``engine.runtime.apply_channels_last``
    for a non-frame model), so the reference gets its best layout too."""
    import copy

    import torch

    from smallbig.models import set_channels_last, set_formulation

    m = copy.deepcopy(model)
    set_formulation(m, "efficient" if form == "efficient" else "reference")
    set_channels_last(m, form == "efficient")
    if form == "reference-cl3d":
        m = m.to(memory_format=torch.channels_last_3d)
    return m


def variant_input(x, form: str):
    import torch

    return x.contiguous(memory_format=torch.channels_last_3d) if form == "reference-cl3d" else x


def speed(args, exp: str) -> dict:
    base, nc = build(exp)
    x, y = inputs(args, nc)
    models = {f: variant(base, f) for f in FORMS}
    xs = {f: variant_input(x, f) for f in FORMS}
    times: dict[str, dict[str, list[float]]] = {f: {"train": [], "infer": []} for f in FORMS}
    for f in FORMS:  # warm-up (first-call allocations, oneDNN primitive caches)
        train_step(models[f], xs[f], y)
        infer(models[f], xs[f])
    for _ in range(args.rounds):
        for f in FORMS:
            m, xf = models[f], xs[f]
            times[f]["train"].append(timed(lambda m=m, xf=xf: train_step(m, xf, y)))
            times[f]["infer"].append(timed(lambda m=m, xf=xf: infer(m, xf)))
    out: dict = {}
    for f in FORMS:
        for k in ("train", "infer"):
            med = statistics.median(times[f][k])
            out[f"{f}_{k}_s"] = round(med, 4)
            out[f"{f}_{k}_clips_per_s"] = round(args.batch / med, 3)
    for k in ("train", "infer"):  # against the reference's faster layout
        best = min(out[f"reference_{k}_s"], out[f"reference-cl3d_{k}_s"])
        out[f"{k}_speedup"] = round(best / out[f"efficient_{k}_s"], 3)
    return out


def memory_child(args) -> dict:
    import torch

    exp, form = args.memory_child
    base, nc = build(exp)
    model = variant(base, form)
    del base
    x, y = inputs(args, nc)
    x = variant_input(x, form)
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
    _reset_peak_rss()
    train_step(model, x, y)
    return {
        "saved_mb": round(saved / 2**20, 1),
        "peak_rss_mb": round(_peak_rss_mb() - rss0, 1),
        "rss_before_mb": round(rss0, 1),
    }


def _reset_peak_rss() -> None:
    """Linux: reset the high-water mark (VmHWM) to the current RSS (proc(5), clear_refs "5")."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(args, exp: str) -> dict:
    out: dict = {}
    for f in FORMS:
        cmd = [sys.executable, __file__, "--memory-child", exp, f]
        cmd += ["--batch", str(args.batch), "--frames", str(args.frames), "--crop", str(args.crop)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
        # every block >= 64 KiB its own mmap, returned on free: RSS follows the live tensors
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        for k, v in json.loads(line[7:]).items():
            out[f"{f}_{k}"] = v
    for k in ("saved_mb", "peak_rss_mb"):  # against the reference's leaner layout
        best = min(out[f"reference_{k}"], out[f"reference-cl3d_{k}"])
        out[f"{k}_ratio"] = round(out[f"efficient_{k}"] / best, 3)
    return out


def profile_table(args, exp: str) -> dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    base, nc = build(exp)
    x, y = inputs(args, nc)
    tables = {}
    for f in FORMS:
        m, xf = variant(base, f), variant_input(x, f)
        train_step(m, xf, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(m, xf, y)
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
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
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
        "| model | step | efficient | reference | reference cl3d | **speed-up** (vs the faster reference) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for k, name in (("train", "training s/step"), ("infer", "inference s/step")):
            lines.append(
                f"| {r['model']} | {name} | {r[f'efficient_{k}_s']} | {r[f'reference_{k}_s']} | "
                f"{r[f'reference-cl3d_{k}_s']} | **{r[f'{k}_speedup']}×** |"
            )
        for k, name in (("saved_mb", "saved activations MB"), ("peak_rss_mb", "peak training RSS MB")):
            lines.append(
                f"| {r['model']} | {name} | {r[f'efficient_{k}']} | {r[f'reference_{k}']} | "
                f"{r[f'reference-cl3d_{k}']} | **{r[f'{k}_ratio']}×** of the leaner reference |"
            )
    for exp, tabs in profiles.items():
        for f, tab in tabs.items():
            lines += [
                "",
                f"## {exp}, {f}: one training step, top operators by self CPU time",
                "",
                "```",
                tab,
                "```",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
