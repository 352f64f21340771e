"""Energy and charge through the pack, integrated from the BMS's own samples.

The meter runs after every decoded batch and integrates each new sample of
pack voltage x current over the time between the source timestamps of two
consecutive samples (trapezoid rule). Direction is kept apart: energy out of
the pack (driving) and into it (regeneration, charging) are separate totals,
because a trip reports both and cycle counting needs only one.

A gap longer than ``max_gap`` (a silent BMS, a dropped batch, a bus asleep) is
not bridged: nothing is known about what flowed meanwhile, so it is counted
in ``insights.energy_gaps`` and the integration restarts at the next sample.
A sample older than the previous one (the wall clock was set back) is a gap
too: integrating across it would need the time between the two samples,
which is unknown, and waiting for the clock to catch up would drop every
sample until then. The chain restarts at it instead. A sample with the
previous one's timestamp is the same sample seen again and adds nothing.
The totals only grow; consumers keep the totals at their start and subtract.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.health import Counters
from gateway.state import SignalState, StateStore

TB = "Vehicle.Powertrain.TractionBattery"
VOLTAGE = f"{TB}.CurrentVoltage"
CURRENT = f"{TB}.CurrentCurrent"
SPEED = "Vehicle.Speed"
GAPS = "insights.energy_gaps"
MAX_GAP_S = 2.0
"""Longest interval between two samples that is still integrated: 20 cycles of a 100 ms
BMS frame, long enough for a loaded gateway's batching, short enough not to invent a
drive across a silence."""


@dataclass(frozen=True)
class Totals:
    """Running totals since the meter started (battery side; ``in`` = into the pack)."""

    wh_out: float = 0.0
    wh_in: float = 0.0
    ah_out: float = 0.0
    ah_in: float = 0.0
    km_speed: float = 0.0
    """Distance from integrating the wheel speed, the last-resort trip distance."""

    def since(self, start: Totals) -> Totals:
        """What accumulated since ``start``."""
        return Totals(self.wh_out - start.wh_out, self.wh_in - start.wh_in,
                      self.ah_out - start.ah_out, self.ah_in - start.ah_in,
                      self.km_speed - start.km_speed)


class _Integral:
    """Trapezoid integration of one reading over its samples' source timestamps."""

    def __init__(self, max_gap: float) -> None:
        self._max_gap = max_gap
        self.ts: float | None = None
        self.value = 0.0

    def step(self, ts: float, value: float) -> float | None:
        """Area since the previous sample, or None after a gap (the first sample, a silence,
        a sample older than the previous one)."""
        prev_ts, prev = self.ts, self.value
        if prev_ts is not None and ts == prev_ts:
            return 0.0  # the same sample seen again
        self.ts, self.value = ts, value
        if prev_ts is None or not 0.0 < ts - prev_ts <= self._max_gap:
            return None  # the first sample, a silence, or the clock set back
        return (prev + value) / 2 * (ts - prev_ts)

    def fresh(self, ts: float) -> bool:
        """True when a sample at ``ts`` continues the chain (no gap, not the first, not
        older than the previous sample)."""
        return self.ts is not None and 0.0 < ts - self.ts <= self._max_gap


class PackMeter:
    """Integrates pack power and current, and wheel speed; see the module docstring."""

    def __init__(self, store: StateStore, counters: Counters, max_gap: float = MAX_GAP_S) -> None:
        self._counters = counters
        self._v = store.slot(VOLTAGE) if VOLTAGE in store else None
        self._i = store.slot(CURRENT) if CURRENT in store else None
        self._speed = store.slot(SPEED) if SPEED in store else None
        self._max_gap = max_gap
        self._power = _Integral(max_gap)
        self._current = _Integral(max_gap)
        self._distance = _Integral(max_gap)
        self._totals = [0.0, 0.0, 0.0, 0.0, 0.0]
        self.power_w: float | None = None
        """The latest pack power (W, + = into the pack); None while unknown."""

    @property
    def available(self) -> bool:
        """True when the profile maps pack voltage and current."""
        return self._v is not None and self._i is not None

    @property
    def gaps(self) -> int:
        """Gaps counted so far (``insights.energy_gaps`` of the meter's counters): a consumer
        that sees it grow knows its totals miss something."""
        return self._counters.get(GAPS)

    @property
    def totals(self) -> Totals:
        """Everything integrated so far."""
        return Totals(*self._totals)

    def on_batch(self, _bus: str = "") -> None:
        """Integrate whatever new samples the last batch brought (a pipeline listener)."""
        if self._v is not None and self._i is not None:
            self._pack(self._v, self._i)
        if self._speed is not None:
            self._wheel(self._speed)

    def _pack(self, v_slot: SignalState, i_slot: SignalState) -> None:
        ts = i_slot.timestamp
        if ts is None or ts == self._current.ts:
            return
        volts, v_ok = v_slot.reading()
        amps, i_ok = i_slot.reading()
        v_ts = v_slot.timestamp
        if not (v_ok and i_ok and isinstance(volts, int | float) and isinstance(amps, int | float)
                and v_ts is not None and abs(v_ts - ts) <= self._max_gap):
            # An invalid reading breaks the chain: what flowed until the next good one is unknown.
            if self._current.ts is not None:
                self._counters.inc(GAPS)
            self.power_w = None
            self._power.ts = self._current.ts = None
            return
        if self._current.ts is not None and not self._current.fresh(ts):
            self._counters.inc(GAPS)
        watts = float(volts) * float(amps)
        self.power_w = watts
        energy = self._power.step(ts, watts)
        charge = self._current.step(ts, float(amps))
        if energy is None or charge is None:
            return
        wh, ah = energy / 3600.0, charge / 3600.0
        if wh >= 0:
            self._totals[1] += wh
        else:
            self._totals[0] -= wh
        if ah >= 0:
            self._totals[3] += ah
        else:
            self._totals[2] -= ah

    def _wheel(self, slot: SignalState) -> None:
        ts = slot.timestamp
        if ts is None or ts == self._distance.ts:
            return
        kmh, ok = slot.reading()
        if not ok or not isinstance(kmh, int | float):
            self._distance.ts = None
            return
        area = self._distance.step(ts, abs(float(kmh)))
        if area is not None:
            self._totals[4] += area / 3600.0
