"""Exceptions that carry a message for the user and the next step to take.

The CLI turns these (and the huggingface_hub errors it knows) into one short message plus a hint,
in one table (coopt_hub.cli.errors). Library code raises the most specific class that fits.
"""

from __future__ import annotations


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
