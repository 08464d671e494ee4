"""Per-GPU training memory of a configuration, estimated before anything is submitted.

The model (bytes per GPU, one training step of ``b`` clips per GPU; GiB = 2**30 bytes)::

    total(b) = weights + grads + momentum [+ ddp_buckets] + buffers     # static, fp32
             + saved_fixed + b * saved_per_clip                         # saved for backward
             + b * 2 * largest_per_clip                                 # gradients in flight
             + b * input_uint8_per_clip                                 # the decoded batch
             + FRAGMENTATION * (everything batch-dependent above)        # allocator allowance
             + WORKSPACE_GIB                                            # context, cuDNN, NCCL

* **weights, grads, momentum**: 4 bytes per parameter each (fp32 parameters, fp32 gradients,
  SGD momentum buffer). AMP (``train.amp: bf16`` / ``fp16``) is autocast: the parameters stay
  fp32, there is no separate fp32 master copy; the per-op bf16 casts of the weights are tensors
  saved for backward and are measured in ``saved_fixed``. **ddp_buckets**: with more than one
  GPU (``resources.gpus``), DDP (``gradient_as_bucket_view=False``, its default and ours) keeps
  a flat copy of the gradients in its all-reduce buckets: 4 more bytes per parameter.
  **buffers**: BN running statistics. Gradients are counted as present together with all the
  activations: exact under gradient accumulation, an upper bound otherwise (the first
  micro-batch after ``zero_grad(set_to_none=True)`` builds them during backward).
* **saved_fixed + b × saved_per_clip**: the distinct tensors autograd saves for backward in
  one training forward (train mode, BN batch statistics, the loss on ``logits.float()``), the
  parameters themselves excluded (counted above). *Measured*, not modelled: the model is built
  on the ``meta`` device (no memory, no compute), a forward of a batch-2 and a batch-3 input
  runs under ``torch.autograd.graph.saved_tensors_hooks`` and the bytes of the distinct
  storages handed to the hook are summed (a storage saved by several ops, views of one tensor:
  counted once; the fp32 input is counted whether saved or not, the training loop holds it).
  ``per_clip = S(3) - S(2)``, ``fixed = S(2) - 2 per_clip`` (batch-independent tensors: BN
  per-channel statistics, bf16 weight casts). S(b) is exactly linear from b = 2 on; batch 1
  lies under the line (a reshape that merges the size-1 batch dim is a view, from batch 2 on a
  copy: the stem's frames are a view of the input at batch 1; in fp32 C2D-R23 saves 1.3 %,
  NonLocal-R23 3.4 % less at batch 1), so the line is fitted on 2 and 3 and is an upper bound
  at batch 1. On a real CPU forward the same sum is exactly
  the same number for fp32 (tests/test_memory_plan.py).
  Should the meta device lack an op, :func:`measure` falls back to a real CPU forward at batch
  1 and counts all of it as per-clip (an overestimate by ``saved_fixed``; ``device: cpu`` in
  the entry).
* **bf16 / fp16**: autocast does not run on meta tensors (``torch.autocast`` accepts no
  ``meta`` device, and its CUDA kernels only cast CUDA tensors), so :func:`autocast_emulation`
  reproduces CUDA autocast's policy one level up, as a ``TorchFunctionMode``: the ops on CUDA
  autocast's lower-precision list (convolutions, linear, matmul, ...) get their floating
  arguments cast to bf16 (casts of leaf tensors that require grad -- the parameters -- cached
  for the step, as autocast does), those on its fp32 lists (softmax, sum, losses, ...) run in
  fp32, everything else runs in the dtype it is given. An op that has a CUDA autocast kernel
  but is not in these lists stops the measurement (no silent guess). The casts are autograd
  ops, as autocast's are, so the saved tensors are those of a real bf16 step. Checked against
  the real CPU autocast on a model whose ops CPU and CUDA autocast treat alike (tests).
* **largest_per_clip**: the largest single tensor saved for backward per clip; during backward
  its gradient and the gradient of its input coexist with the saved tensors (2x, an
  allowance). **input_uint8**: the uint8 clip batch copied to the GPU (3·T·crop² bytes a clip).
* **Allowances (stated, not measured)**: ``FRAGMENTATION`` = 10 % of the batch-dependent
  memory (caching-allocator rounding and fragmentation); ``WORKSPACE_GIB`` = 2 GiB (CUDA
  context ≈ 0.5-0.8, cuDNN/cuBLAS workspaces with ``cudnn.benchmark`` ≈ 1, NCCL ≈ 0.3).

The measurements are cached in ``params/memory.json`` per experiment id with the hash of the
fields that decide the shapes (:func:`shape_fields`): ``smallbig plan --measure-memory``
writes it (full scale); :func:`memory_plan` uses an entry only when its hash matches, else
measures again (seconds on meta) and says so -- never a stale entry.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
from pathlib import Path
from typing import Callable, Optional

from smallbig import config

MEMORY_JSON = config.REPO_ROOT / "params" / "memory.json"
MEMORY_MODEL_VERSION = 1  # bump when what is measured changes: every cache entry goes stale
GIB = 2 ** 30
FRAGMENTATION = 0.10
WORKSPACE_GIB = 2.0
BYTES_PER_PARAM_STATE = 4  # fp32 parameter / gradient / momentum / DDP bucket element
PRECISIONS = ("fp32", "bf16")
# batches of the two measured forwards: the saved bytes are exactly linear in the batch from 2
# on; at batch 1 models save less (reshapes merging the size-1 batch dim are views instead of
# copies: fp32 NonLocal-R23 saves 3.4 % less at batch 1 than the line through batches 2 and 3)
FIT_BATCHES = (2, 3)
FORMULA = ("total(b) = 4P weights + 4P grads + 4P SGD momentum [+ 4P DDP buckets if gpus > 1] "
           "+ BN buffers + saved_fixed + b*saved_per_clip + b*2*largest_per_clip "
           f"+ b*input_uint8 + {FRAGMENTATION:g}*(batch-dependent terms) + {WORKSPACE_GIB:g} GiB "
           "workspace; saved_* measured on the meta device (saved_tensors_hooks, batch 2 and 3, "
           "distinct storages, parameters excluded); bf16 = CUDA autocast policy emulated")


class MemoryMeasurementError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# what decides the shapes
def shape_fields(params: dict) -> dict:
    """The params fields that decide the memory of a training step per clip: the whole model
    section but the pretrained path (weights' values do not matter; dropout, formulation and
    the stages do), frames and crop size."""
    model = {k: v for k, v in params["model"].items() if k != "pretrained"}
    return {"model": model, "num_frames": int(params["data"]["num_frames"]),
            "crop_size": int(params["data"]["crop_size"]),
            "memory_model_version": MEMORY_MODEL_VERSION}


def shape_hash(params: dict) -> str:
    return config.params_hash(shape_fields(params))[:16]


def amp_precision(params: dict) -> str:
    """'bf16' for train.amp bf16 / fp16 (both 2-byte autocast; on CUDA), else 'fp32'."""
    amp = params["train"].get("amp", "none")
    return "fp32" if amp in (None, "none") else "bf16"


# --------------------------------------------------------------------------------------------
# CUDA autocast, emulated one level above autograd
# CUDA autocast's lists (aten/src/ATen/autocast_mode.cpp), as Python function names.
AUTOCAST_LOWER = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "_convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linalg_vecdot", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
})
# fp32 unless a dtype is given
AUTOCAST_FP32_OPT_DTYPE = frozenset({
    "softmax", "log_softmax", "sum", "prod", "cumsum", "cumprod", "linalg_vector_norm",
    "linalg_matrix_norm", "_softmax", "_log_softmax",
})
AUTOCAST_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus",
    "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm", "nuclear_norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d",
    "grid_sampler", "norm", "cross_entropy", "cross_entropy_loss", "stft", "fft_fft",
    "linalg_norm", "linalg_cond", "linalg_matrix_rank", "linalg_solve", "linalg_cholesky",
    "linalg_svdvals", "linalg_eigvals", "linalg_eigvalsh", "linalg_inv",
    "linalg_householder_product",
    "linalg_tensorinv", "linalg_tensorsolve", "fake_quantize_per_tensor_affine", "geqrf",
    "_lu_with_info", "qr", "svd", "triangular_solve", "fractional_max_pool2d",
    "fractional_max_pool3d", "adaptive_max_pool3d", "multilabel_margin_loss_forward",
    "linalg_qr", "linalg_cholesky_ex", "linalg_svd", "linalg_eig", "linalg_eigh", "linalg_lstsq",
    "linalg_inv_ex",
})
# widest floating type of the arguments (CUDA "promote" list)
AUTOCAST_PROMOTE = frozenset({
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler",
    "index_put", "tensordot", "scatter_add",
})
CUDA_AUTOCAST_POLICY = {"lower": AUTOCAST_LOWER, "fp32_opt_dtype": AUTOCAST_FP32_OPT_DTYPE,
                        "fp32": AUTOCAST_FP32, "promote": AUTOCAST_PROMOTE,
                        "dispatch_key": "AutocastCUDA"}


def _has_autocast_kernel(name: str, dispatch_key: str) -> bool:
    """Whether an aten op of this (Python) name has a kernel for ``dispatch_key``."""
    import torch

    packet = getattr(torch.ops.aten, name[2:-2] if name.startswith("__") else name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    base = packet._qualified_op_name if hasattr(packet, "_qualified_op_name") else f"aten::{name}"
    for ov in packet.overloads():
        full = base + ("" if ov == "default" else f".{ov}")
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(full, dispatch_key):
                return True
        except RuntimeError:
            continue
    return False


_EMULATION_CLASS = None


def autocast_emulation(dtype=None, policy: Optional[dict] = None):
    """A ``TorchFunctionMode`` applying an autocast casting policy (default: CUDA's) to tensors
    of any device (meta, CPU). It sits above autograd, so the casts are recorded and the ops
    save the cast tensors, as under real autocast. A function with a kernel for the policy's
    autocast dispatch key that the policy does not list raises ``MemoryMeasurementError``."""
    global _EMULATION_CLASS
    import torch

    if _EMULATION_CLASS is None:
        from torch.overrides import TorchFunctionMode

        class AutocastEmulation(TorchFunctionMode):
            def __init__(self, dtype, policy):
                super().__init__()
                self.dtype = dtype
                self.policy = policy
                self.cache: dict[int, tuple] = {}
                self._checked: dict[str, bool] = {}

            def _cast(self, v, dtype):
                if isinstance(v, torch.Tensor):
                    if not v.is_floating_point() or v.dtype in (dtype, torch.float64):
                        return v
                    if v.is_leaf and v.requires_grad:  # autocast caches the parameters' casts
                        if id(v) not in self.cache:
                            self.cache[id(v)] = (v, v.to(dtype))
                        return self.cache[id(v)][1]
                    return v.to(dtype)
                if isinstance(v, (list, tuple)):
                    return type(v)(self._cast(u, dtype) for u in v)
                return v

            def _call_cast(self, func, args, kwargs, dtype):
                return func(*self._cast(args, dtype),
                            **{k: self._cast(v, dtype) for k, v in kwargs.items()})

            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                pol = self.policy
                if name in pol["lower"]:
                    return self._call_cast(func, args, kwargs, self.dtype)
                if name in pol["fp32_opt_dtype"]:
                    if kwargs.get("dtype") is None and not any(isinstance(a, torch.dtype)
                                                               for a in args):
                        return self._call_cast(func, args, kwargs, torch.float32)
                    return func(*args, **kwargs)
                if name in pol["fp32"]:
                    return self._call_cast(func, args, kwargs, torch.float32)
                if name in pol["promote"]:
                    floats = [a for a in list(args) + list(kwargs.values())
                              if isinstance(a, torch.Tensor) and a.is_floating_point()]
                    wide = (torch.float32 if any(a.dtype == torch.float32 for a in floats)
                            else self.dtype)
                    return self._call_cast(func, args, kwargs, wide)
                if name and (not name.startswith("__") or name in ("__matmul__", "__rmatmul__")):
                    if name not in self._checked:
                        self._checked[name] = _has_autocast_kernel(name, pol["dispatch_key"])
                    if self._checked[name]:
                        raise MemoryMeasurementError(
                            f"autocast ({pol['dispatch_key']}) has a policy for {name!r}, which "
                            f"the emulation in smallbig/engine/memory.py does not list; add it")
                return func(*args, **kwargs)

        _EMULATION_CLASS = AutocastEmulation
    return _EMULATION_CLASS(dtype or torch.bfloat16, policy or CUDA_AUTOCAST_POLICY)


# ops that must never see an fp32 floating input under (emulated) CUDA autocast, at the aten
# level: the guard against a Python composite hiding one of them from the emulation
_LOWER_ATEN = frozenset({"convolution", "_convolution", "cudnn_convolution", "mm", "bmm", "addmm",
                         "baddbmm", "addbmm", "mv", "addmv", "addr"})


def _make_policy_check():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class AutocastPolicyCheck(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func._schema.name.split("::")[-1] in _LOWER_ATEN:
                for a in tree_leaves((args, kwargs)):
                    if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
                        raise MemoryMeasurementError(
                            f"{func} ran in fp32 under the emulated CUDA autocast: a function "
                            "outside the emulation's lists reached it; extend the lists in "
                            "smallbig/engine/memory.py")
            return func(*args, **kwargs)

    return AutocastPolicyCheck


# --------------------------------------------------------------------------------------------
# saved-for-backward bytes of one training forward
def saved_tensor_bytes(model, x, amp_dtype=None, policy: Optional[dict] = None) -> dict:
    """Run ``model`` on ``x`` in train mode (plus the cross-entropy loss on ``logits.float()``
    against class 0), autocast-emulated to ``amp_dtype`` when given, and sum the bytes of the
    distinct storages saved for backward, the parameters' own storages excluded, ``x``'s
    included (saved or not). -> ``{"bytes", "largest", "count"}``. Works on meta and on real
    tensors alike (the same numbers: tests/test_memory_plan.py)."""
    import torch
    import torch.nn.functional as F

    param_ids = {p.untyped_storage()._cdata for p in model.parameters()}
    # storage id -> (storage kept alive, bytes); the input counts whether saved or not (the
    # training loop holds it for the whole step: in fp32 the stem saves it, under autocast its
    # bf16 copy is what is saved)
    seen: dict[int, tuple[object, int]] = {x.untyped_storage()._cdata: (
        x.untyped_storage(), x.untyped_storage().nbytes())}

    def pack(t):
        s = t.untyped_storage()
        key = s._cdata
        if key not in param_ids and key not in seen:
            seen[key] = (s, s.nbytes())
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if amp_dtype is not None:
                with autocast_emulation(amp_dtype, policy), _make_policy_check()():
                    logits = model(x)
            else:
                logits = model(x)
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            loss = F.cross_entropy(logits.float(), y)
        sizes = [b for _, b in seen.values()]
        del loss, logits
    finally:
        model.train(was_training)
    return {"bytes": int(sum(sizes)), "largest": int(max(sizes, default=0)), "count": len(sizes)}


def simulate_step_peak(model, x, amp_dtype=None, policy: Optional[dict] = None) -> dict:
    """Allocator-level cross-check of the formula: one training step (forward, loss, backward)
    of ``model`` on ``x`` under a ``TorchDispatchMode`` that adds the bytes of every new
    storage an op returns and subtracts them when the storage dies; -> ``{"peak"}``: the
    highest live total (the input included, parameters and buffers excluded, parameter
    gradients included), i.e. what a perfect allocator would need. Works on meta. Leaves the
    parameters' ``.grad`` set."""
    import torch
    import torch.nn.functional as F
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    exclude = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[object, int]] = {}
            self.current = x.untyped_storage().nbytes()
            self.peak = self.current

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = st._cdata
                    if key not in self.live and key not in exclude:
                        self.live[key] = (StorageWeakRef(st), st.nbytes())
                        self.current += st.nbytes()
            self.peak = max(self.peak, self.current)
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]
            return out

    was_training = model.training
    model.train()
    tracker = LiveBytes()
    try:
        with tracker:
            if amp_dtype is not None:
                with autocast_emulation(amp_dtype, policy):
                    logits = model(x)
            else:
                logits = model(x)
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            F.cross_entropy(logits.float(), y).backward()
            del logits
    finally:
        model.train(was_training)
    return {"peak": int(tracker.peak)}


