"""A PNG of the per-layer locate distances (needs matplotlib: pip install 'dinm[plot]')."""

from __future__ import annotations

import os

from .errors import DinmError


def plot_distances(distances: list[float], layer: int, path: str | os.PathLike, title: str = "") -> None:
    """Save a bar chart of `distances` with the chosen `layer` highlighted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DinmError("plotting needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    colors = ["tab:red" if i == layer else "tab:blue" for i in range(len(distances))]
    ax.bar(range(len(distances)), distances, color=colors)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("distance (safe vs unsafe)")
    ax.set_title(title or f"toxic layer: {layer}")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
