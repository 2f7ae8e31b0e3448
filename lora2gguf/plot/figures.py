"""What every plot shares: the file-only matplotlib backend, reproducible PNG files written all or
none, and reading the report a plot is drawn from."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora2gguf.artifacts import atomic_file, read_json
from lora2gguf.errors import Lora2ggufError

logger = logging.getLogger(__name__)

# What a report of the wrong shape raises while it is drawn: a missing key (KeyError), a list where a
# mapping belongs (AttributeError, TypeError), a string where a number belongs (ValueError, TypeError).
MALFORMED = (KeyError, IndexError, TypeError, AttributeError, ValueError)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: cluster nodes have no display. Imported here, not at
    module top, so that commands which never plot do not pay for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_report(path: Path) -> dict[str, Any]:
    """The JSON report a plot is drawn from; anything but a JSON object is refused, naming the file."""
    report = read_json(path)
    if not isinstance(report, dict):
        kind = type(report).__name__
        raise Lora2ggufError(f"{path}: not a JSON object (the top level is a {kind}); nothing was plotted")
    return report


def malformed_report(path: Path, exc: BaseException) -> Lora2ggufError:
    """One line naming the report and what in it did not fit (one of MALFORMED, raised while drawing)."""
    if isinstance(exc, KeyError):
        return Lora2ggufError(f"{path}: missing or malformed key {exc}")
    return Lora2ggufError(f"{path}: malformed report: a value has the wrong type or form ({exc}); nothing was plotted")


def draw_figure(draw: Callable[..., Any], *args: Any) -> Any:
    """``draw(*args)``, which returns a new figure; a figure it opened and left behind by failing
    (a malformed report) is closed rather than kept in pyplot's list of open figures."""
    plt = pyplot()
    before = set(plt.get_fignums())
    try:
        return draw(*args)
    except BaseException:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)
        raise


def save_figures(figures: Sequence[tuple[Any, Path]]) -> None:
    """Save each (figure, path) as PNG with fixed metadata, so reruns give the same bytes. All or none:
    every file is written to its temporary path first and renamed into place only when all of them
    were written, so a failure (a full disk, say) leaves no plot of this run behind."""
    plt = pyplot()
    try:
        with contextlib.ExitStack() as stack:
            temps = [stack.enter_context(atomic_file(out)) for _, out in figures]
            for (fig, _), temp in zip(figures, temps):
                fig.savefig(temp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    finally:
        for fig, _ in figures:
            plt.close(fig)
    for _, out in figures:
        logger.info("wrote %s", out)
