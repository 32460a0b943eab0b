"""One progress protocol for every long job: notes, warnings and progress bars.

Library code takes a `Progress` and never prints: the command line passes its output sink (which
turns bars off for --json), library callers get `LogProgress` (logging, bars on a terminal only)
and ranks other than 0 get `Silent`, so one process speaks for a job.
"""

from __future__ import annotations

import logging
import sys
from typing import Protocol

from tqdm.auto import tqdm

logger = logging.getLogger("coopt_hub")


class Bar(Protocol):
    """A progress bar, used as a context manager; `update(n)` counts n more units done."""

    def update(self, n: int = 1) -> object: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, *exc: object) -> object: ...


class Progress(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def bar(self, total: int | None, description: str, unit: str = "it") -> Bar: ...


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def terminal_bar(total: int | None, description: str, unit: str = "it", enabled: bool = True) -> Bar:
    """A tqdm bar with rate and ETA on stderr; a bar that draws nothing when not `enabled`."""
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


class LogProgress:
    """For library callers: notes to logging, bars only when stderr is a terminal."""

    def info(self, message: str) -> None:
        logger.info(message)

    def warn(self, message: str) -> None:
        logger.warning(message)

    def bar(self, total: int | None, description: str, unit: str = "it") -> Bar:
        return terminal_bar(total, description, unit, enabled=sys.stderr.isatty())


class Silent:
    """Says nothing and draws nothing: for ranks other than 0, and for callers that want quiet."""

    def info(self, message: str) -> None:
        return None

    def warn(self, message: str) -> None:
        return None

    def bar(self, total: int | None, description: str, unit: str = "it") -> Bar:
        return _NoBar()
