"""Model size and compute: parameter count and multiply-accumulates (MACs).

Convention (the paper's, fvcore's): one fused multiply-add = one "flop"; counted per view (one
clip of T×crop×crop), conv + linear layers plus the NonLocal attention matrix products, nothing
else (no BN, pooling, activations, element-wise products). Counted with
``torch.utils.flop_counter.FlopCounterMode`` (its FLOPs / 2) on a model built on the ``meta``
device, so no memory is allocated and no weights are initialised for real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from smallbig.config import ParamsError, experiment_path, load_params
from smallbig.models.resnet import build_model, model_spec
from smallbig.spec.params import ModelSpec, Params
from smallbig.spec.protocol import Protocol

# The paper's figures (params in millions, GFlops = GMACs per view, × views), with their source.
PAPER: dict[str, dict] = {
    "k400-r23-c2d": {"params_m": 11.3, "gflops": 17, "source": "Tables 6, 7 (R23 row)"},
    "k400-r23-sb-full": {"params_m": 13.4, "gflops": 31, "source": "Tables 6, 7 (SmallBig-R23 Full)"},
    "k400-r23-sb-full-avgpool": {"params_m": 13.4, "gflops": 31, "source": "Table 6 (Avg Pool)"},
    "k400-r23-sb-full-noshare": {"params_m": 22.1, "gflops": 31, "source": "Table 6 (Without Share)"},
    "k400-r23-sb-full-singlebn": {"params_m": 13.3, "gflops": 17, "source": "Table 6 (Single BN)"},
    "k400-r23-nonlocal": {"params_m": 18.7, "gflops": 34, "source": "Table 7 (NonLocal-R23)"},
    "k400-r50-c2d": {"gflops": 33, "source": "Table 10 (R50 8-frame baselines TSM/TEI: 33)"},
    "k400-r50-sb-full": {
        "gflops": 57,
        "gflops_x_views": 1710,
        "views": 30,
        "source": "Table 10 (SmallBig R50, 57 x 30)",
    },
    "k400-r101-sb-typical-32f": {
        "gflops": 418,
        "gflops_x_views": 5016,
        "views": 12,
        "source": "Table 10 (SmallBig R101, 418 x 12)",
    },
    "sthv1-r50-sb-8f": {"gflops": 52, "source": "Table 11 (SmallBig R50, 8 frames)"},
    "sthv2-r50-sb-8f": {"gflops": 52, "source": "Table 11 (SmallBig R50, 8 frames)"},
    "sthv1-r50-sb-16f": {"gflops": 105, "source": "Table 11 (SmallBig R50, 16 frames)"},
    "sthv2-r50-sb-16f": {"gflops": 105, "source": "Table 11 (SmallBig R50, 16 frames)"},
}

# Sizes measured on the authors' released code (../shared/design/model-spec.md, "Measured
# sizes"), for the configurations that are the same as ours.
AUTHORS_CODE: dict[str, dict] = {
    "k400-r23-c2d": {"params_m": 11.35, "gmacs": 16.98},
    "k400-r23-sb-typical": {"params_m": 11.37, "gmacs": 26.53},
    "k400-r23-sb-full": {"params_m": 13.25, "gmacs": 31.47},
    "k400-r50-c2d": {"params_m": 24.33, "gmacs": 32.70},
    "k400-r50-sb-full": {"params_m": 32.29, "gmacs": 62.66},
    "k400-r101-sb-typical-32f": {"params_m": 43.41, "gmacs": 416.36},
}

PAPER_TOLERANCE = 0.02  # flag differences from the paper above 2 %


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, num_frames: int, crop: int, batch: int = 1) -> int:
    """MACs of one forward pass on ``[batch, 3, num_frames, crop, crop]`` (eval mode)."""
    device = next(model.parameters()).device
    x = torch.empty(batch, 3, num_frames, crop, crop, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def build_meta_model(model: ModelSpec | Mapping[str, Any]) -> torch.nn.Module:
    """The configured model on the meta device (no memory; `build_model` never loads weights)."""
    spec = model_spec(model)
    with torch.device("meta"):
        return build_model(spec)


def primary_protocol(params: Params | Mapping[str, Any]) -> tuple[Protocol, int]:
    """The params' first test protocol and its crop size."""
    p = Params.from_dict(params)
    return p.primary_protocol, p.primary_protocol.crop_size(p.test)


def _pct(ours: float, ref: float) -> float:
    return 100.0 * (ours - ref) / ref


_IGNORED_MODEL_KEYS = ("pretrained", "formulation", "dropout")


