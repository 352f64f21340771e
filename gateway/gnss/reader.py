"""The serial GNSS receiver: bytes in, one :class:`Fix` per epoch out, whatever the line does.

A receiver on USB can vanish at any moment and come back under the same name;
one on a UART can stop talking while its port stays open; a UART line carries
binary protocol frames (u-blox UBX) and noise between the sentences. None of
it may stop the daemon: a lost or silent port is closed and reopened with
exponential backoff, and anything that is not a sentence is counted, logged
once in a while and skipped up to the next ``$``.

Opening and closing run in a worker thread: pyserial does both synchronously,
and for a ``socket://`` receiver that means a TCP connect of up to 5 s and a
0.3 s sleep in ``close``, which must not stall CAN handling on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

import serial

from gateway.clock import Clock
from gateway.config.location import GnssSettings
from gateway.gnss.fix import Fix
from gateway.gnss.nmea import MAX_LINE, NmeaParser, is_text
from gateway.health import Counters, RateLimitedLog

READ_SIZE = 4096
SILENT_EPOCHS = 5.0
"""Epochs without a byte after which an open receiver counts as silent ..."""
SILENT_MIN_S = 5.0
"""... but never sooner than this, whatever its rate."""


class GnssReader:
    """Reads NMEA from ``settings.device`` and calls ``on_fix`` once per receiver epoch.

    ``backoff`` is the (first, longest) wait between attempts to reopen a lost
    port; ``idle_flush`` is how long the line must be quiet after a burst for
    the epoch to count as complete; ``silent_after`` is how long an open port
    may deliver no byte at all before it is closed and reopened (default
    ``max(5, 5 / rate_hz)`` seconds; ``math.inf`` never gives up on it).
    """

    def __init__(
        self,
        settings: GnssSettings,
        clock: Clock,
        counters: Counters,
        rlog: RateLimitedLog,
        on_fix: Callable[[Fix], None],
        *,
        backoff: tuple[float, float] = (1.0, 30.0),
        idle_flush: float = 0.1,
        silent_after: float | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._on_fix = on_fix
        self._backoff = backoff
        self._idle_flush = idle_flush
        self._silent_after = (silent_after if silent_after is not None else
                              max(SILENT_MIN_S, SILENT_EPOCHS / settings.rate_hz))
        self._parser = NmeaParser(counters, rlog)
        self._port: serial.SerialBase | None = None
        self._last_fix: Fix | None = None
        self._buf = bytearray()
        self._skipping = False  # discarding up to the next '$' or line end
        self._pending = False  # bytes arrived since the last flush
        self._got_data = False  # this connection delivered at least one byte

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._port is not None

    @property
    def last_fix(self) -> Fix | None:
        """The latest fix handed to ``on_fix``."""
        return self._last_fix

    async def run(self) -> None:
        """Read forever; returns only by cancellation, which closes the port."""
        low, high = self._backoff
        delay = low
        in_outage = False
        try:
            while True:
                reason = await self._connection()
                if self._got_data:
                    delay, in_outage = low, False
                if not in_outage:
                    # One line per outage: the retries of an unplugged receiver are not news.
                    in_outage = True
                    self._rlog.warning(
                        "gnss.outage", f"GNSS receiver {self._settings.device}: {reason}; "
                        f"retrying with backoff ({low:g} s doubling up to {high:g} s)")
                await self._clock.sleep(delay)
                delay = min(delay * 2.0, high)
        finally:
            await self._close()

    async def _connection(self) -> str:
        """Open the port and read until it fails; returns why it ended."""
        self._got_data = False
        try:
            port = await self._open()
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            self._counters.inc("gnss.open_failures")
            return f"cannot open ({exc})"
        self._port = port
        self._rlog.log(logging.INFO, "gnss.connected",
                       f"GNSS receiver connected on {self._settings.device} "
                       f"({self._settings.baud} baud)")
        try:
            reason = await self._read(port)
        except Exception as exc:  # a bug here must cost a reconnect, not the receiver
            self._counters.inc("gnss.errors.internal")
            self._rlog.error("gnss.internal", f"GNSS reader failed: {type(exc).__name__}: {exc}")
            reason = f"reader error ({type(exc).__name__})"
        finally:
            await self._close()
            self._end_of_stream()
        self._counters.inc("gnss.disconnects")
        return reason

    async def _open(self) -> serial.SerialBase:
        opening = asyncio.ensure_future(asyncio.to_thread(_open_port, self._settings))
        try:
            # Shielded: cancelling cannot stop the thread, and a port it opens after all
            # must still be closed rather than leaked.
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_when_opened)
            raise

    def _silent(self) -> str:
        self._counters.inc("gnss.silent")
        return f"silent (no data for {self._silent_after:g} s)"

    async def _read(self, port: serial.SerialBase) -> str:
        try:
            fd: int | None = port.fileno()
        except (OSError, ValueError, AttributeError):
            fd = None  # e.g. loop:// has no descriptor to wait on
        if fd is None:
            return await self._poll(port)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        last_data = self._clock.monotonic()
        try:
            while True:
                if self._pending:
                    timeout = self._idle_flush
                else:
                    timeout = last_data + self._silent_after - self._clock.monotonic()
                    if timeout <= 0.0:
                        return self._silent()
                if not await self._wait(readable, timeout):
                    if self._pending:
                        self._flush()
                    continue
                readable.clear()
                try:
                    data = port.read(READ_SIZE)
                except OSError as exc:  # EIO from a vanished USB device or a closed pty
                    return f"lost ({exc})"
                if data:
                    last_data = self._clock.monotonic()
                    self._consume(data)
        finally:
            loop.remove_reader(fd)

    async def _poll(self, port: serial.SerialBase) -> str:
        last_data = self._clock.monotonic()
        while True:
            await self._clock.sleep(self._idle_flush)
            try:
                data = port.read(READ_SIZE)
            except OSError as exc:
                return f"lost ({exc})"
            if data:
                last_data = self._clock.monotonic()
                self._consume(data)
            elif self._pending:
                self._flush()
            elif self._clock.monotonic() - last_data >= self._silent_after:
                return self._silent()

    async def _wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds of the injected clock."""
        if math.isinf(timeout):
            await event.wait()
            return True
        waiter = asyncio.ensure_future(event.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()
        return event.is_set()

    def _consume(self, data: bytes) -> None:
        received = self._clock.time()
        self._got_data = self._pending = True
        if self._skipping:
            cut = min((i for i in (data.find(b"$"), data.find(b"\n")) if i >= 0), default=-1)
            if cut < 0:
                return
            data, self._skipping = data[cut:], False
        buf = self._buf
        buf += data
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            self._line(bytes(buf[start:end]), received)
            start = end + 1
        del buf[:start]
        while len(buf) > MAX_LINE:
            self._parser.reject_garbage(bytes(buf), f"no line end within {MAX_LINE} bytes")
            resync = buf.find(b"$", 1)
            if resync < 0:
                buf.clear()
                self._skipping = True
            else:
                del buf[:resync]

    def _line(self, line: bytes, received: float) -> None:
        """Feed the sentences of one line; binary runs between them go in as one piece."""
        first, *rest = line.rstrip(b"\r").split(b"$")
        junk = bytearray(first)
        for part in rest:
            piece = b"$" + part
            if not (part[:1].isupper() and is_text(part)):
                junk += piece  # a '$' inside binary data, not the start of a sentence
                continue
            if junk.strip():
                self._feed(bytes(junk), received)
            junk.clear()
            self._feed(piece, received)
        if junk.strip():
            self._feed(bytes(junk), received)

    def _feed(self, piece: bytes, received: float) -> None:
        fix = self._parser.feed(piece, received)
        if fix is not None:
            self._emit(fix)

    def _flush(self) -> None:
        self._pending = False
        fix = self._parser.flush(self._clock.time())
        if fix is not None:
            self._emit(fix)

    def _emit(self, fix: Fix) -> None:
        self._last_fix = fix
        try:
            self._on_fix(fix)
        except Exception as exc:  # a consumer's bug must not stop the receiver
            self._counters.inc("gnss.errors.consumer")
            self._rlog.error("gnss.consumer",
                             f"GNSS fix consumer failed: {type(exc).__name__}: {exc}")

    def _end_of_stream(self) -> None:
        """Deliver what the lost connection completed; its half line is gone."""
        self._buf.clear()
        self._skipping = False
        if self._pending:
            self._flush()

    async def _close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            await asyncio.to_thread(_close_quietly, port)


def _open_port(settings: GnssSettings) -> serial.SerialBase:
    port: serial.SerialBase = serial.serial_for_url(settings.device, baudrate=settings.baud,
                                                    timeout=0)
    return port


def _close_quietly(port: serial.SerialBase) -> None:
    # Closing a vanished device can fail; it is closed either way.
    with contextlib.suppress(OSError):
        port.close()


def _close_when_opened(opening: asyncio.Future[serial.SerialBase]) -> None:
    """Close the port an abandoned open produced, off the event loop when possible."""
    if opening.cancelled() or opening.exception() is not None:
        return
    port = opening.result()
    try:
        asyncio.get_running_loop().run_in_executor(None, _close_quietly, port)
    except RuntimeError:  # the loop's executor is already shut down: close it here
        _close_quietly(port)
