"""The one exception type the server turns into an HTTP error response."""

from __future__ import annotations

from typing import Any


class HubError(Exception):
    """An error the client caused or must handle, answered as `{"error": message}`.

    `code` becomes the X-Error-Code header, which huggingface_hub maps to its exception classes
    (RepoNotFound, RevisionNotFound, EntryNotFound); `extra` adds keys to the JSON body, such as
    the `url` that create_repo(exist_ok=True) reads from a 409.
    """

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra
        self.headers: dict[str, str] = {}


def bad_request(message: str) -> HubError:
    return HubError(400, message, "BadRequest")


def repo_not_found() -> HubError:
    # The Hub's own words, the same for a missing and a private repo: huggingface_hub's message
    # names the URL already, and appends ours only when it does not contain it.
    return HubError(404, "Repository not found", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Revision {revision!r} not found.", "RevisionNotFound")


def entry_not_found(path: str, revision: str) -> HubError:
    return HubError(404, f"Entry {path!r} not found at revision {revision!r}.", "EntryNotFound")
