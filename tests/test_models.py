"""Model library: every params file builds and trains, any T, efficient == reference, zero init,
feature maps, clear errors on a bad model config. Small widths and inputs: fast on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from smallbig.config import experiment_ids, experiment_path, load_params
from smallbig.models import build_model, feature_maps, set_formulation
from smallbig.models.layers import SmallBigUnit, pool_frames, pool_reference, to_frames
from smallbig.models.resnet import STAGES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


IDS = experiment_ids()


def tiny_cfg(exp_id: str, base_width: int = 8, **over) -> dict:
    cfg = copy.deepcopy(load_params(experiment_path(exp_id))["model"])
    cfg.update(base_width=base_width, num_classes=5)
    cfg.update(over)
    return cfg


def plain_cfg(cfg: dict) -> dict:
    """The same network without SmallBig units, extra units or NonLocal blocks."""
    out = copy.deepcopy(cfg)
    for name in STAGES:
        st = out["stages"][name]
        out["stages"][name] = {"block": "2d" if st["block"] == "smallbig" else st["block"]}
    return out


def randomize_bn(model: torch.nn.Module, affine: bool = True) -> None:
    """Random running statistics (and affine parameters) so that eval mode is a real test."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


def test_all_experiments_listed():
    assert len(IDS) == 25


