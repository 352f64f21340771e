"""LiveSource on real python-can buses: poll mode (virtual), fd mode (udp_multicast),
reopening after open and read failures, and shutdown on cancellation.

Faults are injected by subclassing the real bus classes (the bus still moves real
frames; only the failure is scripted). Backoff runs on a ManualClock, so the sleeps
the source asked for are read from ``clock.slept``. The only real-time waits are
hang guards (``GUARD``), never assertions about speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import can
import pytest
from can.interfaces.udp_multicast import UdpMulticastBus
from can.interfaces.virtual import VirtualBus

from gateway.can import BusOptions, LiveSource, open_bus
from gateway.clock import ManualClock
from gateway.health import Counters, RateLimitedLog
from gateway.queues import BatchQueue, Overflow

GUARD = 10.0
"""Seconds of real time after which a wait is declared hung (a failure, not a threshold)."""

LOGGER = "test.sources"
BUS = "vehicle"


# --------------------------------------------------------------------------- helpers


def unique_channel() -> str:
    return f"test-sources-{uuid.uuid4().hex}"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


def multicast_group() -> str:
    return f"239.74.163.{random.randint(10, 250)}"


def seq_frame(i: int) -> can.Message:
    """Frame number ``i``; the sequence number is carried in the payload."""
    return can.Message(arbitration_id=0x100 + i % 0x600, data=i.to_bytes(4, "big"),
                       is_extended_id=False)


def seq(msg: can.Message) -> int:
    return int.from_bytes(msg.data, "big")


def flat(batches: Sequence[Sequence[can.Message]]) -> list[int]:
    return [seq(m) for batch in batches for m in batch]


class Harness:
    """A LiveSource with its queue, counters and rate-limited log."""

    def __init__(self, options: BusOptions, clock: ManualClock,
                 opener: Callable[[BusOptions], can.BusABC] = open_bus,
                 **kwargs: float) -> None:
        self.counters = Counters()
        self.queue: BatchQueue[can.Message] = BatchQueue(
            f"can.{options.name}", 100_000, Overflow.DROP_OLDEST, self.counters)
        self.rlog = RateLimitedLog(logging.getLogger(LOGGER), clock)
        self.source = LiveSource(options, self.queue, clock, self.counters, self.rlog,
                                 opener=opener, **kwargs)  # type: ignore[arg-type]

    def count(self, what: str) -> int:
        return self.counters.get(f"can.{self.source.options.name}.{what}")

    async def collect(self, n: int) -> list[Sequence[can.Message]]:
        """Batches from the queue until ``n`` frames have arrived."""
        batches: list[Sequence[can.Message]] = []
        got = 0
        async with asyncio.timeout(GUARD):
            while got < n:
                batch = await self.queue.get()
                assert batch is not None
                batches.append(batch)
                got += len(batch)
        return batches


@contextlib.asynccontextmanager
async def running(source: LiveSource) -> AsyncIterator[asyncio.Task[None]]:
    """Run the source until the block ends, then cancel it and wait for it to finish."""
    task = asyncio.create_task(source.run())
    try:
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(GUARD):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(GUARD):
            while not predicate():
                await asyncio.sleep(0.001)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def connected(source: LiveSource) -> None:
    await wait_until(source.connected.is_set, "the source to connect")


def udp_opener(port: int, bus_class: type[UdpMulticastBus] = UdpMulticastBus,
               ) -> Callable[[BusOptions], can.BusABC]:
    """open_bus cannot choose the UDP port (BusOptions has none), so open the bus here."""
    def open_udp(options: BusOptions) -> can.BusABC:
        return bus_class(channel=options.channel, port=port, fd=options.fd)
    return open_udp


class OpenerSequence:
    """An opener that hands out the given buses (or raises the given errors) in order."""

    def __init__(self, *steps: Callable[[BusOptions], can.BusABC] | Exception) -> None:
        self._steps = list(steps)
        self.calls = 0
        self.opened: list[can.BusABC] = []

    def __call__(self, options: BusOptions) -> can.BusABC:
        step = self._steps[min(self.calls, len(self._steps) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        bus = step(options)
        self.opened.append(bus)
        return bus


class VirtualBusFailingAfter(VirtualBus):
    """A real virtual bus whose adapter 'goes away' after delivering ``frames`` frames."""

    def __init__(self, channel: str, frames: int) -> None:
        super().__init__(channel=channel)
        self._left = frames

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self._left <= 0:
            raise can.CanOperationError("injected fault: adapter unplugged")
        msg, filtered = super()._recv_internal(timeout)
        if msg is not None:
            self._left -= 1
        return msg, filtered


class UdpBusFailingAfter(UdpMulticastBus):
    """A real udp_multicast bus that fails on the datagram after the first ``FRAMES``."""

    FRAMES = 5

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._left = self.FRAMES

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        msg, filtered = super()._recv_internal(timeout)
        if msg is not None:
            if self._left <= 0:
                raise can.CanOperationError("injected fault: interface down")
            self._left -= 1
        return msg, filtered


def error_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.ERROR and text in r.getMessage()]



# --------------------------------------------------------------------------- poll mode


async def test_virtual_bus_uses_poll_mode_and_delivers_every_frame_in_order_in_batches(
    clock: ManualClock,
) -> None:
    channel = unique_channel()
    h = Harness(BusOptions(BUS, "virtual", channel), clock, max_batch=256)
    n = 2_000
    async with running(h.source):
        await connected(h.source)
        assert h.source.mode == "poll"
        with can.Bus(interface="virtual", channel=channel) as sender:
            for i in range(n):
                sender.send(seq_frame(i))
            batches = await h.collect(n)

    assert flat(batches) == list(range(n))
    assert len(batches) < n, "frames were handed over one by one, not batched"
    assert max(len(b) for b in batches) <= 256
    assert h.counters.get(f"queue.can.{BUS}.in") == n
    assert h.counters.get(f"queue.can.{BUS}.dropped") == 0


# --------------------------------------------------------------------------- fd mode


async def test_udp_multicast_bus_uses_fd_mode_and_delivers_frames_in_order(
    clock: ManualClock,
) -> None:
    group, port = multicast_group(), free_udp_port()
    h = Harness(BusOptions(BUS, "udp_multicast", group), clock, opener=udp_opener(port))
    n = 300
    async with running(h.source):
        await connected(h.source)
        assert h.source.mode == "fd"
        with UdpMulticastBus(channel=group, port=port, fd=False) as sender:
            for i in range(n):
                sender.send(seq_frame(i))
                if i % 10 == 9:
                    await asyncio.sleep(0)  # let the loop drain the socket as a car would
            batches = await h.collect(n)

    assert flat(batches) == list(range(n))


# --------------------------------------------------------------------------- open failures


async def test_unopenable_bus_is_retried_with_exponential_backoff_and_logged_once(
    clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    channel = unique_channel()
    missing = can.CanInitializationError("no such adapter")
    opener = OpenerSequence(missing, missing, missing, open_bus)
    h = Harness(BusOptions(BUS, "virtual", channel), clock, opener=opener)
    async with running(h.source):
        await connected(h.source)
        with can.Bus(interface="virtual", channel=channel) as sender:
            for i in range(5):
                sender.send(seq_frame(i))
            batches = await h.collect(5)

    assert h.count("open_failures") == 3
    assert clock.slept == [0.5, 1.0, 2.0]
    assert flat(batches) == [0, 1, 2, 3, 4]
    # 3.5 s of virtual time: all three failures fall inside one 10 s interval.
    lines = error_lines(caplog, "cannot open")
    assert len(lines) == 1
    assert "no such adapter" in lines[0]
    assert f"virtual:{channel}" in lines[0]
    assert h.rlog.suppressed_total == 2


async def test_open_backoff_doubles_up_to_the_cap_and_logs_once_per_interval(
    clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    channel = unique_channel()
    missing = can.CanInitializationError("no such adapter")
    opener = OpenerSequence(*[missing] * 8, open_bus)
    h = Harness(BusOptions(BUS, "virtual", channel), clock, opener=opener)
    async with running(h.source):
        await connected(h.source)

    assert clock.slept == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # Failures at t = 0, 0.5, 1.5, 3.5, 7.5 | 15.5 | 31.5 | 61.5: the first of each
    # 10 s interval is logged, carrying the count of those held back before it.
    lines = error_lines(caplog, "cannot open")
    assert len(lines) == 4
    assert "similar suppressed" not in lines[0]
    assert lines[1].endswith("(4 similar suppressed)")
    assert "similar suppressed" not in lines[2]
    assert "similar suppressed" not in lines[3]


# --------------------------------------------------------------------------- read failures


async def test_bus_that_fails_while_reading_is_reopened_poll_mode(
    clock: ManualClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    channel = unique_channel()
    h = Harness(BusOptions(BUS, "virtual", channel), clock)
    async with running(h.source):
        await connected(h.source)
        with can.Bus(interface="virtual", channel=channel) as sender:
            for i in range(10):
                sender.send(seq_frame(i))
            before = await h.collect(10)

            first_bus = h.source.bus
            assert first_bus is not None
            first_bus.shutdown()  # the adapter goes away under the poller
            await wait_until(
                lambda: h.count("read_failures") == 1 and h.source.connected.is_set()
                and h.source.bus not in (None, first_bus),
                "the bus to be reopened",
            )
            assert h.source.mode == "poll"
            for i in range(10, 20):
                sender.send(seq_frame(i))
            after = await h.collect(10)

    assert flat(before) == list(range(10))
    assert flat(after) == list(range(10, 20))
    assert h.count("read_failures") == 1
    assert h.count("open_failures") == 0
    assert clock.slept == [0.5]
    assert len(error_lines(caplog, "read failed")) == 1


async def test_bus_that_fails_while_reading_is_reopened_fd_mode(clock: ManualClock) -> None:
    group, port = multicast_group(), free_udp_port()
    opener = OpenerSequence(udp_opener(port, UdpBusFailingAfter), udp_opener(port))
    h = Harness(BusOptions(BUS, "udp_multicast", group), clock, opener=opener)
    good = UdpBusFailingAfter.FRAMES
    async with running(h.source):
        await connected(h.source)
        assert h.source.mode == "fd"
        with UdpMulticastBus(channel=group, port=port, fd=False) as sender:
            for i in range(good + 1):  # the last datagram triggers the fault
                sender.send(seq_frame(i))
            before = await h.collect(good)
            await wait_until(
                lambda: h.count("read_failures") == 1 and h.source.connected.is_set()
                and opener.calls == 2,
                "the bus to be reopened",
            )
            assert h.source.mode == "fd"
            for i in range(100, 110):
                sender.send(seq_frame(i))
            after = await h.collect(10)

    assert flat(before) == list(range(good)), "frames read before the fault were lost"
    assert flat(after) == list(range(100, 110))
    assert clock.slept == [0.5]


async def test_frames_read_before_a_failure_are_delivered_poll_mode(clock: ManualClock) -> None:
    channel = unique_channel()
    sender = can.Bus(interface="virtual", channel=channel)

    def faulty_with_frames_waiting(options: BusOptions) -> can.BusABC:
        bus = VirtualBusFailingAfter(options.channel, frames=5)
        for i in range(5):  # already queued when the first poll runs
            sender.send(seq_frame(i))
        return bus

    opener = OpenerSequence(faulty_with_frames_waiting, open_bus)
    # All five frames are read in the first poll, which then meets the fault.
    h = Harness(BusOptions(BUS, "virtual", channel), clock, opener=opener)
    try:
        async with running(h.source):
            await wait_until(lambda: h.count("read_failures") == 1, "the read failure")
            # The batch is queued before the failure closes the connection.
            assert h.queue.depth == 5
            assert flat(await h.collect(5)) == [0, 1, 2, 3, 4]
    finally:
        sender.shutdown()


async def test_bus_failing_repeatedly_after_open_backs_off_exponentially(
    clock: ManualClock,
) -> None:
    channel = unique_channel()

    def dead(options: BusOptions) -> can.BusABC:
        return VirtualBusFailingAfter(options.channel, frames=0)

    opener = OpenerSequence(dead, dead, dead, dead, open_bus)
    h = Harness(BusOptions(BUS, "virtual", channel), clock, opener=opener)
    async with running(h.source):
        await wait_until(lambda: opener.calls == 5 and h.source.connected.is_set(),
                         "the fifth open")
    assert h.count("read_failures") == 4
    assert clock.slept == [0.5, 1.0, 2.0, 4.0]


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("interface", ["virtual", "udp_multicast"])
async def test_cancelling_run_closes_the_bus(clock: ManualClock, interface: str) -> None:
    if interface == "virtual":
        opener = OpenerSequence(open_bus)
        options = BusOptions(BUS, "virtual", unique_channel())
    else:
        opener = OpenerSequence(udp_opener(free_udp_port()))
        options = BusOptions(BUS, "udp_multicast", multicast_group())
    h = Harness(options, clock, opener=opener)

    task = asyncio.create_task(h.source.run())
    await connected(h.source)
    assert h.source.mode == ("poll" if interface == "virtual" else "fd")
    task.cancel()
    async with asyncio.timeout(GUARD):
        with pytest.raises(asyncio.CancelledError):
            await task

    assert h.source.mode == "closed"
    assert h.source.bus is None
    assert not h.source.connected.is_set()
    (bus,) = opener.opened
    if interface == "virtual":
        with pytest.raises(can.CanOperationError):  # a shut-down virtual bus refuses to send
            bus.send(seq_frame(0))
    else:
        assert bus.fileno() == -1  # socket closed