def _clip(params: dict, batch: int, device: str):
    import torch

    T, crop = int(params["data"]["num_frames"]), int(params["data"]["crop_size"])
    return torch.zeros(batch, 3, T, crop, crop, device=device) if device != "meta" else \
        torch.empty(batch, 3, T, crop, crop, device=device)


def build_for_memory(params: dict, device: str = "meta"):
    """The params' model on ``device`` (meta: nothing allocated; cpu: random weights)."""
    import torch

    from smallbig.models.resnet import build_model

    cfg = copy.deepcopy(params["model"])
    cfg["pretrained"] = None
    if device == "meta":
        with torch.device("meta"):
            return build_model(cfg)
    return build_model(cfg).to(device)


def measure(params: dict, device: str = "meta", precisions=PRECISIONS,
            fallback: bool = True, check: bool = False) -> dict:
    """A cache entry for the params' configuration at its own shape (frames, crop).

    Per precision: ``saved_per_clip``, ``saved_fixed``, ``largest_per_clip`` (bytes) from
    forwards of batch 2 and 3. When the meta device cannot run an op and ``fallback``, one real
    CPU forward of batch 1 instead (``saved_fixed`` = 0, all of it counted per clip). With
    ``check`` (meta only): ``check_batch2`` per precision, the allocator-level simulated peak
    of a whole step at batch 2 (:func:`simulate_step_peak`) beside the formula's terms without
    the allowances (grads + saved + gradients in flight)."""
    import torch

    torch.manual_seed(0)
    try:
        model = build_for_memory(params, device)
        prec = {}
        for p in precisions:
            dtype = None if p == "fp32" else torch.bfloat16
            s2 = saved_tensor_bytes(model, _clip(params, FIT_BATCHES[0], device), dtype)
            s3 = saved_tensor_bytes(model, _clip(params, FIT_BATCHES[1], device), dtype)
            per = (s3["bytes"] - s2["bytes"]) // (FIT_BATCHES[1] - FIT_BATCHES[0])
            prec[p] = {"saved_per_clip": per, "saved_fixed": s2["bytes"] - FIT_BATCHES[0] * per,
                       "largest_per_clip": s3["largest"] // FIT_BATCHES[1],
                       "saved_tensors": s3["count"]}
            if check:
                model.zero_grad(set_to_none=True)
                sim = simulate_step_peak(model, _clip(params, 2, device), dtype)["peak"]
                model.zero_grad(set_to_none=True)
                n = sum(q.numel() for q in model.parameters())
                formula = (n * BYTES_PER_PARAM_STATE + prec[p]["saved_fixed"]
                           + 2 * (prec[p]["saved_per_clip"] + 2 * prec[p]["largest_per_clip"]))
                prec[p]["check_batch2"] = {"simulated_peak": sim, "formula_no_allowance": formula,
                                           "ratio": round(sim / formula, 4)}
        used = device
    except (NotImplementedError, RuntimeError) as e:
        if (device != "meta" or not fallback
                or isinstance(e, (MemoryMeasurementError, RecursionError))
                or not (isinstance(e, NotImplementedError) or "meta" in str(e).lower())):
            raise
        model = build_for_memory(params, "cpu")
        prec = {}
        for p in precisions:
            dtype = None if p == "fp32" else torch.bfloat16
            s1 = saved_tensor_bytes(model, _clip(params, 1, "cpu"), dtype)
            prec[p] = {"saved_per_clip": s1["bytes"], "saved_fixed": 0,
                       "largest_per_clip": s1["largest"], "saved_tensors": s1["count"],
                       "fallback": f"meta device failed ({type(e).__name__}: {e}); one real CPU "
                                   "forward at batch 1, all of it counted per clip"}
        used = "cpu"
    n_params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    T, crop = int(params["data"]["num_frames"]), int(params["data"]["crop_size"])
    return {
        "shape_hash": shape_hash(params),
        "num_frames": T, "crop_size": crop,
        "depth": int(params["model"]["depth"]), "base_width": int(params["model"]["base_width"]),
        "params": int(n_params),
        "param_bytes": int(n_params * BYTES_PER_PARAM_STATE),
        "grad_bytes": int(n_params * BYTES_PER_PARAM_STATE),
        "optimizer_bytes": int(n_params * BYTES_PER_PARAM_STATE),  # SGD momentum
        "buffer_bytes": int(buffers),
        "input_uint8_per_clip": 3 * T * crop * crop,
        "activations": prec,
        "device": used,
        "torch": torch.__version__,
        "date": _dt.date.today().isoformat(),
    }


