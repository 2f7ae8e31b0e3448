"""Plots of compare_models.json: size vs KL divergence, size vs perplexity, llama.cpp speed per type.

They read only the JSON report (nothing is recomputed). ``apply_style`` holds the look of these plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import Output, check_paths
from lora2gguf.errors import Lora2ggufError
from lora2gguf.layout import COMPARISON_PLOT_NAME, COMPARISON_PLOTS, SIZE_VS_KL, SIZE_VS_PERPLEXITY, SPEED
from lora2gguf.plot.figures import MALFORMED, draw_figure, malformed_report, read_report, save_figures
from lora2gguf.plot.figures import pyplot as plain_pyplot

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
IMATRIX_COLOR = "#2ca02c"
# Points whose sizes differ by less than this fraction share a label column (see _label_slots).
_SAME_SIZE = 0.10


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, styled."""
    plt = plain_pyplot()
    apply_style(plt)
    return plt


def apply_style(plt: Any) -> None:
    plt.rcParams.update(STYLE)


def _is_float_file(label: str) -> bool:
    return label in ("F16", "BF16", "F32")


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(report["models"], key=lambda m: m["size_bytes"])


def _style(m: dict[str, Any]) -> tuple[str, str]:
    """(color, marker): float files, plain quantizations, quantizations with an importance matrix."""
    if _is_float_file(m["label"]):
        return F16_COLOR, "*"
    if m.get("imatrix"):
        return IMATRIX_COLOR, "D"
    return QUANT_COLOR, "o"


# (horizontal side, vertical offset in points) for the labels of points of nearly equal size,
# from the highest point down: right above, left, right below, left below.
_SLOTS = (("right", 6), ("left", 0), ("right", -8), ("left", -8))


def _label_slots(xs: list[float], ys: list[float]) -> list[tuple[str, int]]:
    """Where each point's label goes. Points of nearly equal size (Q4_K_M, its imatrix twin and
    Q5_K_M) are stacked in one column, so their labels are spread by height over both sides; a
    lone point alternates above / below its neighbours."""
    slots: list[tuple[str, int]] = [("right", 6)] * len(xs)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    k = 0
    lone = 0
    while k < len(order):
        group = [order[k]]
        while k + len(group) < len(order) and xs[order[k + len(group)]] <= xs[order[k]] * (1 + _SAME_SIZE):
            group.append(order[k + len(group)])
        if len(group) == 1:
            slots[group[0]] = ("right", 6 if lone % 2 == 0 else -8)
            lone += 1
        else:
            for rank, i in enumerate(sorted(group, key=lambda i: -ys[i])):
                slots[i] = _SLOTS[rank % len(_SLOTS)]
        k += len(group)
    return slots


def _room_for_left_labels(ax: Any, xs: list[float], slots: list[tuple[str, int]]) -> None:
    """Widen the x axis to the left when a label is written there, so it is not cut off."""
    if any(side == "left" for side, _ in slots):
        span = max(xs) - min(xs) or max(xs)
        ax.set_xlim(left=min(xs) - 0.4 * span, right=max(xs) + 0.15 * span)


def _annotate(ax: Any, x: float, y: float, text: str, slot: tuple[str, int]) -> None:
    side, dy = slot
    ax.annotate(
        text, (x, y), textcoords="offset points", xytext=(7 if side == "right" else -7, dy),
        ha="left" if side == "right" else "right", va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        fontsize=9,
    )


def plot_size_vs_kl(report: dict[str, Any], model: str) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots()
    points = _points(report)
    means = [m["kl_divergence"]["mean"] for m in points]
    positive = [v for m in points for v in (m["kl_divergence"]["mean"], m["kl_divergence"]["p99"]) if v > 0]
    # A log axis cannot show an exact zero (identical distributions): draw it at a floor, labelled.
    floor = min(positive) / 10 if positive else 1e-12
    xs = [m["size_bytes"] / 2**20 for m in points]
    # label slots on the log axis: compare heights as logarithms
    slots = _label_slots(xs, [math.log10(max(v, floor)) for v in means])
    for m, mean, x, slot in zip(points, means, xs, slots):
        color, marker = _style(m)
        p99 = max(m["kl_divergence"]["p99"], floor)
        ax.plot([x, x], [max(mean, floor), p99], color=color, alpha=0.35, linewidth=2)
        ax.scatter([x], [max(mean, floor)], s=70 if marker != "D" else 45, color=color, marker=marker, zorder=3)
        ax.scatter([x], [p99], s=25, facecolors="none", edgecolors=color, zorder=3)
        suffix = " (=0)" if mean <= 0 else ""
        _annotate(ax, x, max(mean, floor), f"{m['label']}{suffix}, {m['bits_per_weight']:.2f} bpw", slot)
    _room_for_left_labels(ax, xs, slots)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("KL divergence from PyTorch float32 (nats per token)")
    ax.scatter([], [], marker="*", color=F16_COLOR, s=70, label="float GGUF (reference point)")
    ax.scatter([], [], marker="o", color=QUANT_COLOR, label="quantized, mean")
    if any(m.get("imatrix") for m in points):
        ax.scatter([], [], marker="D", color=IMATRIX_COLOR, s=45, label="quantized with imatrix, mean")
    ax.scatter([], [], facecolors="none", edgecolors="grey", label="99th percentile")
    ax.legend(loc="upper right")
    ax.set_title(f"{model}: size vs KL divergence ({report['settings']['positions_scored']} positions)")
    return fig


