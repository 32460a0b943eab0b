"""Choosing the alignment on the anchors by cross-validation, and the PCA projection to the common size."""

import json
import warnings

import numpy as np
import pytest

from coopt_hub.core.align import (
    AUTO_CONSTRAINED_MAX_ANCHORS_PER_DIM,
    METHODS,
    AlignmentWarning,
    PcaBasis,
    fit_alignment,
    fit_pca_basis,
    fit_transform,
    select_alignment,
)
from coopt_hub.core.quality import knn_overlap
from coopt_hub.errors import ConfigError, PlanError


def brute_force_cv_residual(x, y, method, params, folds=5, seed=0):
    """The documented folds (fold k = permutation[k::folds]), each refitted from scratch."""
    order = np.random.default_rng(seed).permutation(len(x))
    squared = 0.0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(np.arange(len(x)), test)
        transform = fit_transform(x[train], y[train], method, params)
        squared += np.sum((x[test] @ transform - y[test]) ** 2)
    return np.sqrt(squared) / np.linalg.norm(y)


def shared_latent_priors(rows, dims=256, latent=32, seed=0):
    """Two 'priors' of the same images: different random nonlinear maps of a shared latent, plus noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, latent))

    def prior():
        first = rng.standard_normal((latent, dims)) / np.sqrt(latent)
        second = rng.standard_normal((dims, dims)) / np.sqrt(dims)
        return np.tanh(z @ first) @ second + 0.3 * rng.standard_normal((rows, dims))

    return prior(), prior()


# rows > dims: the downdated Gram route; rows < dims: the kernel route (where a rotation is not
# unique off the training rows' span, so Procrustes has no single brute-force answer); unequal sizes.
@pytest.mark.parametrize("rows, d_in, d_out, methods", [
    (120, 16, 16, ("ridge", "procrustes", "reduced_rank")),
    (40, 60, 60, ("ridge", "reduced_rank")),
    (50, 12, 20, ("ridge", "reduced_rank")),
])
def test_held_out_residual_equals_refitting_every_fold(rows, d_in, d_out, methods):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, d_in))
    y = x @ rng.standard_normal((d_in, d_out)) * 0.3 + rng.standard_normal((rows, d_out))
    fit = select_alignment(x, y, methods=methods)
    assert [c.method for c in fit.candidates] == list(methods)
    for candidate in fit.candidates:
        # Procrustes refits its scale per fold, as the selection did.
        params = {} if candidate.method == "procrustes" else candidate.params
        expected = brute_force_cv_residual(x, y, candidate.method, params)
        assert candidate.cv_residual == pytest.approx(expected, rel=1e-8)
    in_sample = np.linalg.norm(x @ fit.transform - y) / np.linalg.norm(y)
    assert fit.residual == pytest.approx(in_sample, rel=1e-8)


def test_noise_gets_a_strong_ridge_and_a_held_out_residual_of_one():
    rng = np.random.default_rng(0)
    source, target = rng.standard_normal((50, 64)), rng.standard_normal((50, 64))
    with pytest.warns(AlignmentWarning):
        _, fixed_rule_residual = fit_alignment(source, target)
    fit = select_alignment(source, target)
    assert fixed_rule_residual < 0.1  # in-sample, the old fit of pure noise looks excellent
    assert fit.cv_residual >= 0.9
    assert fit.params["ridge_relative"] >= 10
    assert abs(fit.cv_cosine) < 0.2


def test_exact_linear_map_gets_a_weak_ridge_and_no_held_out_error():
    rng = np.random.default_rng(1)
    source = rng.standard_normal((300, 40))
    target = source @ rng.standard_normal((40, 24)) + 1e-4 * rng.standard_normal((300, 24))
    fit = select_alignment(source, target)
    assert fit.method == "ridge"
    assert fit.params["ridge_relative"] <= 1e-4
    assert fit.cv_residual < 1e-3 and fit.cv_cosine > 0.999


def uneven_features(rows, dims, decay, noise, seed):
    """float32 features whose variance falls as 1 / j^(2 decay) over dimensions j, and a noisy linear map of them."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, dims)) * np.arange(1, dims + 1) ** -decay).astype(np.float32)
    y = (x @ rng.standard_normal((dims, dims)) + noise * rng.standard_normal((rows, dims))).astype(np.float32)
    return x, y


