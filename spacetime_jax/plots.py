"""Plots a person looks at, drawn with matplotlib's Agg canvas into PNG bytes (never shown, no
display needed, no global pyplot state) and written local or gs:// through etils.epath.

    write_loss_plot(workdir)   # WORKDIR/loss.png from WORKDIR/metrics.jsonl
    png = tradeoff_plot(curve, others, title=..., x_label=..., y_label=...)
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spacetime_jax.paths import PathLike, as_path, write_atomic
from spacetime_jax.training.progress import read_metrics

LOSS_PLOT = "loss.png"
DPI = 100
WIDTH_IN = 8.0  # 800 px
PANEL_HEIGHT_IN = 3.0  # 300 px per panel of the loss plot
TRADEOFF_HEIGHT_IN = 5.5  # 550 px
# Record fields that are bookkeeping, not curves.
NOT_PLOTTED = ("step", "steps_per_s", "elapsed_s")
# A curve whose values span more than this ratio is drawn on a log axis.
LOG_SCALE_RATIO = 20.0
CURVE_COLOR, OTHER_COLOR = "#1f4fd8", "#d62728"


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes, at DPI: its size in inches x DPI pixels."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def loss_panels(records: Sequence[dict]) -> list[list[str]]:
    """The metrics of `records` grouped into panels: every "*loss" metric together first (a
    training loss beside its held-out one), then one panel for each other metric."""
    names: list[str] = []
    for record in records:
        names += [n for n, v in record.items() if n not in NOT_PLOTTED and n not in names
                  and isinstance(v, (int, float))]
    losses = [n for n in names if n.endswith("loss")]
    return ([losses] if losses else []) + [[n] for n in names if n not in losses]


def loss_plot(records: Sequence[dict], title: str = "") -> bytes:
    """PNG of the metrics of metrics.jsonl records over their steps: WIDTH_IN x
    PANEL_HEIGHT_IN inches per panel (loss_panels), DPI pixels an inch."""
    panels = loss_panels(records)
    if not panels:
        raise ValueError("no metrics to plot in the records")
    figure = Figure(figsize=(WIDTH_IN, PANEL_HEIGHT_IN * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, names in zip(axes, panels):
        values = []
        for name in names:
            points = [(r["step"], r[name]) for r in records
                      if isinstance(r.get(name), (int, float))]
            steps, ys = zip(*points)
            ax.plot(steps, ys, marker="o" if len(points) <= 30 else None, markersize=3,
                    label=name)
            values += ys
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(values) / min(values) > LOG_SCALE_RATIO:
            ax.set_yscale("log")
        ax.set_ylabel(names[0] if len(names) == 1 else "loss")
        ax.grid(True, alpha=0.3)
        if len(names) > 1:
            ax.legend()
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    return png_bytes(figure)


def write_loss_plot(workdir: PathLike, records: Optional[Sequence[dict]] = None
                    ) -> Optional[epath.Path]:
    """Draws workdir/loss.png from `records` (default: workdir/metrics.jsonl); None when
    there is nothing to draw."""
    records = read_metrics(workdir) if records is None else records
    if not loss_panels(records):
        return None
    path = as_path(workdir) / LOSS_PLOT
    write_atomic(path, loss_plot(records, title=f"{as_path(workdir).name}: metrics.jsonl"))
    return path


def tradeoff_plot(curve: Sequence[tuple[str, float, float]],
                  others: Sequence[tuple[str, float, float]], *, title: str, x_label: str,
                  y_label: str, x_range: tuple[float, float] = (-0.05, 1.05),
                  thin_curves: Sequence[Sequence[tuple[float, float]]] = ()) -> bytes:
    """PNG of a trade-off: the (label, x, y) points of `curve` joined in order, `thin_curves`
    ((x, y) points, e.g. each seed's run of a mean curve) as thin lines beneath it, and
    `others` as separate labelled squares. WIDTH_IN x TRADEOFF_HEIGHT_IN inches."""
    figure = Figure(figsize=(WIDTH_IN, TRADEOFF_HEIGHT_IN), layout="constrained")
    ax = figure.subplots()
    for points in thin_curves:
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "-", color=CURVE_COLOR, linewidth=0.8, alpha=0.4)
    if curve:
        _, xs, ys = zip(*curve)
        ax.plot(xs, ys, "-o", color=CURVE_COLOR, linewidth=2, markersize=6)
        for label, x, y in curve:
            ax.annotate(label, (x, y), xytext=(-8, 0), textcoords="offset points",
                        ha="right", va="center", color=CURVE_COLOR,
                        bbox=dict(boxstyle="round,pad=0.1", facecolor="white",
                                  edgecolor="none", alpha=0.8))
    for label, x, y in others:
        ax.plot([x], [y], "s", color=OTHER_COLOR, markersize=7)
        ax.annotate(label, (x, y), xytext=(7, -3), textcoords="offset points", ha="left",
                    va="top", color=OTHER_COLOR)
    ax.set_xlim(*x_range)
    ys = ([y for _, _, y in list(curve) + list(others)]
          + [y for points in thin_curves for _, y in points])
    if ys:
        spread = (max(ys) - min(ys)) or 0.01
        ax.set_ylim(min(ys) - 0.1 * spread, max(ys) + 0.1 * spread)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    return png_bytes(figure)


def write_png_bytes(path: PathLike, png: bytes) -> epath.Path:
    """Writes PNG bytes at `path`, local or gs://, making its folder."""
    path = as_path(path)
    write_atomic(path, png)
    return path
