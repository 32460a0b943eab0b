"""Target-quality figures on fixtures whose answers are known."""

import json

import numpy as np
import pytest

from coopt_hub.core.align import uniformity
from coopt_hub.core.quality import (
    NOISE_AGREEMENT_RATIO,
    common_uniformity,
    cv_probe_accuracy,
    knn_accuracy,
    knn_chance,
    knn_indices,
    knn_overlap,
    leave_one_group_out_probe,
    rank_priors,
    sample_rows,
)
from coopt_hub.errors import ConfigError


def clusters(rows_per_class=40, classes=4, dims=16, spread=0.3, seed=0):
    """Well-separated Gaussian clusters: features [rows, dims] and their class labels."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((classes, dims))
    labels = np.repeat(np.arange(classes), rows_per_class)
    return centres[labels] + spread * rng.standard_normal((labels.size, dims)), labels


def real_ish_priors(rows=300, seed=0):
    """Three priors of the same inputs: a shared latent through different random nonlinear maps
    and output sizes, plus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((rows, 8))
    outputs = {}
    for name, dims in [("small", 128), ("medium", 256), ("large", 512)]:
        hidden = np.maximum(latent @ rng.standard_normal((8, 64)), 0.0)
        outputs[name] = hidden @ rng.standard_normal((64, dims)) + 0.5 * rng.standard_normal((rows, dims))
    return outputs


def test_knn_indices_are_the_nearest_other_rows_nearest_first():
    features = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]])
    neighbours = knn_indices(features, 2, block=2)
    # Row 2 duplicates row 0: they are each other's nearest, neither its own.
    assert neighbours[0].tolist() == [2, 1] and neighbours[2].tolist() == [0, 1]
    assert neighbours[3].tolist() == [4, 1]  # cosines 0.196 and 0.0995
    assert not np.any(neighbours == np.arange(5)[:, None])
    with pytest.raises(ValueError, match="k must"):
        knn_indices(features, 5)


def test_knn_overlap_is_one_for_the_same_geometry_and_chance_for_unrelated_views():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((400, 32))
    rotation, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    assert knn_overlap(features, 5.0 * features @ rotation, k=10) == pytest.approx(1.0)
    chance = knn_chance(400, 10)
    assert chance == pytest.approx(10 / 399)
    assert knn_overlap(features, rng.standard_normal((400, 32)), k=10) < 2 * chance
    with pytest.raises(ValueError, match="same rows"):
        knn_overlap(features, features[:100])


def test_common_space_removes_the_advantage_of_width_alone():
    """V falls with dimension: of two priors from one family (spectrum 1/sqrt(i)) the wider looks more
    uniform natively, for its width alone; projected to the common size the two compare as equals."""

    def family(dims, seed):
        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
        return rng.standard_normal((1000, dims)) / np.sqrt(np.arange(1, dims + 1)) @ rotation

    wide, narrow = family(512, 2), family(64, 3)
    assert uniformity(wide) < uniformity(narrow) - 0.15
    assert abs(common_uniformity(wide, 64) - uniformity(narrow)) < 0.08
    assert common_uniformity(narrow, 64) == uniformity(narrow)  # no wider than the common size


def test_a_noise_prior_has_the_best_v_but_is_flagged_and_never_the_reference():
    outputs = real_ish_priors()
    outputs["noise"] = np.random.default_rng(3).standard_normal((300, 256))
    ranking = rank_priors(outputs, dim=256)
    scores = {score.name: score for score in ranking.scores}
    assert min(scores, key=lambda name: scores[name].native_uniformity) == "noise"
    assert min(scores, key=lambda name: scores[name].common_uniformity) == "noise"
    assert scores["noise"].noise_like and ranking.scores[-1].name == "noise"
    assert ranking.reference != "noise" and ranking.reference == ranking.scores[0].name
    for name in ("small", "medium", "large"):
        assert not scores[name].noise_like
        assert scores[name].agreement > 5 * ranking.chance  # well above chance, not just above the flag
    assert scores["noise"].agreement < NOISE_AGREEMENT_RATIO * ranking.chance
    record = json.loads(json.dumps(ranking.to_dict()))
    assert record["reference"] == ranking.reference and len(record["priors"]) == 4


def test_a_lone_prior_is_never_flagged_and_two_strangers_leave_no_safe_reference():
    rng = np.random.default_rng(4)
    alone = rank_priors({"only": rng.standard_normal((80, 16))}, dim=16)
    assert alone.reference == "only" and alone.scores[0].agreement is None
    strangers = rank_priors({"a": rng.standard_normal((80, 16)), "b": rng.standard_normal((80, 16))}, dim=16)
    assert strangers.reference is None and all(score.noise_like for score in strangers.scores)


def test_sample_rows_bounds_the_cost_deterministically():
    assert sample_rows(50, 100).tolist() == list(range(50))
    rows = sample_rows(100_000, 20_000, seed=5)
    assert rows.size == 20_000 and np.unique(rows).size == 20_000 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(100_000, 20_000, seed=5))
    assert not np.array_equal(rows, sample_rows(100_000, 20_000, seed=6))


