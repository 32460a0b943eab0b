"""core.ahead: iterating on a background thread, a bounded number of items ahead."""

import threading
import time

import pytest

from coopt_hub.core.ahead import ahead


def test_items_come_in_order_and_the_producer_stays_within_depth():
    produced, consumed = [], []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    for item in ahead(items(), depth=2):
        time.sleep(0.002)  # a slow consumer: the producer would run away if unbounded
        # consumer holds one, the queue at most 2, the producer one more in hand
        assert len(produced) - len(consumed) <= 4, (len(produced), len(consumed))
        consumed.append(item)
    assert consumed == list(range(20))


def test_work_overlaps_with_the_consumer():
    def slow():
        for i in range(4):
            time.sleep(0.1)
            yield i

    started = time.perf_counter()
    for _ in ahead(slow()):
        time.sleep(0.1)
    # serially 0.8 s; overlapped about 0.5 s
    assert time.perf_counter() - started < 0.7


def test_an_error_is_raised_where_it_happened_in_the_sequence():
    def failing():
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in ahead(failing()):
            seen.append(item)
    assert seen == [1, 2]


def test_stopping_early_stops_and_joins_the_producer():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    iterator = ahead(endless(), depth=1)
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    iterator.close()
    assert threading.active_count() == before, "the thread was joined"
    count = len(produced)
    time.sleep(0.05)
    assert len(produced) == count, "nothing is produced after close"
    assert count <= 3 + 3


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        list(ahead([1], depth=0))
