"""What a comparison leaves for people: a markdown table with the findings, a JSON file with every
figure and run, and a PNG plot (training/plot.py), written side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from coopt_hub.core.files import write_text_atomically
from coopt_hub.training.compare import Comparison, Summary
from coopt_hub.training.plot import save_plot

BUDGET_NAMES = {"epochs": "equal epochs", "time": "equal wall-clock"}


def _row(summary: Summary) -> list[str]:
    accuracy = "-" if summary.accuracy is None else summary.accuracy.text()
    return [summary.variant, BUDGET_NAMES[summary.budget], summary.views, str(len(summary.seeds)),
            f"{summary.epochs.mean:.2f}", f"{summary.clock_seconds.mean:.1f}", f"{summary.samples_per_s.mean:.0f}",
            accuracy]


def markdown_table(comparison: Comparison) -> str:
    header = ["objective", "budget", "views", "seeds", "epochs", "seconds", "samples/s", "probe acc (95% interval)"]
    lines = [header, ["---"] * len(header), *(_row(s) for s in comparison.summaries)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _settings(comparison: Comparison) -> list[str]:
    notes = []
    origin, config = comparison.origin, comparison.config
    if origin is not None:
        notes.append(f"Dataset: {origin.repo}@{origin.revision} (commit {origin.commit[:12]}); students trained on "
                     f"split `{origin.train_split}`, probe scored on split `{origin.eval_split}`.")
    if config is not None:
        notes.append(f"Student: {config.arch}, batch {config.batch_size}, AdamW lr {config.lr}, {config.epochs} "
                     f"epoch(s); linear probe on frozen features, {config.probe.epochs} epochs.")
    clock = "Seconds are training time (probe evaluations and checkpoints excluded)"
    if comparison.labeling_seconds:
        clock += (f", plus {comparison.labeling_seconds:.1f} s of labelling and alignment on the coopt rows "
                  "(the participants' reports, measured on their machines)")
    notes.append(clock + ".")
    if comparison.time_budget:
        notes.append(f"Equal wall-clock budget: {comparison.time_budget:.1f} s per run.")
    notes.append("Intervals: 95% Student-t over seeds; a winner is named only when two intervals do not overlap.")
    return notes


def markdown(comparison: Comparison, image: str | None = None) -> str:
    """The table, the findings, the settings and (when given) the plot's image link."""
    parts = [markdown_table(comparison), "\n".join(f"- {line}" for line in comparison.findings()),
             "Settings:\n\n" + "\n".join(f"- {note}" for note in _settings(comparison))]
    if image:
        parts.append(f"![Linear-probe accuracy vs wall-clock seconds]({image})")
    return "\n\n".join(part for part in parts if part) + "\n"


@dataclass(frozen=True)
class ComparisonFiles:
    markdown: Path
    json: Path
    plot: Path


def write_comparison(comparison: Comparison, directory: Path, stem: str = "comparison") -> ComparisonFiles:
    """`{stem}.md`, `{stem}.json` and `{stem}.png` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    plot = save_plot(comparison, directory / f"{stem}.png")
    text = directory / f"{stem}.md"
    write_text_atomically(text, markdown(comparison, image=plot.name))
    data = directory / f"{stem}.json"
    write_text_atomically(data, json.dumps(comparison.to_dict(), indent=1) + "\n")
    return ComparisonFiles(text, data, plot)
