"""`smallbig train | evaluate | evaluate-merge | ensemble | register` (see docs/engine.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from smallbig import config
from smallbig.engine import tracking_server  # no torch, no MLflow at import

# signals and the time-limit deadline: no torch there, installed before train imports torch
from smallbig.engine.stopping import Deadline, StopFlag
from smallbig.errors import InputError, SmallbigError
from smallbig.spec import memory_plan

# Torch and the modules that import it (train, evaluate, memory) are imported inside the
# command functions: `smallbig --help` stays fast, and `smallbig train` installs its SIGTERM
# handler before the torch import.


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `smallbig` parser."""
    p = sub.add_parser(
        "train",
        help="train a model from a params file (checkpoints, MLflow)",
        description="Train per PARAMS (a resolved params file, an experiment file or "
        "an experiment id). Exit code 3: stopped by SIGTERM/SIGUSR1 after "
        "checkpointing; rerun with --resume.",
    )
    p.add_argument("params", help="resolved params YAML, params/experiments/<id>.yaml, or an id")
    p.add_argument("--out", required=True, help="run directory (checkpoints, history, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--overlay", help="overlay for an experiment file (e.g. params/embedded.yaml)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-mlflow", action="store_true", help="do not record an MLflow run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--stop-before-limit",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="inside a Slurm job (or with SMALLBIG_STOP_AT=epoch seconds): checkpoint and "
        "exit 3 this many seconds before the job's time limit (default 300)",
    )
    p.set_defaults(func=_train)

    _add_evaluate(sub)
    _add_register(sub)

    p = sub.add_parser("evaluate-merge", help="merge sharded evaluation scores of OUT")
    p.add_argument("params")
    p.add_argument("--out", required=True)
    p.add_argument("--overlay")
    p.set_defaults(func=_merge)

    p = sub.add_parser("ensemble", help="fuse saved scores of several models")
    p.add_argument("scores", nargs="+", help="scores.npz files of the members")
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="name of the ensemble (default: the members' directory names)")
    p.add_argument("--views", help="use only this CLIPSxCROPS subset of every member's views (e.g. 4x3)")
    p.set_defaults(func=_ensemble)

    tracking_server.register(sub)  # `smallbig tracking serve` (MLflow server)
    # `smallbig plan` (smallbig/spec, below the engine) measures GPU memory with the engine's
    # torch code, imported only when an experiment must be measured
    memory_plan.set_measurer(_measure_memory)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="multi-view test protocol; saves per-view scores + metrics",
        description="Evaluate a checkpoint with PARAMS, or a model logged in MLflow (--model URI: "
        "its params come with it, PARAMS is not given).",
    )
    p.add_argument("params", nargs="?", help="params (with --checkpoint or --merge)")
    p.add_argument("--checkpoint", help="a smallbig checkpoint (checkpoint.pt, last.pt)")
    p.add_argument(
        "--model",
        metavar="URI",
        help="a model logged by `smallbig train`: runs:/<run_id>/model, models:/<name>/<version> "
        "or models:/<model_id>, in the store of MLFLOW_TRACKING_URI (or --tracking-uri)",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)"
    )
    p.add_argument("--data-root", help="prepared data directory to use instead of the params' data.root")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", help="CLIPSxCROPS (default: the first of test.protocols)")
    p.add_argument("--shard", help="i/n: score every n-th video starting at i (partial scores)")
    p.add_argument("--merge", action="store_true", help="merge OUT/scores.shard-*-of-n.npz, no model run")
    p.add_argument("--overlay")
    p.add_argument("--device")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="register the trained models of reproduced rows in the MLflow model registry",
        description="For every row of VERDICTS (reports/verdicts.json) whose verdict is "
        "'reproduced' (every row with --all), register the model each of its training runs "
        "logged as a version of PREFIX<experiment>, tagged with table, row, protocol, top1, "
        "paper_top1, verdict, seed and the run ids. Idempotent.",
    )
    p.add_argument("verdicts", help="the report's verdict file (reports/verdicts.json)")
    p.add_argument(
        "--all", action="store_true", help="every row, whatever its verdict (e.g. an embedded run)"
    )
    p.add_argument("--prefix", default="smallbig-", help="registered model name prefix (default smallbig-)")
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)"
    )
    p.set_defaults(func=_register)


