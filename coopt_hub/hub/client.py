"""The one place coopt-hub talks to a Hub, through huggingface_hub.

Every write is one atomic `create_commit` pinned to the branch head it was built from
(`parent_commit`), retried with exponential backoff and jitter when the Hub answers 409/412/429/5xx
or the connection breaks. The commit's operations are rebuilt from the fresh head on every try, so a
caller can look at what is there now (someone else's result, or its own commit that went through
before the connection dropped) and decide again.

That patience is for a hub that answered once and is restarting. An endpoint this client has
never reached is more likely wrong or not started, so the first call reaches it first and gives
up within seconds, naming its URL (huggingface_hub alone retries a refused download for 23 s).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperation, HfApi, HfFileSystem, constants, get_session, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from coopt_hub.core import faults
from coopt_hub.errors import ConflictError

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
RETRY_STATUSES = frozenset({409, 412, 429, 500, 502, 503, 504})
T = TypeVar("T")


# A HEAD of the endpoint is answered at once by any hub worth working with.
FIRST_CONTACT_TIMEOUT = httpx2.Timeout(10.0)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_seconds: float = 0.25
    max_seconds: float = 15.0
    # How long an endpoint never reached yet may refuse connections: long enough for a hub that is
    # still binding its port, short enough that a wrong HF_ENDPOINT fails within 5 s.
    first_contact_seconds: float = 2.0

    def delay(self, attempt: int) -> float:
        # Full jitter: concurrent participants retrying after the same conflict spread out.
        return random.uniform(0, min(self.max_seconds, self.base_seconds * 2**attempt))


def is_transient(err: BaseException) -> bool:
    """Errors worth retrying: conflicts, rate limits, server faults and broken connections."""
    if isinstance(err, LocalEntryNotFoundError):
        # hf_hub_download's word for "the Hub could not be reached" (it is also an EntryNotFoundError).
        return True
    if isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
        return False
    if isinstance(err, HfHubHTTPError):
        return _status(err) in RETRY_STATUSES
    if _is_connection_error(err):
        return True
    # huggingface_hub wraps a failed LFS upload in a RuntimeError; what failed underneath decides. A
    # refused upload URL (403) counts too: URLs are signed for a while (and by a hub process that may
    # have restarted since), and the next try asks for fresh ones.
    cause = err.__cause__ if isinstance(err, RuntimeError) else None
    return cause is not None and (is_transient(cause) or _status(cause) == 403)


def _status(err: BaseException) -> int | None:
    return getattr(getattr(err, "response", None), "status_code", None)


def _is_connection_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "TimeoutException", "RemoteProtocolError"})


def open_remote(repo_id: str, revision: str, path: str, token: str | None = None, endpoint: str | None = None,
                block_size: int | None = None):
    """A file of a dataset repo at `revision`, open for reading through HfFileSystem range requests.

    Without `block_size` every read is an exact range request (no read-ahead): parquet readers ask
    for whole column chunks and the footer, and read-ahead would fetch bytes of other participants'
    units. With it, reads are buffered in blocks of that size (for small headers read in pieces).
    """
    fs = HfFileSystem(token=token, endpoint=endpoint)
    where = f"datasets/{repo_id}@{revision}/{path}"
    if block_size is None:
        return fs.open(where, "rb", cache_type="none")
    return fs.open(where, "rb", block_size=block_size)


def dataset_info(repo_id: str, revision: str, token: str | None = None, endpoint: str | None = None):
    """huggingface_hub's DatasetInfo of `repo_id` at `revision` (its sha and card data)."""
    return HfApi(endpoint=endpoint, token=token).dataset_info(repo_id, revision=revision)


