"""The moved-while-parked alert: the car is off, yet its position wandered away.

"Parked" is latched: it begins when the ignition is seen OFF (or ACC) and the
powertrain is not ready, and ends only on good evidence of driving (ignition ON
or START, or the powertrain ready). Stale or invalid data keeps it parked,
because a parked car's bus goes to sleep, and a car towed away while its bus
sleeps is exactly the case this alert exists for.

The first usable fix after parking is the anchor. When ``confirm`` usable
fixes in a row lie more than ``threshold_m`` plus their own error estimate from
it, a critical alert is raised; it stays until the driver switches on. Parked
state and anchor live in a small JSON file, so a head unit rebooting overnight
keeps the anchor of the evening before.

The file also keeps the odometer of the parked car. The car may have been
driven while the gateway was down and be parked somewhere else now; a restored
anchor is therefore checked against the first good odometer reading, and if
the car has covered at least one odometer step (0.1 km) since, the anchor is
dropped without an alert and the next usable fix becomes the new one. A car
towed away does not turn its odometer, so towing still raises the alert.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from gateway.alerts import AlertBook, Severity
from gateway.clock import Clock
from gateway.gnss.fix import Fix
from gateway.gnss.geo import LatLon, distance_m
from gateway.health import Counters, RateLimitedLog
from gateway.insights.state_file import StateFile
from gateway.state import StateStore

IGNITION = "Vehicle.LowVoltageSystemState"
READY = "Vehicle.Powertrain.IsReady"
ODOMETER = "Vehicle.TraveledDistance"
LATITUDE = "Vehicle.CurrentLocation.Latitude"
ALERT_KEY = "location.moved_while_parked"
REANCHORED = "insights.parked_reanchored"
DRIVEN_KM = 0.1
"""Odometer advance (one step of its resolution) that shows the car was driven."""
_PARKING = ("OFF", "ACC")
_DRIVING = ("ON", "START")

_log = logging.getLogger(__name__)


class MovedWhileParked:
    """Raises ``location.moved_while_parked`` when a parked car's position moves away."""

    def __init__(
        self, store: StateStore, alerts: AlertBook, clock: Clock, threshold_m: float,
        max_hdop: float, state_file: Path | None = None, confirm: int = 2,
        counters: Counters | None = None, rlog: RateLimitedLog | None = None,
    ) -> None:
        if confirm < 1:
            raise ValueError("confirm must be at least 1")
        self._store = store
        self._alerts = alerts
        self._clock = clock
        self._threshold = threshold_m
        self._max_hdop = max_hdop
        self._confirm = confirm
        self._counters = counters
        self._rlog = rlog or RateLimitedLog(_log, clock)
        self._file = StateFile(state_file, "parked", counters or Counters(), self._rlog,
                               versioned=False)
        self._signal = LATITUDE if LATITUDE in store else None
        self._parked = False
        self._anchor: LatLon | None = None
        self._odometer: float | None = None  # km, the last good reading while parked
        self._restored = False  # parked state from the file, not yet checked on the odometer
        self._run = 0
        self._alerted = False
        self._last_received: float | None = None
        self._load()

    @property
    def parked(self) -> bool:
        """True from ignition off until good evidence of driving."""
        return self._parked

    @property
    def anchor(self) -> LatLon | None:
        """Where the car was parked: the first usable fix after parking."""
        return self._anchor

    def update(self, now: float) -> None:
        """Latch parked / unparked from the ignition and ready signals (about once a second)."""
        ignition = self._store.good_value(IGNITION, now)
        ready = self._store.good_value(READY, now)
        if ignition in _DRIVING or ready is True:
            if self._parked:
                self._unpark(IGNITION if ignition in _DRIVING else READY)
            return
        if ignition in _PARKING and not self._parked:
            self._parked, self._anchor, self._odometer, self._run = True, None, None, 0
        if self._parked:
            self._check_odometer(now)
        self.save()

    def on_fix(self, fix: Fix) -> None:
        """Set the anchor, or compare a parked car's fix with it."""
        position = fix.position
        if not self._parked or position is None or not fix.usable(self._max_hdop):
            return
        if fix.received == self._last_received:
            return  # the same epoch twice is one confirmation, not two
        # An earlier time is the wall clock stepping back, not an old epoch: it counts.
        self._last_received = fix.received
        self._check_odometer(self._clock.time())
        if self._anchor is None:
            self._anchor = position
        self.save()
        moved = distance_m(self._anchor, position)
        if moved <= self._threshold + (fix.accuracy_m or 0.0):
            self._run = 0
            return
        self._run += 1
        if self._run >= self._confirm and not self._alerted:
            self._alerted = True
            self._alerts.raise_(
                ALERT_KEY, Severity.CRITICAL,
                f"moved {moved:.0f} m while parked (ignition off)",
                signal=self._signal, value=round(moved), limit=self._threshold,
                source_ts=fix.received)

    def save(self) -> None:
        """Write parked state and anchor to the state file if they changed."""
        self._file.save_if_changed(self._state())

    def _state(self) -> dict[str, Any]:
        anchor = None if self._anchor is None else list(self._anchor)
        return {"parked": self._parked, "anchor": anchor, "odometer": self._odometer}

    def _unpark(self, evidence: str) -> None:
        self._parked, self._anchor, self._run, self._alerted = False, None, 0, False
        self._odometer, self._restored = None, False
        self._alerts.clear(ALERT_KEY, source_ts=self._store.slot(evidence).timestamp)
        self.save()

    def _check_odometer(self, now: float) -> None:
        """Remember the parked car's odometer; drop a restored anchor the car drove away from."""
        odometer = self._store.good_value(ODOMETER, now)
        if not isinstance(odometer, int | float) or isinstance(odometer, bool):
            return
        km = float(odometer)
        if self._restored:
            self._restored = False
            # Rounded: readings in 0.1 km steps differ by 0.0999... in binary floating point.
            if self._odometer is not None and round(km - self._odometer, 6) >= DRIVEN_KM:
                self._reanchor()
        if km != self._odometer:
            self._odometer = km

    def _reanchor(self) -> None:
        """Forget an anchor from before a restart: the car was driven since it was taken."""
        if self._anchor is not None and self._counters is not None:
            self._counters.inc(REANCHORED)
        self._anchor, self._run = None, 0
        if self._alerted:  # raised on the stale anchor before the odometer was known
            self._alerted = False
            self._alerts.clear(ALERT_KEY, source_ts=self._store.slot(ODOMETER).timestamp)

    def _load(self) -> None:
        raw = self._file.load(absent=self._state())
        if raw is None:
            return
        parked, anchor, odometer = raw.get("parked"), raw.get("anchor"), raw.get("odometer")
        if (not isinstance(parked, bool) or (anchor is not None and _anchor(anchor) is None)
                or (odometer is not None and not _km(odometer))):
            self._file.broken('expected {"parked": true/false, "anchor": [lat, lon] or null, '
                              '"odometer": km or null}')
            return
        if parked:
            self._parked, self._anchor, self._restored = True, _anchor(anchor), True
            self._odometer = None if odometer is None else float(odometer)


def _km(value: Any) -> bool:
    """True for a finite JSON number (not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _anchor(value: Any) -> LatLon | None:
    """A stored [lat, lon] pair, or None when it is not one."""
    if not (isinstance(value, list) and len(value) == 2 and all(_km(v) for v in value)):
        return None
    lat, lon = float(value[0]), float(value[1])
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    return (lat, lon)
