"""Seeing a schedule's plan: a table of rows per epoch and a picture.

:func:`timeline` evaluates a :class:`~layerfreeze.Schedule` at each epoch
without touching the model (the rows come from the schedule itself,
:meth:`~layerfreeze.Schedule.timeline`); :func:`plot_timeline`, with the same
arguments and a path, draws them (groups x epochs,
frozen or trainable, and the trainable-parameter count as a line).
matplotlib is imported only inside :func:`plot_timeline`, and drawn with its
Agg canvas directly, so no display and no global backend switch is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .schedule import Schedule, TimelineRow

__all__ = ["TimelineRow", "format_timeline", "plot_timeline", "timeline"]


def timeline(
    schedule: Schedule,
    model: nn.Module,
    epochs: int,
    *,
    start: int = 0,
    steps_per_epoch: int | None = None,
    lr: float = 1.0,
) -> list[TimelineRow]:
    """One :class:`TimelineRow` per epoch: :meth:`Schedule.timeline
    <layerfreeze.Schedule.timeline>`, as the table that :func:`plot_timeline`
    (same arguments, and a path) draws.

    Raises:
        SelectorError: a rule's selector does not fit ``model``.
        ArgumentError: ``epochs`` or ``steps_per_epoch`` is not positive.

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> [r.frozen for r in timeline(lf.Schedule().freeze("[0]", until_epoch=1), net, 2)]
        [['[0]'], []]
    """
    return schedule.timeline(model, epochs, start=start, steps_per_epoch=steps_per_epoch, lr=lr)


def format_timeline(rows: list[TimelineRow], groups: list[str], *, width: int | None = None) -> Any:
    """The rows as a rich table (``rich`` is imported here).

    Each group is a column; a cell says ``frozen`` or gives the group's lr
    (the rows' ``lr``: a factor of the base lr unless a base lr was given).
    When the full group labels would make the table wider than ``width``
    columns, the columns are headed ``g0``, ``g1``, ... and the caption
    says which label each stands for.

    Args:
        rows: from :func:`timeline`.
        groups: the group labels, in column order.
        width: the width to fit (None: never abbreviate).

    Returns:
        rich.table.Table: the table.

    Raises:
        ImportError: rich is not installed (``pip install 'layerfreeze[report]'``).

    Example:
        >>> import torch.nn as nn, layerfreeze as lf
        >>> from layerfreeze.timeline import format_timeline
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> s = lf.Schedule().freeze("[0]", until_epoch=1)
        >>> format_timeline(s.timeline(net, 2), ["[0]"], width=80).row_count
        2
    """
    from ._optional import require

    require("rich", "report", "the plan table")
    from rich.console import Console
    from rich.table import Table

    base = rows[0].base_lr if rows else 1.0
    what = "lr factor (x base lr)" if base == 1.0 else f"lr (base lr {base:g})"

    def build(headers: list[str], legend: str) -> Table:
        table = Table(
            title="freeze plan", caption=f"cells: {what} or frozen{legend}", caption_justify="left", show_lines=False
        )
        table.add_column("epoch", justify="right")
        table.add_column("trainable", justify="right")
        for header in headers:
            table.add_column(header, justify="center", no_wrap=True)
        for row in rows:
            cells = []
            for label in groups:
                if label in row.frozen:
                    cells.append("[dim]frozen[/dim]")
                else:
                    cells.append(f"[green]{row.lr.get(label, base):.3g}[/green]")
            table.add_row(str(row.epoch), f"{row.trainable:,}", *cells)
        return table

    table = build(list(groups), "")
    if width is None or Console(width=10_000).measure(table).maximum <= width:
        return table
    keys = [f"g{i}" for i in range(len(groups))]
    # no space inside an entry, so the caption wraps only between entries
    legend = "; " + ", ".join(f"{k}={label}" for k, label in zip(keys, groups, strict=True))
    return build(keys, legend)


def plot_timeline(
    schedule: Schedule,
    model: nn.Module,
    epochs: int,
    path: str | Path,
    *,
    start: int = 0,
    steps_per_epoch: int | None = None,
    lr: float = 1.0,
    title: str | None = None,
) -> Path:
    """Draw the plan as a PNG: groups x epochs, frozen or trainable, with the
    trainable-parameter count as a line.

    Trainable cells are shaded by their lr scale (darker: a higher lr), so
    discriminative learning rates show. Uses matplotlib's Agg canvas: works
    without a display and leaves pyplot's backend alone.

    Args:
        schedule: the schedule.
        model: the model it is for.
        epochs: how many epochs to draw.
        path: where to write the PNG.
        start: the first epoch.
        steps_per_epoch: for step-based rules (see :meth:`Schedule.timeline`).
        lr: the base learning rate (shading is relative, so it only matters
            through the rows; as for :func:`timeline`).
        title: the figure title.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: matplotlib is not installed; the message says
            ``pip install 'layerfreeze[report]'``.

    Example:
        >>> import tempfile, torch.nn as nn, layerfreeze as lf
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
        >>> s = lf.Schedule().gradual_unfreeze(["[0]", "[1]", "[2]"], start_epoch=1)
        >>> lf.plot_timeline(s, net, epochs=4, path=tempfile.mkdtemp() + "/plan.png").suffix
        '.png'
    """
    from ._optional import require

    require("matplotlib", "report", "lf.plot_timeline")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = timeline(schedule, model, epochs, start=start, steps_per_epoch=steps_per_epoch, lr=lr)
    labels = [label for label, _ in schedule.groups(model)]
    top = max((max(r.lr.values(), default=1.0) for r in rows), default=1.0) or 1.0
    # 0: frozen; (0, 1]: trainable, by lr relative to the largest
    grid = [
        [0.0 if label in r.frozen else 0.35 + 0.65 * r.lr.get(label, 1.0) / top for r in rows]
        for label in labels
    ]
    epochs_axis = [r.epoch for r in rows]

    height = 2.0 + 0.32 * len(labels)
    fig = Figure(figsize=(min(12.0, 2.5 + 0.45 * len(rows)), height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#d9d9d9"] + [(0.1, 0.45 + 0.25 * (1 - k / 9), 0.85 - 0.4 * k / 9) for k in range(10)]
    cmap = ListedColormap(colors)
    ax.imshow(
        grid,
        aspect="auto",
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(epochs_axis[0] - 0.5, epochs_axis[-1] + 0.5, len(labels) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()  # bottom group at the bottom
    ax.set_xticks(epochs_axis)
    ax.set_xlabel("epoch")
    ax.set_ylabel("group (bottom first)")
    for x in epochs_axis[:-1]:
        ax.axvline(x + 0.5, color="white", linewidth=0.8)
    for y in range(len(labels) - 1):
        ax.axhline(y + 0.5, color="white", linewidth=0.8)
    line_ax = ax.twinx()
    line_ax.plot(epochs_axis, [r.trainable for r in rows], color="#c0392b", marker="o", linewidth=1.8)
    line_ax.set_ylabel("trainable params", color="#c0392b")
    line_ax.tick_params(axis="y", colors="#c0392b")
    line_ax.set_ylim(bottom=0)
    ax.legend(
        handles=[
            Patch(color=colors[0], label="frozen"),
            Patch(color=colors[-1], label="trainable (darker: higher lr)"),
        ],
        loc="upper left",
        bbox_to_anchor=(0.0, -0.22 - 0.5 / (1 + len(labels))),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.set_title(title or "freeze plan", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
