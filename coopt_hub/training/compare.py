"""The paper's comparison: one architecture trained with each objective, over seeds, at equal budgets.

Every variant runs `seeds` times twice: for the same number of epochs, and for the same wall-clock
seconds. Unless given, the wall-clock budget is what the first variant (coopt) took for its epochs
(mean over seeds), so its epoch runs are also its equal-time runs and the others get as many
seconds. With the labelling cost included, the clocks of the coopt variants start at the seconds
the participants spent labelling and aligning their shards: their curves shift by that much, and
at equal wall-clock they train that much less.

`summarize` turns the runs into what a person reads: for each variant and budget the mean and 95%
interval over seeds, verdicts that name a winner only when the intervals separate, and the speedup
of coopt over byol (its time to reach byol's final accuracy at equal epochs, as in the paper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coopt_hub.core.progress import Progress
from coopt_hub.errors import ConfigError
from coopt_hub.training.data import DatasetOrigin, TrainingData
from coopt_hub.training.stats import Interval, Speedup, Verdict, mean_interval, speedup, verdict
from coopt_hub.training.trainer import LogOnly, TrainConfig, TrainResult, make_accelerator, train

BUDGETS = ("epochs", "time")


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
# The questions the verdicts answer: does CoOpt beat SSL, and does alignment help?
VERDICT_PAIRS = (("coopt", "byol"), ("coopt", "coopt-raw"))
SPEEDUP = ("coopt", "byol")


@dataclass(frozen=True)
class ComparisonRow:
    """One run: a variant at one budget with one seed."""

    variant: str
    budget: str  # "epochs" or "time"
    epochs: float
    seconds: float  # training seconds
    samples_per_s: float
    accuracy: float | None
    result: TrainResult
    seed: int = 0
    offset: float = 0.0  # labelling seconds on this run's clock before its first step
    budget_seconds: float | None = None  # the equal wall-clock budget of a "time" run, labelling included

    @property
    def clock_seconds(self) -> float:
        return self.offset + self.seconds

    def curve(self) -> list[tuple[float, float]]:
        """(clock seconds, probe accuracy) at each evaluation."""
        return [(self.offset + p.seconds, p.accuracy) for p in self.result.evals]

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "result"},
                "clock_seconds": self.clock_seconds, "result": self.result.to_dict()}


def _unavailable(variant: Variant, data: TrainingData) -> str | None:
    if variant.objective == "coopt" and variant.targets not in data.targets:
        return f"no {variant.targets} targets in this dataset"
    if variant.objective == "supervised" and data.labels is None:
        return "no labels in this dataset"
    return None


@dataclass
class _Runner:
    """Trains one run after another on the same data and accelerator, counting them for the notes."""

    config: TrainConfig
    data: TrainingData
    accelerator: Any
    say: Progress
    labeling_seconds: float
    total: int
    done: int = 0

    def offset(self, variant: Variant) -> float:
        return self.labeling_seconds if variant.objective == "coopt" else 0.0

    def run(self, variant: Variant, budget: str, seed: int, epochs: int | None, seconds: float | None,
            budget_seconds: float | None = None) -> ComparisonRow:
        config = self.config
        output = f"{config.output_dir}/{variant.name}-{budget}-seed{seed}" if config.output_dir else None
        run_config = dataclasses.replace(
            config, objective=variant.objective, targets=variant.targets, epochs=epochs, time_budget=seconds,
            seed=seed, output_dir=output, resume=False, student_dir=None, student_name=None,
        )
        self.done += 1
        length = f"{epochs} epochs" if epochs else f"{seconds:.1f} s"
        self.say.info(f"run {self.done}/{self.total}: {variant.name}, seed {seed}, {length}")
        result = train(run_config, self.data, self.accelerator, self.say)
        return ComparisonRow(variant.name, budget, result.epochs, result.seconds, result.samples_per_s,
                             result.accuracy, result, seed, self.offset(variant), budget_seconds)


def compare_objectives(
    data: TrainingData,
    config: TrainConfig,
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS,
    accelerator=None,
    same_time: bool = True,
    progress: Progress | None = None,
    *,
    seeds: int = 1,
    labeling_seconds: float = 0.0,
) -> list[ComparisonRow]:
    """Train each variant with seeds config.seed, config.seed + 1, ... for `config.epochs`, then (with
    `same_time`) for `config.time_budget` seconds (default: the first variant's mean clock at equal
    epochs); one row per run, epoch-budget rows first, then by variant, then by seed.

    labeling_seconds: put on the clock of the coopt variants before their first step (the cost of
        making their targets); 0 leaves it out.
    Everything else (arch, batch size, lr, probe) comes from `config`; with an output_dir each run
    checkpoints into `{output_dir}/{variant}-{budget}-seed{seed}`. Variants the data cannot support
    (raw targets or labels missing) are skipped with a warning. `progress` gets a note and a bar per
    run (see `train`); by default notes go to logging and no bar is drawn.
    """
    say = progress or LogOnly()
    if config.epochs is None:
        raise ConfigError("the comparison needs an epoch budget", hint="Pass --epochs E.")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}", hint="Pass --seeds 3 for 95% intervals.")
    runnable = _runnable(variants, data, say)
    seed_list = [config.seed + i for i in range(seeds)]
    reused = 0 if config.time_budget else 1  # the first variant's epoch runs are its equal-time runs
    total = len(runnable) * seeds + ((len(runnable) - reused) * seeds if same_time else 0)
    runner = _Runner(config, data, accelerator or make_accelerator(config.precision), say, labeling_seconds, total)
    rows = [runner.run(v, "epochs", seed, config.epochs, None) for v in runnable for seed in seed_list]
    if same_time:
        rows += _equal_time_runs(runner, runnable, seed_list, rows)
    return rows


def _runnable(variants: Sequence[Variant], data: TrainingData, say: Progress) -> list[Variant]:
    runnable = []
    for variant in variants:
        reason = _unavailable(variant, data)
        if reason:
            say.warn(f"skipping {variant.name}: {reason}")
        else:
            runnable.append(variant)
    if not runnable:
        raise ConfigError("no variant can run on this dataset", hint="Check that it has targets and labels.")
    return runnable


def _equal_time_runs(
    runner: _Runner, runnable: list[Variant], seed_list: list[int], epoch_rows: list[ComparisonRow]
) -> list[ComparisonRow]:
    first = runnable[0]
    given = runner.config.time_budget
    budget = given or mean_interval([r.clock_seconds for r in epoch_rows if r.variant == first.name]).mean
    rows = []
    for variant in runnable:
        if variant == first and given is None:
            # The budget is this variant's own time at equal epochs: those runs are its equal-time runs.
            rows += [dataclasses.replace(r, budget="time", budget_seconds=budget)
                     for r in epoch_rows if r.variant == variant.name]
            continue
        seconds = budget - runner.offset(variant)
        if seconds <= 0:
            runner.say.warn(f"skipping {variant.name} at equal wall-clock: labelling alone took "
                            f"{runner.offset(variant):.1f} s of the {budget:.1f} s budget")
            continue
        rows += [runner.run(variant, "time", seed, None, seconds, budget) for seed in seed_list]
    return rows


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of a variant, averaged over its seeds."""

    seconds: Interval  # on the variant's clock
    accuracy: Interval


