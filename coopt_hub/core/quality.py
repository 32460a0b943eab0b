"""Target quality measured without training: neighbour agreement between two views of the same rows,
priors ranked by uniformity in the common space with noise-like ones flagged, and label probes.

Used by `coopt-hub evaluate` and merge (rows are paired across arrays; features are [rows, dims]):

    ranking = rank_priors({"shard-0": anchors0, "shard-1": anchors1, ...}, dim=plan.dim)
    ranking.reference                 # lowest common-space V among priors that are not noise-like
    ranking.to_dict()                 # per prior: native and common-space V, agreement, noise flag
    knn_overlap(aligned_anchors, reference_anchors, k=10)   # 1.0 same neighbours; chance k / (n - 1)

    rows = sample_rows(len(targets), MAX_PROBE_ROWS, seed=0)   # bound the cost on large datasets
    cv_probe_accuracy(targets[rows], labels[rows])              # fixed logistic regression, 5 folds
    leave_one_group_out_probe(targets[rows], labels[rows], shards[rows])  # one space for all shards?
    knn_accuracy(train_x, train_y, test_x, test_y, k=10)

Pure: numpy and scikit-learn. Every figure is deterministic for given inputs and seed.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from coopt_hub.core.align import fit_pca_basis, normalize, uniformity
from coopt_hub.core.halves import to_float32
from coopt_hub.errors import ConfigError

# Probes on more rows than this cost more than they tell (a 20k-row accuracy has a standard error
# below 0.4 points); callers sample with sample_rows.
MAX_PROBE_ROWS = 20_000
# A prior is noise-like when no other prior shares even twice the chance number of its anchors'
# neighbours. A ratio rather than a z-score: with thousands of anchors a z-score calls agreement
# 1.1x chance significant, yet such a prior is useless as a reference; while real priors, even
# through different random nonlinear maps of what they see, agree several times above chance.
NOISE_AGREEMENT_RATIO = 2.0


def knn_indices(features, k: int, block: int = 1024) -> np.ndarray:
    """[rows, k] indices of each row's k nearest other rows by cosine, nearest first.

    Visited in row blocks so memory is O(block * rows); the row itself is excluded by position, so
    duplicate rows still count as each other's neighbours.
    """
    x = normalize(features)
    rows = x.shape[0]
    if not 1 <= k < rows:
        raise ValueError(f"k must lie in [1, rows - 1] = [1, {rows - 1}], got {k}.")
    neighbours = np.empty((rows, k), dtype=np.int64)
    for start in range(0, rows, block):
        similarity = x[start:start + block] @ x.T
        local = np.arange(similarity.shape[0])
        similarity[local, start + local] = -np.inf
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        neighbours[start:start + block] = np.take_along_axis(top, order, axis=1)
    return neighbours


def knn_chance(rows: int, k: int) -> float:
    """The expected knn_overlap of two views with unrelated geometry: k of the other rows - 1."""
    return k / (rows - 1)


def knn_overlap(a, b, k: int = 10) -> float:
    """Mean fraction of shared k-nearest neighbours (cosine) of each row in two views of the same rows."""
    if np.shape(a)[0] != np.shape(b)[0]:
        raise ValueError(f"Both views must hold the same rows, got {np.shape(a)[0]} and {np.shape(b)[0]}.")
    return _shared_fraction(knn_indices(a, k), knn_indices(b, k))


def _shared_fraction(first: np.ndarray, second: np.ndarray) -> float:
    shared = (np.sort(first, axis=1)[:, :, None] == np.sort(second, axis=1)[:, None, :]).sum(axis=(1, 2))
    return float(shared.mean() / first.shape[1])


def common_uniformity(features, dim: int, t: float = 2.0) -> float:
    """V after projecting to `dim` dimensions, so priors of different output sizes compare fairly.

    V falls with dimension, so a wider prior would look better for its width alone. The projection
    is onto the `dim` leading axes of the features themselves (uncentred and unscaled, so V keeps
    its meaning: the best a linear map to `dim` can do to keep the prior's geometry); a prior no
    wider than `dim` is measured as it is, since padding with zeros or rotating cannot change V.
    """
    x = np.asarray(features)
    if x.ndim == 2 and x.shape[1] > dim:
        x = fit_pca_basis(x, dim, standardize=False, center=False).project(x)
    return uniformity(x, t=t)


@dataclass(frozen=True)
class PriorScore:
    """One prior judged on the anchors. agreement: its highest knn_overlap with another prior
    (None when it is alone); noise_like: agreement below NOISE_AGREEMENT_RATIO x chance."""

    name: str
    native_uniformity: float
    common_uniformity: float
    agreement: float | None
    noise_like: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "native_uniformity": self.native_uniformity,
                "common_uniformity": self.common_uniformity, "agreement": self.agreement,
                "noise_like": self.noise_like}


@dataclass(frozen=True)
class PriorRanking:
    """Priors ordered best first: not noise-like by common-space V, then the noise-like ones.
    reference: the first that is not noise-like; None when every prior is (then no choice is safe:
    with two priors that disagree, nothing tells which one is the noise)."""

    scores: tuple[PriorScore, ...]
    reference: str | None
    k: int
    chance: float

    def to_dict(self) -> dict:
        return {"reference": self.reference, "k": self.k, "chance": self.chance,
                "priors": [score.to_dict() for score in self.scores]}


def rank_priors(anchor_outputs: Mapping[str, np.ndarray], dim: int, t: float = 2.0, k: int = 10) -> PriorRanking:
    """Rank priors by V in the common space from their outputs on the same anchors (rows paired),
    recomputed from the outputs rather than taken from what a participant reports.

    A noise-like prior gets the best V of all (noise is maximally uniform) yet knows nothing, so it
    is flagged and ranked after every prior that agrees with another. With a single prior there is
    nothing to agree with: it is ranked, never flagged.
    """
    names = list(anchor_outputs)
    if not names:
        raise ConfigError("No prior outputs to rank.", hint="Pass each prior's outputs on the anchors.")
    rows = {np.shape(anchor_outputs[name])[0] for name in names}
    if len(rows) != 1:
        raise ValueError(f"Every prior must be judged on the same anchor rows, got row counts {sorted(rows)}.")
    chance = knn_chance(rows.pop(), k)
    neighbours = {name: knn_indices(anchor_outputs[name], k) for name in names}
    scores = []
    for name in names:
        others = [_shared_fraction(neighbours[name], neighbours[other]) for other in names if other != name]
        agreement = max(others) if others else None
        scores.append(PriorScore(
            name=name, native_uniformity=uniformity(anchor_outputs[name], t=t),
            common_uniformity=common_uniformity(anchor_outputs[name], dim, t=t), agreement=agreement,
            noise_like=agreement is not None and agreement < NOISE_AGREEMENT_RATIO * chance))
    ordered = tuple(sorted(scores, key=lambda s: (s.noise_like, s.common_uniformity)))
    reference = next((s.name for s in ordered if not s.noise_like), None)
    return PriorRanking(scores=ordered, reference=reference, k=k, chance=chance)


# Label probes ---------------------------------------------------------------------------------


def sample_rows(rows: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded sample of min(rows, max_rows) rows, so callers bound a probe's cost."""
    if rows <= max_rows:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10, block: int = 64) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine) of the training rows on the test rows.

    Ties between classes go to the smallest label (scikit-learn's rule), so the figure is
    deterministic. Test rows are visited in blocks, so memory is O(block * training rows) beyond the
    normalised copies: scikit-learn's KNeighborsClassifier took 161 MB more for 16,000 x 512
    training rows, and a merge's evaluation past its memory goal. A block of 64 rows holds 16 bytes
    per training row each (similarities, their negation, argpartition's int64 order): 16 MB at
    16,000 training rows, where 256 held 64.
    """
    train, test = normalize(train_x), normalize(test_x)
    test_y = np.asarray(test_y)
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"k must lie in [1, {train.shape[0]}] (the training rows), got {k}.")
    classes, codes = np.unique(np.asarray(train_y), return_inverse=True)
    correct = 0
    for start in range(0, test.shape[0], block):
        similarity = test[start:start + block] @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = np.zeros((nearest.shape[0], classes.size), dtype=np.int64)
        np.add.at(votes, (np.arange(nearest.shape[0])[:, None], codes[nearest]), 1)
        correct += int(np.sum(classes[votes.argmax(axis=1)] == test_y[start:start + block]))  # argmax: first of ties
    return correct / max(test.shape[0], 1)


def cv_probe_accuracy(x, y, folds: int = 5, seed: int = 0) -> float:
    """Stratified k-fold accuracy of the fixed probe (_fit_probe), pooled over the held-out rows."""
    from sklearn.model_selection import StratifiedKFold

    x, y = np.asarray(x), np.asarray(y)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    correct = sum(int(np.sum(_fit_probe(_rows(x, train), y[train]).predict(_rows(x, test)) == y[test]))
                  for train, test in splitter.split(x, y))
    return correct / len(y)


@dataclass(frozen=True)
class GroupProbe:
    """Leave-one-group-out accuracy: overall (weighted by rows) and per held-out group."""

    accuracy: float
    groups: dict[str, float]
    rows: dict[str, int]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "groups": dict(self.groups), "rows": dict(self.rows)}


def leave_one_group_out_probe(x, y, groups) -> GroupProbe:
    """Fit the fixed probe on every group but one, score it on that one, for each group.

    With groups = shards this is the direct test of whether the shards' targets live in one space:
    a probe fitted on other shards only transfers if they share it, while a probe mixing every
    shard can learn each shard's space separately and look fine.
    """
    x, y, groups = np.asarray(x), np.asarray(y), np.asarray(groups)
    names = np.unique(groups)
    if names.size < 2:
        raise ConfigError(f"Leave-one-group-out needs at least two groups, got {names.size}.",
                          hint="Use a cross-validated probe (cv_probe_accuracy) for a single group.")
    accuracy, rows = {}, {}
    for name in names:
        held = groups == name
        if np.unique(y[~held]).size < 2:
            raise ConfigError(f"Without group {name!r} the other groups hold a single class.",
                              hint="A probe needs at least two classes to fit on.")
        accuracy[str(name)] = float(np.mean(_fit_probe(_rows(x, ~held), y[~held]).predict(_rows(x, held)) == y[held]))
        rows[str(name)] = int(held.sum())
    overall = sum(accuracy[n] * rows[n] for n in accuracy) / sum(rows.values())
    return GroupProbe(accuracy=overall, groups=accuracy, rows=rows)


_WIDEN_BLOCK = 4096  # rows widened at a time by _rows: 4 MiB of float16 at 512 dimensions


def _rows(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """x[index] (positions or a mask) for a probe. Float16 rows come back as float32, widened a block
    at a time (core.halves, bit for bit as numpy casts): scikit-learn would take float16 to float64,
    and widening all the rows up front would keep a float32 copy of every row beside each fit's own
    (40 MB at 20,000 x 512)."""
    if x.dtype != np.float16:
        return x[index]
    positions = np.flatnonzero(index) if index.dtype == bool else index
    out = np.empty((positions.size, *x.shape[1:]), dtype=np.float32)
    for start in range(0, positions.size, _WIDEN_BLOCK):
        stop = min(start + _WIDEN_BLOCK, positions.size)
        to_float32(x[positions[start:stop]], out=out[start:stop])
    return out


_SCALER_BLOCK = 2048  # rows the probe's scaler takes in at a time (its float64 temporaries: 8 MiB at 512 dimensions)


class _FittedProbe:
    """The fixed probe once fitted: the rows standardised (in place) as on fitting, then classified."""

    def __init__(self, scaler, classifier) -> None:
        self.scaler, self.classifier = scaler, classifier

    def predict(self, x: np.ndarray) -> np.ndarray:
        # In place (copy=False): every caller predicts rows it indexed out, a copy of its own.
        return self.classifier.predict(self.scaler.transform(x, copy=False))


def load_probe_libraries() -> None:
    """Import the scikit-learn modules the probe uses (~1-2 s), and with them the BLAS (scipy's) and
    OpenMP runtime they load. A thread limit covers only the libraries loaded when it is entered, and
    one entered per fit on two threads restores BLAS's process-wide count out of order; so callers
    that run probes side by side load these first, then enter one limit around all of them."""
    for module in ("sklearn.linear_model", "sklearn.model_selection", "sklearn.preprocessing"):
        importlib.import_module(module)


def _fit_probe(x: np.ndarray, y: np.ndarray) -> _FittedProbe:
    """The one probe every figure uses: standardised features, multinomial logistic regression,
    C = 1, lbfgs, at most 1,000 iterations; fixed, so figures compare across targets and priors.
    `x` is standardised in place: every caller fits on rows it indexed out, a copy of its own.

    The scaler (scikit-learn's StandardScaler) learns the mean and variance a block of rows at a
    time: in one call it makes a float64 copy of the centred rows and a float copy of their NaN mask,
    77 MiB beside a 17,500 x 512 float32 fit (whose rows are 34 MiB), and two evaluations' probes run
    side by side. The statistics agree with a one-call fit's to float64 rounding."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(copy=False)
    for start in range(0, x.shape[0], _SCALER_BLOCK):
        scaler.partial_fit(x[start:start + _SCALER_BLOCK])
    # lbfgs on a few thousand rows is a long series of small products, which OpenBLAS's threads slow
    # down rather than share: measured on 2 shared cores, a 5-fold probe of 1,797 x 256 took 15.6 s
    # on two BLAS threads and 0.84 s on one, with the same figure.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        # The iteration budget is part of the fixed probe; where lbfgs stops short the figure is
        # still comparable, and a warning per fold would only bury the report.
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(x, copy=False), y)
    return _FittedProbe(scaler, classifier)
