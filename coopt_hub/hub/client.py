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

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperation, CommitOperationAdd, HfApi, HfFileSystem, constants, get_session, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from coopt_hub.core import faults
from coopt_hub.core.shardfile import HeaderError, parse_json_file
from coopt_hub.errors import ConfigError, ConflictError, ShardFileError

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
RETRY_STATUSES = frozenset({409, 412, 429, 500, 502, 503, 504})
T = TypeVar("T")


# A HEAD of the endpoint is answered at once by any hub worth working with.
FIRST_CONTACT_TIMEOUT = httpx2.Timeout(10.0)

# The JSON documents read_json reads (plan, manifest, participant reports, prepare records) may be
# written by a participant, so they are bounded before json.loads. The plan is the largest: ~112 bytes
# per storage unit and ~12 per anchor id, 13.6 MB for 100k row groups and 100k anchors; 64 MiB is ~5x
# that. The deepest is the manifest, 7 levels (shards -> [i] -> alignment -> candidates -> [j]
# -> params); 32 is ~4x that.
MAX_DOCUMENT_BYTES = 64 << 20
MAX_DOCUMENT_DEPTH = 32


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


@dataclass(frozen=True)
class PullRequest:
    number: int
    author: str
    title: str


@dataclass(frozen=True)
class FileVersion:
    """A file as a revision holds it: its content id (sha256 for LFS files, else the git blob id)
    and the commit that last changed it."""

    oid: str
    commit: str
    date: datetime


class AccessDenied(ConfigError):
    """The Hub refused a request for the token's rights (403): another token, or another way (a pull
    request), is the next step, not a rerun."""

    exit_code = 5

    @classmethod
    def of(cls, err: HfHubHTTPError, what: str) -> AccessDenied:
        # The server's own words say which right is missing; huggingface_hub puts a request id first.
        reason = (err.server_message or "").strip() or "403 Forbidden"
        return cls(f"The Hub refused to {what}: {reason.rstrip('.')}.",
                   hint="Participants push shards with `coopt-hub optimize --shard K --push` or `coopt-hub push "
                        "--shard K` (a pull request when the token may not push branches); main, tags and the repo "
                        "itself are for the platform owner's token.")


