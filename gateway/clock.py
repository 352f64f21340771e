"""Injectable time.

Everything that depends on time takes a :class:`Clock`, so tests can drive
time by hand instead of sleeping. Two readings are offered because they answer
different questions: ``time()`` is wall-clock epoch seconds, the timebase of
CAN frame timestamps (kernel and python-can stamp frames with it), and
``monotonic()`` never jumps, for intervals and deadlines.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What time-dependent code may ask about time."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (the timebase of frame timestamps)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """Wall-clock epoch seconds."""
        return time.time()

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Real sleep."""
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to.

    ``sleep`` advances the clock by the requested amount and yields once to the
    event loop, so code under test runs through virtual time at full speed and
    the test can read exactly when each step happened.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 0.0
        self.slept: list[float] = []

    def time(self) -> float:
        """Current virtual wall-clock time."""
        return self._wall

    def monotonic(self) -> float:
        """Current virtual monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._wall += seconds
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the sleep, advance virtual time, and yield to the loop."""
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)