# --------------------------------------------------------------------------------------------
# the formula
def estimate(entry: dict, params: dict, batch: Optional[int] = None,
             precision: Optional[str] = None) -> dict:
    """Bytes per GPU of a training step with ``batch`` clips per GPU (default: the params'
    ``train.per_gpu_batch``) in ``precision`` (default: from ``train.amp``). -> the terms and
    ``total``."""
    tr = params["train"]
    b = int(batch if batch is not None else tr.get("per_gpu_batch", tr["batch_size"]))
    prec = precision or amp_precision(params)
    act = entry["activations"][prec]
    gpus = int(params.get("resources", {}).get("gpus", 1))
    static = {
        "weights": entry["param_bytes"], "grads": entry["grad_bytes"],
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
    return (1 + FRAGMENTATION) * (act["saved_per_clip"] + 2 * act["largest_per_clip"]
                                  + entry["input_uint8_per_clip"])


def max_batch(entry: dict, params: dict, gpu_mem_gb: float, precision: Optional[str] = None) -> int:
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


def accum_steps(train_cfg: dict, gpus: int, per_gpu_batch: Optional[int] = None) -> Optional[int]:
    """Accumulation steps of ``smallbig.engine.optim.plan_batch`` (without importing torch):
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


def batch_to_use(params: dict, limit: int) -> Optional[tuple[int, int]]:
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
        raise config.ParamsError(f"{path}: not valid JSON ({e}); delete it and run "
                                 "`smallbig plan --measure-memory`") from None
    data.setdefault("experiments", {})
    return data


def save_cache(cache: dict, path: Path | str = MEMORY_JSON) -> None:
    import torch

    path = Path(path)
    cache = dict(cache)
    cache.update({"formula": FORMULA, "memory_model_version": MEMORY_MODEL_VERSION,
                  "torch": torch.__version__, "date": _dt.date.today().isoformat(),
                  "command": "smallbig plan --measure-memory",
                  "units": "bytes; GiB = 2**30 in reports"})
    cache["experiments"] = dict(sorted(cache["experiments"].items()))
    order = ["command", "date", "torch", "memory_model_version", "formula", "units", "experiments"]
    out = {k: cache[k] for k in order if k in cache}
    out.update({k: v for k, v in cache.items() if k not in out})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)


def lookup(params: dict, cache: dict) -> tuple[Optional[dict], str]:
    """(entry, status): status 'cached' (hash matches), 'stale' (the experiment's shape fields
    changed since it was measured) or 'missing'. A stale entry is never returned."""
    entry = cache.get("experiments", {}).get(params.get("id", ""))
    if entry is None:
        return None, "missing"
    if entry.get("shape_hash") != shape_hash(params):
        return None, "stale"
    return entry, "cached"


def measure_for_plan(params: dict) -> dict:
    """An entry measured on the fly (no cache entry, or a stale one): the precision the params
    train in only, no cross-check."""
    return measure(params, precisions=(amp_precision(params),))


def memory_plan(params_by_exp: dict[str, dict], gpu_mem_gb: Optional[float] = None,
                cache_path: Path | str = MEMORY_JSON,
                measurer: Callable[[dict], dict] = measure_for_plan) -> dict[str, dict]:
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
            "status": status, "entry": entry, "precision": prec, "gpus": gpus,
            "num_frames": entry["num_frames"], "crop_size": entry["crop_size"],
            "per_gpu_batch": est["batch"], "accum_steps": accum_steps(p["train"], gpus),
            "batch_size": int(p["train"]["batch_size"]),
            "total_gib": est["total"] / GIB,
            "static_gib": est["static"] / GIB,
            "activation_per_clip_gib": entry["activations"][prec]["saved_per_clip"] / GIB,
            "estimate": est,
        }
        if gpu_mem_gb is not None:
            limit = max_batch(entry, p, gpu_mem_gb, prec)
            row.update({"gpu_mem_gb": gpu_mem_gb, "max_batch": limit,
                        "fits": est["total"] <= gpu_mem_gb * GIB,
                        "use": batch_to_use(p, limit)})
        out[exp] = row
    return out


def _params_file(exp: str) -> str:
    try:
        return str(config.experiment_path(exp).relative_to(config.REPO_ROOT))
    except (config.ParamsError, ValueError):
        return exp


def advice(exp: str, row: dict) -> str:
    """One line for a training that does not fit: its need and what to use instead."""
    need = (f"{_params_file(exp)}: train.per_gpu_batch: {row['per_gpu_batch']} needs "
            f"≈ {row['total_gib']:.1f} GiB per GPU ({row['num_frames']}x{row['crop_size']}², "
            f"{row['precision']}) > {row['gpu_mem_gb']:g} GiB")
    if row.get("use"):
        b, k = row["use"]
        return (f"{exp}: {need}; use train.per_gpu_batch: {b} with {k} accumulation step(s) "
                f"(keeps train.batch_size {row['batch_size']} on {row['gpus']} GPU(s); at most "
                f"{row['max_batch']} clip(s) per GPU fit)")
    if row.get("max_batch", 0) > 0:
        return (f"{exp}: {need}; at most {row['max_batch']} clip(s) per GPU fit, but none of "
                f"those batches keeps train.batch_size {row['batch_size']} exactly on "
                f"{row['gpus']} GPU(s); change resources.gpus or use train.batch_policy: scale_lr")
    one = estimate(row["entry"], {"train": {"batch_size": 1}, "resources": {"gpus": row["gpus"]}},
                   1, row["precision"])["total"]
    return (f"{exp}: {need}; not even 1 clip per GPU fits (≈ {one / GIB:.1f} GiB): use GPUs "
            f"with more memory")


def memory_errors(rows: dict[str, dict]) -> list[str]:
    """The :func:`advice` lines of the rows (from ``memory_plan(..., gpu_mem_gb)``) that do
    not fit."""
    return [advice(e, r) for e, r in rows.items() if not r["fits"]]


def memory_error_message(rows: dict[str, dict], gpu_mem_gb: float) -> str:
    bad = memory_errors(rows)
    return (f"GPU memory: {len(bad)} training(s) do not fit {gpu_mem_gb:g} GiB per GPU "
            f"(estimate: smallbig/engine/memory.py, `smallbig plan --gpu-mem {gpu_mem_gb:g}`); "
            "nothing was run or submitted:\n  " + "\n  ".join(bad))


def check_memory(params_by_exp: dict, gpu_mem_gb: float,
                 cache_path: Path | str = MEMORY_JSON) -> None:
    """Raise ``smallbig.config.ParamsError`` naming every experiment whose configured
    ``train.per_gpu_batch`` does not fit ``gpu_mem_gb`` GiB per GPU, with its need and the
    per_gpu_batch / accumulation steps to use instead. Uses params/memory.json where its
    entry is current and measures where not (meta device, about a second an experiment).
    ``params_by_exp``: experiment id -> resolved params (``config.load_params``)."""
    rows = memory_plan(params_by_exp, gpu_mem_gb, cache_path)
    if memory_errors(rows):
        raise config.ParamsError(memory_error_message(rows, gpu_mem_gb))


def measure_all(params_by_exp: dict[str, dict], cache_path: Path | str = MEMORY_JSON,
                force: bool = False, say: Callable[[str], None] = print,
                check: bool = True) -> dict:
    """Measure every experiment whose entry is missing or stale (all with ``force``), with the
    batch-2 allocator-level cross-check (``check``), and write the cache. -> the cache."""
    import time

    cache = load_cache(cache_path)
    for exp in sorted(params_by_exp):
        p = params_by_exp[exp]
        _, status = lookup(p, cache)
        if status == "cached" and not force:
            continue
        t0 = time.time()
        cache["experiments"][exp] = measure(p, check=check)
        why = "re-measured" if status == "cached" else status
        say(f"memory: measured {exp} ({why}) in {time.time() - t0:.1f} s")
    save_cache(cache, cache_path)
    return cache