@pytest.mark.parametrize("rows, dims, decay, noise", [(600, 64, 1.0, 0.3), (600, 64, 2.0, 0.05), (3000, 128, 3.0, 0.3)])
def test_float32_anchors_are_scored_in_float32_and_choose_as_float64_does(rows, dims, decay, noise):
    x, y = uneven_features(rows, dims, decay, noise, seed=rows + dims)
    narrow = select_alignment(x, y)
    wide = select_alignment(x.astype(np.float64), y.astype(np.float64))
    assert narrow.params == wide.params, "the same strength from the same (float32) values"
    assert narrow.cv_residual == pytest.approx(wide.cv_residual, rel=1e-4)
    assert narrow.cv_cosine == pytest.approx(wide.cv_cosine, rel=1e-4)
    assert narrow.transform.dtype == np.float64, "the refit stays float64"
    np.testing.assert_allclose(narrow.transform, wide.transform, rtol=1e-10, atol=1e-12)


def test_float32_scoring_offers_no_strength_below_its_resolution():
    """A near-exact map of very uneven features: float64 picks a strength float32 cannot resolve."""
    x, y = uneven_features(2000, 256, decay=1.5, noise=0.01, seed=7)
    narrow = select_alignment(x, y)
    wide = select_alignment(x.astype(np.float64), y.astype(np.float64))
    largest = np.linalg.eigvalsh(x.astype(np.float64).T @ x.astype(np.float64))[-1]
    assert wide.params["ridge"] < np.finfo(np.float32).eps * largest, "the case needs a strength float32 cannot see"
    assert narrow.params["ridge"] >= np.finfo(np.float32).eps * largest * 0.8 - 1e-12  # (a fold's Gram is ~0.8 of it)
    # Its held-out residual is what refitting every fold in float64 at that strength gives, and near float64's best.
    assert narrow.cv_residual == pytest.approx(
        brute_force_cv_residual(x.astype(np.float64), y.astype(np.float64), "ridge", narrow.params), rel=1e-3)
    assert narrow.cv_residual < 1.1 * wide.cv_residual


def test_cv_ridge_generalises_where_the_fixed_rule_breaks_at_anchors_equal_to_dims():
    """256 anchors for 256 dims: the old rule's ridge drops 1000x right there (issue 11)."""
    first, second = shared_latent_priors(256 + 2000)
    anchors, outside = slice(0, 256), slice(256, None)

    def outside_error(transform):
        return np.linalg.norm(first[outside] @ transform - second[outside]) / np.linalg.norm(second[outside])

    fixed, fixed_in_sample = fit_alignment(first[anchors], second[anchors])
    fit = select_alignment(first[anchors], second[anchors], methods="ridge")
    assert fixed_in_sample < 0.1 and outside_error(fixed) > 2.0  # looks perfect, generalises worse than zero
    assert outside_error(fit.transform) < 0.8
    assert outside_error(fit.transform) < outside_error(fixed) / 4
    # The held-out residual on the anchors predicts the error on rows never seen.
    assert fit.cv_residual == pytest.approx(outside_error(fit.transform), abs=0.1)


def test_procrustes_wins_for_a_rotation_with_few_anchors():
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    source = rng.standard_normal((48, 32))
    target = 3.0 * source @ rotation + 0.5 * rng.standard_normal((48, 32))
    fit = select_alignment(source, target)
    assert fit.method == "procrustes"
    assert fit.params["scale"] == pytest.approx(3.0, rel=0.1)
    np.testing.assert_allclose(fit.transform.T @ fit.transform, fit.params["scale"] ** 2 * np.eye(32), atol=1e-9)
    ridge = next(c for c in fit.candidates if c.method == "ridge")
    assert fit.cv_residual < ridge.cv_residual


def test_reduced_rank_wins_for_a_low_rank_map_and_finds_its_rank():
    rng = np.random.default_rng(3)
    source = rng.standard_normal((72, 48))
    low_rank = rng.standard_normal((48, 4)) @ rng.standard_normal((4, 48))
    target = source @ low_rank / 4 + rng.standard_normal((72, 48))
    fit = select_alignment(source, target, methods=("ridge", "reduced_rank"))
    assert fit.method == "reduced_rank"
    assert 3 <= fit.params["rank"] <= 6
    assert np.linalg.matrix_rank(fit.transform, tol=1e-8) == fit.params["rank"]


def test_auto_compares_constrained_methods_only_where_anchors_are_few():
    rng = np.random.default_rng(4)
    dims = 8
    many = rng.standard_normal((AUTO_CONSTRAINED_MAX_ANCHORS_PER_DIM * dims, dims))
    few = many[: 2 * dims]
    assert [c.method for c in select_alignment(many, many @ rng.standard_normal((dims, dims))).candidates] == [
        "ridge"]
    assert [c.method for c in select_alignment(few, few @ rng.standard_normal((dims, dims))).candidates] == [
        "ridge", "procrustes"]
    assert [c.method for c in select_alignment(few, rng.standard_normal((2 * dims, 5))).candidates] == ["ridge"]
    # Reduced rank only when asked for (align.AUTO_METHODS says why).
    assert [c.method for c in select_alignment(few, few, methods=METHODS).candidates] == list(METHODS)


