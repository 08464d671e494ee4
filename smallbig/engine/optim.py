"""The paper's optimisation recipe from `params.train`: SGD with momentum, weight decay
(optionally not on BN weights and biases), per-iteration cosine or step decay at epochs,
optional linear warmup, and the total-batch policy (gradient accumulation or linear LR scaling).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from smallbig.errors import InputError
from smallbig.spec.params import TrainSpec


class BatchPolicyError(InputError):
    """The total batch cannot be realised on this machine as params ask. Exit 2."""


def _train_spec(train_cfg: TrainSpec | dict) -> TrainSpec:
    """`params.train` typed (a mapping: what it leaves out comes from params/base.yaml)."""
    return train_cfg if isinstance(train_cfg, TrainSpec) else TrainSpec.from_dict(train_cfg)


@dataclass
class BatchPlan:
    """How the paper's total batch is realised on this machine. Recorded in every run."""

    policy: str  # accumulate | scale_lr
    world_size: int
    per_gpu_batch: int  # micro-batch per process and step
    accum_steps: int  # micro-batches per optimizer step (per process)
    total_batch: int  # clips per optimizer step, all processes
    paper_batch: int  # params.train.batch_size
    base_lr: float  # params.train.lr (for paper_batch)
    lr: float  # the LR actually used

    def as_dict(self) -> dict:
        return asdict(self)


def plan_batch(train_cfg: TrainSpec | dict, world_size: int) -> BatchPlan:
    """Accumulate: total = per_gpu_batch * world * k must equal batch_size exactly (else an
    error: never a silent change of batch). scale_lr: one micro-batch per step, LR scaled by
    (per_gpu_batch * world) / batch_size."""
    tr = _train_spec(train_cfg)
    paper, per, policy, base_lr = tr.batch_size, tr.per_gpu_batch, tr.batch_policy, tr.lr
    if policy == "accumulate":
        per_step = per * world_size
        if per_step > paper:
            raise BatchPolicyError(
                f"train.per_gpu_batch {per} x {world_size} process(es) = {per_step} exceeds "
                f"train.batch_size {paper}; lower per_gpu_batch or use batch_policy: scale_lr"
            )
        if paper % per_step:
            raise BatchPolicyError(
                f"train.batch_size {paper} is not a multiple of per_gpu_batch {per} x "
                f"{world_size} process(es) = {per_step}: gradient accumulation cannot keep the "
                f"total batch exactly; change per_gpu_batch or use batch_policy: scale_lr"
            )
        k = paper // per_step
        return BatchPlan(policy, world_size, per, k, paper, paper, base_lr, base_lr)
    if policy == "scale_lr":
        total = per * world_size
        return BatchPlan(policy, world_size, per, 1, total, paper, base_lr, base_lr * total / paper)
    raise BatchPolicyError(f"train.batch_policy: unknown policy {policy!r}")


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_bn_bias: bool) -> list[dict]:
    """One group with weight decay; with exclude_bn_bias, BN/other 1-D params and biases get 0."""
    if not exclude_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train_cfg: TrainSpec | dict, lr: float) -> torch.optim.SGD:
    tr = _train_spec(train_cfg)
    groups = param_groups(model, tr.weight_decay, tr.wd_exclude_bn_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=tr.momentum)


class LRFactor:
    """LR multiplier as a function of the optimizer-step index (picklable for checkpoints).

    cosine: 0.5 * (1 + cos(pi * t / T)) per iteration over all iterations after warmup;
    step:   gamma ** (number of `lr_steps` epochs reached), evaluated per iteration from the
            epoch the iteration belongs to (= stepping at epoch boundaries);
    warmup: linear from 1/warmup_iters to 1 over the first warmup_epochs * iters_per_epoch steps.
    """

    def __init__(
        self,
        schedule: str,
        iters_per_epoch: int,
        epochs: int,
        lr_steps=(),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
    ):
        if schedule not in ("cosine", "step"):
            raise InputError(f"train.schedule: unknown schedule {schedule!r}")
        self.schedule = schedule
        self.iters_per_epoch = int(iters_per_epoch)
        self.total_iters = int(iters_per_epoch * epochs)
        self.lr_steps = [int(s) for s in lr_steps]
        self.gamma = float(gamma)
        self.warmup_iters = int(round(warmup_epochs * iters_per_epoch))

    def __call__(self, it: int) -> float:
        if self.warmup_iters and it < self.warmup_iters:
            warm = (it + 1) / self.warmup_iters
        else:
            warm = 1.0
        if self.schedule == "cosine":
            span = max(1, self.total_iters - self.warmup_iters)
            t = min(max(it - self.warmup_iters, 0), span)
            decay = 0.5 * (1.0 + math.cos(math.pi * t / span))
        else:
            epoch = it // max(1, self.iters_per_epoch)
            decay = self.gamma ** sum(epoch >= s for s in self.lr_steps)
        return warm * decay


def build_scheduler(optimizer, train_cfg: TrainSpec | dict, iters_per_epoch: int):
    tr = _train_spec(train_cfg)
    factor = LRFactor(
        tr.schedule, iters_per_epoch, tr.epochs, list(tr.lr_steps), tr.lr_gamma, tr.warmup_epochs
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
