"""`smallbig params ...`: list, validate and resolve experiment params.

`resolve` merges, in this order: params/base.yaml <- the experiment <- `--overlay` <- the
hyper-parameters of `--dvc-params FILE` (the DVC pipeline's params.yaml) <- each `--set KEY=VALUE`;
the result is validated against the params schema (an unknown or mistyped key is refused with
the key named)."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import yaml

from smallbig import config
from smallbig.config import ParamsError
from smallbig.yamlsafe import YamlInputError, load_yaml_file

# The keys of the DVC params file (params.yaml) that dvc.yaml itself reads; every other key is
# a params section merged last onto the experiment (null = keep the experiment's value).
DVC_KEYS = ("experiment", "scale", "protocol")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="list, validate or resolve experiment params")
    psub = p.add_subparsers(dest="params_command", metavar="ACTION")
    psub.required = True

    q = psub.add_parser("list", help="list experiment ids")
    q.set_defaults(func=_list)

    q = psub.add_parser("validate", help="validate params files (all experiments if none given)")
    q.add_argument("files", nargs="*")
    q.add_argument("--overlay", help="overlay file (e.g. params/embedded.yaml)")
    q.set_defaults(func=_validate)

    q = psub.add_parser("resolve", help="write the merged, validated params of one experiment")
    q.add_argument("file", help="params/experiments/<id>.yaml or an experiment id")
    q.add_argument("--overlay")
    q.add_argument(
        "--dvc-params",
        metavar="FILE",
        help="DVC params file (params.yaml): its sections other than "
        f"{', '.join(DVC_KEYS)} are merged after the overlay; null values keep the experiment's",
    )
    q.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key last (dotted, e.g. train.lr=0.01; VALUE is YAML); repeatable",
    )
    q.add_argument("--out", help="output YAML (stdout if omitted)")
    q.set_defaults(func=_resolve)


def _path(arg: str):
    return config.experiment_path(arg) if not arg.endswith((".yaml", ".yml")) else arg


def _list(args) -> int:
    for exp_id in config.experiment_ids():
        print(exp_id)
    return 0


def _validate(args) -> int:
    files = args.files or [str(config.experiment_path(e)) for e in config.experiment_ids()]
    for f in files:
        config.load_params(_path(f), overlay=args.overlay)
    print(f"{len(files)} params file(s) valid")
    return 0


def _resolve(args) -> int:
    overrides: list[tuple[str, dict]] = []
    if args.dvc_params:
        overrides.append((args.dvc_params, dvc_overrides(args.dvc_params)))
    for item in args.sets:
        overrides.append((f"--set {item}", set_override(item)))
    params = config.load_params(_path(args.file), overlay=args.overlay, overrides=overrides)
    if args.out:
        config.dump_params(params, args.out)
    else:
        print(yaml.safe_dump(params, sort_keys=False), end="")
    return 0


def _prune_nulls(value: Any) -> Any:
    """A mapping without its null leaves (and without mappings left empty by that)."""
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        v = _prune_nulls(v)
        if v is not None and v != {}:
            out[k] = v
    return out


def dvc_overrides(path: str) -> dict:
    """The params fragment of a DVC params file: every top-level key but DVC_KEYS, null leaves
    left out (null = the experiment's own value). The schema judges the keys after the merge."""
    try:
        data = load_yaml_file(path)
    except YamlInputError as e:
        raise ParamsError(str(e)) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of keys")
    return _prune_nulls({k: v for k, v in data.items() if k not in DVC_KEYS})


def set_override(item: str) -> dict:
    """`train.lr=0.01` -> {"train": {"lr": 0.01}} (the value parsed as YAML: 0.01, [1, 2], null)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ParamsError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.01")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ParamsError(f"--set {item}: the value is not valid YAML ({e})") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"--set {item}: {value} is not a finite number")
    out: dict = {}
    for i, part in enumerate(reversed(key.split("."))):
        out = {part: value if i == 0 else out}
    return out