def is_forbidden(err: BaseException) -> bool:
    """The Hub refused the request for the token's rights (403), as it does to an outsider's branch
    push. Not a gated or disabled repo: their own error classes say more."""
    return isinstance(err, AccessDenied) or type(err) is HfHubHTTPError and _status(err) == 403


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
                if type(err) is HfHubHTTPError and _status(err) == 403:
                    raise AccessDenied.of(err, what) from err
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

    def pull_request_heads(self, repo_id: str) -> dict[int, str]:
        """The head commit of every pull request's ref refs/pr/N, by N (open or not: see open_pull_requests)."""
        refs = self.with_retries(
            f"list pull requests of {repo_id}",
            lambda: self.api.list_repo_refs(repo_id, repo_type=REPO_TYPE, include_pull_requests=True),
        )
        return {int(ref.ref.rsplit("/", 1)[1]): ref.target_commit for ref in refs.pull_requests or []
                if ref.ref.rsplit("/", 1)[1].isdigit()}

    def open_pull_requests(self, repo_id: str, author: str | None = None) -> list[PullRequest]:
        """The open pull requests of `repo_id` (of `author` only, when given), oldest first."""
        found = self.with_retries(
            f"list pull requests of {repo_id}",
            lambda: list(self.api.get_repo_discussions(repo_id, author=author, discussion_type="pull_request",
                                                       discussion_status="open", repo_type=REPO_TYPE)),
        )
        return sorted((PullRequest(d.num, d.author, d.title) for d in found), key=lambda pr: pr.number)

    def file_versions(self, repo_id: str, revision: str, paths: Sequence[str]) -> dict[str, FileVersion]:
        """Which of `paths` exist at `revision`: their content id and the commit that last changed them."""

        def info(wanted: list[str], expand: bool) -> list:
            return self.with_retries(f"read paths of {repo_id}@{revision}", lambda: self.api.get_paths_info(
                repo_id, wanted, expand=expand, revision=revision, repo_type=REPO_TYPE))

        wanted = list(paths)
        if len(wanted) > 1:
            # The last commit of a path costs the Hub a walk through history: only for those that exist.
            wanted = [entry.path for entry in info(wanted, expand=False)]
        entries = info(wanted, expand=True) if wanted else []
        versions = {}
        for entry in entries:
            last = getattr(entry, "last_commit", None)
            if last is None or getattr(entry, "blob_id", None) is None:
                continue  # a folder
            oid = entry.lfs.sha256 if entry.lfs else entry.blob_id
            versions[entry.path] = FileVersion(oid=oid, commit=last.oid, date=last.date)
        return versions

    def user(self) -> str:
        """The name of the account this client's token belongs to."""
        return self.with_retries("ask the Hub who this token is", lambda: self.api.whoami()["name"])

    def token_role(self) -> str | None:
        """The token's role as the Hub states it ("read", "write", "fineGrained" on huggingface.co;
        "contribute" and "admin" too on the embedded hub); None when it cannot tell."""
        try:
            me = self.with_retries("ask the Hub who this token is", self.api.whoami)
        except Exception:  # noqa: BLE001 - no token, or a hub without whoami: the writes will say
            return None
        return ((me.get("auth") or {}).get("accessToken") or {}).get("role")

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
        try:
            return parse_json_file(local, "it", MAX_DOCUMENT_BYTES, max_depth=MAX_DOCUMENT_DEPTH)
        except HeaderError as err:  # a participant's file: malformed, too large or nested to exhaust recursion
            raise ShardFileError(f"{path} at {revision[:12]} of {repo_id} is not usable JSON: {str(err)[:200]}.",
                                 hint="Whoever pushed it must push it again; leave that contribution out meanwhile.") from err

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

    def preupload(self, repo_id: str, branch: str, files: Sequence[tuple[Path, str]]) -> list[CommitOperationAdd]:
        """Upload big files (local file, path in the repo) ahead of the commit that will add them
        (huggingface_hub's preupload_lfs_files); pass the operations returned to that commit, which
        then sends only their pointers. Files small enough to travel inside a commit are left to it."""
        operations = [CommitOperationAdd(path, str(local)) for local, path in files]
        self.with_retries(
            f"upload {len(operations)} file(s) to {repo_id}",
            lambda: self.api.preupload_lfs_files(repo_id, additions=operations, repo_type=REPO_TYPE, revision=branch,
                                                 free_memory=False),
        )
        return operations

    def open_pull_request(self, repo_id: str, operations: Sequence[CommitOperation], title: str,
                          description: str) -> tuple[int, str]:
        """One commit as a new pull request to main; (its number, the commit). Tried once: a lost answer
        may still have opened it, so the caller looks for its pull request before trying again."""
        self.reach()
        try:
            info = self.api.create_commit(repo_id, list(operations), commit_message=title,
                                          commit_description=description, revision="main", create_pr=True,
                                          repo_type=REPO_TYPE)
        except HfHubHTTPError as err:
            if is_forbidden(err):
                raise AccessDenied.of(err, f"open a pull request on {repo_id}") from err
            raise
        return info.pr_num, info.oid

    def comment(self, repo_id: str, number: int, text: str) -> None:
        self.with_retries(f"comment on #{number} of {repo_id}",
                          lambda: self.api.comment_discussion(repo_id, number, text, repo_type=REPO_TYPE))

    def comments(self, repo_id: str, number: int) -> list[str]:
        """The text of every comment of discussion or pull request #number, oldest first."""
        details = self.with_retries(f"read #{number} of {repo_id}",
                                    lambda: self.api.get_discussion_details(repo_id, number, repo_type=REPO_TYPE))
        return [event.content for event in details.events if event.type == "comment"]

    def close(self, repo_id: str, number: int, comment: str) -> None:
        """Close pull request (or discussion) #number with `comment`."""
        self.with_retries(
            f"close #{number} of {repo_id}",
            lambda: self.api.change_discussion_status(repo_id, number, "closed", comment=comment, repo_type=REPO_TYPE),
        )

    def create_tag(self, repo_id: str, tag: str, revision: str, message: str) -> None:
        try:
            self.api.create_tag(repo_id, tag=tag, revision=revision, tag_message=message, repo_type=REPO_TYPE)
        except HfHubHTTPError as err:
            if is_forbidden(err):
                raise AccessDenied.of(err, f"create tag {tag} of {repo_id}") from err
            if getattr(err.response, "status_code", None) == 409:
                raise ConflictError(
                    f"Tag {tag} already exists in {repo_id}.",
                    hint="Pass another --tag, or omit it to take the next free vN.",
                ) from err
            raise
