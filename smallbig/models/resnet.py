"""Video ResNets (C2D, 3×1×1, SlowOnly, SmallBig, NonLocal) built from the params' model section.

``build_model(spec)`` returns a :class:`VideoResNet`: ``stem`` -> ``res2`` .. ``res5``
(``nn.Sequential`` of :class:`Bottleneck` blocks) -> ``head``. No temporal stride anywhere; the
global temporal pooling of ``T×k×k`` units is computed from the input, so any T works.

``spec`` is a :class:`~smallbig.spec.params.ModelSpec` (validated with the params) or the
``model`` mapping of a params file, which is checked once, by the params validation
(``smallbig.config.validate_model``), and completed from params/base.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallbig.config import validate_model
from smallbig.models import pooling
from smallbig.models.layers import (
    BatchNorm,
    ConvBN,
    ExtraUnit,
    NonLocal,
    SimpleExtraUnit,
    SmallBigUnit,
    fold_bn,
    from_frames,
    to_frames,
)
from smallbig.spec.params import ModelSpec, StageSpec, UnitSpec

STAGES = ("res2", "res3", "res4", "res5")
DEPTHS: dict[int, tuple[int, int, int, int]] = {23: (1, 2, 3, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


# --------------------------------------------------------------------------------------------
class Stem(nn.Module):
    """conv 1×7×7 stride (1,2,2) -> BN -> ReLU -> max-pool 1×3×3 stride (1,2,2)."""

    def __init__(self, width: int, efficient: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, width, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False)
        self.bn = BatchNorm(width)
        self.efficient = efficient
        self.channels_last = False  # efficient formulation: run the frames channels-last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.efficient:
            x = F.relu(self.bn(self.conv(x)))
            return F.max_pool3d(x, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        n, _, t = x.shape[:3]
        f = to_frames(x)
        if self.channels_last:
            f = f.contiguous(memory_format=torch.channels_last)
        w = self.conv.weight[:, :, 0]
        if not self.training:
            wf, bf = fold_bn(w, self.bn)
            f = F.conv2d(f, wf, bf, 2, 3)
        else:
            f = self.bn(F.conv2d(f, w, None, 2, 3))
        f = pooling.pool(F.relu(f), n, 1, 3, 3, 2, "max")  # 1×3×3 stride 2, pad 1
        return from_frames(f, n, t)


class Head(nn.Module):
    """Global average pool over T×H×W -> dropout (optional) -> linear."""

    def __init__(
        self, in_features: int, num_classes: int, dropout: float = 0.0, efficient: bool = True
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)
        self.efficient = efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.efficient:
            n, c, t = x.shape[:3]
            feat = to_frames(x).mean(dim=(2, 3)).reshape(n, t, c).mean(dim=1)
        else:
            feat = F.adaptive_avg_pool3d(x, 1).flatten(1)
        return self.fc(self.dropout(feat))


class Bottleneck(nn.Module):
    """Bottleneck 1×1 -> 1×3×3 (stride) -> 1×1 (×4), each conv a ConvBN or a SmallBigUnit.

    ``kind``: 2d (Fig. 2a), 3d (first conv 3×1×1, Fig. 2b), smallbig (``smallbig`` maps
    conv1/conv2/conv3 to the pooling of the units, Fig. 2c-f). ``extra`` (default/simple) is
    applied to the block input before the block (the shortcut sees it too); ``nonlocal_``
    adds a NonLocal block after the block's output.
    """

    conv1: nn.Module  # set by name below (ConvBN or SmallBigUnit)
    conv2: nn.Module
    conv3: nn.Module

    def __init__(
        self, cin: int, planes: int, stride: int, stage: StageSpec, unit: UnitSpec, efficient: bool = True
    ) -> None:
        super().__init__()
        kind, smallbig, extra = stage.block, stage.smallbig, stage.extra
        cout = planes * EXPANSION
        self.extra: nn.Module
        if extra == "default":
            self.extra = ExtraUnit(cin, efficient, share=unit.share)
        elif extra == "simple":
            self.extra = SimpleExtraUnit(cin, efficient)
        specs = {  # name: (cin, cout, kernel, stride)
            "conv1": (cin, planes, (3 if kind == "3d" else 1, 1, 1), 1),
            "conv2": (planes, planes, (1, 3, 3), stride),
            "conv3": (planes, cout, (1, 1, 1), 1),
        }
        for name, (ci, co, kernel, s) in specs.items():
            if name in smallbig:
                layer: nn.Module = SmallBigUnit(
                    ci, co, kernel, s, smallbig[name], unit.pool, unit.share, unit.bn, efficient
                )
            else:
                layer = ConvBN(ci, co, kernel, s, efficient)
            setattr(self, name, layer)
        if stride != 1 or cin != cout:
            self.downsample = ConvBN(cin, cout, (1, 1, 1), stride, efficient)
        if stage.nonlocal_:
            self.nonlocal_block = NonLocal(cout, efficient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "extra"):
            x = self.extra(x)
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.downsample(x) if hasattr(self, "downsample") else x
        out = F.relu(out + shortcut)
        if hasattr(self, "nonlocal_block"):
            out = self.nonlocal_block(out)
        return out


class VideoResNet(nn.Module):
    """Input [N, 3, T, H, W] float -> logits [N, num_classes]."""

    res2: nn.Sequential  # set by name in __init__
    res3: nn.Sequential
    res4: nn.Sequential
    res5: nn.Sequential

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        # plain values only: the spec's mapping proxies cannot be deep-copied or pickled
        self.depth = spec.depth
        efficient = spec.formulation == "efficient"
        base = spec.base_width
        self.stem = Stem(base, efficient)
        cin = base
        for i, name in enumerate(STAGES):
            planes = base * 2**i
            blocks = []
            for j in range(DEPTHS[spec.depth][i]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(cin, planes, stride, spec.stages[name], spec.unit, efficient))
                cin = planes * EXPANSION
            setattr(self, name, nn.Sequential(*blocks))
        self.head = Head(cin, spec.num_classes, spec.dropout, efficient)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) convs, BN gamma 1 / beta 0, except the zero-initialised
        big-view BNs, extra-unit BNs and NonLocal output BNs (identity at initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            zero = []
            if isinstance(m, SmallBigUnit) and hasattr(m, "bn_big"):
                zero.append(m.bn_big)
            if isinstance(m, (ExtraUnit, SimpleExtraUnit, NonLocal)):
                zero.append(m.bn)
            for bn in zero:
                nn.init.zeros_(bn.weight)
                nn.init.zeros_(bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"VideoResNet: expected input [N, 3, T, H, W], got {list(x.shape)}")
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
        return self.head(x)


# --------------------------------------------------------------------------------------------
def set_formulation(model: nn.Module, formulation: str) -> nn.Module:
    """Switch every module of a built model to 'efficient' or 'reference' (same weights)."""
    if formulation not in ("efficient", "reference"):
        raise ValueError(f"formulation must be 'efficient' or 'reference', got {formulation!r}")
    for m in model.modules():
        if hasattr(m, "efficient"):
            m.efficient = formulation == "efficient"  # type: ignore[assignment]
    return model


def set_channels_last(model: VideoResNet, on: bool = True) -> VideoResNet:
    """Efficient formulation: run the per-frame 2-D convs in channels-last memory format."""
    model.stem.channels_last = on
    return model


def model_spec(model: ModelSpec | Mapping[str, Any]) -> ModelSpec:
    """A params file's ``model`` section, typed: a ModelSpec as it is; a mapping (even a partial
    one) is checked by the params validation (ParamsError, a ValueError, naming the key) and
    completed from params/base.yaml."""
    if isinstance(model, ModelSpec):
        return model
    return ModelSpec.from_dict(validate_model(model))


def build_model(model: ModelSpec | Mapping[str, Any]) -> VideoResNet:
    """Build the network of a params file's ``model`` section (see docs/models.md), freshly
    initialised. It never loads weights: ``pretrained`` (an ImageNet name, path or ``none``) is
    the engine's business, which loads it for a fresh training only
    (``smallbig.models.weights.resolve_pretrained`` + ``load_pretrained_2d``); evaluation and
    feature maps load trained checkpoints and need no ImageNet file."""
    return VideoResNet(model_spec(model))


def smallbig_units(model: nn.Module) -> list[SmallBigUnit]:
    return [m for m in model.modules() if isinstance(m, SmallBigUnit)]


def feature_maps(model: VideoResNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` and return ``{"res3": [N,C,T,H,W]}`` plus, when the model has a
    SmallBig unit with individual BNs, ``"small_view"`` / ``"big_view"``: the two BN outputs of
    the first such unit before their sum (the big view broadcast over T for ``T×k×k``
    pooling). Tensors are detached; the caller chooses ``torch.no_grad()`` and train/eval."""
    out: dict[str, torch.Tensor] = {}
    units = [u for u in smallbig_units(model) if not u.single_bn]
    unit = units[0] if units else None

    def grab(_m, _inp, output):
        out["res3"] = output.detach().contiguous()

    handle = model.res3.register_forward_hook(grab)
    if unit is not None:
        unit.record, unit.recorded = True, None
    try:
        model(x)
    finally:
        handle.remove()
        if unit is not None:
            unit.record = False
    if unit is not None and unit.recorded is not None:
        out["small_view"] = unit.recorded[0].contiguous()
        out["big_view"] = unit.recorded[1].contiguous()
        unit.recorded = None
    return out
