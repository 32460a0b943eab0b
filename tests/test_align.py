import math
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from coopt_hub.core.align import AlignmentWarning, apply_alignment, fit_alignment, normalize, uniformity


def direct_uniformity(features: np.ndarray, t: float) -> float:
    """The definition, O(n^2) in float64: log mean over pairs i<j of exp(-t ||f_i - f_j||^2)."""
    f = features.astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    i, j = np.triu_indices(len(f), k=1)
    exponents = -t * np.sum((f[i] - f[j]) ** 2, axis=1)
    peak = exponents.max()  # shifted, so that large t does not underflow the reference itself
    return float(peak + np.log(np.mean(np.exp(exponents - peak))))


@pytest.mark.parametrize("rows, block, t", [(2, 2048, 2.0), (257, 64, 2.0), (300, 300, 0.5), (129, 7, 4.0)])
def test_uniformity_matches_the_definition(rows, block, t):
    features = np.random.default_rng(rows).standard_normal((rows, 24)) * 3
    assert uniformity(features, t=t, block=block) == pytest.approx(direct_uniformity(features, t), abs=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_uniformity_is_the_same_on_one_thread_or_several_and_leaves_the_blas_threads_as_they_were(threads):
    features = np.random.default_rng(5).standard_normal((301, 16))
    with threadpool_limits(limits=threads, user_api="blas"):
        before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        value = uniformity(features, t=2.0, block=32)  # 10 blocks: on every core the BLAS allows
        assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before
    assert value == pytest.approx(direct_uniformity(features, 2.0), abs=1e-5)


def test_uniformity_prefers_spread_over_collapse():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((200, 16))
    collapsed = np.ones((200, 16)) + 0.01 * rng.standard_normal((200, 16))
    assert uniformity(spread) < uniformity(collapsed) <= 0.0


def test_uniformity_survives_large_temperatures():
    features = np.random.default_rng(1).standard_normal((100, 8))
    f = normalize(features).astype(np.float64)
    closest = min(np.sum((f[i] - f[j]) ** 2) for i in range(100) for j in range(i + 1, 100))
    t = 800.0 / closest  # every exp(-t d) underflows float64, so a naive mean would give log(0)
    assert np.exp(-t * closest) == 0.0
    value = uniformity(features, t=t, block=16)
    assert math.isfinite(value)
    assert value == pytest.approx(direct_uniformity(features, t), rel=1e-4)


def test_normalize_gives_unit_rows():
    out = normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_alignment_recovers_a_linear_map():
    rng = np.random.default_rng(2)
    source = rng.standard_normal((400, 32))
    true_map = rng.standard_normal((32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform, residual = fit_alignment(source.astype(np.float32), source @ true_map)
    assert transform.dtype == np.float64
    assert transform.shape == (32, 32)
    assert residual < 1e-5
    np.testing.assert_allclose(transform, true_map, atol=1e-4)
    aligned = apply_alignment(source, transform)
    assert aligned.dtype == np.float32
    np.testing.assert_allclose(aligned, source @ true_map, rtol=1e-3, atol=1e-3)


def test_noisy_alignment_reports_its_residual():
    rng = np.random.default_rng(3)
    source = rng.standard_normal((400, 16))
    target = source @ rng.standard_normal((16, 8)) + 0.5 * rng.standard_normal((400, 8))
    transform, residual = fit_alignment(source, target)
    assert transform.shape == (16, 8)
    assert 0.05 < residual < 0.5


def test_under_determined_fit_warns_and_still_solves():
    rng = np.random.default_rng(4)
    source, target = rng.standard_normal((10, 32)), rng.standard_normal((10, 32))
    with pytest.warns(AlignmentWarning, match="under-determined"):
        transform, residual = fit_alignment(source, target)
    assert np.isfinite(transform).all()
    assert residual < 0.1


def test_explicit_ridge_shrinks_the_map():
    rng = np.random.default_rng(5)
    source = rng.standard_normal((100, 8))
    target = source @ rng.standard_normal((8, 8))
    loose, _ = fit_alignment(source, target)
    tight, residual = fit_alignment(source, target, ridge=1e4)
    assert np.linalg.norm(tight) < 0.1 * np.linalg.norm(loose)
    assert residual > 0.5


@pytest.mark.parametrize("call, words", [
    (lambda: uniformity(np.zeros(5)), "2-D"),
    (lambda: uniformity(np.ones((1, 3))), "at least 2 rows"),
    (lambda: uniformity(np.ones((4, 3)), t=0), "temperature"),
    (lambda: fit_alignment(np.ones((4, 3)), np.ones((5, 3))), "same rows"),
    (lambda: fit_alignment(np.ones((4, 3)), np.full((4, 3), np.nan)), "NaN"),
    (lambda: fit_alignment(np.ones((4, 3)), np.zeros((4, 3))), "all zeros"),
    (lambda: fit_alignment(np.ones((4, 3)), np.ones((4, 3)), ridge=-1.0), "ridge"),
    (lambda: apply_alignment(np.ones((4, 3)), np.ones((2, 3))), "expects 2"),
    (lambda: normalize(np.array([["a"]])), "real numbers"),
])
def test_bad_shapes_and_values_are_refused(call, words):
    with pytest.raises(ValueError, match=words):
        call()
