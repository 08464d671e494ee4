"""Process-group setup for one CPU process, `torchrun` (one node, many GPUs) and Slurm
(`srun` with one task per GPU, or `srun torchrun ...`).

Rank sources, first match wins:
  RANK / WORLD_SIZE / LOCAL_RANK          (torchrun, or anything that sets them)
  SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID   (srun with one task per GPU)
Rendezvous: MASTER_ADDR / MASTER_PORT (env://). Under Slurm without MASTER_ADDR the first host
of SLURM_JOB_NODELIST (via `scontrol show hostnames`) or SLURM_LAUNCH_NODE_IPADDR is used, and
MASTER_PORT defaults to 29500 + (SLURM_JOB_ID % 1000).
Backend: NCCL when CUDA is available, else gloo (the same code path on CPU).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    source: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(env=None) -> DistInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), source="torchrun"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return DistInfo(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            source="slurm",
        )
    return DistInfo()


def _slurm_master_addr(env) -> str | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return env.get("SLURM_LAUNCH_NODE_IPADDR")


def setup(device_arg: str | None = None) -> tuple[DistInfo, torch.device]:
    """Initialise the process group if the environment asks for more than one process.

    Returns (DistInfo, device). Device: `device_arg` if given, else cuda:LOCAL_RANK when CUDA is
    available, else cpu."""
    info = env_ranks()
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not info.distributed:
        return info, device
    if info.source == "slurm":
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        if "MASTER_ADDR" not in os.environ:
            addr = _slurm_master_addr(os.environ)
            if not addr:
                raise RuntimeError(
                    "Slurm multi-task run without MASTER_ADDR and no usable "
                    "SLURM_JOB_NODELIST: export MASTER_ADDR (the first node)"
                )
            os.environ["MASTER_ADDR"] = addr
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 1000))
    info.backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=info.backend, init_method="env://", rank=info.rank, world_size=info.world_size
        )
    return info, device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if the flag is set on any process (e.g. a stop signal seen by one rank)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
