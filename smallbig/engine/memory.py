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

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smallbig.models.resnet import build_model
from smallbig.spec import memory_plan as _plan

# the pure part (cache, formula, what fits), re-exported: callers use smallbig.engine.memory
from smallbig.spec.memory_plan import (  # noqa: F401
    BYTES_PER_PARAM_STATE,
    FIT_BATCHES,
    FORMULA,
    FRAGMENTATION,
    GIB,
    MEMORY_JSON,
    MEMORY_MODEL_VERSION,
    PRECISIONS,
    WORKSPACE_GIB,
    accum_steps,
    advice,
    amp_precision,
    batch_to_use,
    check_memory,
    estimate,
    load_cache,
    lookup,
    max_batch,
    measure_all,
    memory_error_message,
    memory_errors,
    memory_plan,
    per_clip_bytes,
    save_cache,
    shape_fields,
    shape_hash,
)


class MemoryMeasurementError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# CUDA autocast, emulated one level above autograd
# CUDA autocast's lists (aten/src/ATen/autocast_mode.cpp), as Python function names.
AUTOCAST_LOWER = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_tbc",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convolution",
        "_convolution",
        "prelu",
        "addmm",
        "addmv",
        "addr",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "einsum",
        "mm",
        "mv",
        "linalg_vecdot",
        "linear",
        "addbmm",
        "baddbmm",
        "bmm",
        "chain_matmul",
        "linalg_multi_dot",
        "lstm_cell",
        "gru_cell",
        "rnn_tanh_cell",
        "rnn_relu_cell",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    }
)
# fp32 unless a dtype is given
AUTOCAST_FP32_OPT_DTYPE = frozenset(
    {
        "softmax",
        "log_softmax",
        "sum",
        "prod",
        "cumsum",
        "cumprod",
        "linalg_vector_norm",
        "linalg_matrix_norm",
        "_softmax",
        "_log_softmax",
    }
)
AUTOCAST_FP32 = frozenset(
    {
        "acos",
        "asin",
        "cosh",
        "erfinv",
        "exp",
        "expm1",
        "log",
        "log10",
        "log2",
        "log1p",
        "reciprocal",
        "rsqrt",
        "sinh",
        "tan",
        "pow",
        "__pow__",
        "__rpow__",
        "softplus",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "frobenius_norm",
        "nuclear_norm",
        "cosine_similarity",
        "poisson_nll_loss",
        "cosine_embedding_loss",
        "nll_loss",
        "nll_loss2d",
        "hinge_embedding_loss",
        "kl_div",
        "l1_loss",
        "smooth_l1_loss",
        "huber_loss",
        "mse_loss",
        "margin_ranking_loss",
        "multilabel_margin_loss",
        "soft_margin_loss",
        "triplet_margin_loss",
        "multi_margin_loss",
        "binary_cross_entropy_with_logits",
        "dist",
        "pdist",
        "cdist",
        "renorm",
        "logsumexp",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "upsample_linear1d",
        "upsample_bilinear2d",
        "upsample_trilinear3d",
        "upsample_bicubic2d",
        "grid_sampler",
        "norm",
        "cross_entropy",
        "cross_entropy_loss",
        "stft",
        "fft_fft",
        "linalg_norm",
        "linalg_cond",
        "linalg_matrix_rank",
        "linalg_solve",
        "linalg_cholesky",
        "linalg_svdvals",
        "linalg_eigvals",
        "linalg_eigvalsh",
        "linalg_inv",
        "linalg_householder_product",
        "linalg_tensorinv",
        "linalg_tensorsolve",
        "fake_quantize_per_tensor_affine",
        "geqrf",
        "_lu_with_info",
        "qr",
        "svd",
        "triangular_solve",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
        "adaptive_max_pool3d",
        "multilabel_margin_loss_forward",
        "linalg_qr",
        "linalg_cholesky_ex",
        "linalg_svd",
        "linalg_eig",
        "linalg_eigh",
        "linalg_lstsq",
        "linalg_inv_ex",
    }
)
# widest floating type of the arguments (CUDA "promote" list)
AUTOCAST_PROMOTE = frozenset(
    {
        "addcdiv",
        "addcmul",
        "atan2",
        "bilinear",
        "cross",
        "dot",
        "vdot",
        "grid_sampler",
        "index_put",
        "tensordot",
        "scatter_add",
    }
)
CUDA_AUTOCAST_POLICY = {
    "lower": AUTOCAST_LOWER,
    "fp32_opt_dtype": AUTOCAST_FP32_OPT_DTYPE,
    "fp32": AUTOCAST_FP32,
    "promote": AUTOCAST_PROMOTE,
    "dispatch_key": "AutocastCUDA",
}


