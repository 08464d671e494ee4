"""Params files: every experiment validates; invalid params give one clear error naming file,
key and problem; merging and overlays behave as documented in smallbig/config.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smallbig import config
from smallbig.config import ParamsError, load_params

EXPECTED_IDS = {
    "k400-r23-c2d",
    "k400-r23-i3d311",
    "k400-r23-sb311",
    "k400-r23-sb311-res345",
    "k400-r23-sb311-res45",
    "k400-r23-sb311-res5",
    "k400-r23-sb333",
    "k400-r23-sb355",
    "k400-r23-sb377",
    "k400-r23-sbT33",
    "k400-r23-sb333-T33",
    "k400-r23-sb-typical",
    "k400-r23-sb-full",
    "k400-r23-sb-full-avgpool",
    "k400-r23-sb-full-noshare",
    "k400-r23-sb-full-singlebn",
    "k400-r23-nonlocal",
    "k400-r50-c2d",
    "k400-r50-sb-full",
    "k400-r50-sb-full-simple",
    "k400-r101-sb-typical-32f",
    "sthv1-r50-sb-8f",
    "sthv1-r50-sb-16f",
    "sthv2-r50-sb-8f",
    "sthv2-r50-sb-16f",
}


def test_the_25_experiments_exist_and_validate():
    assert set(config.experiment_ids()) == EXPECTED_IDS
    for exp_id in EXPECTED_IDS:
        p = load_params(config.experiment_path(exp_id))
        assert p["id"] == exp_id
        assert set(p["model"]["stages"]) == {"res2", "res3", "res4", "res5"}


def test_paper_recipes_in_params():
    r23 = load_params(config.experiment_path("k400-r23-sb-full"))
    r50 = load_params(config.experiment_path("k400-r50-sb-full"))
    ss = load_params(config.experiment_path("sthv2-r50-sb-16f"))
    assert (r23["train"]["lr"], r23["train"]["batch_size"], r23["train"]["epochs"]) == (0.02, 128, 110)
    assert r50["train"]["lr"] == 0.00625 and r50["train"]["schedule"] == "cosine"
    assert r23["data"]["num_frames"] == 8 and r23["data"]["frame_stride"] == 8 and r23["data"]["flip"]
    assert ss["data"]["num_frames"] == 16 and ss["data"]["sampling"] == "segment" and not ss["data"]["flip"]
    assert ss["train"]["schedule"] == "step" and ss["train"]["lr_steps"] == [30, 40, 45]
    assert ss["model"]["num_classes"] == 174 and ss["test"]["protocols"][0] == "2x3"
    assert ss["data"]["source"] == {"archive_dir": "data/raw/sthv2"}  # source replaced whole
    r101 = load_params(config.experiment_path("k400-r101-sb-typical-32f"))
    assert r101["data"]["num_frames"] == 32 and r101["test"]["protocols"][0] == "4x3"


def test_stage_sets_follow_paper_for_tables_2_to_4_and_authors_for_the_rest():
    for exp_id in ("k400-r23-sb311", "k400-r23-sb333", "k400-r23-sbT33", "k400-r23-i3d311"):
        st = load_params(config.experiment_path(exp_id))["model"]["stages"]
        assert st["res2"]["block"] != "2d", exp_id
    for exp_id in ("k400-r23-sb-typical", "k400-r23-sb-full", "k400-r50-sb-full"):
        p = load_params(config.experiment_path(exp_id))
        assert p["model"]["stages"]["res2"] == {"block": "2d"}, exp_id
        assert any("res3-res5" in n for n in p["notes"]), exp_id


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _exp(tmp_path: Path, **changes) -> Path:
    doc = yaml.safe_load(config.experiment_path("k400-r23-sb311").read_text())
    doc["extends"] = str(config.REPO_ROOT / "params" / "base.yaml")
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return _write(tmp_path, "exp.yaml", doc)


@pytest.mark.parametrize(
    "changes, key, words",
    [
        ({"model__bogus": 1}, "model", "unknown key"),
        ({"train__lr": "fast"}, "train.lr", "is not of type 'number'"),
        ({"model__depth": 34}, "model.depth", "is not one of"),
        (
            {
                "model__stages": {
                    "res1": {"block": "2d"},
                    "res2": {"block": "2d"},
                    "res3": {"block": "2d"},
                    "res4": {"block": "2d"},
                    "res5": {"block": "2d"},
                }
            },
            "model.stages",
            "res1",
        ),
        (
            {"model__stages__res5": {"block": "smallbig", "smallbig": {"conv1": [3, 15, 15]}}},
            "model.stages.res5.smallbig.conv1",
            "larger than the res5 feature map",
        ),
        (
            {"model__stages__res3": {"block": "smallbig", "smallbig": {"conv1": [17, 3, 3]}}},
            "model.stages.res3.smallbig.conv1",
            "temporal pooling 17",
        ),
        (
            {"model__stages__res3": {"block": "2d", "smallbig": {"conv1": [3, 3, 3]}}},
            "model.stages.res3.smallbig",
            "needs 'smallbig'",
        ),
        (
            {"model__stages__res3": {"block": "smallbig", "smallbig": {"conv1": [3, 4, 4]}}},
            "model.stages.res3.smallbig.conv1",
            "odd",
        ),
        ({"test__protocols": ["10x2"]}, "test.protocols.0", "does not match"),
    ],
)
def test_invalid_params_give_one_clear_error(tmp_path, changes, key, words):
    path = _exp(tmp_path, **changes)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg and words in msg, msg


def test_missing_file_bad_yaml_and_extends_loop(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    a = _write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ParamsError, match="loops back"):
        load_params(a)


def test_merge_rules_and_overlay(tmp_path):
    base = {
        "model": {
            "unit": {"pool": "max", "share": True},
            "stages": {"res3": {"block": "smallbig", "smallbig": {"conv1": [3, 1, 1]}}},
        }
    }
    over = {"model": {"unit": {"pool": "avg"}, "stages": {"res3": {"block": "2d"}}}}
    merged = config.deep_merge(base, over)
    assert merged["model"]["unit"] == {"pool": "avg", "share": True}  # mappings merge
    assert merged["model"]["stages"]["res3"] == {"block": "2d"}  # a stage is replaced whole
    overlay = _write(
        tmp_path,
        "overlay.yaml",
        {
            "all": {"model": {"base_width": 8}},
            "kinetics400": {"train": {"epochs": 2}},
            "sthv1": {"train": {"epochs": 99}},
            "experiments": {"k400-r23-sb311": {"train": {"lr": 0.5}}},
        },
    )
    p = load_params(config.experiment_path("k400-r23-sb311"), overlay=overlay)
    assert (p["model"]["base_width"], p["train"]["epochs"], p["train"]["lr"]) == (8, 2, 0.5)
    bad = _write(tmp_path, "bad-overlay.yaml", {"everything": {}})
    with pytest.raises(ParamsError, match="unknown top-level key"):
        load_params(config.experiment_path("k400-r23-sb311"), overlay=bad)


def test_resolve_roundtrip_and_hash(tmp_path):
    p = load_params(config.experiment_path("k400-r23-sb-full"))
    out = tmp_path / "resolved.yaml"
    config.dump_params(p, out)
    again = config.load_resolved(out)
    assert again == p and config.params_hash(again) == config.params_hash(p)
    changed = dict(p, description="other")
    assert config.params_hash(changed) != config.params_hash(p)
    assert config.flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_cli_validate_and_error_exit_code(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "smallbig", "params", "validate"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "25 params file(s) valid" in ok.stdout
    path = _exp(tmp_path, train__epochs=0)
    bad = subprocess.run(
        [sys.executable, "-m", "smallbig", "params", "validate", str(path)], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert str(path) in bad.stderr and "train.epochs" in bad.stderr
