"""Video ResNets (C2D, 3×1×1, SlowOnly, SmallBig, NonLocal) built from the params' model section.

``build_model(params["model"])`` returns a :class:`VideoResNet`: ``stem`` -> ``res2`` .. ``res5``
(``nn.Sequential`` of :class:`Bottleneck` blocks) -> ``head``. No temporal stride anywhere; the
global temporal pooling of ``T×k×k`` units is computed from the input, so any T works.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallbig.models.layers import (BatchNorm, ConvBN, ExtraUnit, NonLocal, SimpleExtraUnit,
                                    SmallBigUnit, _check_pool, to_frames, from_frames)

STAGES = ("res2", "res3", "res4", "res5")
DEPTHS: dict[int, tuple[int, int, int, int]] = {23: (1, 2, 3, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4
BLOCK_KINDS = ("2d", "3d", "smallbig")
EXTRA_KINDS = ("none", "default", "simple")
CONVS = ("conv1", "conv2", "conv3")
MODEL_KEYS = {"depth", "base_width", "num_classes", "dropout", "pretrained", "formulation", "unit", "stages"}
UNIT_DEFAULTS = {"pool": "max", "share": True, "bn": "individual"}


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
            from smallbig.models.layers import fold_bn
            wf, bf = fold_bn(w, self.bn)
            f = F.conv2d(f, wf, bf, 2, 3)
        else:
            f = self.bn(F.conv2d(f, w, None, 2, 3))
        f = F.max_pool2d(F.relu(f), 3, stride=2, padding=1)
        return from_frames(f, n, t)


class Head(nn.Module):
    """Global average pool over T×H×W -> dropout (optional) -> linear."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0,
                 efficient: bool = True) -> None:
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

    def __init__(self, cin: int, planes: int, stride: int, kind: str = "2d",
                 smallbig: Optional[dict] = None, extra: str = "none", nonlocal_: bool = False,
                 unit: Optional[dict] = None, efficient: bool = True) -> None:
        super().__init__()
        unit = {**UNIT_DEFAULTS, **(unit or {})}
        smallbig = smallbig or {}
        cout = planes * EXPANSION
        if extra == "default":
            self.extra = ExtraUnit(cin, efficient, share=unit["share"])
        elif extra == "simple":
            self.extra = SimpleExtraUnit(cin, efficient)
        specs = {  # name: (cin, cout, kernel, stride)
            "conv1": (cin, planes, (3 if kind == "3d" else 1, 1, 1), 1),
            "conv2": (planes, planes, (1, 3, 3), stride),
            "conv3": (planes, cout, (1, 1, 1), 1),
        }
        for name, (ci, co, kernel, s) in specs.items():
            if name in smallbig:
                layer: nn.Module = SmallBigUnit(ci, co, kernel, s, smallbig[name], unit["pool"],
                                                unit["share"], unit["bn"], efficient)
            else:
                layer = ConvBN(ci, co, kernel, s, efficient)
            setattr(self, name, layer)
        if stride != 1 or cin != cout:
            self.downsample = ConvBN(cin, cout, (1, 1, 1), stride, efficient)
        if nonlocal_:
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

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        efficient = cfg["formulation"] == "efficient"
        base = cfg["base_width"]
        self.stem = Stem(base, efficient)
        cin = base
        for i, name in enumerate(STAGES):
            st = cfg["stages"][name]
            planes = base * 2 ** i
            blocks = []
            for j in range(DEPTHS[cfg["depth"]][i]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(cin, planes, stride, st["block"], st.get("smallbig"),
                                         st.get("extra", "none"), bool(st.get("nonlocal", False)),
                                         cfg["unit"], efficient))
                cin = planes * EXPANSION
            setattr(self, name, nn.Sequential(*blocks))
        self.head = Head(cin, cfg["num_classes"], cfg["dropout"], efficient)
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
            m.efficient = formulation == "efficient"
    if isinstance(model, VideoResNet):
        model.cfg["formulation"] = formulation
    return model