def _has_autocast_kernel(name: str, dispatch_key: str) -> bool:
    """Whether an aten op of this (Python) name has a kernel for ``dispatch_key``."""
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


class AutocastEmulation(TorchFunctionMode):
    """See :func:`autocast_emulation`."""

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
        return func(*self._cast(args, dtype), **{k: self._cast(v, dtype) for k, v in kwargs.items()})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        pol = self.policy
        if name in pol["lower"]:
            return self._call_cast(func, args, kwargs, self.dtype)
        if name in pol["fp32_opt_dtype"]:
            if kwargs.get("dtype") is None and not any(isinstance(a, torch.dtype) for a in args):
                return self._call_cast(func, args, kwargs, torch.float32)
            return func(*args, **kwargs)
        if name in pol["fp32"]:
            return self._call_cast(func, args, kwargs, torch.float32)
        if name in pol["promote"]:
            floats = [
                a
                for a in list(args) + list(kwargs.values())
                if isinstance(a, torch.Tensor) and a.is_floating_point()
            ]
            wide = torch.float32 if any(a.dtype == torch.float32 for a in floats) else self.dtype
            return self._call_cast(func, args, kwargs, wide)
        if name and (not name.startswith("__") or name in ("__matmul__", "__rmatmul__")):
            if name not in self._checked:
                self._checked[name] = _has_autocast_kernel(name, pol["dispatch_key"])
            if self._checked[name]:
                raise MemoryMeasurementError(
                    f"autocast ({pol['dispatch_key']}) has a policy for {name!r}, which "
                    f"the emulation in smallbig/engine/memory.py does not list; add it"
                )
        return func(*args, **kwargs)


def autocast_emulation(dtype=None, policy: dict | None = None):
    """A ``TorchFunctionMode`` applying an autocast casting policy (default: CUDA's) to tensors
    of any device (meta, CPU). It sits above autograd, so the casts are recorded and the ops
    save the cast tensors, as under real autocast. A function with a kernel for the policy's
    autocast dispatch key that the policy does not list raises ``MemoryMeasurementError``."""
    return AutocastEmulation(dtype or torch.bfloat16, policy or CUDA_AUTOCAST_POLICY)


# ops that must never see an fp32 floating input under (emulated) CUDA autocast, at the aten
# level: the guard against a Python composite hiding one of them from the emulation
_LOWER_ATEN = frozenset(
    {
        "convolution",
        "_convolution",
        "cudnn_convolution",
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "addbmm",
        "mv",
        "addmv",
        "addr",
    }
)


class AutocastPolicyCheck(TorchDispatchMode):
    """Refuses an op of _LOWER_ATEN that gets an fp32 input under the emulated autocast."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name.split("::")[-1] in _LOWER_ATEN:
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
                    raise MemoryMeasurementError(
                        f"{func} ran in fp32 under the emulated CUDA autocast: a function "
                        "outside the emulation's lists reached it; extend the lists in "
                        "smallbig/engine/memory.py"
                    )
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# saved-for-backward bytes of one training forward
class _SavedStorages:
    """saved_tensors_hooks pack hook: the distinct storages saved (kept alive), not `exclude`'s.
    storage id -> (storage, bytes)."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.seen: dict[int, tuple[object, int]] = {}

    def __call__(self, t):
        s = t.untyped_storage()
        key = s._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = (s, s.nbytes())
        return t