@dataclass(frozen=True)
class Summary:
    """One variant at one budget, over its seeds."""

    variant: str
    budget: str
    objective: str
    targets: str | None
    views: str  # the augmentations' name (augment.ViewPair.name)
    seeds: tuple[int, ...]
    epochs: Interval
    seconds: Interval  # training
    clock_seconds: Interval  # training, plus labelling for the coopt variants when included
    samples_per_s: Interval
    accuracy: Interval | None
    curve: tuple[CurvePoint, ...]

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return value.to_dict() if isinstance(value, Interval) else value

        data = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "curve"}
        data["curve"] = [{"seconds": p.seconds.to_dict(), "accuracy": p.accuracy.to_dict()} for p in self.curve]
        return data


@dataclass
class Comparison:
    """What a comparison found: per-variant summaries, verdicts, the speedup, and every run."""

    summaries: list[Summary]
    verdicts: list[Verdict]
    speedup: Speedup | None
    labeling_seconds: float  # on the coopt variants' clocks; 0: not included
    time_budget: float | None  # the equal wall-clock budget; None: no equal-time pass
    runs: list[ComparisonRow]
    config: TrainConfig | None = None
    origin: DatasetOrigin | None = None

    def summary(self, variant: str, budget: str) -> Summary | None:
        return next((s for s in self.summaries if s.variant == variant and s.budget == budget), None)

    def findings(self) -> list[str]:
        """The verdict lines, then the speedup line."""
        return [v.text for v in self.verdicts] + ([self.speedup.text()] if self.speedup else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": dataclasses.asdict(self.origin) if self.origin else None,
            "config": _config_dict(self.config) if self.config else None,
            "labeling_seconds": self.labeling_seconds,
            "time_budget": self.time_budget,
            "summaries": [s.to_dict() for s in self.summaries],
            "verdicts": [dataclasses.asdict(v) for v in self.verdicts],
            "speedup": self.speedup.to_dict() if self.speedup else None,
            "runs": [r.to_dict() for r in self.runs],
        }


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data.pop("views")  # each objective's own: recorded with every summary and run
    return data


