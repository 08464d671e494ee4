#!/usr/bin/env python
"""Training throughput of the SmallBig models: forward + backward clips/s and peak memory,
efficient vs reference formulation (hand-run; results in benchmarks/results/).

  CPU (default):  python benchmarks/model_throughput.py
  GPU:            python benchmarks/model_throughput.py --device cuda --amp bf16 --channels-last --batch 8

Each (model, formulation) runs in its own subprocess, so that the CPU peak memory is that
configuration's own: CPU peak memory = the process's peak resident set size (``resource``
``ru_maxrss``, which includes the ~0.3-0.5 GB of Python + torch; the RSS before the first
iteration is reported too). CUDA peak memory = ``torch.cuda.max_memory_allocated``.
FLOPs per clip for MFU = 3 × 2 × (counted MACs of one forward) (backward ≈ 2 × forward);
MFU = achieved FLOP/s / (``--peak-tflops`` × 1e12); default 989 = H100 SXM dense bf16.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["k400-r23-sb-full", "k400-r50-sb-full"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="experiment ids")
    p.add_argument("--formulations", nargs="+", default=["efficient", "reference"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=2, help="clips per iteration")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="device peak for MFU (989 = H100 SXM bf16 dense)"
    )
    p.add_argument(
        "--out", default=None, help="output stem (default benchmarks/results/model_throughput_<device>)"
    )
    p.add_argument("--single", nargs=2, metavar=("MODEL", "FORMULATION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_single(args) -> dict:
    import torch

    from smallbig.config import experiment_path, load_params
    from smallbig.models import build_model, set_channels_last
    from smallbig.models.info import build_meta_model, count_macs

    if args.threads:
        torch.set_num_threads(args.threads)
    exp_id, formulation = args.single
    params = load_params(experiment_path(exp_id))
    cfg = dict(params["model"], formulation=formulation, pretrained=None)
    macs = count_macs(build_meta_model(cfg), args.frames, args.crop)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    x = torch.randn(args.batch, 3, args.frames, args.crop, args.crop, device=device)
    y = torch.randint(0, cfg["num_classes"], (args.batch,), device=device)
    if args.channels_last:
        if formulation == "efficient":
            set_channels_last(model)  # frames [N*T, C, H, W] channels-last through the 2-D convs
        else:
            model = model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
    step_model = torch.compile(model) if args.compile else model
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_before = rss_mb()
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    clips_per_s = args.batch * args.iters / elapsed
    flops_per_clip = 3 * 2 * macs
    achieved = clips_per_s * flops_per_clip
    out = {
        "model": exp_id,
        "formulation": formulation,
        "clips_per_s": round(clips_per_s, 3),
        "sec_per_iter": round(elapsed / args.iters, 3),
        "gmacs_fwd_per_clip": round(macs / 1e9, 3),
        "achieved_tflops": round(achieved / 1e12, 4),
    }
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["mem_method"] = "torch.cuda.max_memory_allocated"
        out["mfu"] = round(achieved / (args.peak_tflops * 1e12), 4)
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_mem_mb"] = round(rss_mb(), 1)
        out["rss_before_mb"] = round(rss_before, 1)
        out["mem_method"] = "resource ru_maxrss (process peak RSS)"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.single:
        print("RESULT " + json.dumps(run_single(args)))
        return 0
    import torch
    from tqdm import tqdm

    stem = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"model_throughput_{args.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    passthrough = [
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--frames",
        str(args.frames),
        "--crop",
        str(args.crop),
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--amp",
        args.amp,
        "--peak-tflops",
        str(args.peak_tflops),
    ]
    if args.channels_last:
        passthrough.append("--channels-last")
    if args.compile:
        passthrough.append("--compile")
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    results = []
    configs = [(m, f) for m in args.models for f in args.formulations]
    for model, form in tqdm(configs, desc="model throughput"):
        proc = subprocess.run(
            [sys.executable, __file__, "--single", model, form, *passthrough],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            results.append({"model": model, "formulation": form, "error": proc.stderr.strip()[-2000:]})
            tqdm.write(f"{model} {form}: FAILED\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(line[0][len("RESULT ") :]))
        tqdm.write(json.dumps(results[-1]))
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "batch": args.batch,
        "frames": args.frames,
        "crop": args.crop,
        "warmup": args.warmup,
        "iters": args.iters,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "peak_tflops": args.peak_tflops if args.device == "cuda" else None,
        "step": "forward + cross-entropy + backward (no optimizer step), train mode",
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    Path(f"{stem}.md").write_text(to_markdown(meta, results))
    print(to_markdown(meta, results))
    return 0 if all("error" not in r for r in results) else 1


def to_markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"# Model throughput ({meta['device']}, {meta['date']})",
        "",
        f"Batch {meta['batch']} × {meta['frames']}×{meta['crop']}², {meta['step']}; "
        f"amp {meta['amp']}, channels-last {meta['channels_last']}, compile {meta['compile']}; "
        f"torch {meta['torch']}, {meta['threads']} threads on {meta['cpu_count']} CPUs "
        f"({meta['cpu']}); {meta['warmup']} warm-up + {meta['iters']} timed iterations; "
        f"load average at the end {meta['load_average_1_5_15']}.",
        "",
    ]
    cuda = meta["device"] == "cuda"
    head = "| model | formulation | clips/s | s/iter | peak memory MB | GMACs/clip (fwd) | TFLOP/s |"
    head += " MFU |" if cuda else " RSS before MB |"
    lines += [head, "|" + "---|" * (8)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['formulation']} | failed | | | | | |")
            continue
        last = f"{100 * r['mfu']:.1f}%" if cuda else f"{r['rss_before_mb']:.0f}"
        lines.append(
            f"| {r['model']} | {r['formulation']} | {r['clips_per_s']:.3f} | {r['sec_per_iter']:.2f} "
            f"| {r['peak_mem_mb']:.0f} | {r['gmacs_fwd_per_clip']:.2f} | {r['achieved_tflops']:.3f} | {last} |"
        )
    lines += [
        "",
        f"Memory: {results[0].get('mem_method', '')}." if results else "",
        "FLOPs per clip = 3 × 2 × forward MACs (model_info's counting).",
    ]
    if cuda:
        lines.append(f"MFU = achieved FLOP/s / {meta['peak_tflops']} TFLOP/s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
