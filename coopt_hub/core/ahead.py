"""Iterating on a background thread, a bounded number of items ahead of the consumer.

    for shard in ahead(download(s) for s in shards):   # the next shard downloads while this one merges
        merge(shard)

The stages it overlaps must release the GIL for most of their time (file and socket I/O, hashlib,
numpy, pyarrow do), or the thread only takes turns with the consumer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

_Item = TypeVar("_Item")
_END = object()
_POLL_SECONDS = 0.1


def ahead(items: Iterable[_Item], depth: int = 1, name: str = "coopt-ahead") -> Iterator[_Item]:
    """`items` in order, produced on a thread that stays at most `depth` items ahead of the consumer
    (so at most depth + 2 are alive: the consumer's, the queued ones, the one being produced).

    An exception from `items` is raised here at the point in the sequence where it happened. When
    the consumer stops early (break, an exception, close()), the thread is told to stop and joined:
    an item already being produced is finished first, then nothing more is produced.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}.")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
        except BaseException as err:  # noqa: BLE001 -- any error, handed to the consumer and raised there
            offer((_END, err))
            return
        offer((_END, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
