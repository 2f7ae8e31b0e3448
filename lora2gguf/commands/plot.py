"""``lora2gguf plot``: PNG plots from the JSON reports (candidates ranking, float-vs-GGUF comparison)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora2gguf.layout import COMPARISON_PLOTS
from lora2gguf.plot.candidates import CandidatesPlotOptions, draw_candidates
from lora2gguf.plot.comparison import ComparisonPlotOptions, draw_comparison

HELP = "plot the ranking (candidates) or the float-vs-GGUF comparison (comparison) from their JSON reports"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plot", metavar="PLOT", required=True)
    cand = sub.add_parser("candidates", help="losses and training curves of the LoRA runs")
    cand.add_argument("--analysis", required=True, type=Path, help="results/model_analysis.json")
    cand.add_argument("--out", required=True, type=Path, help="PNG path (results/plots/candidates.png)")

    comp = sub.add_parser("comparison", help="size vs KL, size vs perplexity and speed per GGUF type")
    comp.add_argument("--compare", required=True, type=Path, help="results/{model}/compare_models.json")
    comp.add_argument("--model", help="name in the titles and file names (default: from the reference folder)")
    comp.add_argument("--out-dir", type=Path, help="write {model}-{kind}.png for every kind here")
    for kind in COMPARISON_PLOTS:
        comp.add_argument(f"--{kind}", type=Path, metavar="PNG", help=f"path of the {kind} plot")


def run(args: argparse.Namespace) -> int:
    if args.plot == "candidates":
        draw_candidates(CandidatesPlotOptions(analysis=args.analysis, out=args.out))
        return 0
    paths = {kind: getattr(args, kind.replace("-", "_")) for kind in COMPARISON_PLOTS}
    options = ComparisonPlotOptions(
        compare=args.compare,
        model=args.model,
        out_dir=args.out_dir,
        paths={kind: path for kind, path in paths.items() if path is not None},
    )
    draw_comparison(options)
    return 0
