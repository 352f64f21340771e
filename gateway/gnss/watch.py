"""The ``gnss.receiver_lost`` alert: the receiver has stopped delivering epochs.

The reader already survives an unplugged, silent or babbling receiver on its
own and counts it, but counters reach nobody who could walk to the car. This
watch turns a long enough gap into an alert on the operator's alert stream.

What counts as alive is any parsed epoch, including one without a fix: a
receiver that says "no fix" in a tunnel or an underground car park works as
it should, and the position's own staleness already tells consumers there is
no current position. Only a receiver that is gone, silent, or sends nothing
parseable raises the alert. The gap is measured from the start as well, so a
receiver that never delivers anything is reported too.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.alerts import AlertBook, Severity
from gateway.clock import Clock
from gateway.gnss.fix import Fix

ALERT_KEY = "gnss.receiver_lost"
CHECK_EVERY_S = 1.0


class ReceiverWatch:
    """Raises ``gnss.receiver_lost`` after ``threshold_s`` without an epoch; clears on the next.

    ``connected``, when given, tells whether the port is open right now, so the
    message can say whether the device is missing or merely quiet.
    """

    def __init__(self, alerts: AlertBook, device: str, threshold_s: float, clock: Clock,
                 connected: Callable[[], bool] | None = None) -> None:
        if not threshold_s > 0.0:
            raise ValueError(f"threshold_s must be above 0, got {threshold_s}")
        self._alerts = alerts
        self._device = device
        self._threshold = threshold_s
        self._clock = clock
        self._connected = connected
        self._last_epoch = clock.monotonic()
        self._seen = False  # an epoch arrived since the watch began
        self._last_received: float | None = None  # gateway wall time of the last epoch
        self._raised = False

    @property
    def lost(self) -> bool:
        """True while the alert is raised."""
        return self._raised

    def begin(self) -> None:
        """Measure from now, unless an epoch already arrived: building the gateway may come
        well before starting it, and that wait is not the receiver's fault."""
        if not self._seen:
            self._last_epoch = self._clock.monotonic()

    def on_fix(self, fix: Fix) -> None:
        """Any epoch, with or without a position, proves the receiver alive."""
        now = self._clock.monotonic()
        gap = now - self._last_epoch
        self._last_epoch, self._seen, self._last_received = now, True, fix.received
        if self._raised:
            self._raised = False
            # The value of a cleared alert is how long the receiver was gone in all.
            self._alerts.clear(ALERT_KEY, value=round(gap), source_ts=fix.received)

    def check(self, now_monotonic: float) -> None:
        """Raise the alert once the gap has reached the threshold (call about once a second)."""
        gap = now_monotonic - self._last_epoch
        if self._raised or gap < self._threshold:
            return
        self._raised = True
        since = "" if self._seen else " since start"
        self._alerts.raise_(
            ALERT_KEY, Severity.WARNING,
            f"GNSS receiver {self._device}: no position data for {gap:.0f} s{since} "
            f"({self._state()})",
            value=round(gap), limit=self._threshold, source_ts=self._last_received)

    async def run(self, interval: float = CHECK_EVERY_S) -> None:
        """Check every ``interval`` seconds of the injected clock until cancelled."""
        self.begin()
        while True:
            await self._clock.sleep(interval)
            self.check(self._clock.monotonic())

    def _state(self) -> str:
        if self._connected is None:
            return "port closed, silent or sending nothing parseable"
        if self._connected():
            return "port open, but silent or sending nothing parseable"
        return "port closed: unplugged or cannot be opened"
