"""The lineage chart as a PNG (``coldswarm-admin plot --out FILE.png``), drawn with matplotlib.

The same charts as the status page's (:func:`coldswarm.coordinator.lineage.charts`: the headline
charts, side by side), with the same markers per state and colours per metric.
"""

from __future__ import annotations

import io
from pathlib import Path

from coldswarm.common.durable import atomic_write_bytes
from coldswarm.coordinator import lineage


def write_png(entries: list[lineage.LineageEntry], out: Path, title: str = "") -> int:
    """Draw ``entries``' headline lineage charts into ``out``; returns how many charts it drew.

    Raises ValueError when no version carries a metric (there is nothing to draw).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    from matplotlib import pyplot as plt

    charts = [c for c in lineage.charts(entries) if not c["more"]]
    if not charts:
        raise ValueError(
            "no version carries metrics to plot: start the coordinator with --evaluator module:function"
        )
    fig, axes = plt.subplots(1, len(charts), figsize=(5.2 * len(charts), 4.4), squeeze=False)
    for ax, chart in zip(axes[0], charts, strict=True):
        _draw_chart(ax, chart)
    states = _state_legend()
    fig.legend(handles=states, loc="lower center", ncol=len(states), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue(), mode=0o644)  # a whole PNG or none, even if killed
    return len(charts)


def _draw_chart(ax, chart: dict) -> None:
    """One lineage chart: an edge from each version to its parent, a marker per version styled by its state."""
    from matplotlib.lines import Line2D

    for line in chart["lines"]:
        for (px, py), (x, y) in line["edges"]:
            ax.plot([px, x], [py, y], color=line["color"], alpha=0.55, linewidth=1.4, zorder=1)
        for p in line["points"]:
            look = lineage.style(p["state"], p["current"])
            ax.scatter(
                [p["x"]],
                [p["y"]],
                marker=look["mpl"],
                s=170 if p["current"] else 55,
                facecolors=line["color"] if look.get("filled", True) else "white",
                edgecolors=line["color"],
                linewidths=1.6,
                zorder=3,
            )
    ax.set_title(chart["title"], fontsize=11)
    ax.set_xlabel("version")
    ax.set_ylabel(chart["y_label"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.25)
    if len(chart["lines"]) > 1:
        handles = [
            Line2D([], [], color=ln["color"], linewidth=2, label=ln["metric"]) for ln in chart["lines"]
        ]
        ax.legend(handles=handles, fontsize=8, loc="best")


def _state_legend() -> list:
    """The figure's legend: one marker per version state, and the current version's."""
    from matplotlib.lines import Line2D

    states = [
        Line2D(
            [],
            [],
            linestyle="",
            marker=s["mpl"],
            markersize=8,
            color="#3b4252",
            markerfacecolor="#3b4252" if s["filled"] else "white",
            label=s["label"],
        )
        for s in lineage.STATE_STYLE.values()
    ]
    current = lineage.CURRENT_STYLE
    states.append(
        Line2D(
            [],
            [],
            linestyle="",
            marker=current["mpl"],
            markersize=12,
            color="#3b4252",
            label=current["label"],
        )
    )
    return states