@pytest.mark.parametrize("exp_id", IDS)
def test_every_experiment_builds_and_trains(exp_id):
    """Every params file builds (at its own depth, small width) and does forward/backward."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(exp_id, base_width=4))
    assert model.stem.efficient, "efficient must be the default formulation"
    y = model(torch.randn(2, 3, 4, 32, 32))
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.fc.weight.grad.abs().sum() > 0


# one experiment per model option (depth 23: the blocks are the same at every depth)
OPTION_IDS = [
    "k400-r23-c2d",
    "k400-r23-i3d311",
    "k400-r23-sb311",
    "k400-r23-sbT33",
    "k400-r23-sb-full",
    "k400-r23-sb-full-avgpool",
    "k400-r23-sb-full-noshare",
    "k400-r23-sb-full-singlebn",
    "k400-r23-nonlocal",
    "k400-r50-sb-full-simple",
    "sthv1-r50-sb-8f",
]


@pytest.mark.parametrize("exp_id", OPTION_IDS)
def test_efficient_equals_reference_forward_and_grad(exp_id):
    """Forward and backward of the efficient formulation equal the reference (float64 so that
    the comparison is about the maths, not float32 rounding; a 48² crop so that no train-mode
    BN sees fewer than 8 values: BN over 2 values is ill-conditioned in any formulation)."""
    torch.manual_seed(0)
    ref = build_model(tiny_cfg(exp_id, base_width=4, depth=23, formulation="reference")).double()
    randomize_bn(ref)
    eff = set_formulation(copy.deepcopy(ref), "efficient")
    x = torch.randn(2, 3, 4, 48, 48, dtype=torch.float64)
    w = torch.linspace(-1, 1, 5, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), eff.train(train)
        ref.zero_grad(), eff.zero_grad()
        xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ye = ref(xr), eff(xe)
        assert yr.shape == (2, 5) and torch.isfinite(yr).all()
        torch.testing.assert_close(ye, yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())
        (yr * w).sum().backward()
        (ye * w).sum().backward()
        scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
        for (name, pr), pe in zip(ref.named_parameters(), eff.parameters()):
            if pr.grad is None:
                assert pe.grad is None, name
                continue
            torch.testing.assert_close(pe.grad, pr.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-5, atol=1e-5 * xr.grad.abs().max().item())
    # the running statistics were updated identically
    for (name, br), be in zip(ref.named_buffers(), eff.buffers()):
        torch.testing.assert_close(be, br, msg=name)


@pytest.mark.parametrize("exp_id", ["k400-r23-sb-full"])
def test_float32_efficient_close_to_reference(exp_id):
    torch.manual_seed(0)
    ref = build_model(tiny_cfg(exp_id, formulation="reference")).eval()
    randomize_bn(ref, affine=False)
    eff = set_formulation(copy.deepcopy(ref), "efficient")
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        yr, ye = ref(x), eff(x)
    torch.testing.assert_close(ye, yr, rtol=1e-4, atol=1e-4 * yr.abs().max().item())


@pytest.mark.parametrize("exp_id", ["k400-r23-sb-full", "k400-r23-sbT33", "k400-r23-sb-full-avgpool"])
def test_any_T(exp_id):
    """Built for 8 frames, runs on 4, 16 and 32 (global temporal pooling at run time)."""
    model = build_model(tiny_cfg(exp_id))
    randomize_bn(model)
    for T in (4, 16, 32):
        for train in (True, False):
            model.train(train)
            y = model(torch.randn(2, 3, T, 32, 32))
            assert y.shape == (2, 5) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "pool", [[3, 1, 1], [3, 3, 3], [3, 5, 5], [1, 3, 3], ["T", 3, 3], ["T", 1, 1], [5, 7, 7]]
)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("T", [1, 4, 7])
def test_pooling_separable_equals_3d(pool, mode, T):
    x = torch.randn(2, 3, T, 6, 5, dtype=torch.float64)
    ref = pool_reference(x, pool, mode)
    pf, tp = pool_frames(to_frames(x), 2, T, pool, mode)
    got = pf.reshape(2, tp, 3, 6, 5).transpose(1, 2)
    assert ref.shape == got.shape == (2, 3, 1 if pool[0] == "T" else T, 6, 5)
    torch.testing.assert_close(got, ref)
    if pool[0] == "T" and mode == "max" and pool[1] == 1:
        torch.testing.assert_close(ref, x.amax(dim=2, keepdim=True))


@pytest.mark.parametrize(
    "exp_id",
    [e for e in OPTION_IDS if not e.endswith("singlebn")] + ["k400-r23-sb333-T33", "k400-r23-sb-typical"],
)
def test_zero_init_equals_plain_net(exp_id):
    """At initialisation every SmallBig / extra-unit / NonLocal variant computes the function of
    the same network without them, given the same conv weights (train and eval mode).
    (Single BN, BN(W(x + P(x))), cannot: its one BN sees x + P(x); see docs/models.md.)"""
    torch.manual_seed(0)
    cfg = tiny_cfg(exp_id, base_width=4, depth=23)
    model = build_model(cfg)
    randomize_bn(model, affine=False)  # zero-initialised BNs keep gamma = beta = 0
    plain = build_model(plain_cfg(cfg))
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    x = torch.randn(2, 3, 4, 32, 32)
    for formulation in ("efficient", "reference"):
        set_formulation(model, formulation), set_formulation(plain, formulation)
        for train in (True, False):
            model.train(train), plain.train(train)
            with torch.no_grad():
                y, y0 = model(x), plain(x)
            assert (y - y0).abs().max().item() <= 1e-5, (formulation, train)


def test_zero_init_is_not_vacuous():
    """Once the big-view BNs are no longer zero, the SmallBig net differs from the plain one."""
    torch.manual_seed(0)
    cfg = tiny_cfg("k400-r23-sb-typical")
    model = build_model(cfg).eval()
    plain = build_model(plain_cfg(cfg)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    for unit in model.modules():
        if isinstance(unit, SmallBigUnit):
            torch.nn.init.ones_(unit.bn_big.weight)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max().item() > 1e-3


def test_zero_initialised_bns():
    model = build_model(tiny_cfg("k400-r23-sb-full"))
    units = [m for m in model.modules() if isinstance(m, SmallBigUnit)]
    assert len(units) == 3 * (2 + 3 + 1)
    for u in units:
        assert u.bn_big.weight.abs().sum() == 0 and u.bn_big.bias.abs().sum() == 0
        assert (u.bn.weight == 1).all()
    for blk in list(model.res3) + list(model.res4) + list(model.res5):
        assert blk.extra.bn.weight.abs().sum() == 0
    assert not hasattr(model.res2[0], "extra")


def test_structure_and_strides():
    model = build_model(tiny_cfg("k400-r50-sb-full"))
    assert [len(getattr(model, s)) for s in STAGES] == [3, 4, 6, 3]
    for s in ("res3", "res4", "res5"):
        blk = getattr(model, s)[0]
        assert blk.conv2.conv.stride == (1, 2, 2) and blk.conv1.conv.stride == (1, 1, 1)
        assert blk.downsample.conv.stride == (1, 2, 2)
    assert model.res3[0].conv1.pool == (3, 3, 3) and model.res3[0].conv3.pool == ("T", 3, 3)
    fm = feature_maps(model.eval(), torch.randn(1, 3, 6, 64, 64))
    assert fm["res3"].shape == (1, 64, 6, 8, 8)  # width 8·2·4; no temporal stride
    i3d = build_model(tiny_cfg("k400-r23-i3d311"))
    assert i3d.res2[0].conv1.conv.kernel_size == (3, 1, 1)
    slow = build_model(tiny_cfg("sthv1-r50-sb-8f"))
    assert slow.res3[0].conv1.conv.kernel_size == (1, 1, 1) and slow.res4[0].conv1.conv.kernel_size == (
        3,
        1,
        1,
    )
    assert hasattr(slow.res3[0], "extra") and not hasattr(slow.res2[0], "extra")
    nl = build_model(tiny_cfg("k400-r23-nonlocal"))
    assert sum(hasattr(b, "nonlocal_block") for s in STAGES for b in getattr(nl, s)) == 5


def test_feature_maps():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("k400-r23-sb-full")).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 4, 32, 32)
    for formulation in ("efficient", "reference"):
        set_formulation(model, formulation)
        with torch.no_grad():
            fm = feature_maps(model, x)
            logits = model(x)
        assert set(fm) == {"res3", "small_view", "big_view"}
        assert fm["small_view"].shape == fm["big_view"].shape == (2, 16, 4, 8, 8)
        unit = model.res3[0].conv1
        assert unit.record is False and unit.recorded is None
        # the two views sum to the unit's output
        with torch.no_grad():
            stem = model.stem(x)
            x3 = model.res3[0].extra(model.res2(stem))
            torch.testing.assert_close(fm["small_view"] + fm["big_view"], unit(x3), rtol=1e-4, atol=1e-5)
        assert torch.isfinite(logits).all()
    fm = feature_maps(build_model(tiny_cfg("k400-r23-c2d")).eval(), x)
    assert set(fm) == {"res3"}


BAD_CFGS = [
    ({"depth": 34}, "model.depth"),
    ({"base_width": 0}, "model.base_width"),
    ({"formulation": "fast"}, "model.formulation"),
    ({"unit": {"pool": "median"}}, "model.unit.pool"),
    ({"unit": {"size": 3}}, "model.unit: unknown"),
    ({"colour": "red"}, "unknown key"),
    (
        {
            "stages": {
                "res2": {"block": "2d"},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res6": {"block": "2d"},
            }
        },
        "unknown stage name",
    ),
    (
        {
            "stages": {
                "res2": {"block": "4d"},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res5": {"block": "2d"},
            }
        },
        "model.stages.res2.block",
    ),
    (
        {
            "stages": {
                "res2": {"block": "smallbig"},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res5": {"block": "2d"},
            }
        },
        "model.stages.res2.smallbig",
    ),
    (
        {
            "stages": {
                "res2": {"block": "smallbig", "smallbig": {"conv1": [2, 3, 3]}},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res5": {"block": "2d"},
            }
        },
        "odd",
    ),
    (
        {
            "stages": {
                "res2": {"block": "smallbig", "smallbig": {"conv4": [3, 3, 3]}},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res5": {"block": "2d"},
            }
        },
        "unknown conv",
    ),
    (
        {
            "stages": {
                "res2": {"block": "2d", "smallbig": {"conv1": [3, 3, 3]}},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res5": {"block": "2d"},
            }
        },
        "needs 'smallbig'",
    ),
    (
        {
            "stages": {
                "res2": {"block": "2d", "extra": "fancy"},
                "res3": {"block": "2d"},
                "res4": {"block": "2d"},
                "res5": {"block": "2d"},
            }
        },
        "model.stages.res2.extra",
    ),
]


@pytest.mark.parametrize("over,message", BAD_CFGS)
def test_bad_model_config_raises_clear_error(over, message):
    cfg = tiny_cfg("k400-r23-c2d")
    cfg.update(over)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_model(cfg)


def test_bad_input_shape():
    model = build_model(tiny_cfg("k400-r23-c2d"))
    with pytest.raises(ValueError, match=r"\[N, 3, T, H, W\]"):
        model(torch.randn(2, 3, 32, 32))


def test_channels_last_same_result():
    from smallbig.models import set_channels_last

    torch.manual_seed(0)
    model = build_model(tiny_cfg("k400-r23-sb-full", base_width=4))
    randomize_bn(model, affine=False)
    x = torch.randn(2, 3, 4, 48, 48)
    for train in (True, False):
        model.train(train)
        set_channels_last(model, False)
        with torch.no_grad():
            y0 = model(x)
        set_channels_last(model, True)
        with torch.no_grad():
            y1 = model(x)
        torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)


REVERSAL_INVARIANT = [
    "k400-r23-c2d",
    "k400-r23-sb311",
    "k400-r23-sb333",
    "k400-r23-sb-typical",
    "k400-r23-sb-full",
    "k400-r23-sb-full-avgpool",
    "k400-r23-nonlocal",
]


@pytest.mark.parametrize("exp_id", REVERSAL_INVARIANT + ["k400-r23-i3d311", "sthv2-r50-sb-8f"])
def test_time_reversal(exp_id):
    """Every temporal operation of a SmallBig network (big-view max/avg pooling with symmetric
    padding, the global max of T x 3 x 3 and of the extra unit, global average pooling) is
    symmetric in time, so the whole network is exactly invariant to playing the clip backwards:
    SmallBig cannot tell 'moving up' from 'moving down' (docs/models.md). A learned 3 x 1 x 1
    temporal conv (Table 2's 3D block, the SlowOnly backbone of the Something-Something models)
    breaks the symmetry. This is why the toy classes are symmetric in time (docs/data.md)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(exp_id, depth=23 if exp_id.startswith("k400") else 50)).double()
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 6, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y, y_rev = model(x), model(x.flip(2))
    diff = (y - y_rev).abs().max().item() / y.abs().max().item()
    if exp_id in REVERSAL_INVARIANT:
        assert diff < 1e-10
    else:
        assert diff > 1e-3