def _unpack(t):
    return t


def saved_tensor_bytes(model, x, amp_dtype=None, policy: dict | None = None) -> dict:
    """Run ``model`` on ``x`` in train mode (plus the cross-entropy loss on ``logits.float()``
    against class 0), autocast-emulated to ``amp_dtype`` when given, and sum the bytes of the
    distinct storages saved for backward, the parameters' own storages excluded, ``x``'s
    included (saved or not). -> ``{"bytes", "largest", "count"}``. Works on meta and on real
    tensors alike (the same numbers: tests/test_memory_plan.py)."""
    param_ids = {p.untyped_storage()._cdata for p in model.parameters()}
    # storage id -> (storage kept alive, bytes); the input counts whether saved or not (the
    # training loop holds it for the whole step: in fp32 the stem saves it, under autocast its
    # bf16 copy is what is saved)
    pack = _SavedStorages(param_ids)
    pack.seen[x.untyped_storage()._cdata] = (x.untyped_storage(), x.untyped_storage().nbytes())
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            if amp_dtype is not None:
                with autocast_emulation(amp_dtype, policy), AutocastPolicyCheck():
                    logits = model(x)
            else:
                logits = model(x)
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            loss = F.cross_entropy(logits.float(), y)
        sizes = [b for _, b in pack.seen.values()]
        del loss, logits
    finally:
        model.train(was_training)
    return {"bytes": int(sum(sizes)), "largest": int(max(sizes, default=0)), "count": len(sizes)}


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages that ops create (not `exclude`'s), and their peak; starts at
    `start` bytes (the input)."""

    def __init__(self, start: int, exclude: set):
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, tuple[object, int]] = {}
        self.current = start
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in self.exclude:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        return out


def simulate_step_peak(model, x, amp_dtype=None, policy: dict | None = None) -> dict:
    """Allocator-level cross-check of the formula: one training step (forward, loss, backward)
    of ``model`` on ``x`` under a ``TorchDispatchMode`` that adds the bytes of every new
    storage an op returns and subtracts them when the storage dies; -> ``{"peak"}``: the
    highest live total (the input included, parameters and buffers excluded, parameter
    gradients included), i.e. what a perfect allocator would need. Works on meta. Leaves the
    parameters' ``.grad`` set."""
    exclude = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}

    was_training = model.training
    model.train()
    tracker = LiveBytes(x.untyped_storage().nbytes(), exclude)
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
    T, crop = int(params["data"]["num_frames"]), int(params["data"]["crop_size"])
    return (
        torch.zeros(batch, 3, T, crop, crop, device=device)
        if device != "meta"
        else torch.empty(batch, 3, T, crop, crop, device=device)
    )


def build_for_memory(params: dict, device: str = "meta"):
    """The params' model on ``device`` (meta: nothing allocated; cpu: random weights)."""
    cfg = copy.deepcopy(params["model"])
    cfg["pretrained"] = None
    if device == "meta":
        with torch.device("meta"):
            return build_model(cfg)
    return build_model(cfg).to(device)


def _measure_meta(model, params: dict, device: str, precisions, check: bool) -> dict:
    """Per precision: saved bytes per clip and fixed, from forwards of batch 2 and 3."""
    prec = {}
    for p in precisions:
        dtype = None if p == "fp32" else torch.bfloat16
        s2 = saved_tensor_bytes(model, _clip(params, FIT_BATCHES[0], device), dtype)
        s3 = saved_tensor_bytes(model, _clip(params, FIT_BATCHES[1], device), dtype)
        per = (s3["bytes"] - s2["bytes"]) // (FIT_BATCHES[1] - FIT_BATCHES[0])
        prec[p] = {
            "saved_per_clip": per,
            "saved_fixed": s2["bytes"] - FIT_BATCHES[0] * per,
            "largest_per_clip": s3["largest"] // FIT_BATCHES[1],
            "saved_tensors": s3["count"],
        }
        if check:
            prec[p]["check_batch2"] = _check_batch2(model, params, device, dtype, prec[p])
    return prec


