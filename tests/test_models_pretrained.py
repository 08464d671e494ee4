"""ImageNet initialisation: a tiny torchvision-format 2-D ResNet written here (no downloads, no
torchvision) makes the state-dict file; the video nets loaded from it reproduce its logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from smallbig.config import experiment_path, load_params
from smallbig.models import build_model, load_pretrained_2d
from smallbig.models.pretrained import PretrainedError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


WIDTH = 8


class Bottleneck2d(nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3×3), same parameter names."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet2d(nn.Module):
    def __init__(self, layers, width: int = WIDTH, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck2d(cin, width * 2**i, 2 if (i > 0 and j == 0) else 1))
                cin = width * 2**i * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def make_resnet2d(layers, num_classes=1000, seed=0) -> ResNet2d:
    torch.manual_seed(seed)
    net = ResNet2d(layers, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return net.eval()


R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    net = make_resnet2d(R50, num_classes=5)
    path = tmp_path_factory.mktemp("weights") / "resnet50-tiny.pth"
    torch.save(net.state_dict(), path)
    return net, path


def cfg_of(exp_id: str, **over) -> dict:
    cfg = copy.deepcopy(load_params(experiment_path(exp_id))["model"])
    cfg.update({"base_width": WIDTH, "num_classes": 5, **over})
    return cfg


def r23_from(net50: ResNet2d) -> ResNet2d:
    """The 2-D R23 that the video R23 should reproduce: the first 1/2/3/1 blocks per stage."""
    net = copy.deepcopy(net50)
    for i, n in enumerate((1, 2, 3, 1)):
        layer = getattr(net, f"layer{i + 1}")
        setattr(net, f"layer{i + 1}", nn.Sequential(*list(layer)[:n]))
    return net


@pytest.mark.parametrize(
    "exp_id", ["k400-r23-c2d", "k400-r23-sb-full", "k400-r23-sb311", "k400-r23-nonlocal"]
)
@pytest.mark.parametrize("formulation", ["efficient", "reference"])
def test_inflated_net_on_identical_frames_gives_2d_logits(r50_file, exp_id, formulation):
    """C2D (and, thanks to the zero-initialised big-view / extra / NonLocal BNs, every SmallBig
    variant) on a clip of T identical frames returns the 2-D ResNet's logits on that frame."""
    net50, path = r50_file
    net2d = r23_from(net50)
    video = build_model(cfg_of(exp_id, formulation=formulation))
    load_pretrained_2d(video, path)
    video.eval()
    frame = torch.randn(2, 3, 48, 48)
    clip = frame[:, :, None].expand(2, 3, 6, 48, 48).contiguous()
    with torch.no_grad():
        want = net2d(frame)
        got = video(clip)
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    if exp_id == "k400-r23-c2d":  # C2D in train mode too: batch statistics over identical frames
        net2d.train(), video.train()
        with torch.no_grad():
            torch.testing.assert_close(video(clip), net2d(frame), rtol=1e-5, atol=1e-5)


def test_inflated_311_equals_2d_away_from_temporal_borders(r50_file):
    """3×1×1 kernels inflated by mean (repeat / kt) with zero temporal padding: identical frames
    give the 2-D activations except within (number of 3×1×1 convs so far) frames of a border.
    R23-I3D has 7 blocks with a 3×1×1 conv: on 16 frames, frames 7 and 8 are exact."""
    net50, path = r50_file
    net2d = r23_from(net50)
    video = build_model(cfg_of("k400-r23-i3d311"))
    load_pretrained_2d(video, path)
    video.eval()
    assert video.res2[0].conv1.conv.weight.shape[2] == 3
    frame = torch.randn(1, 3, 48, 48)
    T = 16
    clip = frame[:, :, None].expand(1, 3, T, 48, 48).contiguous()
    with torch.no_grad():
        want = net2d.features(frame)  # [1, C, h, w]
        x = video.stem(clip)
        for s in ("res2", "res3", "res4", "res5"):
            x = getattr(video, s)(x)
    assert x.shape[2] == T
    for t in (7, 8):
        torch.testing.assert_close(x[:, :, t], want, rtol=1e-5, atol=1e-5)
    assert (x[:, :, 0] - want).abs().max() > 1e-3  # the border frames do see the zero padding
    w2d = net50.layer1[0].conv1.weight
    torch.testing.assert_close(video.res2[0].conv1.conv.weight, w2d[:, :, None].repeat(1, 1, 3, 1, 1) / 3)


