"""The vehicle's operating mode: drive, charge or park.

Telemetry rates, and later trips and charging sessions, depend on it. The
rule is default-deny like everything else: a speed that is unknown, stale or
invalid counts as moving, so a car whose motor controller went quiet is
reported at the driving rate, never assumed parked.
"""

from __future__ import annotations

from typing import Literal

from gateway.state.store import StateStore

Mode = Literal["drive", "charge", "park"]
MODES: tuple[Mode, ...] = ("drive", "charge", "park")

SPEED = "Vehicle.Speed"
IS_CHARGING = "Vehicle.Powertrain.TractionBattery.Charging.IsCharging"
IGNITION = "Vehicle.LowVoltageSystemState"
READY = "Vehicle.Powertrain.IsReady"
STANDSTILL_KMH = 0.5
"""Below this a wheel-speed sensor's noise is not motion."""


def current_mode(store: StateStore, now: float) -> Mode:
    """The mode the state says the vehicle is in at ``now``."""
    if store.good_value(IS_CHARGING, now) is True:
        return "charge"
    speed = store.good_value(SPEED, now)
    if not isinstance(speed, int | float) or abs(speed) > STANDSTILL_KMH:
        return "drive"
    # Standing at a red light with the ignition on is still driving.
    if store.good_value(READY, now) is True or store.good_value(IGNITION, now) in ("ON", "START"):
        return "drive"
    return "park"


class ModeTracker:
    """Debounces mode changes so that a car creeping at walking pace does not flap.

    A new mode is adopted once it has been observed continuously for
    ``hold`` seconds; the first observation is adopted at once.
    """

    def __init__(self, store: StateStore, hold: float = 3.0) -> None:
        self._store = store
        self._hold = hold
        self.mode: Mode | None = None
        self._candidate: Mode | None = None
        self._since = 0.0

    def update(self, now: float) -> tuple[Mode, Mode | None] | None:
        """Evaluate at ``now``; returns ``(new, old)`` when the mode changed, else None."""
        seen = current_mode(self._store, now)
        if self.mode is None:
            self.mode = seen
            return seen, None
        if seen == self.mode:
            self._candidate = None
            return None
        if seen != self._candidate:
            self._candidate, self._since = seen, now
        if now - self._since < self._hold:
            return None
        old, self.mode, self._candidate = self.mode, seen, None
        return seen, old