def is_paper_configuration(params: Params | Mapping[str, Any]) -> bool:
    """True when the params' model and frame count are those of the experiment's own file
    (not scaled down by an overlay), so that the paper's figures apply."""
    p = Params.from_dict(params)
    try:
        own = Params.from_dict(load_params(experiment_path(p.id)))
    except ParamsError:
        return False

    def strip(m: ModelSpec) -> ModelSpec:
        ignored: dict[str, Any] = dict.fromkeys(_IGNORED_MODEL_KEYS)
        return dataclasses.replace(m, **ignored)

    return strip(own.model) == strip(p.model) and own.data.num_frames == p.data.num_frames


def model_info(params: Params | Mapping[str, Any], model: torch.nn.Module | None = None) -> dict:
    """Size and compute of the params' model.

    Keys: ``id``, ``params`` (int), ``params_m``, ``num_frames``, ``gmacs_224`` (per view, T
    from the params), ``test_crop``, ``gmacs_test_crop`` (per view at the primary protocol's
    crop), ``protocol``, ``views``, ``gflops_x_views`` (gmacs_224 × views: the paper's
    convention, Table 10), ``gflops_x_views_test_crop`` (what the test really costs),
    ``paper`` / ``authors_code`` (figures or None; None too when an overlay scaled the model
    down, ``paper_comparable`` False), ``diff_pct`` and ``flags`` (differences from the paper
    above 2 %)."""
    p = Params.from_dict(params)
    model = model if model is not None else build_meta_model(p.model)
    T = p.data.num_frames
    proto, crop = primary_protocol(p)
    n_params = count_params(model)
    gmacs_224 = count_macs(model, T, 224) / 1e9
    gmacs_crop = gmacs_224 if crop == 224 else count_macs(model, T, crop) / 1e9
    views = proto.views
    exp_id = p.id
    comparable = is_paper_configuration(p)
    paper = PAPER.get(exp_id) if comparable else None
    authors = AUTHORS_CODE.get(exp_id) if comparable else None
    diff: dict[str, float] = {}
    flags: list[str] = []
    if paper:
        if "params_m" in paper:
            diff["params_vs_paper"] = _pct(n_params / 1e6, paper["params_m"])
        if "gflops" in paper:
            diff["gflops_vs_paper"] = _pct(gmacs_224, paper["gflops"])
        for key, pct in diff.items():
            if abs(pct) > 100 * PAPER_TOLERANCE:
                what = "params" if key.startswith("params") else "GFlops"
                flags.append(f"{what} {pct:+.1f}% vs paper")
    if authors:
        diff["params_vs_authors_code"] = _pct(n_params / 1e6, authors["params_m"])
        diff["gmacs_vs_authors_code"] = _pct(gmacs_224, authors["gmacs"])
    return {
        "id": exp_id,
        "params": int(n_params),
        "params_m": round(n_params / 1e6, 3),
        "num_frames": T,
        "gmacs_224": round(gmacs_224, 3),
        "test_crop": crop,
        "gmacs_test_crop": round(gmacs_crop, 3),
        "protocol": proto.name,
        "views": views,
        "gflops_x_views": round(gmacs_224 * views, 1),
        "gflops_x_views_test_crop": round(gmacs_crop * views, 1),
        "paper_comparable": comparable,
        "paper": paper,
        "authors_code": authors,
        "diff_pct": {k: round(v, 2) for k, v in diff.items()},
        "flags": flags,
    }


def _fmt(v, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)


def info_table(infos: list[dict]) -> str:
    """Markdown table: ours beside the paper's (and the authors' code where measured)."""
    head = (
        "| experiment | params M | paper M | GMACs 224 | paper GFlops | authors' code M / GMACs "
        "| test crop GMACs | views | GFlops×views | paper ×views | differences > 2% |"
    )
    lines = [head, "|" + "---|" * 11]
    for i in infos:
        p = i["paper"] or {}
        a = i["authors_code"]
        authors = f"{a['params_m']:.2f} / {a['gmacs']:.2f}" if a else "–"
        lines.append(
            f"| {i['id']} | {i['params_m']:.2f} | {_fmt(p.get('params_m'))} | {i['gmacs_224']:.2f} "
            f"| {_fmt(p.get('gflops'))} | {authors} "
            f"| {i['gmacs_test_crop']:.2f} ({i['test_crop']}²) | {i['views']} ({i['protocol']}) "
            f"| {i['gflops_x_views']:.0f} | {_fmt(p.get('gflops_x_views'))} "
            f"| {'; '.join(i['flags']) if i['flags'] else ''} |"
        )
    return "\n".join(lines)
