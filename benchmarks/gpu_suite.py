#!/usr/bin/env python
"""GPU suite: training and inference clips/s, peak memory and MFU of the paper's three headline
models, efficient vs reference formulation x fp32 / bf16 autocast x channels-last x
torch.compile, plus the training data loader's clips/s; one run, time-budgeted (<= 8 minutes).

  bash benchmarks/gpu_suite.sh                    # on a GPU machine, from the repository root
  python benchmarks/gpu_suite.py --device cpu --smoke --out /tmp/x/gpu_cpu   # the same code, tiny

Models (at their own frames, 224^2): k400-r23-sb-full (8 f), k400-r50-sb-full (8 f),
k400-r101-sb-typical-32f (32 f); per-GPU batch = the params' train.per_gpu_batch (16 / 16 / 4:
what the engine trains with; `--batch MODEL=N` overrides). Synthetic uint8 clips, fed exactly as
the engine's training step does (smallbig.engine.runtime.to_input, autocast, cross-entropy on
fp32 logits, backward, the engine's SGD, zero_grad(set_to_none=True)); inference: eval mode,
torch.no_grad(), autocast, as smallbig.engine.evaluate. Weights are the same in every
configuration (reloaded from one initial state); cudnn.benchmark is on, as in the engine.

Plan (time budget `--budget-s`, default 450 s, checked before every configuration):
  1. eager grid, every model: formulation x precision x channels-last (8 configurations each);
  2. the data loader (real encoded videos generated on the spot, see `loader_sources`);
  3. torch.compile (inductor) for each model at the precision / channels-last of its fastest
     eager training, efficient formulation for every model first, then reference;
each configuration: `--warmup` steps, then `--iters` timed steps between cuda synchronizes.
A configuration that runs out of memory or fails to compile is recorded as such and the suite
goes on; one that would not finish before the deadline is recorded as skipped. Results are
written after every configuration (a run killed by the wrapper's hard timeout leaves what it had).

MFU = achieved FLOP/s / the device's dense peak (PEAKS below): FLOPs per clip = 2 x the counted
MACs of one forward (smallbig.models.info.count_macs, the same for both formulations), training
= 3 x forward; fp32 uses the TF32 peak when cuDNN may use TF32 (torch's default, which the
engine keeps), bf16 the bf16 tensor-core peak. Unknown device (or no peak for that precision):
MFU left blank, and the report says so; `--peak-tflops` overrides.

Writes benchmarks/results/gpu_<device-slug>.json and .md (`--out STEM` elsewhere).
`smallbig plan` reads the json (smallbig/spec/plan.py, "GPU rates").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallbig import config  # noqa: E402
from smallbig.data.dataset import collate, normalize  # noqa: E402
from smallbig.engine.optim import build_optimizer  # noqa: E402
from smallbig.engine.runtime import to_input  # noqa: E402
from smallbig.models import build_model, set_channels_last, set_formulation  # noqa: E402
from smallbig.models.info import build_meta_model, count_macs  # noqa: E402
from smallbig.spec.plan import engine_settings, throughput_shape  # noqa: E402

MODELS = ("k400-r23-sb-full", "k400-r50-sb-full", "k400-r101-sb-typical-32f")
FORMULATIONS = ("efficient", "reference")
PRECISIONS = ("bf16", "fp32")
SCHEMA_VERSION = 1

# Dense peak TFLOP/s (no 2:4 sparsity: the datasheets' "*" figures halved), from NVIDIA's
# datasheets / architecture whitepapers: (pattern on torch.cuda.get_device_name(), label,
# fp32 on CUDA cores, TF32 tensor cores, bf16 tensor cores with fp32 accumulation).
# First match wins: more specific names first.
PEAKS: list[tuple[str, str, float, float | None, float | None]] = [
    (r"H200 NVL", "H200 NVL", 60.0, 417.5, 835.5),
    (r"H200", "H200 SXM", 67.0, 494.7, 989.4),
    (r"H100 NVL", "H100 NVL", 60.0, 417.5, 835.5),
    (r"H100 PCIe", "H100 PCIe", 51.0, 378.0, 756.0),
    (r"H100", "H100 SXM", 67.0, 494.7, 989.4),
    (r"A100", "A100 (SXM / PCIe)", 19.5, 156.0, 312.0),
    (r"L40S", "L40S", 91.6, 183.0, 362.0),
    (r"\bL4\b", "L4", 30.3, 60.0, 121.0),
    (r"\bA10\b", "A10", 31.2, 62.5, 125.0),
    (r"V100-SXM", "V100 SXM2", 15.7, None, None),
    (r"V100", "V100 PCIe", 14.0, None, None),
    (r"RTX 4090", "GeForce RTX 4090", 82.6, 82.6, 165.2),
    (r"RTX 3090", "GeForce RTX 3090", 35.6, 35.6, 71.0),
]
GIB = 2**30
SMOKE_BATCH = 2


class Deadline:
    """The global time budget: `fits(seconds)` is False when a step of that length would end
    after the deadline."""

    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()


# ------------------------------------------------------------------------------ device
def device_slug(name: str) -> str:
    s = re.sub(r"^(nvidia|tesla)\s+", "", name.strip(), flags=re.I)
    s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
    return s or "unknown"


def peak_table(name: str) -> dict | None:
    for pattern, label, fp32, tf32, bf16 in PEAKS:
        if re.search(pattern, name):
            return {"label": label, "fp32": fp32, "tf32": tf32, "bf16": bf16}
    return None


def peaks_for(device: torch.device, name: str, override: float | None) -> dict:
    """{"fp32": TFLOP/s or None, "bf16": ..., "note": where they come from}."""
    if override:
        return {"fp32": override, "bf16": override, "note": f"--peak-tflops {override:g} (given)"}
    table = peak_table(name) if device.type == "cuda" else None
    if table is None:
        return {"fp32": None, "bf16": None, "note": f"no peak known for {name!r}: MFU left blank"}
    tf32 = torch.backends.cudnn.allow_tf32 and table["tf32"] is not None
    return {
        "fp32": table["tf32"] if tf32 else table["fp32"],
        "bf16": table["bf16"],
        "note": f"{table['label']} dense peaks (NVIDIA datasheet): fp32 runs "
        + (
            f"{table['tf32']:g} (TF32 tensor cores: cudnn.allow_tf32 is on, torch's default)"
            if tf32
            else f"{table['fp32']:g} (CUDA cores)"
        )
        + ", bf16 "
        + (f"{table['bf16']:g}" if table["bf16"] else "none (no bf16 tensor cores: MFU blank)"),
    }


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "memory_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32": {
                "cudnn": torch.backends.cudnn.allow_tf32,
                "matmul": torch.backends.cuda.matmul.allow_tf32,
            },
            "cpu_count": os.cpu_count(),
        }
    return {
        "type": device.type,
        "name": f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)",
        "cpu_count": os.cpu_count(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ models
class ModelCtx:
    """One model: params (full scale, or the embedded overlay's tiny widths with --smoke), the
    network on the device, its initial weights (CPU copy) and the synthetic batch."""

    def __init__(self, exp: str, overlay: Path | None, device: torch.device, batch: int | None):
        self.exp = exp
        self.params = config.load_params(config.experiment_path(exp), overlay)
        d = self.params["data"]
        self.frames, self.crop = d["num_frames"], d["crop_size"]
        self.batch = batch or self.params["train"]["per_gpu_batch"]
        self.model_cfg = dict(self.params["model"], pretrained="none")
        self.macs = count_macs(build_meta_model(self.model_cfg), self.frames, self.crop)
        self.device = device
        self.cl3d = False  # set per configuration by measure(): reference + channels-last
        self.model: torch.nn.Module | None = None
        self.init_state: dict | None = None

    def describe(self) -> dict:
        m = self.model_cfg
        return {
            "frames": self.frames,
            "crop": self.crop,
            "batch": self.batch,
            "depth": m["depth"],
            "base_width": m["base_width"],
            "gmacs_per_clip": round(self.macs / 1e9, 4),
            "shape": throughput_shape(self.params),
            "engine_settings": engine_settings(self.params, self.device.type),
        }

    def build(self) -> torch.nn.Module:
        if self.model is None:
            torch.manual_seed(0)
            model = build_model(self.model_cfg)
            self.init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.model = model.to(self.device)
        return self.model

    def reset(self) -> torch.nn.Module:
        """Same weights and BN statistics for every configuration."""
        model = self.build()
        assert self.init_state is not None
        model.load_state_dict(self.init_state)
        model.zero_grad(set_to_none=True)
        return model.train()

    def batch_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        shape = (self.batch, 3, self.frames, self.crop, self.crop)
        video = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        labels = torch.randint(0, self.params["model"]["num_classes"], (self.batch,), generator=g)
        if self.device.type == "cuda":  # the engine's DataLoader pins memory on CUDA
            video, labels = video.pin_memory(), labels.pin_memory()
        return video, labels

    def release(self) -> None:
        self.model = self.init_state = None
        cleanup(self.device)


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def classify(err: BaseException, compiled: bool) -> str:
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, torch.cuda.OutOfMemoryError) or re.search(
        r"out of memory|can't allocate memory|not enough memory", text, re.I
    ):
        return "oom"
    if compiled and (
        "torch._dynamo" in type(err).__module__
        or "torch._inductor" in type(err).__module__
        or re.search(r"BackendCompilerFailed|InductorError|dynamo|inductor|triton", text)
    ):
        return "compile_failed"
    return "failed"


# ------------------------------------------------------------------------------ one configuration
def timed(device: torch.device, fn, warmup: int, iters: int) -> tuple[float, float, object]:
    """-> (seconds of the timed iterations, seconds of the first warm-up call, last result)."""
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        out = fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync(device)
    return time.perf_counter() - t0, first, out


def measure(ctx: ModelCtx, cfg: dict, args) -> dict:
    """Training then inference of one configuration; raises on OOM / compile failure."""
    model = ctx.reset()
    set_formulation(model, cfg["formulation"])
    # channels-last: the efficient formulation runs its frames channels-last (set_channels_last);
    # the reference's convs are 3-D, so it gets channels_last_3d weights and inputs
    cl3d = bool(cfg["channels_last"]) and cfg["formulation"] == "reference"
    set_channels_last(model, bool(cfg["channels_last"]) and not cl3d)
    if cl3d:
        model = model.to(memory_format=torch.channels_last_3d)
    ctx.cl3d = cl3d
    if cfg["compile"]:
        torch._dynamo.reset()
        fwd = torch.compile(model, backend=args.compile_backend)
    else:
        fwd = model
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else None
    video, labels = ctx.batch_tensors()
    warmup = args.warmup + (1 if cfg["compile"] else 0)
    out = measure_train(ctx, model, fwd, dtype, video, labels, warmup, args.iters)
    model.zero_grad(set_to_none=True)
    cleanup(ctx.device)
    try:
        out.update(measure_infer(ctx, model, fwd, dtype, video, warmup, args.iters))
    finally:
        model.train()
    return out


def measure_train(ctx: ModelCtx, model, fwd, dtype, video, labels, warmup: int, iters: int) -> dict:
    """The engine's training step (smallbig.engine.train._optimizer_step, one micro-batch)."""
    dev, d = ctx.device, ctx.params["data"]
    opt = build_optimizer(model, ctx.params["train"], ctx.params["train"]["lr"])

    def train_step():
        x = to_input(video, dev, d["mean"], d["std"], normalize, ctx.cl3d)
        y = labels.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dt, first, loss = timed(dev, train_step, warmup, iters)
    out = {
        "train_clips_s": ctx.batch * iters / dt,
        "train_step_ms": 1000 * dt / iters,
        "first_train_step_s": first,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    return out


def measure_infer(ctx: ModelCtx, model, fwd, dtype, video, warmup: int, iters: int) -> dict:
    """Evaluation as smallbig.engine.evaluate: eval mode, no grad, autocast, no compile there
    (a compiled configuration measures the compiled model in eval mode all the same)."""
    dev, d = ctx.device, ctx.params["data"]
    model.eval()

    def infer_step():
        x = to_input(video, dev, d["mean"], d["std"], normalize, ctx.cl3d)
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return fwd(x)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dt, first, _ = timed(dev, infer_step, warmup, iters)
    out = {
        "infer_clips_s": ctx.batch * iters / dt,
        "infer_step_ms": 1000 * dt / iters,
        "first_infer_step_s": first,
    }
    if dev.type == "cuda":
        out["infer_peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    return out


def run_config(ctx: ModelCtx, cfg: dict, args, peaks: dict) -> dict:
    row = dict(cfg, model=ctx.exp, batch=ctx.batch, frames=ctx.frames, crop=ctx.crop)
    row["engine"] = all(cfg[k] == v for k, v in engine_settings(ctx.params, ctx.device.type).items())
    t0 = time.monotonic()
    try:
        row.update(measure(ctx, cfg, args))
        row["status"] = "ok"
    except Exception as err:  # recorded, the suite goes on
        row["status"] = classify(err, cfg["compile"])
        row["error"] = f"{type(err).__name__}: {err}"[:600]
        if args.verbose:
            traceback.print_exc()
    finally:
        if cfg["compile"]:
            torch._dynamo.reset()
        if ctx.model is not None:
            ctx.model.zero_grad(set_to_none=True)
        cleanup(ctx.device)
    row["seconds"] = round(time.monotonic() - t0, 2)
    peak = peaks.get(cfg["precision"])
    if row["status"] == "ok" and peak:
        row["mfu"] = row["train_clips_s"] * 3 * 2 * ctx.macs / (peak * 1e12)
        row["infer_mfu"] = row["infer_clips_s"] * 2 * ctx.macs / (peak * 1e12)
    else:
        row["mfu"] = row["infer_mfu"] = None
    row.setdefault("peak_mem_gib", None)
    return row


def skipped(ctx_or_exp, cfg: dict, why: str) -> dict:
    exp = ctx_or_exp if isinstance(ctx_or_exp, str) else ctx_or_exp.exp
    row = dict(cfg, model=exp, status="skipped", error=why, mfu=None, infer_mfu=None, peak_mem_gib=None)
    if not isinstance(ctx_or_exp, str):
        row.update(batch=ctx_or_exp.batch, frames=ctx_or_exp.frames, crop=ctx_or_exp.crop)
    return row


# ------------------------------------------------------------------------------ the plan
def eager_grid() -> list[dict]:
    return [
        {"formulation": f, "precision": p, "channels_last": cl, "compile": False}
        for f in FORMULATIONS
        for p in PRECISIONS
        for cl in (False, True)
    ]


def compile_candidates(rows: list[dict], models: list[str]) -> list[tuple[str, dict]]:
    """Efficient formulation of every model first, then reference; each at the precision and
    channels-last of the model's fastest eager training (either formulation)."""
    best: dict[str, dict] = {}
    for r in rows:
        faster = r["model"] not in best or r.get("train_clips_s", 0) > best[r["model"]]["train_clips_s"]
        if r["status"] == "ok" and not r["compile"] and faster:
            best[r["model"]] = r
    out = []
    for form in FORMULATIONS:
        for exp in models:
            if exp in best:
                b = best[exp]
                cfg = {"precision": b["precision"], "channels_last": b["channels_last"]}
                out.append((exp, {"formulation": form, **cfg, "compile": True}))
    return out


def estimate(rows: list[dict], exp: str, compiled: bool, default: float, depths: dict[str, int]) -> float:
    """Seconds the next configuration of `exp` should take: the longest one so far of the same
    model and kind (eager / compiled) x 1.25; else, compiled, the longest other compile scaled
    by the depth ratio (compile time grows with the graph) x 1.25; else `default` (x depth / 50
    compiled)."""
    kind = [r for r in rows if r["compile"] == compiled and r["status"] != "skipped" and "seconds" in r]
    same = [r["seconds"] for r in kind if r["model"] == exp]
    if same:
        return 1.25 * max(same)
    if compiled and kind:
        return 1.25 * max(r["seconds"] * depths[exp] / depths[r["model"]] for r in kind)
    return default * depths[exp] / 50 if compiled else default


class Suite:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.deadline = Deadline(args.budget_s)
        self.overlay = config.REPO_ROOT / "params" / "embedded.yaml" if args.smoke else None
        name = describe_device(self.device)
        self.peaks = peaks_for(self.device, name["name"], args.peak_tflops)
        self.out = Path(args.out) if args.out else None
        self.results: dict = {
            "schema": SCHEMA_VERSION,
            "suite": "benchmarks/gpu_suite.py",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "device": name,
            "peak_tflops": self.peaks,
            "smoke": bool(args.smoke),
            "params_overlay": "params/embedded.yaml" if args.smoke else None,
            "budget_s": args.budget_s,
            "settings": {
                "warmup": args.warmup,
                "iters": args.iters,
                "compile_backend": args.compile_backend,
                "cudnn_benchmark": self.device.type == "cuda",
            },
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "status": "running",
            "models": {},
            "results": [],
            "loader": None,
            "notes": [],
        }
        self.ctxs: dict[str, ModelCtx] = {}
        self.depths: dict[str, int] = {}

    @property
    def rows(self) -> list[dict]:
        return self.results["results"]

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        self.write()

    def context(self, exp: str) -> ModelCtx:
        if exp not in self.ctxs:
            batch = self.args.batch.get(exp) or (SMOKE_BATCH if self.args.smoke else None)
            ctx = ModelCtx(exp, self.overlay, self.device, batch)
            self.ctxs[exp] = ctx
            self.depths[exp] = ctx.model_cfg["depth"]
            self.results["models"][exp] = ctx.describe()
        return self.ctxs[exp]

    def run(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as smallbig.engine.train on CUDA
        self.eager_phase()
        if self.args.loader:
            self.loader_phase()
        if self.args.compile:
            self.compile_phase()
        else:
            self.note("torch.compile not measured (--no-compile)")
        skipped_n = sum(r["status"] == "skipped" for r in self.rows)
        self.results["status"] = "budget exhausted" if skipped_n else "complete"
        if skipped_n:
            self.note(f"{skipped_n} configuration(s) skipped: the budget of {self.args.budget_s:g} s ran out")

    def eager_phase(self) -> None:
        for exp in self.args.models:
            try:
                ctx = self.context(exp)
            except Exception as err:  # the params or the MAC count: recorded, the others go on
                self.note(f"{exp}: not measured: {type(err).__name__}: {err}"[:600])
                continue
            for cfg in eager_grid():
                need = estimate(self.rows, exp, False, self.args.eager_estimate_s, self.depths)
                if not self.deadline.fits(need):
                    self.add(
                        skipped(ctx, cfg, f"budget: ~{need:.0f} s needed, {self.deadline.left():.0f} s left")
                    )
                    continue
                self.add(run_config(ctx, cfg, self.args, self.peaks))
            ctx.release()

    def compile_phase(self) -> None:
        todo = compile_candidates(self.rows, self.args.models)
        for exp in self.ctxs:
            if not any(e == exp for e, _ in todo):
                self.note(f"{exp}: no successful eager configuration, torch.compile not tried")
        cap = self.args.compile_max
        if cap is not None and len(todo) > cap:
            left = ", ".join(f"{e} {c['formulation']}" for e, c in todo[cap:])
            self.note(f"--compile-max {cap}: torch.compile not run for {left}")
            todo = todo[:cap]
        for exp, cfg in todo:
            ctx = self.context(exp)
            need = estimate(self.rows, exp, True, self.args.compile_estimate_s, self.depths)
            if not self.deadline.fits(need):
                self.add(
                    skipped(ctx, cfg, f"budget: ~{need:.0f} s needed, {self.deadline.left():.0f} s left")
                )
                continue
            self.add(run_config(ctx, cfg, self.args, self.peaks))
        for ctx in self.ctxs.values():
            ctx.release()

    def loader_phase(self) -> None:
        need = self.args.loader_estimate_s
        if not self.deadline.fits(need):
            self.note(
                f"loader not measured: budget (~{need:.0f} s needed, {self.deadline.left():.0f} s left)"
            )
            return
        try:
            self.results["loader"] = measure_loader(self.args, self.deadline)
        except Exception as err:  # recorded, the GPU figures stand without it
            self.results["loader"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:600]}
            if self.args.verbose:
                traceback.print_exc()
        self.results["loader_vs_gpu"] = loader_vs_gpu(self.results)
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        self.results["elapsed_s"] = round(self.deadline.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.out.with_suffix(".json"))
        self.out.with_suffix(".md").write_text(report_md(self.results))


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def engine_row(results: dict, exp: str) -> dict | None:
    for r in results["results"]:
        if r["model"] == exp and r.get("engine") and r["status"] == "ok":
            return r
    return None


def loader_vs_gpu(results: dict) -> dict:
    """Per model: the GPU training rate at the engine's settings and at the best measured
    settings, and how many loader workers (CPU cores) each needs, from the per-worker rate at
    the most workers measured (contention included)."""
    loader = results.get("loader") or {}
    out: dict = {}
    for exp in results["models"]:
        ok = [r for r in results["results"] if r["model"] == exp and r["status"] == "ok"]
        if not ok:
            continue
        eng = engine_row(results, exp)
        best = max(ok, key=lambda r: r["train_clips_s"])
        e = {
            "engine_train_clips_s": eng["train_clips_s"] if eng else None,
            "best_train_clips_s": best["train_clips_s"],
            "workers_needed": {},
        }
        for fmt, rates in (loader.get("formats") or {}).items():
            good = [x for x in rates if x.get("clips_s")]
            if not good:
                continue
            top = max(good, key=lambda x: x["workers"])
            per_worker = top["clips_s"] / top["workers"]
            e["workers_needed"][fmt] = {
                "per_worker_clips_s": per_worker,
                "at_workers": top["workers"],
                "engine": eng["train_clips_s"] / per_worker if eng else None,
                "best": best["train_clips_s"] / per_worker,
            }
        out[exp] = e
    return out


# ------------------------------------------------------------------------------ data loader
TOY_SHORT_SIDE = 120  # smallbig.data.toy renders 160 x 120 videos (its W, H; not configurable)


def loader_params(root: Path, source: Path, fmt: str, smoke: bool) -> dict:
    """The training data section of a Kinetics experiment (params/base.yaml: dense sampling,
    8 frames at stride 8, random short side [256, 320], crop 224, flip, JPEG frames at short
    side 320); --smoke: the embedded overlay's 4 x 112² from short side [120, 144]."""
    base = config.load_params(config.experiment_path("k400-r50-sb-full"))["data"]
    d = dict(base, root=str(root), source={"base_url": str(source)}, format=fmt)
    d.update(limit_train=None, limit_val=None, num_workers=0)
    if smoke:
        d.update(num_frames=4, train_short_side=[120, 144], crop_size=112, frame_short_side=TOY_SHORT_SIDE)
    return {"data": d}


def loader_sources(args, work: Path) -> tuple[dict, str]:
    """Real encoded videos made here -> {format: training VideoDataset}, and what they are.
    smallbig.data.toy writes Kinetics-style h264 videos of 160 x 120 (48-72 frames, 25 fps);
    `frames`: JPEG frames extracted by `smallbig data prepare` at the params' frame_short_side
    (320: the full-scale setting, upscaled from 120); `video`: the videos re-encoded to that
    short side (h264, `smallbig data resize`'s resize_videos), decoded by decord."""
    from smallbig.data.dataset import build_dataset
    from smallbig.data.frames import resize_videos
    from smallbig.data.prepare import prepare
    from smallbig.data.toy import make_toy

    per_class = {"train": 2 if args.smoke else 4, "val": 1, "test": 1}
    make_toy(work / "toy", seed=0, datasets=("kinetics400",), per_class=per_class, progress=False)
    src = work / "toy" / "kinetics400"
    out: dict = {}
    workers = min(os.cpu_count() or 1, 16)
    for fmt in args.loader_formats:
        p = loader_params(work / fmt, src, fmt, args.smoke)
        prepare(p, progress=False, workers=workers)
        ds = build_dataset(p, "train", "train")  # quarantined videos (the toy mirror has one) left out
        short = p["data"]["frame_short_side"]
        if fmt == "video" and short != TOY_SHORT_SIDE:
            ds.entries, failed = resize_videos(ds.root, ds.entries, f"videos{short}", short, progress=False)
            if failed:
                raise RuntimeError(f"re-encoding failed: {failed[0]}")
        out[fmt] = ds
    short = loader_params(work, src, "frames", args.smoke)["data"]["frame_short_side"]
    what = (
        f"{len(next(iter(out.values())))} training videos made by smallbig.data.toy (Kinetics-style "
        f"h264, 160 x 120, 48-72 frames); frames: JPEG extracted at short side {short} by "
        "`smallbig data prepare`"
        + (
            f"; video: re-encoded to short side {short} (h264, crf 20), decord"
            if short != TOY_SHORT_SIDE
            else ""
        )
    )
    return out, what


def loader_rate(ds, workers: int, batch: int, seconds: float, window: float, pin: bool) -> dict:
    """Training DataLoader for `seconds`; clips/s over batches arriving in the last `window`
    seconds (the first ones come from prefetch queues filled while the workers started)."""
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(
        ds, replacement=True, num_samples=10**7, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        drop_last=True,
    )
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    it = iter(loader)
    shape = None
    while True:
        b = next(it)
        now = time.perf_counter() - t0
        arrivals.append((now, int(b["video"].shape[0])))
        shape = tuple(b["video"].shape)
        if now >= seconds:
            break
    del it, loader
    start = seconds - window
    late = [(t, n) for t, n in arrivals if t > start]
    clips = sum(n for _, n in late)
    span = late[-1][0] - start if late else 0.0
    return {
        "workers": workers,
        "clips_s": clips / span if span > 0 and clips else None,
        "clips": clips,
        "window_s": round(span, 3),
        "batches": len(arrivals),
        "batch_shape": list(shape) if shape else None,
    }


def measure_loader(args, deadline: Deadline) -> dict:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="smallbig-gpu-suite-"))
    t0 = time.monotonic()
    try:
        datasets, what = loader_sources(args, work)
        d = next(iter(datasets.values())).data
        res: dict = {
            "status": "ok",
            "source": what,
            "prepare_s": round(time.monotonic() - t0, 1),
            "frames": d.num_frames,
            "crop": d.crop_size,
            "train_short_side": list(d.train_short_side),
            "batch": 8,
            "seconds": args.loader_seconds,
            "window_s": round(args.loader_seconds * 2 / 3, 3),
            "formats": {},
        }
        for fmt, ds in datasets.items():
            res["formats"][fmt] = []
            for w in args.loader_workers:
                if not deadline.fits(args.loader_seconds + 3):
                    res["formats"][fmt].append({"workers": w, "clips_s": None, "skipped": "budget"})
                    res["status"] = "budget exhausted"
                    continue
                r = loader_rate(
                    ds, w, res["batch"], args.loader_seconds, res["window_s"], args.device != "cpu"
                )
                res["formats"][fmt].append(r)
                print(json.dumps({"loader": fmt, **r}), flush=True)
        return res
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------ report
def _f(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _label(r: dict) -> str:
    return f"{r['precision']}{' +cl' if r['channels_last'] else ''}{' +compile' if r['compile'] else ''}"


def report_md(res: dict) -> str:
    dev = res["device"]
    lines = [
        f"# GPU suite: {dev['name']}"
        + (" (SMOKE RUN: tiny models, not a GPU measurement)" if res["smoke"] else ""),
        "",
        f"Status: **{res['status']}** after {res.get('elapsed_s', 0):.0f} s (budget {res['budget_s']:g} s); "
        f"{res['date']}; torch {res['torch']}"
        + (f", CUDA {dev.get('cuda')}, cuDNN {dev.get('cudnn')}" if dev["type"] == "cuda" else "")
        + f"; git {str(res.get('git_commit'))[:10]}; load average at start {res['load_average_at_start']}.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"MFU peaks: {res['peak_tflops']['note']}. FLOPs per clip = 2 x counted MACs of one forward; "
        "training = 3 x forward.",
        "",
        "| model | T x crop² | batch | GMACs/clip |",
        "|---|---|---|---|",
    ]
    for exp, m in res["models"].items():
        lines.append(f"| {exp} | {m['frames']} x {m['crop']}² | {m['batch']} | {m['gmacs_per_clip']:.4g} |")
    lines += [
        "",
        "Train = forward + backward + SGD step (clips/s); infer = eval mode, no grad. "
        "`engine` marks the settings `smallbig train` uses (params: model.formulation, train.amp, "
        "train.channels_last, train.compile), the row `smallbig plan` reads.",
        "",
        "| model | formulation | mode | train clips/s | infer clips/s | train peak GiB | infer peak GiB "
        "| MFU train | MFU infer | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        imfu = "–" if r.get("infer_mfu") is None else f"{100 * r['infer_mfu']:.1f}%"
        status = r["status"] + (f": {r['error'][:120]}" if r.get("error") else "")
        lines.append(
            f"| {r['model']} | {r['formulation']} | {_label(r)}{' (engine)' if r.get('engine') else ''} "
            f"| {_f(r.get('train_clips_s'))} | {_f(r.get('infer_clips_s'))} | {_f(r.get('peak_mem_gib'))} "
            f"| {_f(r.get('infer_peak_mem_gib'))} | {mfu} | {imfu} | {status} |"
        )
    lines += ["", *ratio_lines(res)]
    lines += loader_md(res)
    if res["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in res["notes"]]]
    return "\n".join(lines) + "\n"


def ratio_lines(res: dict) -> list[str]:
    """efficient / reference at equal settings, side by side in this run."""
    ok = {
        (r["model"], r["formulation"], r["precision"], r["channels_last"], r["compile"]): r
        for r in res["results"]
        if r["status"] == "ok"
    }
    out = []
    for (exp, form, prec, cl, comp), r in ok.items():
        ref = ok.get((exp, "reference", prec, cl, comp))
        if form != "efficient" or ref is None:
            continue
        mem = ""
        if r.get("peak_mem_gib") and ref.get("peak_mem_gib"):
            mem = f", train peak memory {r['peak_mem_gib'] / ref['peak_mem_gib']:.2f}x"
        out.append(
            f"- {exp} {_label(r)}: efficient / reference train {r['train_clips_s'] / ref['train_clips_s']:.2f}x, "
            f"infer {r['infer_clips_s'] / ref['infer_clips_s']:.2f}x{mem}"
        )
    return (["Efficient vs reference (same settings, same run):", "", *out]) if out else []


def loader_md(res: dict) -> list[str]:
    loader = res.get("loader")
    if not loader:
        return ["", "Data loader: not measured."]
    if loader.get("status") == "failed":
        return ["", f"Data loader: failed: {loader['error']}"]
    lines = [
        "",
        "## Data loader",
        "",
        f"{loader['source']}. Training DataLoader (smallbig.data.dataset, the engine's train mode: "
        f"random short side {loader['train_short_side']}, crop {loader['crop']}, flip), batch "
        f"{loader['batch']} of {loader['frames']} x {loader['crop']}², collate as the engine; clips/s "
        f"over the last {loader['window_s']:g} s of {loader['seconds']:g} s per worker count "
        "(page cache warm: decoding cost, not disk).",
        "",
        "| format | workers | clips/s | clips/s per worker |",
        "|---|---|---|---|",
    ]
    for fmt, rates in loader["formats"].items():
        for x in rates:
            per = x["clips_s"] / x["workers"] if x.get("clips_s") else None
            lines.append(f"| {fmt} | {x['workers']} | {_f(x.get('clips_s'))} | {_f(per)} |")
    vs = res.get("loader_vs_gpu") or {}
    if vs:
        lines += [
            "",
            "Loader workers (CPU cores) needed per GPU = GPU training clips/s / loader clips/s per "
            "worker (at the most workers measured):",
            "",
            "| model | GPU train clips/s (engine) | best | format | workers for engine rate | for best |",
            "|---|---|---|---|---|---|",
        ]
        for exp, e in vs.items():
            for fmt, w in e["workers_needed"].items():
                lines.append(
                    f"| {exp} | {_f(e['engine_train_clips_s'])} | {_f(e['best_train_clips_s'])} | {fmt} "
                    f"| {_f(w['engine'], '.1f')} | {_f(w['best'], '.1f')} |"
                )
    return lines


# ------------------------------------------------------------------------------ CLI
def parse_models_kv(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items:
        exp, _, n = it.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--batch: expected MODEL=N (N >= 1), got {it!r}")
        out[exp] = int(n)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models (params/embedded.yaml overlay)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", nargs="*", default=[], metavar="MODEL=N", help="per-model batch")
    ap.add_argument("--budget-s", type=float, default=450.0, help="global deadline (seconds)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (GPU 3, smoke 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (GPU 10, smoke 2)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (GPU inductor, smoke eager)"
    )
    ap.add_argument("--compile-max", type=int, default=None, help="at most N compiled configurations")
    ap.add_argument("--no-loader", dest="loader", action="store_false")
    ap.add_argument("--loader-workers", default=None, help="comma list (GPU 1,4,8,16; smoke 1,2)")
    ap.add_argument("--loader-seconds", type=float, default=None, help="per worker count (GPU 5)")
    ap.add_argument("--loader-formats", default="frames,video")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    ap.add_argument(
        "--work", default=None, help="scratch directory for the loader's videos (default: a temp dir)"
    )
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/gpu_<device>)")
    ap.add_argument("--verbose", action="store_true", help="tracebacks of failed configurations")
    ap.add_argument("--eager-estimate-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compile-estimate-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--loader-estimate-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [m for m in args.models if m not in config.experiment_ids()]
    if unknown:
        ap.error(f"--models: unknown experiment(s) {', '.join(unknown)}")
    args.batch = parse_models_kv(args.batch)
    if (args.iters is not None and args.iters < 1) or (args.warmup is not None and args.warmup < 1):
        ap.error("--iters and --warmup must be >= 1")
    smoke = args.smoke
    defaults = {
        "warmup": 1 if smoke else 3,
        "iters": 2 if smoke else 10,
        "compile_backend": "eager" if smoke else "inductor",
        "compile_max": 1 if smoke else None,
        "loader_workers": "1,2" if smoke else "1,4,8,16",
        "loader_seconds": 1.5 if smoke else 5.0,
        "eager_estimate_s": 3.0 if smoke else 20.0,
        "compile_estimate_s": 10.0 if smoke else 120.0,
        "loader_estimate_s": 30.0 if smoke else 90.0,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.loader_workers = [int(w) for w in str(args.loader_workers).split(",") if w]
    args.loader_formats = [f for f in args.loader_formats.split(",") if f]
    bad = [f for f in args.loader_formats if f not in ("frames", "video")]
    if bad:
        ap.error(f"--loader-formats: unknown format(s) {', '.join(bad)} (frames, video)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA device here (use --device cpu --smoke for the CPU smoke run)", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    if args.out is None:
        slug = device_slug(describe_device(device)["name"]) if device.type == "cuda" else "cpu"
        args.out = (
            str(Path(tempfile.gettempdir()) / "smallbig-gpu-suite" / f"gpu_smoke_{slug}")
            if args.smoke
            else str(REPO / "benchmarks" / "results" / f"gpu_{slug}")
        )
    suite = Suite(args)

    def on_term(signum, _frame):
        raise SystemExit(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        suite.run()
    except BaseException as err:  # killed by the wrapper's timeout, Ctrl-C, a bug: keep what we have
        suite.results["status"] = f"interrupted ({type(err).__name__}: {err})"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        suite.write()
        print(f"wrote {Path(args.out).with_suffix('.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
