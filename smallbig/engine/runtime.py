"""What training and evaluation share at run time: the engine's errors, AMP settings,
channels-last, turning a collated batch into model input, and small process facts (peak memory,
timestamps)."""

from __future__ import annotations

import resource
import time

import torch

from smallbig.errors import RunError
from smallbig.models import VideoResNet, set_channels_last


class TrainingError(RunError):
    """The training cannot go on (a setting this machine cannot run, a data set smaller than one
    step). Exit 1."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the message names the iteration. Exit 1."""


def amp_settings(amp: str | None, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """-> (autocast dtype or None, use GradScaler, effective amp string)."""
    if amp in (None, "none") or device.type != "cuda":
        return None, False, "none"
    if amp == "bf16":
        return torch.bfloat16, False, "bf16"
    if amp == "fp16":
        return torch.float16, True, "fp16"
    raise TrainingError(f"train.amp: unknown value {amp!r}")


def apply_channels_last(model: torch.nn.Module) -> bool:
    """Channels-last memory format. A smallbig VideoResNet (efficient formulation: 2-D convs
    over frame-major clips) switches its frames to channels-last itself (set_channels_last);
    -> False (feed inputs unchanged). Any other model: channels_last_3d weights, -> True (feed
    channels_last_3d inputs)."""
    if isinstance(model, VideoResNet):
        set_channels_last(model, True)
        return False
    model.to(memory_format=torch.channels_last_3d)
    return True


def to_input(batch_video: torch.Tensor, device, mean, std, normalize, channels_last: bool):
    """uint8 clips -> normalised float input on `device` (channels_last_3d if asked)."""
    x = batch_video.to(device, non_blocking=True)
    x = normalize(x, mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def batch_labels(batch: dict, device) -> torch.Tensor:
    y = batch["label"]
    if not torch.is_tensor(y):
        y = torch.as_tensor(y)
    return y.to(device, dtype=torch.long, non_blocking=True)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
