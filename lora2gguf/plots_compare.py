"""Plots of compare_models.json: size vs KL divergence, size vs perplexity, llama.cpp speed per type.

They read only the JSON report (nothing is recomputed). ``apply_style`` holds the look shared by every
plot of the project (the candidates plot in lora2gguf.plots uses it too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The kinds of comparison plot and their file-name suffix: results/plots/{model}-{kind}.png
KINDS = ("size-vs-kl", "size-vs-perplexity", "speed")

STYLE: dict[str, Any] = {
    "figure.figsize": (8.0, 5.0),
    "figure.dpi": 120,
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.frameon": False,
}
REFERENCE_COLOR = "#444444"
F16_COLOR = "#d62728"
QUANT_COLOR = "#1f77b4"


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (cluster nodes have no display), styled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    apply_style(plt)
    return plt


def apply_style(plt: Any) -> None:
    plt.rcParams.update(STYLE)


def _is_float_file(label: str) -> bool:
    return label in ("F16", "BF16", "F32")


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(report["models"], key=lambda m: m["size_bytes"])


def _annotate(ax: Any, x: float, y: float, text: str, index: int) -> None:
    """Label a point; neighbours in size order alternate above / below so that types of nearly
    equal size (Q4_K_M and Q5_K_M) do not print over each other."""
    above = index % 2 == 0
    ax.annotate(
        text, (x, y), textcoords="offset points", xytext=(7, 6 if above else -8),
        va="bottom" if above else "top", fontsize=9,
    )


def plot_size_vs_kl(report: dict[str, Any], model: str, out: Path) -> None:
    from lora2gguf.plots import save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    points = _points(report)
    means = [m["kl_divergence"]["mean"] for m in points]
    positive = [v for m in points for v in (m["kl_divergence"]["mean"], m["kl_divergence"]["p99"]) if v > 0]
    # A log axis cannot show an exact zero (identical distributions): draw it at a floor, labelled.
    floor = min(positive) / 10 if positive else 1e-12
    for index, (m, mean) in enumerate(zip(points, means)):
        x = m["size_bytes"] / 2**20
        is_float = _is_float_file(m["label"])
        color = F16_COLOR if is_float else QUANT_COLOR
        p99 = max(m["kl_divergence"]["p99"], floor)
        ax.plot([x, x], [max(mean, floor), p99], color=color, alpha=0.35, linewidth=2)
        ax.scatter([x], [max(mean, floor)], s=70, color=color, marker="*" if is_float else "o", zorder=3)
        ax.scatter([x], [p99], s=25, facecolors="none", edgecolors=color, zorder=3)
        suffix = " (=0)" if mean <= 0 else ""
        _annotate(ax, x, max(mean, floor), f"{m['label']}{suffix}, {m['bits_per_weight']:.2f} bpw", index)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("KL divergence from PyTorch float32 (nats per token)")
    ax.scatter([], [], marker="*", color=F16_COLOR, s=70, label="float GGUF (reference point)")
    ax.scatter([], [], marker="o", color=QUANT_COLOR, label="quantized, mean")
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="99th percentile")
    ax.legend(loc="upper right")
    ax.set_title(f"{model}: size vs KL divergence ({report['settings']['positions_scored']} positions)")
    save_figure(fig, out)
    logger.info("wrote %s", out)


def plot_size_vs_perplexity(report: dict[str, Any], model: str, out: Path) -> None:
    from lora2gguf.plots import save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ref = report["reference"]["perplexity"]
    ax.axhline(ref, color=REFERENCE_COLOR, linestyle="--", linewidth=1, label=f"PyTorch float32: {ref:.3f}")
    for index, m in enumerate(_points(report)):
        x = m["size_bytes"] / 2**20
        is_float = _is_float_file(m["label"])
        ax.scatter(
            [x], [m["perplexity"]], s=70, zorder=3,
            color=F16_COLOR if is_float else QUANT_COLOR, marker="*" if is_float else "o",
        )
        _annotate(ax, x, m["perplexity"], f"{m['label']}: {m['perplexity']:.3f} (x{m['perplexity_ratio']:.4f})", index)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("perplexity on the held-out text")
    ax.legend(loc="upper right")
    ax.set_title(f"{model}: size vs perplexity (llama.cpp, {report['settings']['tokens_scored']} tokens)")
    ax.margins(x=0.15, y=0.2)
    save_figure(fig, out)
    logger.info("wrote %s", out)


def plot_speed(report: dict[str, Any], model: str, out: Path) -> None:
    from lora2gguf.plots import save_figure

    plt = pyplot()
    points = _points(report)
    labels = [m["label"] for m in points]
    fig, (pp_ax, tg_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in (
        (pp_ax, "prompt_tokens_per_s", f"prompt processing ({report['settings']['speed_prompt_tokens']} tokens)"),
        (tg_ax, "generation_tokens_per_s", "generation (one token at a time)"),
    ):
        values = [m["speed"][key] or 0.0 for m in points]
        colors = [F16_COLOR if _is_float_file(label) else QUANT_COLOR for label in labels]
        bars = ax.bar(labels, values, color=colors)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                        va="bottom", fontsize=9)
        ax.set_ylabel("tokens per second")
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(False, axis="x")
    threads = sorted({m["speed"]["threads"] for m in points})
    fig.suptitle(f"{model}: llama.cpp CPU speed per type ({', '.join(map(str, threads))} threads)")
    loads = [m["speed"].get("load_average_1min") for m in points]
    if all(v is not None for v in loads):
        cpus = report.get("device_info", {}).get("cpu_count")
        # Other processes on the machine slow llama.cpp down: show how busy it was while measuring.
        fig.text(
            0.5, -0.02,
            f"1-minute load average while measuring: {min(loads):.1f} to {max(loads):.1f}"
            + (f" on {cpus} CPUs" if cpus else ""),
            ha="center", fontsize=9, color=REFERENCE_COLOR,
        )
    save_figure(fig, out)
    logger.info("wrote %s", out)


PLOTTERS = {
    "size-vs-kl": plot_size_vs_kl,
    "size-vs-perplexity": plot_size_vs_perplexity,
    "speed": plot_speed,
}


def plot_comparison(report: dict[str, Any], model: str, outputs: dict[str, Path]) -> None:
    """Draw each requested kind (a key of KINDS) to its path."""
    if not report.get("models"):
        raise ValueError("compare_models.json has no models to plot")
    for kind, out in outputs.items():
        PLOTTERS[kind](report, model, out)
