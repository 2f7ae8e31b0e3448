"""`lora2gguf plot`: PNG plots from the JSON reports (candidates ranking, float-vs-GGUF comparison)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "plot the ranking (candidates) or the float-vs-GGUF comparison (comparison) from their JSON reports"

logger = logging.getLogger(__name__)

_KINDS = ("size-vs-kl", "size-vs-perplexity", "speed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plot", metavar="PLOT", required=True)
    cand = sub.add_parser("candidates", help="losses and training curves of the LoRA runs")
    cand.add_argument("--analysis", required=True, type=Path, help="results/model_analysis.json")
    cand.add_argument("--out", required=True, type=Path, help="PNG path (results/plots/candidates.png)")

    comp = sub.add_parser("comparison", help="size vs KL, size vs perplexity and speed per GGUF type")
    comp.add_argument("--compare", required=True, type=Path, help="results/{model}/compare_models.json")
    comp.add_argument("--model", help="name in the titles and file names (default: from the reference folder)")
    comp.add_argument("--out-dir", type=Path, help="write {model}-{kind}.png for every kind here")
    for kind in _KINDS:
        comp.add_argument(f"--{kind}", type=Path, metavar="PNG", help=f"path of the {kind} plot")


def _model_name(report: dict, compare: Path) -> str:
    ref = Path(report.get("reference", {}).get("path", "")).name
    return ref.removesuffix("-merged") or compare.parent.name


def run(args: argparse.Namespace) -> int:
    from lora2gguf.artifacts import read_json
    from lora2gguf.errors import Lora2ggufError

    if args.plot == "candidates":
        from lora2gguf.plots import plot_candidates

        analysis = read_json(args.analysis)
        try:
            plot_candidates(analysis, args.out)
        except (KeyError, TypeError) as exc:
            raise Lora2ggufError(f"{args.analysis}: missing or malformed key {exc}") from None
        return 0

    from lora2gguf.plots_compare import plot_comparison

    report = read_json(args.compare)
    model = args.model or _model_name(report, args.compare)
    outputs = {kind: getattr(args, kind.replace("-", "_")) for kind in _KINDS}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    if args.out_dir is not None:
        for kind in _KINDS:
            outputs.setdefault(kind, args.out_dir / f"{model}-{kind}.png")
    if not outputs:
        raise Lora2ggufError("plot comparison: give --out-dir or at least one of --" + ", --".join(_KINDS))
    try:
        plot_comparison(report, model, outputs)
    except (KeyError, TypeError, ValueError) as exc:
        raise Lora2ggufError(f"{args.compare}: missing or malformed key {exc}") from None
    return 0
