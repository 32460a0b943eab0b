"""Process-wide settings coopt_hub puts in place at import, before the libraries that read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from coopt_hub._env import BLAS_THREAD_TIMEOUT

# What numpy's OpenBLAS took from the environment as it loaded (0: nothing, its default).
_READ_BY_OPENBLAS = """
import ctypes, json, os
import coopt_hub
import numpy
from threadpoolctl import threadpool_info

found = [info for info in threadpool_info() if info["internal_api"] == "openblas"]
library = ctypes.CDLL(found[0]["filepath"]) if found else None
read = None
if library is not None and hasattr(library, "openblas_thread_timeout"):
    read = library.openblas_thread_timeout()
print(json.dumps({"environment": os.environ.get("OPENBLAS_THREAD_TIMEOUT"), "openblas": read}))
"""


def _settings(**environment: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_THREAD_TIMEOUT"}
    completed = subprocess.run([sys.executable, "-c", _READ_BY_OPENBLAS], env={**env, **environment},
                               capture_output=True, text=True, check=True)
    settings = json.loads(completed.stdout)
    if settings["openblas"] is None:
        pytest.skip("numpy here does not run on OpenBLAS (or it does not say what it read)")
    return settings


def test_openblas_threads_sleep_soon_after_a_product_when_coopt_hub_is_imported_first():
    settings = _settings()
    assert settings == {"environment": BLAS_THREAD_TIMEOUT, "openblas": int(BLAS_THREAD_TIMEOUT)}


def test_a_thread_timeout_the_user_set_is_kept():
    assert _settings(OPENBLAS_THREAD_TIMEOUT="22") == {"environment": "22", "openblas": 22}
