"""PNG plot of a pruning run: per-block target and achieved sparsity (bars) and outlier ratio (line)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..utils import atomic_write

PLOT_NAME = "owl_sparsity.png"
PLOT_HINT = 'pip install "optimum-owl[plot]"  (installs matplotlib)'


def plot_block_sparsity(report: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the per-block sparsity and outlier ratio of a `PruneReport` into a PNG file (written atomically).

    Args:
        report (`PruneReport`): the run to plot; blocks without an outlier ratio get no line.
        path (`str` or `os.PathLike`): PNG file to write.
        title (`str`, *optional*): plot title; a default naming the method and target sparsity otherwise.

    Returns:
        `Path`: the written file.

    Example:

    ```python
    >>> plot_block_sparsity(report, "owl_sparsity.png")  # doctest: +SKIP
    ```
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"The sparsity plot needs matplotlib, which is not installed: {PLOT_HINT}") from err

    path = Path(path)
    blocks = report.blocks
    index = [b.index for b in blocks]
    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.4
    ax.bar([i - width / 2 for i in index], [b.target_sparsity for b in blocks], width, label="target sparsity", color="#9ecae1")
    ax.bar([i + width / 2 for i in index], [b.achieved_sparsity for b in blocks], width, label="achieved sparsity", color="#3182bd")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_ylim(0, 1)
    ax.set_xticks(index)
    handles, labels = ax.get_legend_handles_labels()
    ratios = [(b.index, b.outlier_ratio) for b in blocks if b.outlier_ratio is not None]
    if ratios:
        ax2 = ax.twinx()
        ax2.plot([i for i, _ in ratios], [100 * r for _, r in ratios], "o-", color="#e6550d", label="outlier ratio")
        ax2.set_ylabel("outlier ratio (%)")
        ax2.set_ylim(bottom=0)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    cfg = report.config or {}
    layerwise = str(cfg.get("layerwise", "?"))
    family = (getattr(report, "allocation", None) or {}).get("family")
    if family and family != layerwise:  # a search: name the family it chose
        layerwise = f"{family} (chosen by {layerwise})"
    ax.set_title(title or f"{cfg.get('method', '?')} + {layerwise}: mean sparsity {report.sparsity:.3f}", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