def _measure_memory(params: dict, **kwargs) -> dict:
    from smallbig.engine.memory import measure  # torch

    return measure(params, **kwargs)


def load_any_params(arg: str, overlay: str | None = None) -> dict:
    path = Path(arg)
    if not arg.endswith((".yaml", ".yml")) and not path.exists():
        path = config.experiment_path(arg)
    if overlay:
        return config.load_params(path, overlay)
    return config.load_resolved(path)


def _train(args) -> int:
    # first, before torch is imported: a SIGTERM from now on ends in exit 3, never in a -15 death
    stop = StopFlag(Deadline(args.stop_before_limit)).install()
    from smallbig.engine.train import train  # torch

    params = load_any_params(args.params, args.overlay)
    with _input_errors():
        return train(
            params,
            args.out,
            resume=args.resume,
            device=args.device,
            track=not args.no_mlflow,
            progress=not args.no_progress,
            stop=stop,
        )


def _evaluate_source(args) -> tuple[dict, object]:
    """(params, what to evaluate): PARAMS + --checkpoint, or the model at --model with the
    params stored with it."""
    if args.model and (args.checkpoint or args.params or args.overlay or args.merge):
        raise InputError(
            "--model: give no PARAMS, --overlay, --checkpoint or --merge with it (the params come "
            "with the model; --data-root and --protocol choose the data and the views)"
        )
    if not args.model and not args.params:
        raise InputError("PARAMS is required (or evaluate a logged model with --model URI)")
    if not args.model and not args.checkpoint and not args.merge:
        raise InputError("give --checkpoint CKPT (or --model URI, or --merge)")
    if args.model:
        from smallbig.engine.mlflow_models import load_logged_model  # torch

        loaded = load_logged_model(args.model, args.data_root)
        return loaded.params, loaded
    params = load_any_params(args.params, args.overlay)
    if args.data_root:
        params["data"]["root"] = args.data_root
    return params, args.checkpoint


def _use_tracking_uri(uri: str | None) -> None:
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri


def _evaluate(args) -> int:
    from smallbig.engine.evaluate import evaluate, merge, parse_shard  # torch

    _use_tracking_uri(args.tracking_uri)
    params, source = _evaluate_source(args)
    with _input_errors():
        if args.merge:
            merge(params, args.out)
            return 0
        shard = parse_shard(args.shard) if args.shard else None
        res = evaluate(
            params,
            source,
            args.out,
            protocol=args.protocol,
            shard=shard,
            device=args.device,
            track=not args.no_mlflow,
            progress=not args.no_progress,
        )
    if res:
        print(
            f"{params['id']} {res['protocol']}: top1 {res['top1']:.2f} top5 {res['top5']:.2f} "
            f"({res['num_videos']} videos, {res['skipped']} skipped)"
        )
    return 0


def _register(args) -> int:
    from smallbig.engine.registry import register_verdicts

    _use_tracking_uri(args.tracking_uri)
    register_verdicts(args.verdicts, all_rows=args.all, prefix=args.prefix)
    return 0


def _merge(args) -> int:
    from smallbig.engine.evaluate import merge

    params = load_any_params(args.params, args.overlay)
    with _input_errors():
        res = merge(params, args.out)
    print(f"{params['id']} {res['protocol']}: top1 {res['top1']:.2f} top5 {res['top5']:.2f}")
    return 0


def _ensemble(args) -> int:
    from smallbig.engine.evaluate import ensemble

    with _input_errors():
        res = ensemble(args.scores, args.out, name=args.name, views=args.views)
    print(f"{res['experiment']}: top1 {res['top1']:.2f} top5 {res['top5']:.2f} ({res['num_videos']} videos)")
    return 0


@contextlib.contextmanager
def _input_errors():
    """A ValueError from a layer below that is not yet a smallbig error (a bad list line, a bad
    --protocol, a pretrained file that does not fit) is bad input: InputError (exit 2), which
    smallbig.cli.main reports like every other error."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, SmallbigError):
            raise
        raise InputError(str(e)) from e
