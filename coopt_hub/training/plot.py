"""The comparison as a picture: linear-probe accuracy against wall-clock seconds, one line per
objective at equal epochs, with its 95% interval over seeds as a band."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coopt_hub.training.compare import Comparison, Summary


def series_label(summary: Summary) -> str:
    return f"{summary.variant} ({summary.views} views)"


def curve_figure(comparison: Comparison) -> Figure:
    """One line (mean over seeds) per variant's equal-epoch run, a band where the seeds give an
    interval, and the equal wall-clock budget as a dotted vertical line."""
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)  # PNG rendering without pyplot's global state or a display
    axes = figure.add_subplot()
    for summary in comparison.summaries:
        if summary.budget != "epochs" or not summary.curve:
            continue
        seconds = [p.seconds.mean for p in summary.curve]
        accuracy = [p.accuracy.mean for p in summary.curve]
        (line,) = axes.plot(seconds, accuracy, marker="o", label=series_label(summary))
        if all(p.accuracy.half_width is not None for p in summary.curve):
            axes.fill_between(seconds, [p.accuracy.low for p in summary.curve],
                              [p.accuracy.high for p in summary.curve], color=line.get_color(), alpha=0.2)
    if comparison.time_budget:
        axes.axvline(comparison.time_budget, color="gray", linestyle=":", label="equal wall-clock budget")
    clock = "training seconds"
    if comparison.labeling_seconds:
        clock += f" (coopt: + {comparison.labeling_seconds:.0f} s of labelling)"
    axes.set_xlabel(clock)
    axes.set_ylabel("linear-probe accuracy")
    seeds = max((len(s.seeds) for s in comparison.summaries), default=0)
    axes.set_title(f"Probe accuracy vs wall-clock, mean of {seeds} seed(s)"
                   + (", 95% interval bands" if seeds > 1 else ""))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def save_plot(comparison: Comparison, path: Path) -> Path:
    curve_figure(comparison).savefig(path, format="png")
    return path
