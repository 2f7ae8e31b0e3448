"""The candidates plot: how the LoRA runs compare, read only from model_analysis.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import Output, check_paths
from lora2gguf.plot.figures import MALFORMED, draw_figure, malformed_report, pyplot, read_report, save_figures


@dataclass
class CandidatesPlotOptions:
    """What ``lora2gguf plot candidates`` was asked."""

    analysis: Path
    out: Path


def draw_candidates(options: CandidatesPlotOptions) -> None:
    """Read model_analysis.json and draw its plot; a malformed report names its file."""
    check_paths([("--analysis", options.analysis)], [Output("--out", options.out)])
    analysis = read_report(options.analysis)
    try:
        fig = draw_figure(plot_candidates, analysis)
    except MALFORMED as exc:
        raise malformed_report(options.analysis, exc) from None
    save_figures([(fig, options.out)])


def _final_losses(bars: Any, analysis: dict[str, Any]) -> None:
    """Left panel: the ranking metric and the training loss of every candidate, best marked."""
    metric = analysis["metric"]
    names = analysis["ranking"]
    entries = analysis["candidates"]
    eval_values = [entries[n]["metrics"].get(metric) for n in names]
    train_values = [entries[n]["metrics"].get("train_loss") for n in names]
    positions = range(len(names))
    width = 0.38
    bars.bar([p - width / 2 for p in positions], eval_values, width, label=metric)
    bars.bar(
        [p + width / 2 for p in positions],
        [v if v is not None else 0.0 for v in train_values],
        width,
        label="train_loss",
    )
    for p, value in zip(positions, eval_values):
        bars.annotate(f"{value:.4f}", (p - width / 2, value), ha="center", va="bottom", fontsize=8)
    bars.set_xticks(list(positions))
    bars.set_xticklabels(
        [f"{n}\n(best)" if n == analysis["best"] else n for n in names], fontsize=8
    )
    bars.set_ylabel("loss (nats per token)")
    bars.set_title(f"Final losses, ranked by {metric} ({analysis['mode']} is best)")
    bars.legend()


def _training_curves(curves: Any, analysis: dict[str, Any]) -> None:
    """Right panel: train and eval loss over the optimizer steps of every candidate."""
    for name in analysis["ranking"]:
        series = analysis["candidates"][name]["curves"]
        if series.get("loss"):
            steps, losses = zip(*series["loss"])
            (line,) = curves.plot(steps, losses, label=f"{name} train")
            if series.get("eval_loss"):
                e_steps, e_losses = zip(*series["eval_loss"])
                curves.plot(e_steps, e_losses, "o--", color=line.get_color(), label=f"{name} eval")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("loss (nats per token)")
    curves.set_title("Training curves from trainer_state.json log_history")
    if curves.lines:
        curves.legend(fontsize=7)
    else:
        curves.text(0.5, 0.5, "no log_history recorded", ha="center", transform=curves.transAxes)


def plot_candidates(analysis: dict[str, Any]) -> Any:
    """The candidates figure, drawn but not saved (a malformed report fails here, before any file)."""
    plt = pyplot()
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    _final_losses(bars, analysis)
    _training_curves(curves, analysis)
    fig.suptitle("LoRA candidates")
    return fig