def plot_size_vs_perplexity(report: dict[str, Any], model: str) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots()
    ref = report["reference"]["perplexity"]
    ax.axhline(ref, color=REFERENCE_COLOR, linestyle="--", linewidth=1, label=f"PyTorch float32: {ref:.3f}")
    points = _points(report)
    xs = [m["size_bytes"] / 2**20 for m in points]
    slots = _label_slots(xs, [m["perplexity"] for m in points])
    for m, x, slot in zip(points, xs, slots):
        color, marker = _style(m)
        ax.scatter([x], [m["perplexity"]], s=70 if marker != "D" else 45, zorder=3, color=color, marker=marker)
        _annotate(ax, x, m["perplexity"], f"{m['label']}: {m['perplexity']:.3f} (x{m['perplexity_ratio']:.4f})", slot)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("perplexity on the held-out text")
    ax.legend(loc="upper right")
    ax.set_title(f"{model}: size vs perplexity (llama.cpp, {report['settings']['tokens_scored']} tokens)")
    ax.margins(x=0.15, y=0.2)
    _room_for_left_labels(ax, xs, slots)
    return fig


def plot_speed(report: dict[str, Any], model: str) -> Any:
    plt = pyplot()
    points = _points(report)
    labels = [m["label"] for m in points]
    fig, (pp_ax, tg_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in (
        (pp_ax, "prompt_tokens_per_s", f"prompt processing ({report['settings']['speed_prompt_tokens']} tokens)"),
        (tg_ax, "generation_tokens_per_s", "generation (one token at a time)"),
    ):
        values = [m["speed"][key] or 0.0 for m in points]
        colors = [_style(m)[0] for m in points]
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
    return fig


PLOTTERS = {
    SIZE_VS_KL: plot_size_vs_kl,
    SIZE_VS_PERPLEXITY: plot_size_vs_perplexity,
    SPEED: plot_speed,
}


def plot_comparison(report: dict[str, Any], model: str, kinds: list[str]) -> list[Any]:
    """The figure of each requested kind (layout.COMPARISON_PLOTS), all drawn before any is saved, so
    that a report that fails on the last one leaves no plot behind."""
    figures: list[Any] = []
    try:
        for kind in kinds:
            figures.append(draw_figure(PLOTTERS[kind], report, model))
    except BaseException:
        for fig in figures:
            plain_pyplot().close(fig)
        raise
    return figures


@dataclass
class ComparisonPlotOptions:
    """What ``lora2gguf plot comparison`` was asked: explicit paths per kind and / or a folder that
    gets every kind not given explicitly."""

    compare: Path
    model: str | None = None
    out_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)


def _model_name(report: dict[str, Any], compare: Path) -> str:
    ref = Path(report.get("reference", {}).get("path", "")).name
    return ref.removesuffix("-merged") or compare.parent.name


def _outputs(options: ComparisonPlotOptions, model: str) -> dict[str, Path]:
    outputs = dict(options.paths)
    if options.out_dir is not None:
        for kind in COMPARISON_PLOTS:
            outputs.setdefault(kind, options.out_dir / COMPARISON_PLOT_NAME.format(model=model, kind=kind))
    if not outputs:
        raise Lora2ggufError("plot comparison: give --out-dir or at least one of --" + ", --".join(COMPARISON_PLOTS))
    return outputs


def _check_paths(options: ComparisonPlotOptions, outputs: dict[str, Path]) -> None:
    """No plot may overwrite the report or another plot, or land on a folder."""
    labels = {kind: f"--{kind}" if kind in options.paths else f"the {kind} plot (--out-dir)" for kind in outputs}
    check_paths([("--compare", options.compare)], [Output(labels[kind], path) for kind, path in outputs.items()])


def draw_comparison(options: ComparisonPlotOptions) -> None:
    """Read compare_models.json and draw the requested plots; a malformed report names its file."""
    report = read_report(options.compare)
    if not report.get("models"):
        raise Lora2ggufError(f"{options.compare}: key 'models' is missing or empty: no models to plot")
    try:
        model = options.model or _model_name(report, options.compare)
    except MALFORMED as exc:
        raise malformed_report(options.compare, exc) from None
    outputs = _outputs(options, model)
    _check_paths(options, outputs)
    try:
        figures = plot_comparison(report, model, list(outputs))
    except MALFORMED as exc:
        raise malformed_report(options.compare, exc) from None
    save_figures(list(zip(figures, outputs.values())))