def test_knn_accuracy_is_perfect_on_separable_clusters_and_chance_on_unrelated_labels():
    x, y = clusters()
    train, test = np.arange(0, y.size, 2), np.arange(1, y.size, 2)
    assert knn_accuracy(x[train], y[train], x[test], y[test], k=5) == 1.0
    shuffled = np.random.default_rng(6).permutation(y)
    assert abs(knn_accuracy(x[train], shuffled[train], x[test], shuffled[test], k=5) - 0.25) < 0.15


def test_cv_probe_is_perfect_on_separable_clusters_and_chance_on_unrelated_labels():
    x, y = clusters()
    assert cv_probe_accuracy(x, y) == 1.0
    rng = np.random.default_rng(7)
    noise, labels = rng.standard_normal((400, 16)), rng.integers(0, 4, 400)
    accuracy = cv_probe_accuracy(noise, labels, folds=5, seed=0)
    assert abs(accuracy - 0.25) < 0.08
    assert cv_probe_accuracy(noise, labels, folds=5, seed=0) == accuracy


def test_leave_one_group_out_sees_what_a_mixed_probe_hides():
    """Two shards whose targets live in differently rotated spaces: a probe mixing both learns each
    space; a probe fitted on one shard fails on the other."""
    x, y = clusters(rows_per_class=30, dims=32, seed=8)
    rotation, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((32, 32)))
    x_other, y_other = clusters(rows_per_class=20, dims=32, seed=8)  # the same classes, fewer rows
    features = np.vstack([x, x_other @ rotation])
    labels = np.concatenate([y, y_other])
    shards = np.array(["shard-0"] * y.size + ["shard-1"] * y_other.size)
    assert cv_probe_accuracy(features, labels) > 0.95
    probe = leave_one_group_out_probe(features, labels, shards)
    assert probe.accuracy < 0.5
    assert probe.rows == {"shard-0": 120, "shard-1": 80}
    weighted = (120 * probe.groups["shard-0"] + 80 * probe.groups["shard-1"]) / 200
    assert probe.accuracy == pytest.approx(weighted)
    same_space = leave_one_group_out_probe(np.vstack([x, x_other]), labels, shards)
    assert same_space.accuracy == 1.0
    with pytest.raises(ConfigError, match="two groups"):
        leave_one_group_out_probe(x, y, np.zeros(y.size))


def test_knn_accuracy_agrees_with_scikit_learns_classifier_in_blocks_of_any_size():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 24)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + 2 * (rng.random(700) < 0.3)  # 4 classes, partly predictable
    reference = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(x[:500], y[:500])
    expected = float(np.mean(reference.predict(x[500:]) == y[500:]))
    for block in (1, 64, 1000):
        assert knn_accuracy(x[:500], y[:500], x[500:], y[500:], k=7, block=block) == pytest.approx(expected)
    with pytest.raises(ValueError, match="k must lie"):
        knn_accuracy(x[:5], y[:5], x[5:9], y[5:9], k=6)


def test_probe_rows_of_float16_features_are_widened_exactly_a_block_at_a_time(monkeypatch):
    from coopt_hub.core import quality

    monkeypatch.setattr(quality, "_WIDEN_BLOCK", 7)  # several blocks and a partial one
    x = np.random.default_rng(10).standard_normal((40, 6)).astype(np.float16)
    mask = np.random.default_rng(11).random(40) < 0.6
    for index in (mask, np.flatnonzero(mask), np.array([3, 3, 39, 0])):
        rows = quality._rows(x, index)
        assert rows.dtype == np.float32 and np.array_equal(rows, x.astype(np.float32)[index])
    wide = x.astype(np.float64)
    assert quality._rows(wide, mask).dtype == np.float64  # other dtypes are indexed as they are


def test_the_probe_is_scikit_learns_pipeline_fitted_without_a_float64_copy_of_the_rows():
    """The scaler learns in blocks: the same predictions as make_pipeline(StandardScaler,
    LogisticRegression) fitted in one call, and the fit's allocations stay near the rows' own size
    (the one-call scaler alone allocated 2.25x the rows beside them)."""
    import tracemalloc

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from coopt_hub.core.quality import _fit_probe

    rng = np.random.default_rng(12)
    x = (rng.standard_normal((9000, 128)) * rng.uniform(0.5, 3.0, 128) + rng.standard_normal(128)).astype(np.float32)
    y = (x[:, :3] @ rng.standard_normal(3) > 0).astype(int) + 2 * (rng.random(9000) < 0.3)
    test = rng.standard_normal((500, 128)).astype(np.float32)

    def peak_bytes(fit):
        tracemalloc.start()
        try:
            fitted = fit(x.copy())  # the copy is counted: each caller hands the probe rows of its own
            return fitted, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    reference, one_call = peak_bytes(
        lambda rows: make_pipeline(StandardScaler(copy=False), LogisticRegression(C=1.0, max_iter=1000)).fit(rows, y))
    probe, blocks = peak_bytes(lambda rows: _fit_probe(rows, y))
    assert blocks < 2 * x.nbytes < one_call - x.nbytes
    assert np.array_equal(probe.predict(test.copy()), reference.predict(test))
    np.testing.assert_allclose(probe.scaler.mean_, reference[0].mean_, rtol=1e-12)
    np.testing.assert_allclose(probe.scaler.scale_, reference[0].scale_, rtol=1e-12)
