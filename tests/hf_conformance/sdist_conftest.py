"""conftest.py for huggingface_hub's own tests, run against the embedded hub by the harness.

The harness copies this file next to the tests it takes from huggingface_hub's sdist, which ships
no conftest.py although its tests import `RepoFactory` from one. It provides what the selected
tests use (`api`, `repo_factory`, a small `mocker`), and points the test constants at the hub
the harness started: HF_ENDPOINT is that hub, and it knows the tokens of USER and OTHER_USER.
"""

from __future__ import annotations

import os
import unittest.mock
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, RepoUrl, constants

from . import testing_constants
from .testing_utils import repo_name

# Imported before any test module, so their `from .testing_constants import ENDPOINT_STAGING` reads this.
testing_constants.ENDPOINT_STAGING = os.environ["HF_ENDPOINT"]


class RepoFactory:
    """Creates repos for one test (a fresh name by default) and deletes them after it."""

    def __init__(self, api: HfApi):
        self._api = api
        self._created: list[tuple[str, str | None, str | None]] = []

    def __call__(self, repo_type: str | None = None, *, repo_id: str | None = None, token: str | None = None,
                 **kwargs) -> RepoUrl:
        url = self._api.create_repo(repo_id or repo_name(), repo_type=repo_type, token=token, **kwargs)
        self._created.append((url.repo_id, repo_type, token))
        return url

    def clean(self) -> None:
        for repo_id, repo_type, token in self._created:
            self._api.delete_repo(repo_id, repo_type=repo_type, token=token, missing_ok=True)


@pytest.fixture(scope="session")  # class-scoped fixtures of the tests use it
def api() -> HfApi:
    return HfApi(endpoint=testing_constants.ENDPOINT_STAGING, token=testing_constants.TOKEN)


@pytest.fixture
def repo_factory(api: HfApi) -> Iterator[RepoFactory]:
    factory = RepoFactory(api)
    yield factory
    factory.clean()


@pytest.fixture
def mocker() -> Iterator[SimpleNamespace]:
    """What these tests use of pytest-mock's fixture: `patch` and `patch.object`, undone after the test."""
    patches: list = []

    def start(patcher):
        patches.append(patcher)
        return patcher.start()

    def patch(target, *args, **kwargs):
        return start(unittest.mock.patch(target, *args, **kwargs))

    patch.object = lambda target, attribute, *args, **kwargs: start(
        unittest.mock.patch.object(target, attribute, *args, **kwargs))
    yield SimpleNamespace(patch=patch)
    for patcher in reversed(patches):
        patcher.stop()


@pytest.fixture(autouse=True)
def _quiet_experimental_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_EXPERIMENTAL_WARNING", True)
