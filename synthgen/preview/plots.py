"""Asked-vs-drawn plots of each label, drawn from its merged statistics (no sample is read).

One style for every figure synthgen draws: a matplotlib `Figure` with the Agg canvas, never the
global pyplot state, saved without a version stamp so a rerun writes the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from synthgen.output.outdir import OutDir
from synthgen.recipe.joint import leaf
from synthgen.recipe.label_stats import Counts, Fitted, Grouped, LabelStats, Moments
from synthgen.recipe.schema import Recipe

ASKED_COLOR, DRAWN_COLOR = "#9aa5b1", "#1f77b4"


def new_figure(width: float, height: float, dpi: int = 100):
    """A Figure on the Agg canvas: no pyplot, no global state, no GUI backend."""
    # start-up time: `info` without --plots and run bookkeeping (plot_name) never draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _bars(ax, shares: Mapping[str, float], drawn: Counts, asked: bool) -> None:
    names = list(shares)
    x = np.arange(len(names))
    if asked:
        ax.bar(x - 0.2, list(shares.values()), 0.4, label="asked", color=ASKED_COLOR)
    ax.bar(x + 0.2, [drawn.share(v) for v in names], 0.4, label="drawn", color=DRAWN_COLOR)
    many = len(names) > 4
    ax.set_xticks(x, names, rotation=30 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("share of samples")


def _histogram(ax, spec, drawn: Moments, asked: bool) -> None:
    edges = np.array(drawn.edges)
    if drawn.n:
        heights = np.array(drawn.bins) / (drawn.n * np.diff(edges))
        ax.stairs(heights, edges, fill=True, color=DRAWN_COLOR, alpha=0.8, label="drawn")
    if asked:
        x = np.linspace(edges[0], edges[-1], 400)
        ax.plot(x, spec.density(x), color="black", linewidth=1.5, label="asked density")
    ax.set_ylabel("density")


def plot_label(name: str, spec, stats: LabelStats) -> bytes:
    """One label's asked-vs-drawn figure as PNG bytes. A label that depends on others is drawn
    alone: what was asked of it is in the card's conditional table."""
    figure = new_figure(5.6, 3.4)
    ax = figure.add_subplot()
    dependent = isinstance(stats, (Grouped, Fitted))
    marginal = stats.marginal if dependent else stats
    if isinstance(marginal, Moments):
        _histogram(ax, spec, marginal, asked=not dependent)
    else:
        plain = leaf(spec)
        _bars(ax, plain.asked_shares(), marginal, asked=not dependent)
        if plain.dist == "multilabel":
            ax.set_ylabel("rate per sample")
    ax.set_title(f"{name}: {'drawn' if dependent else 'asked vs drawn'} (n={stats.n})", fontsize=10)
    ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.2)  # room for the legend above the data
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return figure_png(figure)


def plot_name(label: str) -> str:
    return f"labels-{label}.png"


def label_plots(recipe: Recipe, stats: Mapping[str, LabelStats], folder: OutDir) -> list[str]:
    """Write `labels-NAME.png` for every label into `folder`; return the file names."""
    names = []
    for name, spec in recipe.labels.items():
        folder.write_atomic(plot_name(name), plot_label(name, spec, stats[name]))
        names.append(plot_name(name))
    return names
