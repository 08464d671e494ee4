"""`smallbig params ...`: list, validate and resolve experiment params."""

from __future__ import annotations

import argparse

import yaml

from smallbig import config


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
    params = config.load_params(_path(args.file), overlay=args.overlay)
    if args.out:
        config.dump_params(params, args.out)
    else:
        print(yaml.safe_dump(params, sort_keys=False), end="")
    return 0
