"""Exceptions that carry a message for the user and the next step to take, and THE error table.

Library code raises the most specific class that fits. `describe_error` turns any exception into
(exit code, message, next step): ours carry their own; the errors of huggingface_hub and httpx
that reach a user are mapped by ERROR_TABLE. The command line and the recipes both use it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx2


class CoOptError(Exception):
    """Base class: `str(err)` says what is wrong, `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(CoOptError):
    """A missing or contradictory option, config file or environment variable."""

    exit_code = 2


class PlanError(CoOptError):
    """No plan, a different plan, or a shard/anchor request the plan cannot satisfy."""


class SourceError(CoOptError):
    """The source dataset is missing, moved on from its pinned commit, or lacks a split/column."""


class PriorError(CoOptError):
    """A prior model that cannot be loaded, or that produced unusable outputs (NaN/inf)."""


class BadImageError(CoOptError):
    """Images that cannot be decoded; `ids` names them."""

    def __init__(self, message: str, ids: list[int], hint: str | None = None):
        super().__init__(message, hint)
        self.ids = ids


class ShardFileError(CoOptError):
    """A targets/anchors file that is corrupt, truncated, inconsistent or of the wrong shape."""


class ConflictError(CoOptError):
    """The remote moved on or holds someone else's result; nothing was overwritten."""


class VerificationError(CoOptError):
    """A merge or verify check failed; the message names the shard and the check."""


@dataclass(frozen=True)
class ErrorRow:
    """How one exception class reaches the user."""

    error: type[BaseException]
    exit_code: int
    message: str
    hint: str


@functools.cache
def error_table() -> tuple[ErrorRow, ...]:
    """The table, first match wins (subclasses before their bases).

    Built on first use: importing huggingface_hub and httpx costs a quarter of a second that
    `coopt-hub --help` and the pure core should not pay.
    """
    import httpx2
    from huggingface_hub import errors as hf

    status_hint = "`coopt-hub status REPO` shows what each branch holds."
    return (
        ErrorRow(hf.RevisionNotFoundError, 3, "Revision not found",
                 "List the repo's branches and tags with `coopt-hub status REPO` (or the Hub's web page), "
                 "or pass an existing --revision."),
        ErrorRow(hf.RemoteEntryNotFoundError, 3, "File not found in the repo", f"Check the path and revision; {status_hint}"),
        ErrorRow(hf.LocalEntryNotFoundError, 5, "Cannot reach the Hub and the file is not cached",
                 "Check HF_ENDPOINT and your network (or start `coopt-hub hub serve`), then retry."),
        ErrorRow(hf.EntryNotFoundError, 3, "File not found", f"Check the path and revision; {status_hint}"),
        ErrorRow(hf.GatedRepoError, 4, "Access to this repo is gated",
                 "Request access on the Hub, then set HF_TOKEN to a token of the account that has it."),
        ErrorRow(hf.RepositoryNotFoundError, 3, "Repository not found",
                 "Check the repo id and HF_ENDPOINT; private repos need HF_TOKEN set to a token that can read them."),
        ErrorRow(hf.HFValidationError, 2, "Invalid repo id",
                 "Name repos ORG/NAME: letters, digits, '-', '_' and '.', at most 96 characters, no '--' or '..'."),
        ErrorRow(hf.HfHubHTTPError, 5, "The Hub refused the request",
                 "Read the server's message above; 401 means HF_TOKEN is missing or wrong, 412 that someone "
                 "committed first (rerun the command)."),
        ErrorRow(httpx2.ConnectError, 5, "Cannot connect to the Hub endpoint",
                 "Check HF_ENDPOINT (is `coopt-hub hub serve` running?) and your network, then retry."),
        ErrorRow(httpx2.TransportError, 5, "The connection to the Hub failed",
                 "Check the network and HF_ENDPOINT, then rerun: finished work is kept and not redone."),
        ErrorRow(ConnectionError, 5, "Cannot connect", "Check HF_ENDPOINT and your network, then retry."),
    )


def describe_error(err: BaseException) -> tuple[int, str, str | None]:
    """Map an exception to (exit code, message, next step)."""
    if isinstance(err, CoOptError):
        return err.exit_code, str(err), err.hint
    for row in error_table():
        if isinstance(err, row.error):
            # huggingface_hub puts a request id first; the status and the server's own words say what went wrong.
            status = getattr(getattr(err, "response", None), "status_code", None)
            server = (getattr(err, "server_message", None) or "").strip().splitlines()
            detail = [f"{status} {server[0]}"] if server and status else str(err).strip().splitlines()
            detail_text = f": {detail[0]}" if detail else ""
            request = _failed_request(err)
            if request is not None and str(request.url) not in str(err):
                # "Connection refused" alone does not say which endpoint refused.
                detail_text += f" ({request.method} {request.url})"
            hint = row.hint
            if status == 412:
                hint = "Someone committed to that branch first. Rerun the command; it starts from the new state."
            elif status == 401:
                hint = "Set HF_TOKEN to a token the endpoint accepts (`coopt-hub hub serve` prints one)."
            return row.exit_code, f"{row.message}{detail_text}", hint
    return 1, f"Unexpected error: {type(err).__name__}: {err}", (
        "Rerun with --debug for the traceback, and report it if the input looks right."
    )


def _failed_request(err: BaseException) -> httpx2.Request | None:
    """The httpx2 request behind `err`, found on it or on the errors that caused it; None if there is none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            request = getattr(current, "request", None)
        except RuntimeError:  # httpx2's errors raise when they were made without a request
            request = None
        if request is not None and hasattr(request, "url"):
            return request
        current = current.__cause__ or current.__context__
    return None


def id_list(ids: Sequence[int], limit: int = 20) -> str:
    """Ids for a message: the first `limit`, then how many more."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
