"""Params files: loading, merging, validation, hashing.

An experiment is `params/experiments/<id>.yaml`. It names its parent with `extends:` (a path
relative to the file, usually `../base.yaml`); parents are merged first. An optional *overlay*
(e.g. `params/embedded.yaml`, the scaled-down embedded default) is merged last: its `all:`
section applies to every experiment, its `<dataset>:` sections (kinetics400, sthv1, sthv2) to
experiments of that dataset, and its `experiments: {<id>: {...}}` section to one experiment.

Merge rule: mappings merge key by key; lists and scalars are replaced; each entry of
`model.stages` is replaced whole (a stage is one description, never half of two), and so is
`data.source`.

Every problem raises :class:`ParamsError` whose message names the file, the key and the problem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from smallbig.errors import InputError
from smallbig.fsutil import atomic_write_text
from smallbig.spec.params import DataSpec, TestSpec, TrainSpec, defaults
from smallbig.spec.protocol import ProtocolError
from smallbig.yamlsafe import YamlInputError, load_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = Path(__file__).resolve().parent / "spec" / "schemas" / "params.schema.yaml"
EXPERIMENTS_DIR = REPO_ROOT / "params" / "experiments"
STAGES = ("res2", "res3", "res4", "res5")
_REPLACE_CHILDREN = {("model", "stages")}  # each stage entry is replaced whole
_REPLACE_WHOLE = {("data", "source")}  # a dataset's source is one description


# ------------------------------------------------------------------ what model.pretrained means
# (used by the validation below and by smallbig.models.weights, which fetches and verifies)
NONE = "none"
# which torchvision ResNet depth a video net of each depth loads (R23 = first blocks of R50)
SOURCE_DEPTH = {23: 50, 50: 50, 101: 101}
_PATH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin", ".pkl")


def looks_like_path(value: str) -> bool:
    """A `model.pretrained` value that is not a declared name is a path when it has a directory
    part or a weights-file suffix; anything else is a (mistyped or undeclared) name."""
    return "/" in value or os.sep in value or value.lower().endswith(_PATH_SUFFIXES)


def classify(value: Any, declared: dict | None) -> str:
    """'unset' (None), 'none', 'name' (declared), 'path', or 'unknown' (an undeclared name)."""
    if value is None:
        return "unset"
    if value == NONE:
        return "none"
    if value in (declared or {}):
        return "name"
    if isinstance(value, str) and looks_like_path(value):
        return "path"
    return "unknown"


class ParamsError(InputError):
    """A params file is missing, unreadable, or invalid. The message names file, key, problem."""

    label = "invalid params"

    def render(self, command: str) -> str:
        return f"smallbig: invalid params: {self}"


def _read_yaml(path: Path) -> dict:
    """A params or overlay file as a mapping. Every problem (not a regular file, too large, not
    UTF-8, empty, invalid YAML, duplicate or non-string keys, alias bombs, NaN) is a ParamsError
    `PATH[:LINE]: problem` (smallbig/yamlsafe.py)."""
    try:
        data = load_yaml_file(path)
    except YamlInputError as e:
        raise ParamsError(str(e)) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of keys, got {_type_name(data)}")
    return data


def _type_name(value) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def deep_merge(base: dict, override: dict, _path: tuple = ()) -> dict:
    """Return base merged with override (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        here = _path + (key,)
        if _path in _REPLACE_CHILDREN or here in _REPLACE_WHOLE:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ParamsError(f"{path}: `extends` loops back to itself ({' -> '.join(map(str, seen))})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ParamsError(f"{path}: extends: must be a path string, got {parent!r}")
    return deep_merge(_load_chain(path.parent / parent, seen + (path,)), data)


def _apply_overlay(params: dict, overlay_path: Path) -> dict:
    overlay = _read_yaml(overlay_path)
    allowed = {"all", "kinetics400", "sthv1", "sthv2", "experiments", "description"}
    unknown = set(overlay) - allowed
    if unknown:
        raise ParamsError(
            f"{overlay_path}: unknown top-level key(s) {sorted(unknown)}; an overlay has "
            f"sections {sorted(allowed - {'description'})}"
        )
    for section in ("all", "kinetics400", "sthv1", "sthv2", "experiments"):
        if not isinstance(overlay.get(section) or {}, dict):
            raise ParamsError(
                f"{overlay_path}: {section}: must be a mapping, got {_type_name(overlay[section])}"
            )
    out = deep_merge(params, overlay.get("all") or {})
    data = params.get("data")
    dataset = data.get("dataset") if isinstance(data, dict) else None
    if isinstance(dataset, str) and dataset in overlay:
        out = deep_merge(out, overlay[dataset] or {})
    per_exp = (overlay.get("experiments") or {}).get(params.get("id"))
    if per_exp is not None and not isinstance(per_exp, dict):
        raise ParamsError(
            f"{overlay_path}: experiments.{params.get('id')}: must be a mapping, got {_type_name(per_exp)}"
        )
    if per_exp:
        out = deep_merge(out, per_exp)
    return out


_SCHEMA_CACHE: dict | None = None


def schema() -> dict:
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        _SCHEMA_CACHE = yaml.safe_load(SCHEMA_PATH.read_text())
    return _SCHEMA_CACHE


def _key(path: Iterable) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "(top level)"


def _clip(text: str, limit: int = 240) -> str:
    """jsonschema quotes the offending value whole; a 40 MB value must not reach stderr."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters cut)"


# what an unknown key is, where the schema lists the allowed ones
_UNKNOWN = {("model", "stages"): "unknown stage name(s)", "smallbig": "unknown conv(s)"}


def _schema_check(instance: Any, sub_schema: dict, source: str | Path, prefix: tuple = ()) -> None:
    """Validate against (part of) the params schema; ParamsError `SOURCE: KEY: problem` per
    error (at most 10), keys written from the top of the params (`prefix` + the error's path)."""
    validator = jsonschema.Draft202012Validator(sub_schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.path), list(map(str, e.path))))
    if not errors:
        return
    lines = []
    for e in errors[:10]:
        path = prefix + tuple(e.absolute_path)
        msg = _clip(e.message)
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            allowed = sorted(e.schema.get("properties", {}))
            extra = sorted(set(e.instance) - set(allowed))
            what = _UNKNOWN.get(
                tuple(map(str, path[-2:])), _UNKNOWN.get(str(path[-1]) if path else "", "unknown key(s)")
            )
            msg = f"{what} {', '.join(map(repr, extra))} (allowed: {', '.join(allowed)})"
        lines.append(f"{source}: {_key(path)}: {msg}")
    more = f"\n... and {len(errors) - 10} more" if len(errors) > 10 else ""
    raise ParamsError("\n".join(lines) + more)


def validate(params: dict, source: str | Path = "<params>") -> None:
    """Schema + semantic checks; raises ParamsError naming source, key and problem."""
    _check_pretrained_set(params, str(source))
    _schema_check(params, schema(), source)
    _semantic_checks(params, str(source))


def validate_model(model: Mapping[str, Any], source: str = "model config") -> dict:
    """The one check of a `model` section given on its own (a hand-built dict for `build_model`):
    the same schema and stage rules as `validate`, on the section completed from
    params/base.yaml (stages are never merged: a section without them is refused). `pretrained`
    may be unset here (what a training starts from is the engine's business). Returns the
    completed section; raises ParamsError (a ValueError) naming the key and the problem."""
    if not isinstance(model, Mapping):
        raise ParamsError(f"{source}: model: expected a mapping, got {_type_name(model)}")
    full = deep_merge({"model": defaults().get("model") or {}}, {"model": dict(model)})["model"]
    checked = {k: v for k, v in full.items() if not (k == "pretrained" and v is None)}
    sub = {"$defs": schema()["$defs"], **schema()["properties"]["model"]}
    _schema_check(checked, sub, source, ("model",))
    _check_stages(full, source)
    return full


def feature_size(crop: int, stage: str) -> int:
    """Spatial size of a stage's output for a square input crop (stem /4, stride-2 convs after)."""
    size = -(-crop // 2)  # conv1 7x7 stride 2 pad 3
    size = -(-size // 2)  # max-pool 3x3 stride 2 pad 1
    for _name in STAGES[1 : STAGES.index(stage) + 1]:
        size = -(-size // 2)
    return size


def _check_pretrained_set(p: dict, source: str) -> None:
    """`model.pretrained` must say what a training starts from: null/missing is refused (before
    the schema, for a clear message), `none` is the explicit from-scratch choice."""
    model = p.get("model")
    if isinstance(model, dict) and model.get("pretrained") is None:
        declared = p.get("pretrained_weights")
        names = ", ".join(sorted(declared)) if isinstance(declared, dict) and declared else "none declared"
        raise ParamsError(
            f"{source}: model.pretrained: not set ({'null' if 'pretrained' in model else 'missing'}); "
            f"every training says what it starts from: a name declared under pretrained_weights "
            f"({names}), the path of a local torchvision-format .pth file, or `none` to train "
            f"from scratch"
        )


def _check_pretrained(p: dict, source: str) -> None:
    """A name must be declared, and hold the ResNet depth the model loads; declared files unique."""
    declared = p.get("pretrained_weights") or {}
    files: dict[str, str] = {}
    for name, entry in declared.items():
        if entry["file"] in files:
            raise ParamsError(
                f"{source}: pretrained_weights.{name}.file: {entry['file']} is also "
                f"pretrained_weights.{files[entry['file']]}'s file; each name needs its own file"
            )
        files[entry["file"]] = name
    value, depth = p["model"]["pretrained"], p["model"]["depth"]
    kind = classify(value, declared)
    if kind == "unknown":
        raise ParamsError(
            f"{source}: model.pretrained: {value!r} is not declared under pretrained_weights "
            f"(declared: {', '.join(sorted(declared)) or 'none'}) and is not a path (a path has a "
            f"'/' or a .pth/.pt suffix); use `none` to train from scratch"
        )
    if kind == "name" and declared[value]["depth"] != SOURCE_DEPTH[depth]:
        raise ParamsError(
            f"{source}: model.pretrained: {value} holds a ResNet-{declared[value]['depth']}, but an "
            f"R{depth} model loads ResNet-{SOURCE_DEPTH[depth]} weights (R23 takes the first "
            f"blocks of each ResNet-50 stage)"
        )


def _check_stages(model: dict, source: str, frames: int | None = None, crop: int | None = None) -> None:
    """The stage rules the schema cannot say: `smallbig` exactly with block smallbig, odd pooling
    sizes ('same' padding) and, with the input's `frames` and smallest `crop`, no window wider
    than the input allows."""
    for name in STAGES:
        st = model["stages"][name]
        key = f"model.stages.{name}"
        if st["block"] != "smallbig" and "smallbig" in st:
            raise ParamsError(
                f"{source}: {key}.smallbig: given, but the stage's block is {st['block']!r} (needs 'smallbig')"
            )
        if st["block"] == "smallbig" and not st.get("smallbig"):
            raise ParamsError(
                f"{source}: {key}.smallbig: block 'smallbig' needs at least one of conv1/conv2/conv3 with its pooling"
            )
        for conv, pool in (st.get("smallbig") or {}).items():
            kt, kh, kw = pool
            # A window wider than 2*size-1 covers the whole axis from every position: it is the
            # same as a smaller one, so it is a configuration mistake (use T for global time).
            if frames is not None and kt != "T" and kt > 2 * frames - 1:
                raise ParamsError(
                    f"{source}: {key}.smallbig.{conv}: temporal pooling {kt} is larger than the "
                    f"input's {frames} frames allow (at most {2 * frames - 1}; use T for global pooling)"
                )
            if crop is not None:
                feat = feature_size(crop, name)
                if max(kh, kw) > 2 * feat - 1:
                    raise ParamsError(
                        f"{source}: {key}.smallbig.{conv}: pooling {kh}x{kw} is larger than the {name} "
                        f"feature map ({feat}x{feat} at crop {crop}; at most {2 * feat - 1})"
                    )
            if (kt != "T" and kt % 2 == 0) or kh % 2 == 0 or kw % 2 == 0:
                raise ParamsError(
                    f"{source}: {key}.smallbig.{conv}: pooling sizes must be odd ('same' padding), got {pool}"
                )


def _semantic_checks(p: dict, source: str) -> None:
    _check_pretrained(p, source)
    try:
        test = TestSpec.from_dict(p["test"])
    except ProtocolError as e:
        raise ParamsError(f"{source}: test.protocols: {e}") from None
    data, train = DataSpec.from_dict(p["data"]), TrainSpec.from_dict(p["train"])
    sizes = [data.crop_size] + [proto.crop_size(test) for proto in test.protocols]
    _check_stages(p["model"], source, data.num_frames, min(sizes))
    if data.sampling == "dense" and "frame_stride" not in p["data"]:
        raise ParamsError(f"{source}: data.frame_stride: required for dense sampling")
    if train.schedule == "step" and not train.lr_steps:
        raise ParamsError(f"{source}: train.lr_steps: step schedule needs at least one epoch")


def load_params(
    path: str | Path,
    overlay: str | Path | None = None,
    overrides: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> dict:
    """Load an experiment (following `extends`), apply the overlay, then each override (a
    params fragment such as `{"train": {"lr": 0.01}}`, named by its source for messages, e.g.
    `--set` or `params.yaml`) last, validate, return a dict."""
    path = Path(path)
    params = _load_chain(path)
    if "id" not in params:
        params["id"] = path.stem
    if overlay:
        params = _apply_overlay(params, Path(overlay))
    for _label, fragment in overrides:
        params = deep_merge(params, dict(fragment))
    source = f"{path}" + (f" (+ overlay {overlay})" if overlay else "")
    source += "".join(f" (+ {label})" for label, _ in overrides)
    validate(params, source)
    return _only_used_weights(params)


def _only_used_weights(p: dict) -> dict:
    """Keep only the `pretrained_weights` entry the experiment loads (all were validated): its
    params (and hash, the run's identity) then change with its own ImageNet file, never with
    another's; `none` or a path keeps none."""
    declared = p.get("pretrained_weights")
    if declared is not None:
        used = p["model"]["pretrained"]
        if used in declared:
            p["pretrained_weights"] = {used: declared[used]}
        else:
            del p["pretrained_weights"]
    return p


def load_resolved(path: str | Path) -> dict:
    """Load an already-resolved params file (no extends, no overlay) and validate it."""
    params = _read_yaml(Path(path))
    if "extends" in params:
        return load_params(path)
    validate(params, path)
    return params


def params_hash(params: dict) -> str:
    """SHA-256 of the canonical JSON of the params (the identity of a run)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def dump_params(params: dict, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(params, sort_keys=False))


def experiment_ids() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def experiment_path(exp_id: str) -> Path:
    path = EXPERIMENTS_DIR / f"{exp_id}.yaml"
    if not path.exists():
        raise ParamsError(f"{path}: no such experiment (known: {', '.join(experiment_ids())})")
    return path


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
