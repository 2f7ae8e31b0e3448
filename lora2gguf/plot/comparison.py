"""Plots of compare_models.json: size vs KL divergence, size vs perplexity, llama.cpp speed per type.

They read only the JSON report (nothing is recomputed). ``apply_style`` holds the look of these plots.
"""

from __future__ import annotations

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


# Where a point's label may go (side, vertical offset in points), tried in this order until one
# overlaps no earlier label, the legend nor the axes' edge.
_LABEL_SLOTS = (("right", 6), ("right", -8), ("left", 6), ("left", -8)) + tuple(
    (side, dy) for step in (18, 30, 42, 54) for dy in (step, -step - 2) for side in ("right", "left")
)


def _room_for_left_labels(ax: Any, xs: list[float]) -> None:
    """Widen the x axis to the left, so that a label written there is not cut off."""
    span = max(xs) - min(xs) or max(xs)
    ax.set_xlim(left=min(xs) - 0.4 * span, right=max(xs) + 0.15 * span)


def _annotate(ax: Any, x: float, y: float, text: str, slot: tuple[str, int]) -> Any:
    side, dy = slot
    return ax.annotate(
        text, (x, y), textcoords="offset points", xytext=(7 if side == "right" else -7, dy),
        ha="left" if side == "right" else "right", va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        fontsize=9,
        # a thin line from label to point: in a crowded column a label may sit nearer another point
        arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4},
    )


def _marker_box(ax: Any, x: float, y: float, half: float = 6.0) -> Any:
    """The display-space box a point's marker covers (about 12 pixels across)."""
    from matplotlib.transforms import Bbox

    px, py = ax.transData.transform((x, y))
    return Bbox.from_extents(px - half, py - half, px + half, py + half)


def _text_extent(note: Any, renderer: Any) -> Any:
    """The label's own box (an annotation's extent would include its leader line)."""
    from matplotlib.text import Text

    note.update_positions(renderer)
    return Text.get_window_extent(note, renderer)


def _place_labels(ax: Any, labels: list[tuple[float, float, str]]) -> None:
    """Annotate every point, each label where it overlaps no label placed before it (top points first);
    drawn once to measure the real text extents. A label with no free place takes the first slot."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    taken += [_marker_box(ax, x, y) for x, y, _ in labels]  # no label over another point
    for x, y, text in sorted(labels, key=lambda label: -label[1]):
        for slot in _LABEL_SLOTS:
            note = _annotate(ax, x, y, text, slot)
            box = _text_extent(note, renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in taken):
                break
            note.remove()
        else:
            note = _annotate(ax, x, y, text, _LABEL_SLOTS[0])
            box = _text_extent(note, renderer)
        taken.append(box)


def plot_size_vs_kl(report: dict[str, Any], model: str) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots()
    points = _points(report)
    means = [m["kl_divergence"]["mean"] for m in points]
    positive = [v for m in points for v in (m["kl_divergence"]["mean"], m["kl_divergence"]["p99"]) if v > 0]
    # A log axis cannot show an exact zero (identical distributions): draw it at a floor, labelled.
    floor = min(positive) / 10 if positive else 1e-12
    xs = [m["size_bytes"] / 2**20 for m in points]
    labels = []
    for m, mean, x in zip(points, means, xs):
        color, marker = _style(m)
        p99 = max(m["kl_divergence"]["p99"], floor)
        ax.plot([x, x], [max(mean, floor), p99], color=color, alpha=0.35, linewidth=2)
        ax.scatter([x], [max(mean, floor)], s=70 if marker != "D" else 45, color=color, marker=marker, zorder=3)
        ax.scatter([x], [p99], s=25, facecolors="none", edgecolors=color, zorder=3)
        suffix = " (=0)" if mean <= 0 else ""
        labels.append((x, max(mean, floor), f"{m['label']}{suffix}, {m['bits_per_weight']:.2f} bpw"))
    _room_for_left_labels(ax, xs)
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
    _place_labels(ax, labels)
    return fig


def plot_size_vs_perplexity(report: dict[str, Any], model: str) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots()
    ref = report["reference"]["perplexity"]
    ax.axhline(ref, color=REFERENCE_COLOR, linestyle="--", linewidth=1, label=f"PyTorch float32: {ref:.3f}")
    points = _points(report)
    xs = [m["size_bytes"] / 2**20 for m in points]
    labels = []
    for m, x in zip(points, xs):
        color, marker = _style(m)
        ax.scatter([x], [m["perplexity"]], s=70 if marker != "D" else 45, zorder=3, color=color, marker=marker)
        labels.append((x, m["perplexity"], f"{m['label']}: {m['perplexity']:.3f} (x{m['perplexity_ratio']:.4f})"))
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("perplexity on the held-out text")
    ax.legend(loc="upper right")
    ax.set_title(f"{model}: size vs perplexity (llama.cpp, {report['settings']['tokens_scored']} tokens)")
    ax.margins(x=0.15, y=0.2)
    _room_for_left_labels(ax, xs)
    _place_labels(ax, labels)
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