def test_summary_and_key_mapping(r50_file):
    net50, path = r50_file
    model = build_model(cfg_of("k400-r23-sb-full-noshare", num_classes=7))
    summary = load_pretrained_2d(model, path)
    assert summary["source_depth"] == 50
    # every 2-D tensor of the first blocks is used; the later R50 blocks are not
    assert "layer1.1.conv1.weight" in summary["unused"] and "layer1.0.conv1.weight" not in summary["unused"]
    assert any(k.startswith("head.fc.weight") for k in summary["skipped"])  # 5 vs 7 classes
    assert any(".bn_big." in k for k in summary["new"]) and any(".extra." in k for k in summary["new"])
    torch.testing.assert_close(model.res3[1].conv2.conv.weight[:, :, 0], net50.layer2[1].conv2.weight)
    torch.testing.assert_close(model.res3[1].conv2.conv_big.weight[:, :, 0], net50.layer2[1].conv2.weight)
    torch.testing.assert_close(model.res3[0].conv2.bn.running_var, net50.layer2[0].bn2.running_var)
    torch.testing.assert_close(
        model.res4[0].downsample.conv.weight[:, :, 0, 0, 0], net50.layer3[0].downsample[0].weight[:, :, 0, 0]
    )
    torch.testing.assert_close(model.stem.bn.weight, net50.bn1.weight)
    assert model.res3[0].conv1.bn_big.weight.abs().sum() == 0


def test_classifier_loaded_when_shapes_match(r50_file):
    net50, path = r50_file
    model = build_model(cfg_of("k400-r50-c2d"))
    load_pretrained_2d(model, path)
    torch.testing.assert_close(model.head.fc.weight, net50.fc.weight)
    # R50 takes every block
    torch.testing.assert_close(model.res4[5].conv3.conv.weight[:, :, 0], net50.layer3[5].conv3.weight)


def test_r101_loads_r101_and_refuses_r50(tmp_path, r50_file):
    _, path50 = r50_file
    net101 = make_resnet2d(R101, num_classes=5, seed=3)
    path101 = tmp_path / "resnet101-tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net101.state_dict().items()}}, path101)
    model = build_model(cfg_of("k400-r101-sb-typical-32f"))
    summary = load_pretrained_2d(model, path101)
    assert summary["source_depth"] == 101 and not summary["unused"]
    torch.testing.assert_close(model.res4[22].conv1.conv.weight[:, :, 0], net101.layer3[22].conv1.weight)
    with pytest.raises(PretrainedError, match="ResNet-50 state dict, but the model is R101"):
        load_pretrained_2d(build_model(cfg_of("k400-r101-sb-typical-32f")), path50)
    with pytest.raises(PretrainedError, match="ResNet-101 state dict, but the model is R23"):
        load_pretrained_2d(build_model(cfg_of("k400-r23-c2d")), path101)
    # R101 on identical frames = the 2-D R101
    video = build_model(cfg_of("k400-r101-sb-typical-32f"))
    load_pretrained_2d(video, path101)
    video.eval()
    frame = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        want = net101(frame)
        got = video(frame[:, :, None].expand(1, 3, 4, 48, 48).contiguous())
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_bad_files(tmp_path, r50_file):
    model = build_model(cfg_of("k400-r23-c2d"))
    with pytest.raises(PretrainedError, match="not found"):
        load_pretrained_2d(model, tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedError, match="cannot read"):
        load_pretrained_2d(model, junk)
    wide = build_model(cfg_of("k400-r23-c2d", base_width=16))
    with pytest.raises(PretrainedError, match="shape"):
        load_pretrained_2d(wide, r50_file[1])


def test_build_model_never_loads_weights(tmp_path, r50_file):
    """`pretrained` in the model config (a name, a path, `none`) is the engine's business: the
    model is built freshly initialised, whatever the value, and no file is opened."""
    net50, path = r50_file
    for value in ("torchvision-resnet50", str(path), str(tmp_path / "missing.pth"), "none", None):
        model = build_model(cfg_of("k400-r23-c2d", pretrained=value))
        assert not torch.equal(model.stem.conv.weight[:, :, 0], net50.conv1.weight), value
        assert torch.equal(model.stem.bn.running_mean, torch.zeros_like(model.stem.bn.running_mean)), value
    with pytest.raises(ValueError, match="model.pretrained"):
        build_model(cfg_of("k400-r23-c2d", pretrained=3))
