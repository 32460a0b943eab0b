"""Atomic file writes: a reader sees the old file or the new one, never a part of either. And
positioned reads (read_at), which share no file offset between threads, of runs of consecutive
rows (consecutive_runs).

The new content goes to a temporary file beside the target (unique per process and thread, so
ranks sharing a work directory never write the same one), is flushed to disk, then renamed over
the target.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed over `path` when the block ends
    without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def read_at(fileno: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` (bytes) from `offset` of the open file `fileno` with positioned reads, which move
    no file offset, so several threads may read one file at once; returns the bytes read, fewer
    than asked only where the file ends."""
    done = 0
    while done < buffer.nbytes:
        count = os.preadv(fileno, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def consecutive_runs(positions: np.ndarray) -> Iterator[tuple[int, int]]:
    """Index ranges [first, stop) of `positions` over which the values go up by exactly one: the
    rows one read or write can take."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for first, stop in zip(np.r_[0, breaks], np.r_[breaks, positions.size]):
        if stop > first:
            yield int(first), int(stop)
