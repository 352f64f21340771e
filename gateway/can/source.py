"""Live frames from a CAN bus, handed to the event loop in batches.

Two ways in, chosen by what the bus offers; neither uses a thread, so there
is no per-frame hand-off and no lock contention with the decoder:

- **fd mode** (socketcan, udp_multicast): the bus exposes a file descriptor.
  The event loop watches it and, when readable, drains everything that is
  ready in one callback.
- **poll mode** (virtual, slcan, vendor adapters): every ``poll_interval``
  (default 5 ms) the loop drains whatever the driver has buffered with
  non-blocking ``recv(0)`` calls. The drivers buffer in their own threads or
  in hardware, so nothing is lost between polls; the cost is at most one
  interval of latency.

Either way batches land in a DROP_OLDEST :class:`BatchQueue`: if decoding
falls behind, the oldest frames go and are counted. A bus that fails (adapter
unplugged, interface down) is closed, logged once per interval, and reopened
with exponential backoff; the backoff resets only once the bus has delivered
frames again, so an interface that opens and fails at once is not hammered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import can

from gateway.can.bus import BusOptions, open_bus
from gateway.clock import Clock
from gateway.health import Counters, RateLimitedLog
from gateway.queues import BatchQueue

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


class LiveSource:
    """Keeps one bus open and feeds its frames into ``queue``."""

    def __init__(
        self,
        options: BusOptions,
        queue: BatchQueue[can.Message],
        clock: Clock,
        counters: Counters,
        rlog: RateLimitedLog,
        *,
        opener: Callable[[BusOptions], can.BusABC] = open_bus,
        poll_interval: float = 0.005,
        max_batch: int = 512,
    ) -> None:
        self.options = options
        self._queue = queue
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._opener = opener
        self._poll_interval = poll_interval
        self._max_batch = max_batch
        self._delivered = False
        self._bus: can.BusABC | None = None
        self.mode = "closed"
        self.connected = asyncio.Event()

    @property
    def bus(self) -> can.BusABC | None:
        """The open bus, if any (the transmit side shares it)."""
        return self._bus

    async def run(self) -> None:
        """Open, read until failure, back off, reopen; until cancelled."""
        backoff = BACKOFF_START
        name = self.options.name
        while True:
            try:
                self._bus = self._opener(self.options)
            except Exception as exc:  # any driver error means "not now, retry later"
                self._counters.inc(f"can.{name}.open_failures")
                self._rlog.error(f"open:{name}", f"bus {name}: cannot open "
                                 f"{self.options.interface}:{self.options.channel}: {exc}; "
                                 f"retrying in {backoff:.1f} s")
                await self._clock.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.connected.set()
            self._delivered = False
            try:
                error = await self._read_until_failure(self._bus)
            finally:
                self.connected.clear()
                self._close()
            if self._delivered:
                backoff = BACKOFF_START
            self._counters.inc(f"can.{name}.read_failures")
            self._rlog.error(f"read:{name}", f"bus {name}: read failed: {error}; "
                             f"reopening in {backoff:.1f} s")
            await self._clock.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _close(self) -> None:
        bus, self._bus = self._bus, None
        self.mode = "closed"
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.shutdown()

    async def _read_until_failure(self, bus: can.BusABC) -> BaseException:
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[BaseException] = loop.create_future()

        def fail(exc: BaseException) -> None:
            if not failed.done():
                failed.set_result(exc)

        try:
            fd = bus.fileno()
        except (NotImplementedError, OSError, AttributeError):
            fd = -1
        if fd >= 0:
            self.mode = "fd"
            loop.add_reader(fd, self._drain, bus, fail)
            try:
                return await failed
            finally:
                loop.remove_reader(fd)
        self.mode = "poll"
        while not failed.done():
            if self._drain(bus, fail) < self._max_batch:
                # Real time on purpose: this paces I/O polling, not vehicle logic,
                # and must not spin when a test drives a manual clock.
                await asyncio.sleep(self._poll_interval)
            else:
                await asyncio.sleep(0)  # a backlog: let the decoder run between batches
        return failed.result()

    def _drain(self, bus: can.BusABC, fail: Callable[[BaseException], None]) -> int:
        """Read what is ready (up to one batch); returns how many frames were read."""
        batch: list[can.Message] = []
        recv, append = bus.recv, batch.append  # bound once: this loop runs per frame
        try:
            for _ in range(self._max_batch):
                msg = recv(0)
                if msg is None:
                    break
                append(msg)
        except Exception as exc:  # driver errors end this connection, not the daemon
            fail(exc)
        if batch:
            # Frames read before a failure are delivered, not lost with the connection.
            self._queue.put_nowait(batch)
            self._delivered = True
        return len(batch)
