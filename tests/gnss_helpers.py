"""Shared pieces of the GNSS tests: sentences with checksums, a real pty, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from collections.abc import Callable
from pathlib import Path

from gateway.clock import ManualClock
from gateway.gnss.nmea import NmeaParser
from gateway.health import Counters, RateLimitedLog

LOGGER = "test.gnss"


def nmea(body: str, *, check: str | None = None) -> bytes:
    """``$body*hh\\r\\n`` with the XOR checksum (or ``check`` instead)."""
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return f"${body}*{check if check is not None else f'{value:02X}'}\r\n".encode("ascii")


def make_parser() -> tuple[NmeaParser, Counters]:
    """A parser whose rate-limited log never holds back (each warning is visible)."""
    counters = Counters()
    rlog = RateLimitedLog(logging.getLogger(LOGGER), ManualClock(), interval=0.0)
    return NmeaParser(counters, rlog), counters


class Pty:
    """A pseudo-terminal: the slave stands in for the receiver's serial device.

    The slave is put in raw mode at once so nothing the test writes is echoed
    back (an unread echo would eventually block the writer).
    """

    def __init__(self, link: Path | None = None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.link = link
        if link is not None:
            link.symlink_to(self.path)

    def write(self, data: bytes) -> None:
        """Send ``data`` as the receiver would."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def unplug(self) -> None:
        """Close both ends and remove the link: the device is gone. Safe to repeat."""
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        # Never close a number twice: by then it may be someone else's descriptor.
        self.master = self.slave = -1
        if self.link is not None:
            self.link.unlink(missing_ok=True)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
