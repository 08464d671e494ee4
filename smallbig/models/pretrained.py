"""ImageNet initialisation from a local torchvision-format 2-D ResNet state dict.

Which file a training loads (a name declared under `pretrained_weights:` in the params, verified,
a path, or `none`) is decided by ``smallbig.models.weights.resolve_pretrained``; the engine loads
it for a fresh run only (``build_model`` never loads weights).

Rules (``../shared/design/model-spec.md``):
- 2-D kernels ``[O, I, kh, kw]`` become ``[O, I, 1, kh, kw]``; a temporal kernel (3×1×1) is
  inflated: repeated over time and divided by kt (so a clip of identical frames gives the 2-D
  net's activations away from the temporal borders).
- R23 takes the first 1/2/3/1 blocks of each ResNet-50 stage; R50 loads R50; R101 loads R101
  (the source depth is read from the number of ``layer3`` blocks; a mismatch is refused).
- SmallBig units: the shared conv and the small-view BN come from the 2-D conv/BN; a separate
  big-view conv (``share: false``) is initialised with the same 2-D kernel; the big-view BN keeps
  its zero initialisation. Extra units, NonLocal blocks are new (left as initialised).
- The classifier is copied only when its shape matches (e.g. not 1000 ImageNet classes -> 400).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from smallbig.fsutil import not_regular
from smallbig.models.resnet import VideoResNet
from smallbig.models.weights import SOURCE_DEPTH, PretrainedError

log = logging.getLogger("smallbig.models")

# blocks of layer1..layer4 by torchvision depth
_SOURCE_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_REQUIRED_SOURCE = SOURCE_DEPTH  # R23 and R50 load ResNet-50, R101 loads ResNet-101

__all__ = ["PretrainedError", "load_pretrained_2d", "source_depth"]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    kind = not_regular(path)
    if kind and kind.startswith("missing"):
        raise PretrainedError(f"{path}: pretrained weights file not found")
    if kind:
        raise PretrainedError(f"{path}: is {kind}, not a weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise PretrainedError(f"{path}: cannot read a torch state dict: {e}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def source_depth(sd: dict[str, torch.Tensor], path: Any = "<state dict>") -> int:
    """Depth of a torchvision ResNet state dict, from its block counts (bottleneck only)."""
    counts: list[int] = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        counts.append(len(idx))
    if not any(k.endswith("conv3.weight") for k in sd):
        raise PretrainedError(
            f"{path}: not a bottleneck ResNet state dict (no conv3 weights; "
            f"block counts {counts}); need torchvision ResNet-50 or ResNet-101"
        )
    depth = _SOURCE_DEPTHS.get((counts[0], counts[1], counts[2], counts[3]))
    if depth is None:
        raise PretrainedError(f"{path}: unrecognised ResNet layout, blocks per stage {counts}")
    return depth


def _convert(name: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """2-D -> 3-D kernel (1×k×k, or inflated kt×1×1 by repeat / kt); other tensors as they are."""
    if dst.dim() == 5 and src.dim() == 4:
        kt = dst.shape[2]
        src = src.unsqueeze(2)
        if kt > 1:
            src = src.repeat(1, 1, kt, 1, 1) / kt
    if src.shape != dst.shape:
        raise PretrainedError(
            f"{name}: shape {tuple(src.shape)} in the file, the model needs "
            f"{tuple(dst.shape)} (base_width or depth mismatch?)"
        )
    return src


def _target_names(model_key: str) -> str:
    """Our key -> torchvision key (None when the parameter has no 2-D counterpart)."""
    k = model_key
    k = re.sub(r"^stem\.conv\.", "conv1.", k)
    k = re.sub(r"^stem\.bn\.", "bn1.", k)
    k = re.sub(r"^head\.fc\.", "fc.", k)
    m = re.match(r"^res([2-5])\.(\d+)\.(.*)$", k)
    if m:
        layer = int(m.group(1)) - 1
        rest = m.group(3)
        rest = re.sub(r"^(conv[123])\.(conv|conv_big)\.", lambda mm: f"{mm.group(1)}.", rest)
        rest = re.sub(r"^conv([123])\.bn\.", r"bn\1.", rest)
        rest = re.sub(r"^downsample\.conv\.", "downsample.0.", rest)
        rest = re.sub(r"^downsample\.bn\.", "downsample.1.", rest)
        k = f"layer{layer}.{m.group(2)}.{rest}"
    return k


def load_pretrained_2d(model: VideoResNet, path: str | Path, strict_depth: bool = True) -> dict:
    """Initialise ``model`` from a torchvision-format ResNet-50/101 state dict file.

    Returns (and logs) a summary: ``loaded`` (number of model tensors set), ``new`` (model
    tensors with no 2-D counterpart, left as initialised: big-view BNs, extra units, NonLocal),
    ``skipped`` (in both, but not copied: the classifier when its shape differs), ``unused``
    (file tensors not used, e.g. the later blocks of each R50 stage for R23), ``source_depth``.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    depth = model.depth
    src_depth = source_depth(sd, path)
    if strict_depth and src_depth != _REQUIRED_SOURCE[depth]:
        raise PretrainedError(
            f"{path}: a ResNet-{src_depth} state dict, but the model is R{depth}, which loads "
            f"ResNet-{_REQUIRED_SOURCE[depth]} weights (R23 takes the first blocks of each ResNet-50 stage)"
        )
    own = model.state_dict()
    used: set[str] = set()
    loaded, new, skipped = [], [], []
    with torch.no_grad():
        for key, dst in own.items():
            src_key = _target_names(key)
            if ".bn_big." in key or src_key not in sd:
                new.append(key)
                continue
            src = sd[src_key]
            if key.startswith("head.fc.") and src.shape != dst.shape:
                skipped.append(f"{key} (file {tuple(src.shape)}, model {tuple(dst.shape)})")
                used.add(src_key)
                continue
            value = _convert(f"{path}: {src_key} -> {key}", src, dst)
            dst.copy_(value.to(dst.dtype))
            used.add(src_key)
            loaded.append(key)
    unused = sorted(set(sd) - used)
    summary = {
        "file": str(path),
        "source_depth": src_depth,
        "loaded": len(loaded),
        "new": new,
        "skipped": skipped,
        "unused": unused,
    }
    log.info(
        "pretrained %s (ResNet-%d): %d tensors loaded, %d new in the video net (e.g. %s), "
        "%d skipped %s, %d unused in the file",
        path,
        src_depth,
        len(loaded),
        len(new),
        ", ".join(sorted({re.sub(r"^res\d\.\d+\.", "", k).split(".")[0] for k in new})[:6]) or "-",
        len(skipped),
        skipped,
        len(unused),
    )
    return summary
