"""The GPU-memory plan of a training, without torch: the cache of measured activations
(``params/memory.json``), the formula, and what fits.

The formula and what is measured are described in smallbig/engine/memory.py, which does the
measuring (torch, the meta device) and plugs its measurer in here (:func:`set_measurer`), so
this layer -- below the engine, used by ``smallbig plan`` and the workflow -- imports neither
torch nor the engine. A cache entry is used only when its hash of the shape fields
(:func:`shape_fields`) matches; else the experiment is measured again with the measurer (about a
second on the meta device) and reported as such -- never a stale entry.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from smallbig import config
from smallbig.fsutil import atomic_write_text

MEMORY_JSON = config.REPO_ROOT / "params" / "memory.json"
MEMORY_MODEL_VERSION = 2  # bump when what is measured changes: every cache entry goes stale
# 2: the efficient formulation's pooling keeps no indices (issue 12, smallbig/models/pooling.py)
GIB = 2**30
FRAGMENTATION = 0.10
WORKSPACE_GIB = 2.0
BYTES_PER_PARAM_STATE = 4  # fp32 parameter / gradient / momentum / DDP bucket element
PRECISIONS = ("fp32", "bf16")
# batches of the two measured forwards: the saved bytes are exactly linear in the batch from 2
# on; at batch 1 models save less (reshapes merging the size-1 batch dim are views instead of
# copies: fp32 NonLocal-R23 saves 3.4 % less at batch 1 than the line through batches 2 and 3)
FIT_BATCHES = (2, 3)
FORMULA = (
    "total(b) = 4P weights + 4P grads + 4P SGD momentum [+ 4P DDP buckets if gpus > 1] "
    "+ BN buffers + saved_fixed + b*saved_per_clip + b*2*largest_per_clip "
    f"+ b*input_uint8 + {FRAGMENTATION:g}*(batch-dependent terms) + {WORKSPACE_GIB:g} GiB "
    "workspace; saved_* measured on the meta device (saved_tensors_hooks, batch 2 and 3, "
    "distinct storages, parameters excluded); bf16 = CUDA autocast policy emulated"
)


# --------------------------------------------------------------------------------------------
# what decides the shapes
def shape_fields(params: dict) -> dict:
    """The params fields that decide the memory of a training step per clip: the whole model
    section but the pretrained path (weights' values do not matter; dropout, formulation and
    the stages do), frames and crop size."""
    model = {k: v for k, v in params["model"].items() if k != "pretrained"}
    return {
        "model": model,
        "num_frames": int(params["data"]["num_frames"]),
        "crop_size": int(params["data"]["crop_size"]),
        "memory_model_version": MEMORY_MODEL_VERSION,
    }


def shape_hash(params: dict) -> str:
    return config.params_hash(shape_fields(params))[:16]


def amp_precision(params: dict) -> str:
    """'bf16' for train.amp bf16 / fp16 (both 2-byte autocast; on CUDA), else 'fp32'."""
    amp = params["train"].get("amp", "none")
    return "fp32" if amp in (None, "none") else "bf16"


# --------------------------------------------------------------------------------------------
# the formula
def estimate(entry: dict, params: dict, batch: int | None = None, precision: str | None = None) -> dict:
    """Bytes per GPU of a training step with ``batch`` clips per GPU (default: the params'
    ``train.per_gpu_batch``) in ``precision`` (default: from ``train.amp``). -> the terms and
    ``total``."""
    tr = params["train"]
    b = int(batch if batch is not None else tr.get("per_gpu_batch", tr["batch_size"]))
    prec = precision or amp_precision(params)
    act = entry["activations"][prec]
    gpus = int(params.get("resources", {}).get("gpus", 1))
    static = {
        "weights": entry["param_bytes"],
        "grads": entry["grad_bytes"],
        "momentum": entry["optimizer_bytes"],
        "ddp_buckets": entry["grad_bytes"] if gpus > 1 else 0,
        "buffers": entry["buffer_bytes"],
    }
    dyn = {
        "saved_fixed": act["saved_fixed"],
        "activations": b * act["saved_per_clip"],
        "grad_in_flight": b * 2 * act["largest_per_clip"],
        "input": b * entry["input_uint8_per_clip"],
    }
    batch_dep = dyn["activations"] + dyn["grad_in_flight"] + dyn["input"]
    allow = {"fragmentation": int(FRAGMENTATION * batch_dep), "workspace": int(WORKSPACE_GIB * GIB)}
    out = {**static, **dyn, **allow}
    out["static"] = sum(static.values())
    out["total"] = sum(static.values()) + sum(dyn.values()) + sum(allow.values())
    out["batch"] = b
    out["precision"] = prec
    return out


def per_clip_bytes(entry: dict, precision: str) -> float:
    act = entry["activations"][precision]
    return (1 + FRAGMENTATION) * (
        act["saved_per_clip"] + 2 * act["largest_per_clip"] + entry["input_uint8_per_clip"]
    )


def max_batch(entry: dict, params: dict, gpu_mem_gb: float, precision: str | None = None) -> int:
    """The largest clips per GPU whose estimate fits ``gpu_mem_gb`` GiB (0: not even one)."""
    prec = precision or amp_precision(params)
    fixed = estimate(entry, params, 0, prec)["total"]
    room = gpu_mem_gb * GIB - fixed
    if room <= 0:
        return 0
    b = int(room // per_clip_bytes(entry, prec))
    while b > 0 and estimate(entry, params, b, prec)["total"] > gpu_mem_gb * GIB:
        b -= 1
    while estimate(entry, params, b + 1, prec)["total"] <= gpu_mem_gb * GIB:
        b += 1
    return b


def accum_steps(train_cfg: dict, gpus: int, per_gpu_batch: int | None = None) -> int | None:
    """Accumulation steps of ``smallbig.engine.optim.plan_batch`` (without importing torch; this
    layer is below the engine):
    ``batch_size / (per_gpu_batch x gpus)`` under policy accumulate when that is exact, 1 under
    scale_lr; None when plan_batch would refuse the combination (tests check they agree)."""
    paper = int(train_cfg["batch_size"])
    per = int(per_gpu_batch if per_gpu_batch is not None else train_cfg.get("per_gpu_batch", paper))
    policy = train_cfg.get("batch_policy", "accumulate")
    if policy == "scale_lr":
        return 1
    if policy != "accumulate" or per < 1 or per * gpus > paper or paper % (per * gpus):
        return None
    return paper // (per * gpus)


def batch_to_use(params: dict, limit: int) -> tuple[int, int] | None:
    """(per_gpu_batch, accumulation steps): the largest per_gpu_batch <= ``limit`` that keeps
    the paper's total batch (``train.batch_size``) exactly on ``resources.gpus`` GPUs (policy
    accumulate); under scale_lr ``(limit, 1)`` (the LR is scaled instead); None if none."""
    tr = params["train"]
    gpus = int(params.get("resources", {}).get("gpus", 1))
    if limit < 1:
        return None
    if tr.get("batch_policy", "accumulate") == "scale_lr":
        return limit, 1
    for b in range(min(limit, int(tr["batch_size"])), 0, -1):
        k = accum_steps(tr, gpus, b)
        if k is not None:
            return b, k
    return None


# --------------------------------------------------------------------------------------------
# the cache (params/memory.json)
def load_cache(path: Path | str = MEMORY_JSON) -> dict:
    path = Path(path)
    if not path.exists():
        return {"experiments": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise config.ParamsError(
            f"{path}: not valid JSON ({e}); delete it and run `smallbig plan --measure-memory`"
        ) from None
    data.setdefault("experiments", {})
    return data


def save_cache(cache: dict, path: Path | str = MEMORY_JSON) -> None:
    path = Path(path)
    cache = dict(cache)
    cache.update(
        {
            "formula": FORMULA,
            "memory_model_version": MEMORY_MODEL_VERSION,
            "torch": _torch_version(),
            "date": _dt.date.today().isoformat(),
            "command": "smallbig plan --measure-memory",
            "units": "bytes; GiB = 2**30 in reports",
        }
    )
    cache["experiments"] = dict(sorted(cache["experiments"].items()))
    order = ["command", "date", "torch", "memory_model_version", "formula", "units", "experiments"]
    out = {k: cache[k] for k in order if k in cache}
    out.update({k: v for k, v in cache.items() if k not in out})
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")


def lookup(params: dict, cache: dict) -> tuple[dict | None, str]:
    """(entry, status): status 'cached' (hash matches), 'stale' (the experiment's shape fields
    changed since it was measured) or 'missing'. A stale entry is never returned."""
    entry = cache.get("experiments", {}).get(params.get("id", ""))
    if entry is None:
        return None, "missing"
    if entry.get("shape_hash") != shape_hash(params):
        return None, "stale"
    return entry, "cached"


def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# the measurer (smallbig.engine.memory.measure, plugged in by the engine)
Measurer = Callable[..., dict]  # (params, precisions=..., check=...) -> a cache entry
_MEASURER: Measurer | None = None


def set_measurer(measurer: Measurer) -> None:
    """Plug in the function that measures an entry (``smallbig.engine.memory.measure``; the
    engine's CLI plugs in a lazy one, so ``smallbig plan`` imports torch only to measure)."""
    global _MEASURER
    _MEASURER = measurer


def measurer() -> Measurer:
    if _MEASURER is None:
        raise config.ParamsError(
            "GPU memory: an experiment has no current entry in params/memory.json and nothing "
            "to measure it with here (import smallbig.engine.memory, which measures with torch)"
        )
    return _MEASURER


def measure_for_plan(params: dict) -> dict:
    """An entry measured on the fly (no cache entry, or a stale one): the precision the params
    train in only, no cross-check."""
    return measurer()(params, precisions=(amp_precision(params),))


def memory_plan(
    params_by_exp: dict[str, dict],
    gpu_mem_gb: float | None = None,
    cache_path: Path | str = MEMORY_JSON,
    measurer: Callable[[dict], dict] = measure_for_plan,
) -> dict[str, dict]:
    """Per experiment id: the estimate at its configured per-GPU batch and precision and, with
    ``gpu_mem_gb`` (GiB per GPU), ``max_batch`` (the most clips per GPU that fit), ``fits`` and
    ``use`` ((per_gpu_batch, accumulation steps) keeping the total batch, or None). ``status``:
    ``cached`` (params/memory.json, hash current), ``stale`` or ``missing`` (then measured now
    with ``measurer``, about a second an experiment on the meta device, plus the torch import;
    a stale entry is never used)."""
    cache = load_cache(cache_path)
    out: dict[str, dict] = {}
    for exp in sorted(params_by_exp):
        p = params_by_exp[exp]
        entry, status = lookup(p, cache)
        if entry is None:
            entry = measurer(p)
        prec = amp_precision(p)
        est = estimate(entry, p)
        gpus = int(p.get("resources", {}).get("gpus", 1))
        row = {
            "status": status,
            "entry": entry,
            "precision": prec,
            "gpus": gpus,
            "num_frames": entry["num_frames"],
            "crop_size": entry["crop_size"],
            "per_gpu_batch": est["batch"],
            "accum_steps": accum_steps(p["train"], gpus),
            "batch_size": int(p["train"]["batch_size"]),
            "total_gib": est["total"] / GIB,
            "static_gib": est["static"] / GIB,
            "activation_per_clip_gib": entry["activations"][prec]["saved_per_clip"] / GIB,
            "estimate": est,
        }
        if gpu_mem_gb is not None:
            limit = max_batch(entry, p, gpu_mem_gb, prec)
            row.update(
                {
                    "gpu_mem_gb": gpu_mem_gb,
                    "max_batch": limit,
                    "fits": est["total"] <= gpu_mem_gb * GIB,
                    "use": batch_to_use(p, limit),
                }
            )
        out[exp] = row
    return out


def _params_file(exp: str) -> str:
    try:
        return str(config.experiment_path(exp).relative_to(config.REPO_ROOT))
    except (config.ParamsError, ValueError):
        return exp


def advice(exp: str, row: dict) -> str:
    """One line for a training that does not fit: its need and what to use instead."""
    need = (
        f"{_params_file(exp)}: train.per_gpu_batch: {row['per_gpu_batch']} needs "
        f"≈ {row['total_gib']:.1f} GiB per GPU ({row['num_frames']}x{row['crop_size']}², "
        f"{row['precision']}) > {row['gpu_mem_gb']:g} GiB"
    )
    if row.get("use"):
        b, k = row["use"]
        return (
            f"{exp}: {need}; use train.per_gpu_batch: {b} with {k} accumulation step(s) "
            f"(keeps train.batch_size {row['batch_size']} on {row['gpus']} GPU(s); at most "
            f"{row['max_batch']} clip(s) per GPU fit)"
        )
    if row.get("max_batch", 0) > 0:
        return (
            f"{exp}: {need}; at most {row['max_batch']} clip(s) per GPU fit, but none of "
            f"those batches keeps train.batch_size {row['batch_size']} exactly on "
            f"{row['gpus']} GPU(s); change resources.gpus or use train.batch_policy: scale_lr"
        )
    one = estimate(
        row["entry"], {"train": {"batch_size": 1}, "resources": {"gpus": row["gpus"]}}, 1, row["precision"]
    )["total"]
    return f"{exp}: {need}; not even 1 clip per GPU fits (≈ {one / GIB:.1f} GiB): use GPUs with more memory"


def memory_errors(rows: dict[str, dict]) -> list[str]:
    """The :func:`advice` lines of the rows (from ``memory_plan(..., gpu_mem_gb)``) that do
    not fit."""
    return [advice(e, r) for e, r in rows.items() if not r["fits"]]


def memory_error_message(rows: dict[str, dict], gpu_mem_gb: float) -> str:
    bad = memory_errors(rows)
    return (
        f"GPU memory: {len(bad)} training(s) do not fit {gpu_mem_gb:g} GiB per GPU "
        f"(estimate: smallbig/engine/memory.py, `smallbig plan --gpu-mem {gpu_mem_gb:g}`); "
        "nothing was run or submitted:\n  " + "\n  ".join(bad)
    )


def check_memory(params_by_exp: dict, gpu_mem_gb: float, cache_path: Path | str = MEMORY_JSON) -> None:
    """Raise ``smallbig.config.ParamsError`` naming every experiment whose configured
    ``train.per_gpu_batch`` does not fit ``gpu_mem_gb`` GiB per GPU, with its need and the
    per_gpu_batch / accumulation steps to use instead. Uses params/memory.json where its
    entry is current and measures where not (meta device, about a second an experiment).
    ``params_by_exp``: experiment id -> resolved params (``config.load_params``)."""
    rows = memory_plan(params_by_exp, gpu_mem_gb, cache_path)
    if memory_errors(rows):
        raise config.ParamsError(memory_error_message(rows, gpu_mem_gb))


def measure_all(
    params_by_exp: dict[str, dict],
    cache_path: Path | str = MEMORY_JSON,
    force: bool = False,
    say: Callable[[str], None] = print,
    check: bool = True,
) -> dict:
    """Measure every experiment whose entry is missing or stale (all with ``force``), with the
    batch-2 allocator-level cross-check (``check``), and write the cache. -> the cache."""
    cache = load_cache(cache_path)
    for exp in sorted(params_by_exp):
        p = params_by_exp[exp]
        _, status = lookup(p, cache)
        if status == "cached" and not force:
            continue
        t0 = time.time()
        cache["experiments"][exp] = measurer()(p, check=check)
        why = "re-measured" if status == "cached" else status
        say(f"memory: measured {exp} ({why}) in {time.time() - t0:.1f} s")
    save_cache(cache, cache_path)
    return cache
