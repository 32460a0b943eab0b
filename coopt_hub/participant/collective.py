"""Agreement between the processes of one job: rank, world size and the few collective operations
the job needs, and `agreed`, which fails every rank when a step fails on one.

Only the launcher (cli/optimize) builds a real Collective from accelerate's state; the library
takes one as an argument, so it runs and is tested without a launcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from coopt_hub import errors
from coopt_hub.errors import BadImageError, CoOptError

T = TypeVar("T")


@dataclass(frozen=True)
class _RankFailure:
    """An exception in a form every rank can rebuild (exceptions with extra fields do not pickle)."""

    rank: int
    kind: str
    message: str
    hint: str | None

    @classmethod
    def of(cls, rank: int, err: BaseException) -> _RankFailure:
        if isinstance(err, CoOptError):
            return cls(rank, type(err).__name__, str(err), err.hint)
        return cls(rank, type(err).__name__, f"{type(err).__name__}: {err}", None)

    def rebuild(self) -> CoOptError:
        kind = getattr(errors, self.kind, None)
        prefix = f"Process {self.rank}: "
        if isinstance(kind, type) and issubclass(kind, CoOptError) and kind is not BadImageError:
            return kind(prefix + self.message, hint=self.hint)
        return CoOptError(prefix + self.message, hint=self.hint or "Rerun with --debug for that process's traceback.")


def agreed(collective: Collective, step: Callable[[], T]) -> T:
    """Run `step` on every rank; if it fails anywhere, fail everywhere instead of leaving ranks waiting."""
    failure: BaseException | None = None
    value: T | None = None
    try:
        value = step()
    except Exception as err:  # noqa: BLE001 - re-raised below, on this rank and the others
        failure = err
    reports = collective.all_gather(None if failure is None else _RankFailure.of(collective.rank, failure))
    if failure is not None:
        raise failure
    first = next((report for report in reports if report is not None), None)
    if first is not None:
        raise first.rebuild()
    return value  # type: ignore[return-value]


class Collective(Protocol):
    """The few collective operations a distributed job needs; every rank calls each in the same order."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...

    def all_gather(self, value: T) -> list[T]: ...

    def broadcast(self, value: T | None, src: int) -> T: ...


@dataclass(frozen=True)
class SingleProcess:
    """The collective of a job that runs in one process."""

    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        return None

    def all_gather(self, value: T) -> list[T]:
        return [value]

    def broadcast(self, value: T | None, src: int) -> T:
        return value
