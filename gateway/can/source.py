"""Live frames from a CAN bus, handed to the event loop in batches.

Two ways in, chosen by what the bus offers:

- **fd mode** (socketcan, udp_multicast): the bus exposes a file descriptor.
  The event loop watches it and, when readable, drains everything that is
  ready in one callback. No thread, no per-frame hand-off.
- **thread mode** (virtual, slcan, vendor adapters): a reader thread blocks in
  ``recv`` and collects frames for a short window (default 5 ms) before one
  ``call_soon_threadsafe`` hands the whole batch over.

Either way batches land in a DROP_OLDEST :class:`BatchQueue`: if decoding
falls behind, the oldest frames go and are counted. A bus that fails (adapter
unplugged, interface down) is closed, logged once per interval, and reopened
with exponential backoff; the daemon keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
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
        batch_window: float = 0.005,
        max_batch: int = 512,
    ) -> None:
        self.options = options
        self._queue = queue
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._opener = opener
        self._window = batch_window
        self._max_batch = max_batch
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
            backoff = BACKOFF_START
            self.connected.set()
            try:
                error = await self._read_until_failure(self._bus)
            finally:
                self.connected.clear()
                self._close()
            self._counters.inc(f"can.{name}.read_failures")
            self._rlog.error(f"read:{name}", f"bus {name}: read failed: {error}; reopening")
            await self._clock.sleep(backoff)

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
        self.mode = "thread"
        stop = threading.Event()
        thread = threading.Thread(
            target=self._thread_main, args=(bus, loop, stop, fail),
            name=f"can-rx-{self.options.name}", daemon=True,
        )
        thread.start()
        try:
            return await failed
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 1.0)

    def _drain(self, bus: can.BusABC, fail: Callable[[BaseException], None]) -> None:
        batch: list[can.Message] = []
        try:
            while len(batch) < self._max_batch:
                msg = bus.recv(timeout=0)
                if msg is None:
                    break
                batch.append(msg)
        except Exception as exc:  # driver errors end this connection, not the daemon
            fail(exc)
        if batch:
            self._queue.put_nowait(batch)

    def _thread_main(
        self,
        bus: can.BusABC,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
        fail: Callable[[BaseException], None],
    ) -> None:
        put = self._queue.put_nowait
        try:
            while not stop.is_set():
                msg = bus.recv(timeout=0.1)
                if msg is None:
                    continue
                batch = [msg]
                deadline = time.monotonic() + self._window
                while len(batch) < self._max_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    msg = bus.recv(timeout=remaining)
                    if msg is None:
                        break
                    batch.append(msg)
                loop.call_soon_threadsafe(put, batch)
        except Exception as exc:  # reported to the loop, which reopens the bus
            if not stop.is_set():
                with contextlib.suppress(RuntimeError):  # loop already closed
                    loop.call_soon_threadsafe(fail, exc)
