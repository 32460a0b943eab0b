"""Process-wide settings that must be in place before the libraries that read them are imported
(huggingface_hub, numpy's OpenBLAS): set at package import, each only where the user has not."""

from __future__ import annotations

import os
from urllib.parse import urlparse

_HUGGINGFACE_HOSTS = {"huggingface.co", "hf.co"}


def endpoint_is_huggingface(endpoint: str | None) -> bool:
    if not endpoint:
        return True
    host = (urlparse(endpoint).hostname or "").lower()
    return host in _HUGGINGFACE_HOSTS or host.endswith(".huggingface.co") or host.endswith(".hf.co")


def configure_hub_environment() -> None:
    """Keep uploads on the plain LFS path for any endpoint that is not huggingface.co.

    huggingface_hub sends every LFS file through Xet when hf_xet is importable, and only the real Hub
    runs a Xet CAS. The switch is read when huggingface_hub is imported, so it is set here, at
    package import, rather than next to each call.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not endpoint_is_huggingface(os.environ.get("HF_ENDPOINT")):
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


# OpenBLAS's worker threads spin for 2^n CPU cycles after each multi-threaded product before they
# sleep; its default, n = 28, is ~0.1 s. Between the many short products of a merge or an evaluation
# (re-alignment ranges, k-NN blocks, probe predictions) they spun on cores the reading, hashing and
# encoding threads needed: a 1M x 512 merge with its evaluation (benchmarks/merge.py, runs
# alternated on 2 cores) took 76.6-77.2 CPU-s and 54.0-55.6 s, and 58.8-58.9 CPU-s and 50.1-50.3 s
# with n = 16 (~25 us); n = 8 and 22 measured the same as 16.
BLAS_THREAD_TIMEOUT = "16"


def configure_blas_environment() -> None:
    """Make OpenBLAS's idle threads sleep after ~25 us rather than spin ~0.1 s. OpenBLAS reads the
    setting when numpy loads it, so it holds for processes that import coopt_hub before numpy (the
    CLI, recipes, benchmarks); a value the user set is kept."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_THREAD_TIMEOUT)
