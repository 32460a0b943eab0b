"""Figures over seeds: means with 95% intervals, who wins (only when the intervals say so), and the
speedup of one objective over another (the paper's time-to-accuracy figure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of `n` values and the half-width of its Student-t interval (None below 2 values)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def separates_from(self, other: Interval) -> bool:
        """Both intervals exist and do not overlap."""
        if self.half_width is None or other.half_width is None:
            return False
        return self.low > other.high or other.low > self.high

    def text(self, digits: int = 3) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n={self.n}, no interval)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "half_width": self.half_width, "low": self.low, "high": self.high, "n": self.n}


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of `values` (a few seeds: the normal quantile would be too narrow)."""
    if not values:
        raise ValueError("no values to average")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, n)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    quantile = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    return Interval(mean, quantile * math.sqrt(variance / n), n)


@dataclass(frozen=True)
class Verdict:
    """Which of two objectives is better at one budget, claimed only when their intervals separate."""

    budget: str
    first: str
    second: str
    winner: str | None
    text: str


def verdict(budget: str, first: str, a: Interval, second: str, b: Interval) -> Verdict:
    figures = f"{first} {a.text()} vs {second} {b.text()}"
    where = f"at equal {'epochs' if budget == 'epochs' else 'wall-clock'}"
    if a.separates_from(b):
        winner, loser = (first, second) if a.mean > b.mean else (second, first)
        return Verdict(budget, first, second, winner, f"{winner} beats {loser} {where}: {figures} (95% intervals)")
    if a.half_width is None or b.half_width is None:
        reason = "one seed per objective gives no interval (run --seeds 2 or more; 3+ give useful ones)"
    else:
        reason = "the 95% intervals overlap"
    return Verdict(budget, first, second, None, f"no winner {where} between {first} and {second}: {reason} ({figures})")


@dataclass(frozen=True)
class Speedup:
    """How much sooner `objective` reaches `baseline`'s final accuracy than `baseline` itself did.

    `seconds` is `objective`'s time (on its clock, labelling included when asked) at its first
    evaluation whose mean accuracy reaches `target`; None when it never does within its run. When
    that is its very first evaluation, it may have got there sooner: the figure is a lower bound.
    """

    objective: str
    baseline: str
    target: float  # the baseline's final accuracy
    baseline_seconds: float  # what the baseline took to get there
    seconds: float | None
    at_first_evaluation: bool = False

    @property
    def value(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.baseline_seconds / self.seconds

    def text(self) -> str:
        head = f"{self.objective} speedup over {self.baseline}"
        if self.value is None:
            return (f"{head}: never reached ({self.objective} did not reach {self.baseline}'s final probe accuracy "
                    f"{self.target:.3f} within its run)")
        bound = ("; already at its first evaluation, so at least this much: more evaluation points would "
                 "place it sooner" if self.at_first_evaluation else "")
        return (f"{head}: {self.value:.2f}x ({self.objective} reached {self.baseline}'s final probe accuracy "
                f"{self.target:.3f} at {self.seconds:.1f} s; {self.baseline} took {self.baseline_seconds:.1f} s{bound})")

    def to_dict(self) -> dict[str, object]:
        return {"objective": self.objective, "baseline": self.baseline, "target_accuracy": self.target,
                "baseline_seconds": self.baseline_seconds, "seconds": self.seconds, "speedup": self.value,
                "lower_bound": self.at_first_evaluation, "text": self.text()}


def speedup(
    objective: str, curve: Sequence[tuple[float, float]], baseline: str, target: float, baseline_seconds: float
) -> Speedup:
    """`curve`: (seconds, accuracy) of `objective`'s evaluations in time order."""
    index = next((i for i, (_, accuracy) in enumerate(curve) if accuracy >= target), None)
    if index is None:
        return Speedup(objective, baseline, target, baseline_seconds, None)
    return Speedup(objective, baseline, target, baseline_seconds, curve[index][0], at_first_evaluation=index == 0)
