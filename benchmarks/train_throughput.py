"""Training-step throughput (clips/s) of the engine's step: forward, cross-entropy, backward,
SGD step — the same calls as smallbig.engine.train (autocast, channels-last, torch.compile).

  CPU (default): the embedded-default models (params/embedded.yaml overlay), per_gpu_batch clips
                 of T x crop^2, synthetic uint8 input normalised as the loader would.
  --device cuda: SmallBig-R50 8x224^2 (k400-r50-sb-full, the paper's size), per-GPU clips/s and
                 MFU for fp32, bf16, bf16 + channels-last, bf16 + channels-last + torch.compile.

MFU = clips/s x 3 x 2 x forward GMACs(T x 224^2, smallbig.models.model_info) x 1e9 / peak FLOP/s,
with training = 3 x forward and 1 MAC = 2 FLOPs; the peak is the GPU's dense bf16 tensor-core
peak (H100/H200 SXM: 989 TFLOP/s) for every mode (fp32 uses TF32 tensor cores), or --peak-tflops.

  python benchmarks/train_throughput.py                       # CPU, writes results/train_throughput_cpu.*
  python benchmarks/train_throughput.py --device cuda         # GPU, writes results/train_throughput_cuda.*
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallbig import config  # noqa: E402
from smallbig.data import normalize  # noqa: E402
from smallbig.engine.optim import build_optimizer  # noqa: E402
from smallbig.engine.train import amp_settings, apply_channels_last  # noqa: E402
from smallbig.models import build_model, model_info  # noqa: E402

CPU_EXPERIMENTS = ["k400-r23-c2d", "k400-r23-sb-full", "k400-r50-sb-full", "sthv2-r50-sb-8f"]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def measure(
    params: dict,
    device: torch.device,
    batch: int,
    amp: str,
    channels_last: bool,
    compile_: bool,
    warmup: int,
    iters: int,
) -> dict:
    torch.manual_seed(0)
    model = build_model(params["model"])
    cl_input = apply_channels_last(model) if channels_last else False
    model = model.to(device).train()
    step_model = torch.compile(model) if compile_ else model
    opt = build_optimizer(model, params["train"], 0.01)
    dtype, use_scaler, amp_eff = amp_settings(amp, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    d = params["data"]
    T, crop, K = d["num_frames"], d.get("crop_size", 224), params["model"]["num_classes"]
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (batch, 3, T, crop, crop), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, K, (batch,), generator=g)

    def step():
        x = normalize(video.to(device, non_blocking=True), d["mean"], d["std"])
        if cl_input:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = labels.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = step_model(x)
        loss = F.cross_entropy(out.float(), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss in the benchmark")
    out = {
        "clips_per_s": batch * iters / dt,
        "step_ms": 1000 * dt / iters,
        "batch": batch,
        "amp": amp_eff,
        "channels_last": channels_last,
        "compile": compile_,
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def write(results: dict, stem: str) -> None:
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# {stem}",
        "",
        f"device: {results['device']}; torch {results['torch']}; "
        f"{results['date']}; load average at start {results.get('load_average_at_start')}",
        "",
    ]
    rows = results["rows"]
    cols = [
        c
        for c in (
            "experiment",
            "mode",
            "batch",
            "T",
            "crop",
            "gmacs_224",
            "clips_per_s",
            "step_ms",
            "mfu_pct",
            "peak_mem_gb",
        )
        if any(c in r for r in rows)
    ]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
            + " |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experiments", nargs="*", help="CPU: experiment ids (default: a representative set)")
    ap.add_argument("--batch", type=int, help="clips per step (default: per_gpu_batch of the params)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, help="GPU peak for MFU (default: by GPU name)")
    ap.add_argument("--modes", default="fp32,bf16,bf16+cl,bf16+cl+compile")
    ap.add_argument("--out", help="results file stem (default: train_throughput_<device type>)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": [round(x, 2) for x in __import__("os").getloadavg()],
        "rows": [],
    }
    if device.type == "cpu":
        overlay = config.REPO_ROOT / "params" / "embedded.yaml"
        for exp in args.experiments or CPU_EXPERIMENTS:
            p = config.load_params(config.experiment_path(exp), overlay)
            batch = args.batch or p["train"]["per_gpu_batch"]
            r = measure(p, device, batch, "none", False, False, args.warmup or 1, args.iters or 3)
            info = model_info(p)
            r.update(
                experiment=exp,
                mode="fp32",
                T=p["data"]["num_frames"],
                crop=p["data"]["crop_size"],
                gmacs_224=info["gmacs_224"],
            )
            print(json.dumps(r), flush=True)
            results["rows"].append(r)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        p = config.load_params(config.experiment_path("k400-r50-sb-full"))
        p["data"]["num_frames"], p["data"]["crop_size"] = 8, 224
        info = model_info(p)
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        results["peak_tflops"] = peak
        batch = args.batch or p["train"]["per_gpu_batch"]
        for mode in args.modes.split(","):
            amp = "bf16" if "bf16" in mode else "none"
            try:
                r = measure(
                    p,
                    device,
                    batch,
                    amp,
                    "+cl" in mode,
                    "compile" in mode,
                    args.warmup or (15 if "compile" in mode else 5),
                    args.iters or 20,
                )
            except Exception as e:  # report, keep the other modes
                r = {"error": f"{type(e).__name__}: {e}"[:500]}
            r.update(experiment="k400-r50-sb-full", mode=mode, T=8, crop=224, gmacs_224=info["gmacs_224"])
            if "clips_per_s" in r and peak:
                r["mfu_pct"] = 100 * r["clips_per_s"] * 3 * 2 * info["gmacs_224"] * 1e9 / (peak * 1e12)
            print(json.dumps(r), flush=True)
            results["rows"].append(r)
    write(results, args.out or f"train_throughput_{device.type}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
