"""The serial reader against real pseudo-terminals (and a real TCP socket for socket:// URLs).

A pty's slave is the receiver's device; the test writes NMEA to the master.
Unplugging is closing the pty and removing the symlink the reader is
configured with; replugging is a new pty behind the same link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.clock import ManualClock, SystemClock
from gateway.config.location import GnssSettings
from gateway.gnss.fix import Fix
from gateway.gnss.reader import GnssReader
from gateway.health import Counters, RateLimitedLog
from tests.gnss_helpers import LOGGER, Pty, nmea, wait_until

CLASSIC = (b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
           b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n")


def epoch_at(second: int) -> bytes:
    """A u-blox style epoch at 12:00:<second>, with its position moving north each second."""
    t = f"1200{second:02d}.00"
    lat = f"48{7.0 + second * 0.01:06.3f}"
    return (nmea(f"GNRMC,{t},A,{lat},N,01131.000,E,5.0,10.0,010124,,,A,V")
            + nmea("GNVTG,10.0,T,,M,5.0,N,9.3,K,A")
            + nmea(f"GNGGA,{t},{lat},N,01131.000,E,1,10,0.8,500.0,M,47.0,M,,")
            + nmea("GNGSA,A,3,01,02,03,04,05,06,,,,,,,1.4,0.8,1.1,1")
            + nmea(f"GNGLL,{lat},N,01131.000,E,{t},A,A"))


class Rig:
    """A reader on a real device path, collecting its fixes."""

    def __init__(self, device: str, on_fix: Callable[[Fix], None] | None = None,
                 idle_flush: float = 0.05, silent_after: float | None = None) -> None:
        self.counters = Counters()
        self.fixes: list[Fix] = []
        rlog = RateLimitedLog(logging.getLogger(LOGGER), SystemClock(), interval=0.0)
        self.reader = GnssReader(GnssSettings(enabled=True, device=device, baud=115200),
                                 SystemClock(), self.counters, rlog,
                                 on_fix or self.fixes.append, backoff=(0.01, 0.05),
                                 idle_flush=idle_flush, silent_after=silent_after)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.reader.run())

    async def stop(self) -> None:
        assert self.task is not None
        assert not self.task.done(), "the reader must run until cancelled"
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def pty() -> AsyncIterator[Pty]:
    p = Pty()
    yield p
    p.unplug()


async def connected_rig(device: str, **kwargs: object) -> Rig:
    rig = Rig(device, **kwargs)  # type: ignore[arg-type]
    await rig.start()
    # pyserial empties the input buffer when it opens: write only once it has.
    await wait_until(lambda: rig.reader.connected, "the port to open")
    return rig


async def test_epochs_from_a_pty_become_fixes(pty: Pty) -> None:
    rig = await connected_rig(pty.path)
    pty.write(CLASSIC)
    await wait_until(lambda: len(rig.fixes) == 1, "the idle flush to deliver the epoch")
    fix = rig.fixes[0]
    assert fix.lat == pytest.approx(48 + 7.038 / 60) and fix.alt == 545.4
    assert fix.speed_kmh == pytest.approx(22.4 * 1.852) and fix.satellites == 8
    assert rig.reader.last_fix is fix
    for second in range(3):
        pty.write(epoch_at(second))
    await wait_until(lambda: len(rig.fixes) == 4, "three more fixes")
    assert [f.lat for f in rig.fixes[1:]] == pytest.approx(
        [48 + (7.0 + s * 0.01) / 60 for s in range(3)])
    assert rig.counters.get("gnss.ignored") == 3  # the GLLs
    await rig.stop()
    assert not rig.reader.connected


async def test_partial_lines_across_writes_make_one_epoch(pty: Pty) -> None:
    rig = await connected_rig(pty.path, idle_flush=0.5)
    data = epoch_at(7)
    for start in range(0, len(data), 9):
        pty.write(data[start:start + 9])
        await asyncio.sleep(0.001)  # separate reads, far shorter than the idle time
    await wait_until(lambda: len(rig.fixes) == 1, "the epoch")
    fix = rig.fixes[0]
    assert (fix.alt, fix.speed_kmh, fix.heading, fix.hdop) == (500.0, 9.3, 10.0, 0.8)
    assert rig.counters.snapshot("gnss.errors") == {}
    await rig.stop()


async def test_binary_noise_and_overlong_lines_are_skipped(pty: Pty) -> None:
    rig = await connected_rig(pty.path)
    pty.write(b"\xb5\x62\x01\x07\x08\x00\x24\x0a\x99\x00\x24\x01\x02\x03\x7a\x11")  # UBX
    pty.write(epoch_at(1))
    await wait_until(lambda: len(rig.fixes) == 1, "the epoch after the UBX frame")
    noise_errors = rig.counters.get("gnss.errors.garbage")
    assert noise_errors >= 1
    # A long binary run without line end or '$': one error, not one per read.
    for _ in range(10):
        pty.write(bytes(range(0x80, 0xE4)))
        await asyncio.sleep(0.002)
    pty.write(b"\r\n" + b"X" * 300 + epoch_at(2))  # an over-long line glued to the epoch
    await wait_until(lambda: len(rig.fixes) == 2, "the epoch after the noise")
    assert rig.counters.get("gnss.errors.garbage") == noise_errors + 2
    assert rig.fixes[1].satellites == 10
    assert rig.counters.get("gnss.errors.checksum") == 0
    await rig.stop()


async def test_checksum_errors_are_counted_and_reading_goes_on(pty: Pty) -> None:
    rig = await connected_rig(pty.path)
    bad = epoch_at(3).replace(b"*", b"*0", 1)  # the RMC's checksum field gets three digits
    pty.write(bad + nmea("GNGGA,120004.00,4807.040,N,01131.000,E,1,10,0.8,500.0,M,47.0,M,,",
                         check="00"))
    pty.write(epoch_at(5))
    await wait_until(lambda: len(rig.fixes) == 2, "two fixes")
    assert rig.counters.get("gnss.errors.checksum") == 2
    assert rig.fixes[0].utc is None and rig.fixes[0].alt == 500.0  # epoch 3 without its RMC
    assert rig.fixes[1].utc is not None
    await rig.stop()


async def test_a_failing_consumer_does_not_stop_the_reader(pty: Pty) -> None:
    seen: list[Fix] = []

    def on_fix(fix: Fix) -> None:
        seen.append(fix)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    rig = await connected_rig(pty.path, on_fix=on_fix)
    pty.write(epoch_at(1))
    await wait_until(lambda: len(seen) == 1, "the first fix")
    pty.write(epoch_at(2))
    await wait_until(lambda: len(seen) == 2, "the second fix")
    assert rig.counters.get("gnss.errors.consumer") == 1
    assert rig.reader.last_fix is seen[1]
    await rig.stop()


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "retrying" in r.getMessage()]


def connect_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and "connected" in r.getMessage()]


async def test_unplug_backoff_and_replug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    link = tmp_path / "gnss0"
    first = Pty(link)
    rig = await connected_rig(str(link))
    first.write(epoch_at(1))
    await wait_until(lambda: len(rig.fixes) == 1, "a fix from the first receiver")

    first.unplug()
    await wait_until(lambda: rig.counters.get("gnss.open_failures") >= 5, "several retries")
    assert rig.counters.get("gnss.disconnects") == 1
    assert not rig.reader.connected
    assert len(outage_lines(caplog)) == 1  # one line for the outage, not one per retry
    assert str(link) in outage_lines(caplog)[0]

    second = Pty(link)
    await wait_until(lambda: rig.reader.connected, "the reconnection")
    second.write(epoch_at(2))
    await wait_until(lambda: len(rig.fixes) == 2, "a fix from the second receiver")
    assert rig.fixes[1].lat == pytest.approx(48 + 7.02 / 60)
    assert len(connect_lines(caplog)) == 2

    second.unplug()
    failures = rig.counters.get("gnss.open_failures")
    await wait_until(lambda: rig.counters.get("gnss.open_failures") >= failures + 3,
                     "retries after the second unplug")
    assert rig.counters.get("gnss.disconnects") == 2
    assert len(outage_lines(caplog)) == 2
    assert all(r.exc_info is None for r in caplog.records)
    await rig.stop()


async def test_receiver_missing_at_start(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    link = tmp_path / "ttyACM0"
    rig = Rig(str(link))
    await rig.start()
    await wait_until(lambda: rig.counters.get("gnss.open_failures") >= 3, "failed opens")
    assert rig.counters.get("gnss.disconnects") == 0
    assert len(outage_lines(caplog)) == 1
    pty = Pty(link)
    try:
        await wait_until(lambda: rig.reader.connected, "the receiver to appear")
        pty.write(CLASSIC)
        await wait_until(lambda: len(rig.fixes) == 1, "a fix")
    finally:
        await rig.stop()
        pty.unplug()


async def test_cancellation_closes_the_port(pty: Pty) -> None:
    rig = await connected_rig(pty.path)
    os.close(pty.slave)  # from now on the reader holds the only handle on the slave
    pty.slave = -1
    os.set_blocking(pty.master, False)
    with pytest.raises(BlockingIOError):
        os.read(pty.master, 1)  # slave open, nothing to read
    await rig.stop()
    assert not rig.reader.connected
    with pytest.raises(OSError, match="Input/output error"):
        os.read(pty.master, 1)  # no slave open any more: the port was closed


async def test_socket_url_and_server_going_away() -> None:
    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A networked receiver streams: pyserial drops whatever arrived before its open
        # returned, so a single burst at connect time could be lost on the way in.
        for second in range(6):
            writer.write(epoch_at(second))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rig = Rig(f"socket://127.0.0.1:{port}")
    await rig.start()
    try:
        await wait_until(lambda: len(rig.fixes) >= 1, "a fix over TCP")
        assert rig.fixes[0].alt == 500.0
        await wait_until(lambda: rig.counters.get("gnss.disconnects") >= 1, "the disconnect")
        await wait_until(lambda: len(rig.fixes) >= 2, "a fix after reconnecting")
    finally:
        await rig.stop()
        server.close()
        await server.wait_closed()


async def test_backoff_doubles_to_the_maximum_and_resets_after_data(tmp_path: Path) -> None:
    clock = ManualClock()  # the backoff runs in virtual time; the pty I/O is real
    counters = Counters()
    fixes: list[Fix] = []
    link = tmp_path / "gnss"
    reader = GnssReader(GnssSettings(enabled=True, device=str(link)), clock, counters,
                        RateLimitedLog(logging.getLogger(LOGGER), clock), fixes.append,
                        backoff=(1.0, 30.0), idle_flush=0.1,
                        # Virtual time would call the pty silent before the test writes.
                        silent_after=math.inf)
    task = asyncio.create_task(reader.run())

    def backoffs() -> list[float]:
        return [s for s in clock.slept if s >= 1.0]  # leave out the idle-flush waits

    await wait_until(lambda: len(backoffs()) >= 8, "eight retries")
    assert backoffs()[:8] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    pty = Pty(link)
    try:
        await wait_until(lambda: reader.connected, "the receiver to appear")
        pty.write(CLASSIC)
        await wait_until(lambda: len(fixes) == 1, "a fix")
        before = len(backoffs())
        pty.unplug()
        await wait_until(lambda: len(backoffs()) >= before + 3, "retries after the unplug")
        assert backoffs()[before:before + 3] == [1.0, 2.0, 4.0]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pty.unplug()
    assert not reader.connected


async def test_a_silent_receiver_is_closed_counted_and_reopened(
        pty: Pty, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    rig = await connected_rig(pty.path, silent_after=0.5)
    # Bytes at shorter intervals than the silence limit keep the port open.
    for second in range(8):
        pty.write(epoch_at(second))
        await asyncio.sleep(0.05)
    await wait_until(lambda: len(rig.fixes) == 8, "eight fixes")
    assert rig.counters.get("gnss.silent") == 0
    assert rig.counters.get("gnss.disconnects") == 0
    # Then the receiver stops talking while its port stays open.
    await wait_until(lambda: rig.counters.get("gnss.silent") >= 3, "repeated silences")
    assert rig.counters.get("gnss.disconnects") >= 3
    assert len(connect_lines(caplog)) >= 3  # each silence closed the port and reopened it
    [outage] = outage_lines(caplog)  # one line for the whole silent spell
    assert "silent" in outage
    await wait_until(lambda: rig.reader.connected, "a reopened port")
    pty.write(epoch_at(30))
    await wait_until(lambda: len(rig.fixes) == 9, "a fix once it talks again")
    await rig.stop()


@pytest.mark.parametrize(("rate_hz", "silence"), [(1.0, 5.0), (10.0, 5.0), (0.5, 10.0)])
async def test_silence_limit_is_five_epochs_but_at_least_five_seconds(
        pty: Pty, rate_hz: float, silence: float) -> None:
    clock = ManualClock()  # virtual time: the silence passes at once, the pty stays real
    counters = Counters()
    reader = GnssReader(GnssSettings(enabled=True, device=pty.path, rate_hz=rate_hz), clock,
                        counters, RateLimitedLog(logging.getLogger(LOGGER), clock),
                        lambda _: None, backoff=(1.0, 1.0))
    task = asyncio.create_task(reader.run())
    try:
        await wait_until(lambda: counters.get("gnss.silent") >= 2, "two silences")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    waits = [s for s in clock.slept if s != 1.0]  # leave out the backoffs
    assert waits[:2] == [silence, silence]


async def test_a_socket_connect_that_hangs_does_not_block_the_loop() -> None:
    # A listener that never accepts, with its queue full: the kernel drops the next SYN,
    # so a connect to it hangs exactly like one to a receiver behind a dead route.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = fill_accept_queue(listener)
    rig = Rig(f"socket://127.0.0.1:{listener.getsockname()[1]}")
    await rig.start()
    try:
        await asyncio.sleep(0)  # the reader starts its open
        ticks = 0
        while ticks < 20:
            await asyncio.sleep(0.01)
            # Neither connected nor failed: the open is still going on.
            assert rig.counters.get("gnss.open_failures") == 0 and not rig.reader.connected
            ticks += 1
        listener.close()  # the retried SYN is now refused: the open fails and is counted
        await wait_until(lambda: rig.counters.get("gnss.open_failures") >= 1, "the failure")
    finally:
        await rig.stop()
        listener.close()
        for s in fillers:
            s.close()


def fill_accept_queue(listener: socket.socket) -> list[socket.socket]:
    """Connect to ``listener`` until a connection stays pending; returns the sockets."""
    sockets: list[socket.socket] = []
    for _ in range(64):
        s = socket.socket()
        s.setblocking(False)
        sockets.append(s)
        with contextlib.suppress(BlockingIOError):
            s.connect(listener.getsockname())
        _, writable, _ = select.select([], [s], [], 0.5)
        if not writable:
            return sockets
    raise AssertionError("the accept queue never filled")
