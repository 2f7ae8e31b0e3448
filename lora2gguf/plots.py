"""The candidates plot: how the LoRA runs compare, read only from model_analysis.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import atomic_file

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path) -> None:
    """Save as PNG through a temporary file, with fixed metadata so reruns give the same bytes."""
    plt = _pyplot()
    with atomic_file(out) as temp:
        fig.savefig(temp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_candidates(analysis: dict[str, Any], out: Path) -> None:
    plt = _pyplot()
    metric = analysis["metric"]
    names = analysis["ranking"]
    entries = analysis["candidates"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))

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

    for name in names:
        series = entries[name]["curves"]
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
    fig.suptitle("LoRA candidates")
    save_figure(fig, out)
    logger.info("wrote %s", out)
