"""smallbig.models: the video ResNets of the paper (C2D, 3x1x1, SmallBig, NonLocal, SlowOnly).

Contract (docs/architecture.md, section Models): ``build_model(spec)`` (a ModelSpec or the
params' ``model`` mapping),
``feature_maps(model, x)``, ``model_info(params)``, ``load_pretrained_2d(model, path)``.
Imported lazily (PEP 562), so the `smallbig` CLI does not load torch for light subcommands.
"""

from __future__ import annotations

_RESNET = {"VideoResNet", "build_model", "feature_maps", "model_spec", "set_channels_last", "set_formulation"}
__all__ = sorted(_RESNET | {"model_info", "load_pretrained_2d"})


def __getattr__(name: str):
    if name in _RESNET:
        from smallbig.models import resnet

        return getattr(resnet, name)
    raise AttributeError(f"module 'smallbig.models' has no attribute {name!r}")


def model_info(params: dict, **kwargs) -> dict:
    from smallbig.models.info import model_info as _model_info

    return _model_info(params, **kwargs)


def load_pretrained_2d(model, path, **kwargs) -> dict:
    from smallbig.models.pretrained import load_pretrained_2d as _load

    return _load(model, path, **kwargs)