def set_channels_last(model: VideoResNet, on: bool = True) -> VideoResNet:
    """Efficient formulation: run the per-frame 2-D convs in channels-last memory format."""
    model.stem.channels_last = on
    return model


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalize_model_cfg(cfg: Any) -> dict:
    """Check a model config dict (the params' ``model`` section) and fill in defaults.
    Raises ValueError naming the key and the problem."""
    if not isinstance(cfg, dict):
        raise ValueError(f"model config: expected a mapping, got {type(cfg).__name__}")
    unknown = set(cfg) - MODEL_KEYS
    if unknown:
        raise ValueError(f"model config: unknown key(s) {sorted(unknown)} (known: {sorted(MODEL_KEYS)})")
    out = copy.deepcopy(cfg)
    for key in ("depth", "stages"):
        if key not in out:
            raise ValueError(f"model config: missing required key {key!r}")
    if out["depth"] not in DEPTHS or not _is_int(out["depth"]):
        raise ValueError(f"model.depth: must be one of {sorted(DEPTHS)}, got {out['depth']!r}")
    out.setdefault("base_width", 64)
    out.setdefault("num_classes", 400)
    out.setdefault("dropout", 0.0)
    out.setdefault("pretrained", None)
    out.setdefault("formulation", "efficient")
    for key in ("base_width", "num_classes"):
        if not _is_int(out[key]) or out[key] < 1:
            raise ValueError(f"model.{key}: must be an integer >= 1, got {out[key]!r}")
    d = out["dropout"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise ValueError(f"model.dropout: must be a number in [0, 1), got {d!r}")
    if out["formulation"] not in ("efficient", "reference"):
        raise ValueError(f"model.formulation: must be 'efficient' or 'reference', got {out['formulation']!r}")
    if out["pretrained"] is not None and not isinstance(out["pretrained"], str):
        raise ValueError(f"model.pretrained: must be a declared name, a path or 'none', got {out['pretrained']!r}")
    unit = out.get("unit") or {}
    if not isinstance(unit, dict):
        raise ValueError(f"model.unit: expected a mapping, got {unit!r}")
    bad = set(unit) - set(UNIT_DEFAULTS)
    if bad:
        raise ValueError(f"model.unit: unknown key(s) {sorted(bad)} (known: pool, share, bn)")
    unit = {**UNIT_DEFAULTS, **unit}
    if unit["pool"] not in ("max", "avg"):
        raise ValueError(f"model.unit.pool: must be 'max' or 'avg', got {unit['pool']!r}")
    if not isinstance(unit["share"], bool):
        raise ValueError(f"model.unit.share: must be true or false, got {unit['share']!r}")
    if unit["bn"] not in ("individual", "single"):
        raise ValueError(f"model.unit.bn: must be 'individual' or 'single', got {unit['bn']!r}")
    out["unit"] = unit
    stages = out["stages"]
    if not isinstance(stages, dict):
        raise ValueError(f"model.stages: expected a mapping of res2..res5, got {stages!r}")
    bad = set(stages) - set(STAGES)
    if bad:
        raise ValueError(f"model.stages: unknown stage name(s) {sorted(bad)} (stages are {', '.join(STAGES)})")
    for name in STAGES:
        if name not in stages:
            raise ValueError(f"model.stages: missing stage {name!r}")
        st = stages[name]
        key = f"model.stages.{name}"
        if not isinstance(st, dict):
            raise ValueError(f"{key}: expected a mapping with 'block', got {st!r}")
        bad = set(st) - {"block", "smallbig", "extra", "nonlocal"}
        if bad:
            raise ValueError(f"{key}: unknown key(s) {sorted(bad)} (known: block, smallbig, extra, nonlocal)")
        if st.get("block") not in BLOCK_KINDS:
            raise ValueError(f"{key}.block: must be one of {list(BLOCK_KINDS)}, got {st.get('block')!r}")
        sb = st.get("smallbig")
        if st["block"] == "smallbig":
            if not isinstance(sb, dict) or not sb:
                raise ValueError(f"{key}.smallbig: block 'smallbig' needs a mapping of conv1/conv2/conv3 to pooling [kt, kh, kw]")
            bad = set(sb) - set(CONVS)
            if bad:
                raise ValueError(f"{key}.smallbig: unknown conv(s) {sorted(bad)} (known: conv1, conv2, conv3)")
            for conv, pool in sb.items():
                try:
                    _check_pool(pool)
                except ValueError as e:
                    raise ValueError(f"{key}.smallbig.{conv}: {e}") from None
        elif sb:
            raise ValueError(f"{key}.smallbig: given, but the stage's block is {st['block']!r} (needs 'smallbig')")
        if st.get("extra", "none") not in EXTRA_KINDS:
            raise ValueError(f"{key}.extra: must be one of {list(EXTRA_KINDS)}, got {st.get('extra')!r}")
        if not isinstance(st.get("nonlocal", False), bool):
            raise ValueError(f"{key}.nonlocal: must be true or false, got {st.get('nonlocal')!r}")
    return out


def build_model(model_cfg: dict) -> VideoResNet:
    """Build the network of a params file's ``model`` section (see docs/models.md), freshly
    initialised. It never loads weights: ``pretrained`` (an ImageNet name, path or ``none``) is
    the engine's business, which loads it for a fresh training only
    (``smallbig.models.weights.resolve_pretrained`` + ``load_pretrained_2d``); evaluation and
    feature maps load trained checkpoints and need no ImageNet file."""
    return VideoResNet(normalize_model_cfg(model_cfg))


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
