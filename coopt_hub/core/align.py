"""Judging priors on the anchors (uniformity) and mapping one prior's targets onto another's (ridge fit).

Row-vector convention: features are [rows, dims] and an alignment T acts as `features @ T`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

# Under-determined fits: ridge as a fraction of the mean eigenvalue of source^T source.
_RIDGE_DETERMINED = 1e-6
_RIDGE_UNDER_DETERMINED = 1e-3


class AlignmentWarning(UserWarning):
    """The alignment fit has fewer anchor rows than dimensions, so part of the target is lost."""


def normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (an all-zero row stays zero)."""
    x = _matrix(x, "features").astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def uniformity(features, t: float = 2.0, block: int = 2048) -> float:
    """V = log mean_{i<j} exp(-t ||f_i - f_j||^2) over L2-normalised rows; lower is more uniform.

    Pairs are visited in row blocks against the rows after them, so memory is O(rows * block)
    rather than O(rows^2), and the mean is accumulated as a log-sum-exp, so large t cannot
    underflow it to log(0).
    """
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"The uniformity temperature must be positive, got {t}.")
    if block < 1:
        raise ValueError(f"The block size must be at least 1, got {block}.")
    x = normalize(features)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"Uniformity needs at least 2 rows, got {n}.")
    # lower[r, c]: column c is not after row r inside a block's leading square (pairs j <= i).
    lower = np.tri(min(block, n), dtype=bool)
    log_total = -math.inf
    for start in range(0, n - 1, block):
        stop = min(start + block, n)
        # For unit vectors ||a - b||^2 = 2 - 2 a.b, so a float32 BLAS product is the whole cost;
        # the rest works in place on it to keep to one [block, rows] buffer.
        exponent = x[start:stop] @ x[start:].T
        exponent *= -2.0
        exponent += 2.0
        np.maximum(exponent, 0.0, out=exponent)
        exponent *= -t
        size = stop - start
        np.copyto(exponent[:, :size], -np.inf, where=lower[:size, :size])
        peak = float(exponent.max())
        exponent -= peak
        np.exp(exponent, out=exponent)
        log_total = np.logaddexp(log_total, peak + math.log(float(exponent.sum(dtype=np.float64))))
    num_pairs = n * (n - 1) / 2
    return float(log_total - math.log(num_pairs))


def fit_alignment(source, target, ridge: float | None = None) -> tuple[np.ndarray, float]:
    """Ridge least squares T = argmin ||source T - target||^2 + ridge ||T||^2, in float64.

    Returns T [source dims, target dims] and the relative residual ||source T - target|| / ||target||
    (Frobenius). The default ridge scales with the data; it is larger when there are fewer anchor
    rows than source dimensions, where the fit is under-determined and a warning is issued.
    """
    x = _matrix(source, "source").astype(np.float64)
    y = _matrix(target, "target").astype(np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"source and target must have the same rows (the anchors), "
                         f"got {x.shape[0]} and {y.shape[0]}.")
    _require_finite(x, "source")
    _require_finite(y, "target")
    target_norm = float(np.linalg.norm(y))
    if target_norm == 0:
        raise ValueError("The alignment target is all zeros.")
    rows, dims = x.shape
    gram = x.T @ x
    if ridge is None:
        mean_eigenvalue = float(np.trace(gram)) / dims or 1.0
        ridge = (_RIDGE_DETERMINED if rows >= dims else _RIDGE_UNDER_DETERMINED) * mean_eigenvalue
    elif not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"The ridge must be a non-negative number, got {ridge}.")
    if rows < dims:
        warnings.warn(
            f"The alignment fit is under-determined: {rows} anchor rows for {dims} dimensions (ridge {ridge:.3g}); "
            "part of the reference prior's information is lost. Use more anchors or a smaller --dim.",
            AlignmentWarning,
            stacklevel=2,
        )
    gram[np.diag_indices_from(gram)] += ridge
    transform = np.linalg.solve(gram, x.T @ y)
    residual = float(np.linalg.norm(x @ transform - y)) / target_norm
    return transform, residual


def apply_alignment(x, T) -> np.ndarray:
    """x @ T in float32."""
    x = _matrix(x, "features")
    transform = _matrix(T, "alignment")
    if x.shape[1] != transform.shape[0]:
        raise ValueError(f"Features have {x.shape[1]} dimensions but the alignment expects {transform.shape[0]}.")
    return x.astype(np.float32) @ transform.astype(np.float32)


def _matrix(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, dims] array, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}.")
    return array


def _require_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