def _check_batch2(model, params: dict, device: str, dtype, entry: dict) -> dict:
    """The allocator-level simulated peak of a whole step at batch 2 beside the formula's terms
    without the allowances."""
    model.zero_grad(set_to_none=True)
    sim = simulate_step_peak(model, _clip(params, 2, device), dtype)["peak"]
    model.zero_grad(set_to_none=True)
    n = sum(q.numel() for q in model.parameters())
    formula = (
        n * BYTES_PER_PARAM_STATE
        + entry["saved_fixed"]
        + 2 * (entry["saved_per_clip"] + 2 * entry["largest_per_clip"])
    )
    return {"simulated_peak": sim, "formula_no_allowance": formula, "ratio": round(sim / formula, 4)}


def _measure_cpu_fallback(model, params: dict, precisions, e: BaseException) -> dict:
    """One real CPU forward of batch 1 (the meta device could not run an op)."""
    prec = {}
    for p in precisions:
        dtype = None if p == "fp32" else torch.bfloat16
        s1 = saved_tensor_bytes(model, _clip(params, 1, "cpu"), dtype)
        prec[p] = {
            "saved_per_clip": s1["bytes"],
            "saved_fixed": 0,
            "largest_per_clip": s1["largest"],
            "saved_tensors": s1["count"],
            "fallback": f"meta device failed ({type(e).__name__}: {e}); one real CPU "
            "forward at batch 1, all of it counted per clip",
        }
    return prec


def _can_fall_back(e: BaseException, device: str, fallback: bool) -> bool:
    return (
        device == "meta"
        and fallback
        and not isinstance(e, (MemoryMeasurementError, RecursionError))
        and (isinstance(e, NotImplementedError) or "meta" in str(e).lower())
    )


def measure(
    params: dict, device: str = "meta", precisions=PRECISIONS, fallback: bool = True, check: bool = False
) -> dict:
    """A cache entry for the params' configuration at its own shape (frames, crop).

    Per precision: ``saved_per_clip``, ``saved_fixed``, ``largest_per_clip`` (bytes) from
    forwards of batch 2 and 3. When the meta device cannot run an op and ``fallback``, one real
    CPU forward of batch 1 instead (``saved_fixed`` = 0, all of it counted per clip). With
    ``check`` (meta only): ``check_batch2`` per precision, the allocator-level simulated peak
    of a whole step at batch 2 (:func:`simulate_step_peak`) beside the formula's terms without
    the allowances (grads + saved + gradients in flight)."""
    torch.manual_seed(0)
    try:
        model = build_for_memory(params, device)
        prec, used = _measure_meta(model, params, device, precisions, check), device
    except (NotImplementedError, RuntimeError) as e:
        if not _can_fall_back(e, device, fallback):
            raise
        model = build_for_memory(params, "cpu")
        prec, used = _measure_cpu_fallback(model, params, precisions, e), "cpu"
    n_params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    T, crop = int(params["data"]["num_frames"]), int(params["data"]["crop_size"])
    return {
        "shape_hash": shape_hash(params),
        "num_frames": T,
        "crop_size": crop,
        "depth": int(params["model"]["depth"]),
        "base_width": int(params["model"]["base_width"]),
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


def measure_for_plan(params: dict) -> dict:
    """An entry measured on the fly (no cache entry, or a stale one): the precision the params
    train in only, no cross-check."""
    return measure(params, precisions=(amp_precision(params),))


_plan.set_measurer(measure)
