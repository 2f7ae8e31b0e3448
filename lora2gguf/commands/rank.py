"""``lora2gguf rank``: rank the candidate LoRA runs and write model_analysis.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.qlora import TRAINED_ON
from lora2gguf.rank import RankOptions, rank_candidates

HELP = "rank candidate LoRA runs by an evaluation metric and write model_analysis.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--candidate",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "RUN_DIR", "BASE_DIR"),
        help="a candidate: its name, its LoRA run folder and its base model folder (repeat per candidate)",
    )
    parser.add_argument("--metric", default="eval_loss", help="metric to rank by (default: eval_loss)")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="min: lower is better (default)")
    parser.add_argument("--out", required=True, type=Path, help="where to write model_analysis.json")
    parser.add_argument(
        "--trained-on",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "KIND"),
        help=f"the base candidate NAME was trained against ({', '.join(TRAINED_ON)}); overrides what its run "
        "folder records (repeat per candidate)",
    )


def run(args: argparse.Namespace) -> int:
    options = RankOptions(
        candidates=[(name, Path(run_dir), Path(base_dir)) for name, run_dir, base_dir in args.candidate],
        metric=args.metric,
        mode=args.mode,
        out=args.out,
        trained_on=dict(args.trained_on),
    )
    rank_candidates(options)
    return 0
