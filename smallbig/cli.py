"""`smallbig` command line. Each area of the library adds its own subcommands through a plain
`register(subparsers)` function in its `cli` module; this file only wires them together.

  params      resolve / validate / list experiments          (smallbig/config_cli.py)
  model-info  sizes and compute of a configured model        (smallbig/models/cli.py)
  pretrained  fetch / list ImageNet initialisation files      (smallbig/models/weights.py)
  data ...    acquire, extract, check, embedded dataset      (smallbig/data/cli.py)
  train, evaluate, ensemble                                   (smallbig/engine/cli.py)
  plan        jobs and GPU-hours of the workflow              (smallbig/spec/plan.py)
  report ...  tables, figures, feature maps, HTML report     (smallbig/analysis/cli.py)
  dvc ...     steps of the DVC pipeline (dvc.yaml)            (smallbig/dvc_cli.py)
"""

from __future__ import annotations

import argparse
import os
import sys

from smallbig import __version__, config_cli, dvc_cli
from smallbig.analysis import cli as analysis_cli
from smallbig.data import cli as data_cli
from smallbig.engine import cli as engine_cli
from smallbig.models import cli as models_cli
from smallbig.models import weights as pretrained_cli
from smallbig.spec import plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallbig", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"smallbig {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (config_cli, models_cli, pretrained_cli, data_cli, engine_cli, plan, analysis_cli, dvc_cli):
        module.register(sub)
    return parser


def _command(args: argparse.Namespace) -> str:
    """'train', 'data check', 'report tables', ... (for messages)."""
    parts = [args.command]
    parts += [v for k, v in sorted(vars(args).items()) if k.endswith("_command") and isinstance(v, str)]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """The one place where errors become messages and exit codes (smallbig/errors.py)."""
    from smallbig.errors import SmallbigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
    except SmallbigError as e:
        print(e.render(_command(args)), file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"smallbig {_command(args)}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`smallbig params list | head -2`): nothing is wrong with us.
        # Point stdout at /dev/null so the interpreter's final flush cannot raise again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print("smallbig: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