class Hub:
    """A dataset repo's view of the Hub: heads, atomic commits, tags and downloads."""

    def __init__(self, token: str | None = None, endpoint: str | None = None, retry: RetryPolicy | None = None):
        self.api = HfApi(endpoint=endpoint, token=token)
        self.token = token
        self.endpoint = self.api.endpoint
        self.retry = retry or RetryPolicy()
        self.reached = False

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        self.reach()
        for attempt in range(self.retry.attempts):
            try:
                return call()
            except Exception as err:  # noqa: BLE001 - filtered by is_transient
                if not is_transient(err) or attempt == self.retry.attempts - 1:
                    raise
                delay = self.retry.delay(attempt)
                logger.info("%s failed (%s); retrying in %.2fs", what, err, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def reach(self) -> None:
        """Make sure the endpoint answers, once per client: its connection error (with the URL) otherwise.

        Any HTTP answer will do. Offline (HF_HUB_OFFLINE) there is nothing to reach: calls are served
        from the cache.
        """
        if self.reached or constants.is_offline_mode():
            return
        deadline = time.monotonic() + self.retry.first_contact_seconds
        attempt = 0
        while True:
            try:
                get_session().head(self.endpoint, timeout=FIRST_CONTACT_TIMEOUT)
            except httpx2.TransportError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                time.sleep(min(self.retry.delay(attempt), remaining))
                attempt += 1
            else:
                self.reached = True
                return

    # Reads -----------------------------------------------------------------------------------

    def head(self, repo_id: str, revision: str = "main") -> str | None:
        """The commit a branch or tag points to, or None when it does not exist."""
        try:
            info = self.with_retries(
                f"read {repo_id}@{revision}",
                lambda: self.api.repo_info(repo_id, revision=revision, repo_type=REPO_TYPE),
            )
        except RevisionNotFoundError:
            return None
        return info.sha

    def refs(self, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """(branches, tags), each name -> commit sha."""
        refs = self.with_retries(f"list refs of {repo_id}", lambda: self.api.list_repo_refs(repo_id, repo_type=REPO_TYPE))
        return (
            {ref.name: ref.target_commit for ref in refs.branches},
            {ref.name: ref.target_commit for ref in refs.tags},
        )

    def list_files(self, repo_id: str, revision: str) -> list[str]:
        return self.with_retries(
            f"list files of {repo_id}@{revision}",
            lambda: self.api.list_repo_files(repo_id, revision=revision, repo_type=REPO_TYPE),
        )

    def download(self, repo_id: str, path: str, revision: str, local_dir: Path | None = None) -> Path:
        return Path(
            self.with_retries(
                f"download {repo_id}@{revision}/{path}",
                lambda: hf_hub_download(
                    repo_id,
                    path,
                    repo_type=REPO_TYPE,
                    revision=revision,
                    token=self.token,
                    endpoint=self.endpoint,
                    local_dir=local_dir,
                ),
            )
        )

    def read_json(self, repo_id: str, path: str, revision: str) -> dict[str, Any] | None:
        """A JSON file's content, or None when the file (or the revision) does not exist.

        An unreachable Hub raises: taken for an absence, it would make callers act on a state they never saw.
        """
        try:
            local = self.download(repo_id, path, revision)
        except (RemoteEntryNotFoundError, RevisionNotFoundError):
            return None
        return json.loads(local.read_text())

    def open(self, repo_id: str, revision: str, path: str, block_size: int | None = None):
        """A remote file open for range reads (see open_remote)."""
        return open_remote(repo_id, revision, path, self.token, self.endpoint, block_size)

    # Writes ----------------------------------------------------------------------------------

    def ensure_repo(self, repo_id: str, private: bool = False) -> None:
        self.with_retries(
            f"create {repo_id}",
            lambda: self.api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True),
        )

    def ensure_branch(self, repo_id: str, branch: str, start: str = "main") -> None:
        self.with_retries(
            f"create branch {branch} of {repo_id}",
            lambda: self.api.create_branch(repo_id, branch=branch, revision=start, repo_type=REPO_TYPE, exist_ok=True),
        )

    def commit(
        self,
        repo_id: str,
        branch: str,
        build: Callable[[str | None], Sequence[CommitOperation] | None],
        message: str,
        description: str = "",
    ) -> str | None:
        """Commit what `build(head)` returns on top of `head`, atomically; return the new commit id.

        `build` is called again with the fresh head after a conflict or a dropped connection. It
        returns None (or nothing) when the branch already holds what it wants: then no commit is
        made and the current head is returned.
        """

        def attempt() -> str | None:
            parent = self.head(repo_id, branch)
            operations = build(parent)
            if not operations:
                return parent
            faults.reach("commit")
            info = self.api.create_commit(
                repo_id,
                list(operations),
                commit_message=message,
                commit_description=description,
                revision=branch,
                parent_commit=parent,
                repo_type=REPO_TYPE,
            )
            return info.oid

        return self.with_retries(f"commit to {repo_id}@{branch}", attempt)

    def create_tag(self, repo_id: str, tag: str, revision: str, message: str) -> None:
        try:
            self.api.create_tag(repo_id, tag=tag, revision=revision, tag_message=message, repo_type=REPO_TYPE)
        except HfHubHTTPError as err:
            if getattr(err.response, "status_code", None) == 409:
                raise ConflictError(
                    f"Tag {tag} already exists in {repo_id}.",
                    hint="Pass another --tag, or omit it to take the next free vN.",
                ) from err
            raise