def test_selection_is_deterministic_and_its_record_is_json_without_the_transform():
    first, second = shared_latent_priors(60, dims=24, latent=6)
    fit = select_alignment(first, second, seed=3)
    again = select_alignment(first.copy(), second.copy(), seed=3)
    assert fit.transform.tobytes() == again.transform.tobytes() and fit.to_dict() == again.to_dict()
    assert select_alignment(first, second, seed=4).cv_residual != fit.cv_residual  # other folds
    record = json.loads(json.dumps(fit.to_dict()))
    assert "transform" not in record
    assert record["method"] == fit.method and record["anchors"] == 60 and record["folds"] == 5
    assert {"residual", "cv_residual", "cv_cosine", "params", "candidates"} <= set(record)
    np.testing.assert_allclose(fit.apply(first), (first @ fit.transform).astype(np.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("methods", [("ridge",), ("procrustes",), ("reduced_rank",)])
def test_recorded_params_rebuild_the_transform(methods):
    first, second = shared_latent_priors(60, dims=24, latent=6, seed=5)
    fit = select_alignment(first, second, methods=methods)
    np.testing.assert_allclose(fit_transform(first, second, fit.method, fit.params), fit.transform, atol=1e-10)


def test_selection_refuses_what_it_cannot_do():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((30, 8)), rng.standard_normal((30, 6))
    with pytest.raises(PlanError, match="too few"):
        select_alignment(x[:9], y[:9])
    with pytest.raises(ConfigError, match="folds"):
        select_alignment(x, y, folds=1)
    with pytest.raises(ConfigError, match="Unknown"):
        select_alignment(x, y, methods=("lasso",))
    with pytest.raises(ConfigError, match="same size"):
        select_alignment(x, y, methods=("procrustes",))
    with pytest.raises(ConfigError, match="rank"):
        fit_transform(x, y, "reduced_rank", {"ridge": 1.0})
    with pytest.raises(ValueError, match="same rows"):
        select_alignment(x, y[:20])


# Projection to the common size ----------------------------------------------------------------


def low_rank_features(rows=400, rank=16, dims=512, seed=7):
    """Rank-16 features with an offset and unequal per-dimension scales, as prior outputs have."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, dims)) + 3.0
    return features * rng.uniform(0.5, 2.0, dims)


def test_pca_keeps_the_reference_neighbours_where_a_random_w_does_not():
    features = low_rank_features()
    standardised = (features - features.mean(axis=0)) / features.std(axis=0)
    basis = fit_pca_basis(features, 32)
    w = np.random.default_rng(8).standard_normal((512, 32)) / np.sqrt(32)
    assert basis.explained == pytest.approx(1.0)
    assert knn_overlap(basis.project(features), standardised) > 0.99
    assert knn_overlap(standardised @ w, standardised) < 0.8
    assert knn_overlap(features @ w, features) < 0.8


def test_pca_basis_is_deterministic_signed_and_storable():
    features = low_rank_features(rows=100)
    basis = fit_pca_basis(features, 24)
    assert basis.components.dtype == np.float32 and basis.components.shape == (512, 24)
    assert fit_pca_basis(features.copy(), 24).components.tobytes() == basis.components.tobytes()
    # Components past the rank are zero; each real one has its largest-magnitude entry positive.
    used = np.abs(basis.components).max(axis=0) > 0
    assert used.sum() == 16
    peaks = np.abs(basis.components[:, used]).argmax(axis=0)
    assert (basis.components[peaks, np.flatnonzero(used)] > 0).all()
    stored = PcaBasis.from_arrays({name: array.copy() for name, array in basis.arrays().items()})
    assert stored.project(features).tobytes() == basis.project(features).tobytes()
    assert stored.explained == pytest.approx(basis.explained)


def test_pca_basis_from_fewer_rows_than_dims_and_without_standardising():
    rng = np.random.default_rng(9)
    features = rng.standard_normal((20, 64))
    basis = fit_pca_basis(features, 8, standardize=False, center=False)
    assert np.all(basis.mean == 0) and np.all(basis.scale == 1)
    # Uncentred and unscaled: the leading right singular vectors of the features themselves.
    _, singular, vt = np.linalg.svd(features, full_matrices=False)
    np.testing.assert_allclose(np.abs(basis.components.T @ vt[:8].T), np.eye(8), atol=1e-4)
    assert basis.explained == pytest.approx(np.sum(singular[:8] ** 2) / np.sum(singular**2), rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert basis.project(features).shape == (20, 8)