def summarize(
    rows: list[ComparisonRow],
    *,
    config: TrainConfig | None = None,
    origin: DatasetOrigin | None = None,
    pairs: Sequence[tuple[str, str]] = VERDICT_PAIRS,
) -> Comparison:
    """Means and intervals per (variant, budget), the verdicts for `pairs` at each budget, and the
    speedup of coopt over byol at equal epochs."""
    groups: dict[tuple[str, str], list[ComparisonRow]] = {}
    for row in rows:
        groups.setdefault((row.variant, row.budget), []).append(row)
    ordered = sorted(groups.items(), key=lambda item: BUDGETS.index(item[0][1]))  # stable: variants keep order
    summaries = [_summary(group) for _, group in ordered]
    by_key = {(s.variant, s.budget): s for s in summaries}
    verdicts = [
        verdict(budget, a, by_key[a, budget].accuracy, b, by_key[b, budget].accuracy)
        for budget in BUDGETS for a, b in pairs
        if (a, budget) in by_key and (b, budget) in by_key
        and by_key[a, budget].accuracy is not None and by_key[b, budget].accuracy is not None
    ]
    time_rows = [r.budget_seconds for r in rows if r.budget == "time" and r.budget_seconds is not None]
    return Comparison(
        summaries=summaries, verdicts=verdicts, speedup=_speedup(by_key),
        labeling_seconds=max((r.offset for r in rows), default=0.0),
        time_budget=time_rows[0] if time_rows else None, runs=list(rows), config=config, origin=origin,
    )


def _summary(group: list[ComparisonRow]) -> Summary:
    first = group[0].result
    accuracies = [r.accuracy for r in group if r.accuracy is not None]
    return Summary(
        variant=group[0].variant, budget=group[0].budget, objective=first.objective, targets=first.targets,
        views=first.views["name"], seeds=tuple(r.seed for r in group),
        epochs=mean_interval([r.epochs for r in group]),
        seconds=mean_interval([r.seconds for r in group]),
        clock_seconds=mean_interval([r.clock_seconds for r in group]),
        samples_per_s=mean_interval([r.samples_per_s for r in group]),
        accuracy=mean_interval(accuracies) if len(accuracies) == len(group) else None,
        curve=_mean_curve([r.curve() for r in group]),
    )


def _mean_curve(curves: list[list[tuple[float, float]]]) -> tuple[CurvePoint, ...]:
    """The seeds' evaluations averaged point by point (the i-th evaluation of every seed together)."""
    points = min(len(c) for c in curves)
    return tuple(
        CurvePoint(mean_interval([c[i][0] for c in curves]), mean_interval([c[i][1] for c in curves]))
        for i in range(points)
    )


def _speedup(by_key: dict[tuple[str, str], Summary]) -> Speedup | None:
    objective, baseline = SPEEDUP
    mine, theirs = by_key.get((objective, "epochs")), by_key.get((baseline, "epochs"))
    if mine is None or theirs is None or theirs.accuracy is None or not mine.curve:
        return None
    curve = [(p.seconds.mean, p.accuracy.mean) for p in mine.curve]
    return speedup(objective, curve, baseline, theirs.accuracy.mean, theirs.clock_seconds.mean)


def format_table(rows: list[ComparisonRow]) -> str:
    """Every run as a fixed-width text table: objective, budget, seed, epochs, seconds, samples/s, probe accuracy."""
    header = ("objective", "budget", "seed", "epochs", "seconds", "samples/s", "probe acc")
    lines = [
        (r.variant, r.budget, str(r.seed), f"{r.epochs:.2f}", f"{r.clock_seconds:.1f}", f"{r.samples_per_s:.0f}",
         "-" if r.accuracy is None else f"{r.accuracy:.4f}")
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *lines])
