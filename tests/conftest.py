"""Suite-wide setup: one embedded Hub server, every client cache pointed at a temp dir, and the
fixtures the test modules share (the hub client, sources, new collaborations, fake prior backends).

huggingface_hub and datasets read HF_ENDPOINT and their cache paths when they are imported, so the
environment is set in pytest_configure, before any test module imports them. Keep this file free
of heavy imports (torch, open_clip, huggingface_hub): collection must stay fast, and the helpers
are imported inside the fixtures that use them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from coopt_hub.server import HubServer

HUB_TOKEN = "coopt-test-write-token"
_SERVER = pytest.StashKey[HubServer]()
_TMP = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    imported = [name for name in ("huggingface_hub", "datasets") if name in sys.modules]
    if imported:
        raise pytest.UsageError(
            f"{', '.join(imported)} was imported before tests/conftest.py could point it at the test server; "
            "a plugin or an early import is to blame."
        )
    _share_the_cores()
    _take_ctrl_c()
    tmp = Path(tempfile.mkdtemp(prefix="coopt-hub-tests-"))
    server = HubServer(tmp / "hub", tokens=[HUB_TOKEN]).start()
    os.environ.update(server.env())
    os.environ.update({
        "HF_HOME": str(tmp / "hf-home"),
        "HF_DATASETS_CACHE": str(tmp / "datasets-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "COOPT_HUB_HOME": str(tmp / "coopt-home"),
    })
    config.stash[_SERVER] = server
    config.stash[_TMP] = tmp


def _take_ctrl_c() -> None:
    """A shell without job control starts a background command (`.ci/run &`) with SIGINT ignored, and
    every process it starts inherits that: the Ctrl-C tests' commands then never see their Ctrl-C (all
    three failed so, while passing from a terminal). Python's own handler here, reset to the default
    in each command the tests start, makes the suite behave the same either way."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _share_the_cores() -> None:
    """Under pytest-xdist, give each worker's torch/BLAS (and the subprocesses it starts) its share of
    the cores. With two workers each running an OpenMP team as large as the machine, a team thread
    waits at every barrier for a core the other worker holds: on 2 cores a resnet18 forward ran 12x
    slower with 2 threads than with 1. Set before torch is imported; an explicit setting wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, share)


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(_SERVER, None)
    if server is not None:
        server.stop()
    tmp = config.stash.get(_TMP, None)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def hub_server(pytestconfig: pytest.Config) -> HubServer:
    """The session's running server; `hub_server.root` is its storage, `.token` a write token."""
    return pytestconfig.stash[_SERVER]


@pytest.fixture
def hf_api():
    from huggingface_hub import HfApi

    return HfApi()


@pytest.fixture
def new_repo_id():
    """Factory of repo ids unique in the session: new_repo_id("digits") -> "org/digits-1a2b3c4d5e6f"."""

    def make(name: str = "repo", namespace: str = "org") -> str:
        return f"{namespace}/{name}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def repo_id(new_repo_id) -> str:
    """A fresh, not yet created repo id for this test."""
    return new_repo_id()


@pytest.fixture(scope="session")
def hub(hub_server):
    """The library's Hub client, with the server's write token."""
    from coopt_hub.hub.client import Hub

    return Hub(token=hub_server.token)


@pytest.fixture(scope="session")
def digits_source(hub_server) -> str:
    """The sample dataset (all of scikit-learn's digits: train and test splits, labels, 16 px PNGs in
    row groups of 100) as a source repo. Shared by the whole session: never write to it."""
    import helpers_hub

    return helpers_hub.digits_source(f"org/digits-{uuid.uuid4().hex[:8]}", hub_server.token)


@pytest.fixture(scope="session")
def small_source(hub) -> str:
    """240 digits (16 px PNGs, with labels) in 8 row groups of 30: 2 shards of 4 storage units each.
    Shared by the whole session: never write to it."""
    from helpers_hub import publish_digit_rows

    return publish_digit_rows(hub, rows=240, rows_per_group=30, name="small-digits")


@pytest.fixture(scope="session")
def new_collaboration(hub):
    """Factory: new_collaboration(source, "name", shards=3, anchors=96, dim=16) publishes a plan over
    `source` in a new repo org/name-<random> and returns its helpers_hub.Collaboration."""
    from helpers_hub import start_collaboration

    def make(source: str, name: str = "coopt", **settings):
        return start_collaboration(hub, f"org/{name}-{uuid.uuid4().hex[:12]}", source, **settings)

    return make


@pytest.fixture(scope="session")
def fake_backends():
    """tests/fakes.py's prior backends, registered: `--model pixel:net` (fakes.PIXEL_MODEL) loads the pixel prior."""
    import fakes

    fakes.register_backends()
    yield
    fakes.unregister_backends()


@pytest.fixture(autouse=True)
def no_weights_endpoint(monkeypatch):
    """Every test starts with the priors' weights coming from the default endpoint: `--weights-endpoint`
    sets COOPT_HUB_WEIGHTS_ENDPOINT for its process, and an in-process command line must not leak it."""
    monkeypatch.delenv("COOPT_HUB_WEIGHTS_ENDPOINT", raising=False)
