"""Event-loop lag: how late the loop runs a timer that is due.

Everything in the gateway shares one event loop; a callback that blocks it
(a slow disk write on the loop thread, a runaway decode) delays every other
stage. A task that asks to wake up at a known moment and notes how late it
actually ran measures exactly that delay.
"""

from __future__ import annotations

import asyncio

LAG_INTERVAL_S = 0.25
"""How often the lag is sampled: often enough to catch a stall, cheap enough to ignore."""

REPORT = "report"
"""The default reader of :meth:`LoopLag.take_max`."""


class LoopLag:
    """Samples the event loop's lag; each reader gets the worst lag since it last asked.

    Deliberately not driven by the injected clock: lag is a property of the
    real event loop's timers, so it is measured with the loop's own clock
    (``loop.time()``) around a real ``asyncio.sleep``. A manual clock's sleep
    returns at once and would make any loop look perfectly punctual.
    """

    def __init__(self, interval: float = LAG_INTERVAL_S) -> None:
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: float | None = None
        self._latest = 0.0
        self._peak = 0.0
        self._max: dict[str, float] = {}
        self._taken: dict[str, tuple[float, float]] = {}
        """Per reader: (due time, lateness) of a pending sample it has already been given."""

    async def run(self) -> None:
        """Sample until cancelled."""
        loop = self._loop = asyncio.get_running_loop()
        try:
            while True:
                self._due = due = loop.time() + self._interval
                await asyncio.sleep(self._interval)
                self._record(due, max(0.0, loop.time() - due))
        finally:
            self._loop = self._due = None

    @property
    def latest(self) -> float:
        """The lag of the last sample, or more if the pending sample is already that late.

        A loop that is blocked right now cannot run the sampling task; whoever
        gets to run first afterwards must still see the stall, so the time the
        pending wake-up is overdue counts too.
        """
        return max(self._latest, self._overdue())

    def take_max(self, reader: str = REPORT) -> float:
        """The worst lag since ``reader`` last called this (or since the start).

        A stall counts once per reader: lateness of the pending sample handed
        out now is not handed out again when that sample completes.
        """
        overdue = self._overdue()
        taken = self._taken.pop(reader, None)
        already = taken[1] if taken is not None and taken[0] == self._due else 0.0
        worst = max(self._max.get(reader, self._peak), overdue - already)
        self._max[reader] = 0.0
        if overdue > 0.0 and self._due is not None:
            self._taken[reader] = (self._due, overdue)
        return worst

    def _record(self, due: float, lag: float) -> None:
        self._latest = lag
        self._peak = max(self._peak, lag)
        for reader, worst in self._max.items():
            taken = self._taken.pop(reader, None)
            part = lag - taken[1] if taken is not None and taken[0] == due else lag
            self._max[reader] = max(worst, part)

    def _overdue(self) -> float:
        if self._loop is None or self._due is None:
            return 0.0
        return max(0.0, self._loop.time() - self._due)
