"""smallbig.models: the video ResNets of the paper (C2D, 3x1x1, SmallBig, NonLocal, SlowOnly).

Contract (docs/architecture.md, section Models): ``build_model(params["model"])``,
``feature_maps(model, x)``, ``model_info(params)``, ``load_pretrained_2d(model, path)``.
"""
from smallbig.models.resnet import (VideoResNet, build_model, feature_maps, normalize_model_cfg,
                                    set_channels_last, set_formulation)


def model_info(params: dict, **kwargs) -> dict:
    from smallbig.models.info import model_info as _model_info
    return _model_info(params, **kwargs)


def load_pretrained_2d(model, path, **kwargs) -> dict:
    from smallbig.models.pretrained import load_pretrained_2d as _load
    return _load(model, path, **kwargs)


__all__ = ["VideoResNet", "build_model", "feature_maps", "model_info", "load_pretrained_2d",
           "normalize_model_cfg", "set_formulation", "set_channels_last"]
