"""Feature-map figures (paper Fig. 3) from real (tiny) SmallBig and NonLocal models saved as
checkpoints in the engine's format, on frame-folder validation videos."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from smallbig.analysis.featmaps import _upsample, channel_mean_maps, featmap_figure, write_featmaps
from smallbig.config import experiment_path, load_params, params_hash
from smallbig.models import build_model

T, CROP = 4, 64


def _params(exp_id, root, tmp_path):
    overlay = tmp_path / f"overlay-{exp_id}.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "model": {"base_width": 4, "num_classes": 3},
                    "data": {
                        "root": str(root),
                        "format": "frames",
                        "num_frames": T,
                        "frame_stride": 1,
                        "crop_size": CROP,
                    },
                    "test": {
                        "short_side": 72,
                        "single_crop_size": CROP,
                        "multi_crop_size": CROP,
                        "protocols": ["1x1"],
                    },
                }
            }
        )
    )
    return load_params(experiment_path(exp_id), overlay=overlay)


def _frames_dataset(root, n_videos=2, n_frames=8):
    rng = np.random.default_rng(0)
    lines = []
    for v in range(n_videos):
        d = root / "frames" / f"video{v}"
        d.mkdir(parents=True)
        for f in range(n_frames):
            img = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
            img[20:40, 10 + 5 * f : 30 + 5 * f] = 255  # a moving bright square
            Image.fromarray(img).save(d / f"img_{f + 1:05d}.jpg")
        lines.append(f"frames/video{v} {n_frames} {v % 3}")
    (root / "val.txt").write_text("\n".join(lines) + "\n")


def _checkpoint(params, path):
    torch.manual_seed(0)
    model = build_model(params["model"])
    # move the zero-initialised big-view BNs off zero so the big view is visible
    for name, p in model.named_parameters():
        if p.ndim == 1 and "weight" in name:
            with torch.no_grad():
                p.add_(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the engine's checkpoint keys (docs/architecture.md)
    torch.save(
        {
            "model": model.state_dict(),
            "params": params,
            "epoch": 1,
            "iteration": 1,
            "params_hash": params_hash(params),
        },
        path,
    )
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("featmaps")
    root = tmp / "data"
    _frames_dataset(root)
    run = tmp / "results" / "embedded"
    sb = _params("k400-r23-sb-full", root, tmp)
    nl = _params("k400-r23-nonlocal", root, tmp)
    sb_model = _checkpoint(sb, run / "k400-r23-sb-full" / "train" / "checkpoint.pt")
    _checkpoint(nl, run / "k400-r23-nonlocal" / "train" / "checkpoint.pt")
    return tmp, run, sb, sb_model


def test_channel_mean_maps_shapes(setup):
    _, _, params, model = setup
    x = torch.randn(1, 3, T, CROP, CROP)
    maps = channel_mean_maps(model.eval(), x)
    assert set(maps) == {"res3", "small_view", "big_view"}
    assert maps["res3"].shape == (T, CROP // 8, CROP // 8)  # res3 at stride 8, no temporal stride
    assert maps["small_view"].shape == maps["big_view"].shape
    assert not np.allclose(maps["small_view"], maps["big_view"])


def test_write_featmaps_from_checkpoints(setup):
    tmp, run, _, _ = setup
    out = tmp / "reports" / "figures"
    m = write_featmaps(run, out, num_videos=2)
    assert m["missing"] == []
    assert [f["video_id"] for f in m["figures"]] == ["video0", "video1"]
    for f in m["figures"]:
        assert (out / f["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f["svg"]).stat().st_size > 0
    assert json.loads((out / "featmaps.json").read_text()) == m


def test_missing_nonlocal_model_is_said_not_fatal(setup, tmp_path):
    tmp, run, _, _ = setup
    m = write_featmaps(run, tmp_path, nonlocal_id="k400-r23-no-such", num_videos=1)
    assert len(m["figures"]) == 1
    assert any("NonLocal: no checkpoint" in x for x in m["missing"])
    m = write_featmaps(tmp_path / "empty", tmp_path / "none", num_videos=1)
    assert m["figures"] == [] and len(m["missing"]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    m = write_featmaps(run, tmp_path / "bad", num_videos=1, nonlocal_ckpt=bad)
    assert any(x.startswith(f"NonLocal: {bad}: not a readable checkpoint") for x in m["missing"])


def test_overlay_figure_and_upsample():
    up = _upsample(np.array([[0.0, 1.0], [2.0, 3.0]]), 3, 3)
    assert up[0, 0] == 0.0 and up[2, 2] == 3.0 and up[1, 1] == pytest.approx(1.5)
    video = np.zeros((3, 8, 32, 32), np.uint8)
    fig = featmap_figure(video, [("a", np.random.rand(8, 4, 4)), ("b", "model not available")], "t")
    assert len(fig.axes) == 3 * 8
