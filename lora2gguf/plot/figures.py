"""matplotlib set-up shared by every plot: the file-only backend and reproducible PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora2gguf.artifacts import atomic_file


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: cluster nodes have no display. Imported here, not at
    module top, so that commands which never plot do not pay for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path) -> None:
    """Save as PNG through a temporary file, with fixed metadata so reruns give the same bytes."""
    plt = pyplot()
    with atomic_file(out) as temp:
        fig.savefig(temp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
