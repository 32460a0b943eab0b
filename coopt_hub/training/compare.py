"""The paper's comparison: one architecture trained with each objective at equal budgets.

Every variant runs twice: for the same number of epochs, and for the same wall-clock seconds of
training. Unless given, the wall-clock budget is what the first variant (coopt) needed for its
epochs, so the table answers both "better per epoch?" and "better per second?".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from coopt_hub.core.progress import Progress
from coopt_hub.errors import ConfigError
from coopt_hub.training.data import TrainingData
from coopt_hub.training.trainer import LogOnly, TrainConfig, TrainResult, make_accelerator, train


@dataclass(frozen=True)
class Variant:
    name: str
    objective: str
    targets: str = "aligned"


DEFAULT_VARIANTS = (
    Variant("coopt", "coopt"),
    Variant("coopt-raw", "coopt", "raw"),  # unaligned targets: what alignment buys
    Variant("byol", "byol"),
    Variant("supervised", "supervised"),  # labels: the upper bound
)


@dataclass(frozen=True)
class ComparisonRow:
    variant: str
    budget: str  # "epochs" or "time"
    epochs: float
    seconds: float
    samples_per_s: float
    accuracy: float | None
    result: TrainResult


def _unavailable(variant: Variant, data: TrainingData) -> str | None:
    if variant.objective == "coopt" and variant.targets not in data.targets:
        return f"no {variant.targets} targets in this dataset"
    if variant.objective == "supervised" and data.labels is None:
        return "no labels in this dataset"
    return None


def compare_objectives(
    data: TrainingData,
    config: TrainConfig,
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS,
    accelerator=None,
    same_time: bool = True,
    progress: Progress | None = None,
) -> list[ComparisonRow]:
    """Train each variant for `config.epochs`, then (with `same_time`) for `config.time_budget`
    seconds (default: the first variant's time), and return one row per run, epoch-budget rows first.

    Everything else (arch, batch size, lr, seed, probe) comes from `config`; with an output_dir each
    run checkpoints into `{output_dir}/{variant}-{budget}`. Variants the data cannot support (raw
    targets or labels missing) are skipped with a warning. `progress` gets one bar per run (see
    `train`); by default notes go to logging and no bar is drawn.
    """
    say = progress or LogOnly()
    if config.epochs is None:
        raise ConfigError("the comparison needs an epoch budget", hint="Pass --epochs E.")
    runnable = []
    for variant in variants:
        reason = _unavailable(variant, data)
        if reason:
            say.warn(f"skipping {variant.name}: {reason}")
        else:
            runnable.append(variant)
    if not runnable:
        raise ConfigError("no variant can run on this dataset", hint="Check that it has targets and labels.")
    accelerator = accelerator or make_accelerator(config.precision)

    def run(variant: Variant, budget: str, epochs: int | None, seconds: float | None) -> ComparisonRow:
        output = f"{config.output_dir}/{variant.name}-{budget}" if config.output_dir else None
        run_config = dataclasses.replace(
            config, objective=variant.objective, targets=variant.targets, epochs=epochs, time_budget=seconds,
            output_dir=output, resume=False,
        )
        say.info(f"training {variant.name} for " + (f"{epochs} epochs" if epochs else f"{seconds:.1f} s"))
        result = train(run_config, data, accelerator, say)
        return ComparisonRow(variant.name, budget, result.epochs, result.seconds, result.samples_per_s,
                             result.accuracy, result)

    rows = [run(v, "epochs", config.epochs, None) for v in runnable]
    if not same_time:
        return rows
    time_budget = config.time_budget or rows[0].seconds
    rows += [run(v, "time", None, time_budget) for v in runnable]
    return rows


def format_table(rows: list[ComparisonRow]) -> str:
    """A fixed-width text table: objective, budget, epochs, seconds, samples/s, probe accuracy."""
    header = ("objective", "budget", "epochs", "seconds", "samples/s", "probe acc")
    lines = [
        (r.variant, r.budget, f"{r.epochs:.2f}", f"{r.seconds:.1f}", f"{r.samples_per_s:.0f}",
         "-" if r.accuracy is None else f"{r.accuracy:.4f}")
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *lines])
