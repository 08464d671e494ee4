"""`smallbig model-info`: parameter count and compute of configured models, beside the paper's."""

from __future__ import annotations

import argparse
import json

from smallbig import config


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `smallbig` parser."""
    p = sub.add_parser(
        "model-info",
        help="parameters and GMACs of a configured model (vs the paper)",
        description="Build the model on the meta device and count parameters and "
        "multiply-accumulates (conv + linear + NonLocal matmuls).",
    )
    p.add_argument("params", nargs="?", help="params/experiments/<id>.yaml or an experiment id")
    p.add_argument("--all", action="store_true", help="one table of all experiments")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--overlay", help="overlay file (e.g. params/embedded.yaml)")
    p.set_defaults(func=_model_info)


def _model_info(args) -> int:
    from tqdm import tqdm

    from smallbig.models.info import info_table, model_info  # torch: only when the command runs

    if bool(args.params) == bool(args.all):
        raise SystemExit("smallbig model-info: give one params file (or id), or --all")
    if args.all:
        ids = config.experiment_ids()
        infos = [
            model_info(config.load_params(config.experiment_path(e), overlay=args.overlay))
            for e in tqdm(ids, desc="model-info", leave=False)
        ]
        if args.json:
            print(json.dumps(infos, indent=2))
        else:
            print(info_table(infos))
            n = sum(bool(i["flags"]) for i in infos)
            print(
                f"\n{len(infos)} models; {n} differ from the paper by more than 2% (see docs/models.md). "
                "GFlops = GMACs per view at 224² (paper convention); ×views uses the primary protocol."
            )
        return 0
    path = args.params if args.params.endswith((".yaml", ".yml")) else config.experiment_path(args.params)
    info = model_info(config.load_params(path, overlay=args.overlay))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["paper"] or {}
    a = info["authors_code"]
    print(f"experiment        {info['id']}")
    print(
        f"parameters        {info['params']:,} ({info['params_m']:.2f} M)"
        + (f"   paper {p['params_m']} M" if "params_m" in p else "")
    )
    print(
        f"GMACs / view      {info['gmacs_224']:.2f} at {info['num_frames']}x224x224"
        + (f"   paper {p['gflops']} GFlops" if "gflops" in p else "")
    )
    print(
        f"                  {info['gmacs_test_crop']:.2f} at {info['num_frames']}x{info['test_crop']}x{info['test_crop']} (test crop)"
    )
    print(f"views             {info['views']} ({info['protocol']})")
    print(
        f"GFlops x views    {info['gflops_x_views']:.0f} (224² per view, paper convention); "
        f"{info['gflops_x_views_test_crop']:.0f} at the test crop"
        + (f"   paper {p['gflops_x_views']}" if "gflops_x_views" in p else "")
    )
    if a:
        print(f"authors' code     {a['params_m']} M / {a['gmacs']} GMACs (model-spec.md)")
    if p:
        print(f"paper source      {p['source']}")
    if not info["paper_comparable"]:
        print("paper figures     not comparable (model or frames differ from the experiment's own file)")
    for flag in info["flags"]:
        print(f"DIFFERS           {flag}")
    return 0
