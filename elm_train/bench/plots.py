"""The study's four figures, drawn from measured rows only (matplotlib, no display needed).

Each plotted point is the best Token/$ over the axes the figure does not show, as in the
study. A figure whose comparison has fewer than two measured values is not drawn; the
reason goes into the report instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class FigureSpec:
    file: str
    title: str
    x: str           # row key on the x axis
    x_label: str
    line: str        # row key that tells the lines apart
    by_model: bool   # one panel per model size


FIGURES = (
    FigureSpec("fig1_attention.png", "FlashAttention vs vanilla attention", "batch_size",
               "per-device batch size", "attention", True),
    FigureSpec("fig2_gpu_types.png", "GPU types", "batch_size", "per-device batch size",
               "gpu_type", True),
    FigureSpec("fig3_strategies.png", "DDP vs FSDP by number of GPUs", "world_size",
               "GPUs (all nodes)", "strategy", True),
    FigureSpec("fig4_global_batch.png", "Global batch size", "global_batch_size",
               "global batch size (sequences)", "model", False),
)


def successful(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_dollar")]


def models_by_size(rows: Iterable[Row]) -> list[str]:
    sizes = {r["model"]: r.get("params") or 0 for r in rows}
    return sorted(sizes, key=lambda m: (sizes[m], m))


def best_points(rows: Iterable[Row], group: Callable[[Row], Any], metric: str = "tokens_per_dollar"
                ) -> dict[Any, Row]:
    """The row with the highest `metric` in each group."""
    best: dict[Any, Row] = {}
    for row in rows:
        key = group(row)
        if row.get(metric) is not None and (key not in best or row[metric] > best[key][metric]):
            best[key] = row
    return best


def why_not_drawn(figure: FigureSpec, rows: list[Row]) -> str | None:
    """None when the figure has a comparison to show, else the reason it is left out."""
    lines = sorted({str(r[figure.line]) for r in rows})
    if len(lines) < 2:
        shown = ", ".join(lines) or "nothing"
        return f"not drawn: it compares {figure.line} values and only {shown} was measured"
    if not figure.by_model:
        if len({r[figure.x] for r in rows}) < 2:
            return f"not drawn: only one {figure.x_label} was measured"
        return None
    compared = [m for m in models_by_size(rows)
                if len({str(r[figure.line]) for r in rows if r["model"] == m}) >= 2]
    if not compared:
        return (f"not drawn: no model size was measured with two or more {figure.line} values")
    return None


def draw(figure: FigureSpec, rows: list[Row], destination: Path, currency: str) -> None:
    from matplotlib.figure import Figure

    panels = models_by_size(rows) if figure.by_model else [None]
    columns = min(4, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * grid_rows), layout="constrained")
    axes = fig.subplots(grid_rows, columns, squeeze=False).ravel()
    line_values = sorted({str(r[figure.line]) for r in rows})
    colours = {value: f"C{i}" for i, value in enumerate(line_values)}
    for ax, model in zip(axes, panels, strict=False):
        panel_rows = [r for r in rows if model is None or r["model"] == model]
        best = best_points(panel_rows, lambda r: (str(r[figure.line]), r[figure.x]))
        for value in line_values:
            points = sorted((x, row["tokens_per_dollar"]) for (line, x), row in best.items()
                            if line == value)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=colours[value], label=value)
        ax.set_xscale("log", base=2)
        ticks = sorted({x for _, x in best})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(figure.x_label)
        ax.set_ylabel(f"tokens per {currency}")
        ax.set_title(model if model is not None else figure.title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if figure.by_model:
        fig.suptitle(figure.title)
    temporary = destination.with_name(f".{destination.name}.tmp.png")
    fig.savefig(temporary, dpi=110)
    os.replace(temporary, destination)


def write_figures(rows: list[Row], directory: Path, currency: str) -> dict[str, str | None]:
    """Draw every figure that has something to show; {file: None if drawn, else the reason}.
    A figure not drawn now is removed, so no stale image outlives the data behind it."""
    measured = successful(rows)
    outcome: dict[str, str | None] = {}
    for figure in FIGURES:
        path = directory / figure.file
        reason = why_not_drawn(figure, measured)
        if reason is None:
            draw(figure, measured, path, currency)
        else:
            path.unlink(missing_ok=True)
        outcome[figure.file] = reason
    return outcome

