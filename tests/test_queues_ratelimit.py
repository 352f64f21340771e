"""BatchQueue overflow policies and closing, RateLimitedLog, and Counters."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.clock import ManualClock
from gateway.health import Counters, RateLimitedLog
from gateway.queues import BatchQueue, Overflow

LOGGER = "test.ratelimit"


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- BatchQueue


def test_queue_rejects_a_non_positive_bound() -> None:
    with pytest.raises(ValueError, match="max_items"):
        BatchQueue("q", 0, Overflow.DROP_OLDEST, Counters())


async def test_drop_oldest_discards_old_batches_counts_them_and_stays_bounded() -> None:
    counters = Counters()
    queue: BatchQueue[int] = BatchQueue("live", 10, Overflow.DROP_OLDEST, counters)
    batches = [list(range(i, i + 3)) for i in range(0, 18, 3)]  # six batches of three

    depths = []
    for batch in batches:
        queue.put_nowait(batch)
        depths.append(queue.depth)

    # 3, 6, 9, then each further batch pushes out the oldest one.
    assert depths == [3, 6, 9, 9, 9, 9]
    assert counters.get("queue.live.dropped") == 9
    assert counters.get("queue.live.in") == 18
    assert [await queue.get() for _ in range(3)] == batches[3:]
    assert queue.depth == 0


async def test_drop_oldest_never_drops_the_newest_batch() -> None:
    counters = Counters()
    queue: BatchQueue[int] = BatchQueue("live", 4, Overflow.DROP_OLDEST, counters)
    queue.put_nowait([1, 2])
    queue.put_nowait([3, 4, 5, 6, 7, 8])  # alone bigger than the bound

    assert counters.get("queue.live.dropped") == 2
    assert await queue.get() == [3, 4, 5, 6, 7, 8]


async def test_drop_oldest_put_does_not_wait_when_full() -> None:
    counters = Counters()
    queue: BatchQueue[int] = BatchQueue("live", 2, Overflow.DROP_OLDEST, counters)
    async with asyncio.timeout(5):
        for i in range(5):
            await queue.put([i, i])
    assert counters.get("queue.live.dropped") == 8
    assert await queue.get() == [4, 4]


async def test_block_put_waits_while_full_and_resumes_after_get() -> None:
    counters = Counters()
    queue: BatchQueue[str] = BatchQueue("replay", 4, Overflow.BLOCK, counters)
    await queue.put(["a", "b", "c"])
    await queue.put(["d"])  # depth 4: full

    blocked = asyncio.create_task(queue.put(["e", "f"]))
    await settle()
    assert not blocked.done(), "put() must wait while the queue is full"
    assert queue.depth == 4

    assert await queue.get() == ["a", "b", "c"]
    async with asyncio.timeout(5):
        await blocked
    assert queue.depth == 3

    assert await queue.get() == ["d"]
    assert await queue.get() == ["e", "f"]
    assert counters.get("queue.replay.dropped") == 0
    assert counters.get("queue.replay.in") == 6


async def test_block_put_nowait_over_the_bound_keeps_everything() -> None:
    counters = Counters()
    queue: BatchQueue[int] = BatchQueue("replay", 2, Overflow.BLOCK, counters)
    for i in range(4):
        queue.put_nowait([i])
    assert counters.get("queue.replay.dropped") == 0
    assert [await queue.get() for _ in range(4)] == [[0], [1], [2], [3]]


async def test_get_waits_for_a_batch() -> None:
    queue: BatchQueue[int] = BatchQueue("q", 10, Overflow.DROP_OLDEST, Counters())
    getter = asyncio.create_task(queue.get())
    await settle()
    assert not getter.done()
    queue.put_nowait([7])
    async with asyncio.timeout(5):
        assert await getter == [7]


async def test_close_lets_get_drain_then_return_none() -> None:
    queue: BatchQueue[int] = BatchQueue("q", 10, Overflow.DROP_OLDEST, Counters())
    queue.put_nowait([1])
    queue.put_nowait([2, 3])
    queue.close()
    queue.put_nowait([4])  # input after close is ignored

    async with asyncio.timeout(5):  # a get() that never returns None would hang
        assert await queue.get() == [1]
        assert await queue.get() == [2, 3]
        assert await queue.get() is None
        assert await queue.get() is None


async def test_close_wakes_a_waiting_getter_with_none() -> None:
    queue: BatchQueue[int] = BatchQueue("q", 10, Overflow.DROP_OLDEST, Counters())
    getter = asyncio.create_task(queue.get())
    await settle()
    queue.close()
    async with asyncio.timeout(5):
        assert await getter is None


async def test_close_releases_a_blocked_put() -> None:
    queue: BatchQueue[int] = BatchQueue("replay", 1, Overflow.BLOCK, Counters())
    await queue.put([1])
    blocked = asyncio.create_task(queue.put([2]))
    await settle()
    assert not blocked.done()

    queue.close()
    async with asyncio.timeout(5):
        await blocked
        assert await queue.get() == [1]
        assert await queue.get() is None


# --------------------------------------------------------------------------- RateLimitedLog


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def make_rlog(clock: ManualClock, **kwargs: int) -> RateLimitedLog:
    return RateLimitedLog(logging.getLogger(LOGGER), clock, interval=10.0, **kwargs)


def test_first_occurrence_logs_and_repeats_in_the_interval_are_suppressed(
    clock: ManualClock, logged: pytest.LogCaptureFixture,
) -> None:
    rlog = make_rlog(clock)
    assert rlog.warning("crc:0x123", "bad CRC on 0x123") is True
    clock.advance(4.0)
    assert rlog.warning("crc:0x123", "bad CRC on 0x123") is False
    clock.advance(5.5)  # 9.5 s after the first line: still inside the interval
    assert rlog.warning("crc:0x123", "bad CRC on 0x123") is False

    assert lines(logged) == [(logging.WARNING, "bad CRC on 0x123")]
    assert rlog.suppressed_total == 2


def test_after_the_interval_the_next_line_reports_what_was_suppressed(
    clock: ManualClock, logged: pytest.LogCaptureFixture,
) -> None:
    rlog = make_rlog(clock)
    rlog.error("k", "boom")
    clock.advance(1.0)
    rlog.error("k", "boom")
    rlog.error("k", "boom")
    clock.advance(9.0)  # exactly one interval after the first line
    assert rlog.error("k", "boom again") is True
    clock.advance(10.0)
    assert rlog.error("k", "boom once more") is True  # nothing held back in between

    assert lines(logged) == [
        (logging.ERROR, "boom"),
        (logging.ERROR, "boom again (2 similar suppressed)"),
        (logging.ERROR, "boom once more"),
    ]
    assert rlog.suppressed_total == 2


def test_keys_are_limited_independently(
    clock: ManualClock, logged: pytest.LogCaptureFixture,
) -> None:
    rlog = make_rlog(clock)
    assert rlog.warning("a", "A") is True
    assert rlog.warning("b", "B") is True  # "a" logging does not silence "b"
    assert rlog.warning("a", "A") is False
    assert rlog.warning("a", "A") is False
    clock.advance(10.0)
    assert rlog.warning("b", "B") is True
    assert rlog.warning("a", "A") is True

    assert lines(logged) == [
        (logging.WARNING, "A"),
        (logging.WARNING, "B"),
        (logging.WARNING, "B"),
        (logging.WARNING, "A (2 similar suppressed)"),
    ]


def test_key_table_is_bounded_by_max_keys(
    clock: ManualClock, logged: pytest.LogCaptureFixture,
) -> None:
    rlog = make_rlog(clock, max_keys=3)
    for key in ("a", "b", "c"):
        assert rlog.warning(key, key) is True
    assert rlog.warning("a", "a") is False  # remembered while the table has room

    for i in range(100):  # a flood of distinct keys, e.g. random CAN IDs
        assert rlog.warning(f"id:{i}", f"unknown id {i}") is True
    assert len(rlog._keys) <= 3  # memory stays bounded

    # The flood pushed "a" out of the table, so it is treated as new again.
    assert rlog.warning("a", "a") is True
    assert len(lines(logged)) == 3 + 100 + 1


# --------------------------------------------------------------------------- Counters


def test_counters_inc_and_get() -> None:
    counters = Counters()
    assert counters.get("decode.unknown_id") == 0
    counters.inc("decode.unknown_id")
    counters.inc("decode.unknown_id")
    counters.inc("queue.can.vehicle.dropped", 512)
    assert counters.get("decode.unknown_id") == 2
    assert counters.get("queue.can.vehicle.dropped") == 512


def test_counters_get_does_not_create_a_counter() -> None:
    counters = Counters()
    assert counters.get("never") == 0
    assert counters.snapshot() == {}


def test_counters_snapshot_filters_by_prefix_sorted_and_is_a_copy() -> None:
    counters = Counters()
    counters.inc("queue.can.vehicle.in", 3)
    counters.inc("can.vehicle.read_failures")
    counters.inc("queue.can.battery.in", 5)
    counters.inc("queuex", 9)

    queues = counters.snapshot("queue.")
    assert list(queues.items()) == [("queue.can.battery.in", 5), ("queue.can.vehicle.in", 3)]
    assert list(counters.snapshot()) == [
        "can.vehicle.read_failures", "queue.can.battery.in", "queue.can.vehicle.in", "queuex",
    ]

    queues["queue.can.battery.in"] = 0
    counters.inc("queue.can.battery.in")
    assert counters.get("queue.can.battery.in") == 6
    assert queues["queue.can.battery.in"] == 0
