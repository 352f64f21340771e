"""Battery health in ``state/battery``: cycles, capacity, consumption, range, cell imbalance.

As in OVMS's BMS layer, the vehicle profile only maps raw readings (pack current,
SoC, cell extremes) and the gateway owns the statistics, so every car gets the
same figures computed the same way. Each figure is a gateway-owned slot that is
registered only when the profile gives what it needs, and stays without a value
until there is a measured one: nothing here is a default or a guess.

The long-term figures (throughput, capacity estimates, recent trips, the daily
spread series) live in a small JSON state file, so a restart continues them.
Only complete sessions and trips teach it anything: one with an unobserved part
(``complete`` False) would make the capacity or the consumption a guess.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.config.profile import BatterySpec
from gateway.health import Counters, RateLimitedLog
from gateway.insights.energy import PackMeter
from gateway.insights.sessions import ChargeSession, Trip
from gateway.insights.spread import SpreadSeries, finite
from gateway.insights.state_file import STATE_VERSION, StateFile
from gateway.state import SignalState, StateStore, lookup

TB = "Vehicle.Powertrain.TractionBattery"
CURRENT = f"{TB}.CurrentCurrent"
SOC = f"{TB}.StateOfCharge.Current"
ENERGY = f"{TB}.StateOfCharge.CurrentEnergy"
CELL_MAX = f"{TB}.CellVoltage.Max"
CELL_MIN = f"{TB}.CellVoltage.Min"
CYCLES = f"{TB}.EquivalentFullCycles"
CAPACITY = f"{TB}.Estimate.Capacity"
SOH = f"{TB}.Estimate.StateOfHealth"
CONSUMPTION = f"{TB}.Estimate.Consumption"
RANGE = f"{TB}.Estimate.Range"
SPREAD = f"{TB}.CellVoltage.Spread"
TREND = f"{TB}.CellVoltage.SpreadTrend"

REST_CURRENT_A = 2.0
REST_S = 60.0
REST_GAP_S = 5.0
"""Quiet readings further apart than this (the gateway paused, the BMS went silent) do
not make one continuous rest: what happened in between was not seen."""
SPREAD_EVERY_S = 600.0
MIN_SOC_RISE = 20.0
"""Below 20 points the 0.1 % resolution of SoC and the BMS's own SoC error dominate."""
CAPACITY_KEEP = 5
CAPACITY_BOUNDS = (0.5, 1.2)
TRIP_MIN_KM = 1.0
TRIPS_KEEP = 20
TRIPS_KEEP_KM = 300.0
CONSUMPTION_KM = 100.0
THROUGHPUT_SAVE_S = 600.0
"""Throughput alone is written at most this often (each write is an fsync on flash). A power
cut then loses at most ten minutes of it: on the reference car's drive cycle about 5 Ah,
0.04 of a 120 Ah cycle, against the thousands a pack lives through."""
_THROUGHPUT = ("ah_out", "wh_out")


class BatteryHealth:
    """The battery-health slots of ``state/battery`` and the state behind them.

    The wiring calls :meth:`update` once a second, :meth:`on_charge` and
    :meth:`on_trip` when a session or trip ends, :meth:`save` every minute, and
    ``save(force=True)`` at stop.
    """

    def __init__(self, store: StateStore, meter: PackMeter, spec: BatterySpec | None,
                 clock: Clock, counters: Counters, rlog: RateLimitedLog,
                 state_file: Path | None = None) -> None:
        self._store = store
        self._meter = meter
        self._spec = spec
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._file = StateFile(state_file, "battery", counters, rlog, versioned=False)
        self._last = meter.totals
        self._ah_out = self._wh_out = self._initial_cycles = 0.0
        self._capacity: list[tuple[float, float]] = []
        """(session end, Ah) of the accepted estimates, oldest first."""
        self._trips: list[tuple[float, float, float]] = []
        """(trip end, km, Wh) of recent trips, oldest first."""
        self._spread = SpreadSeries()
        self._rest_since: float | None = None
        self._rest_last: float | None = None
        self._written: dict[str, Any] | None = None
        """What the state file holds (None: unknown, so the next save writes)."""
        self._written_at = clock.monotonic()
        self._slots = self._register()
        if self._load():
            self._written = self._state()
        self._publish_loaded(clock.time())

    def _register(self) -> dict[str, SignalState]:
        store, rated, metered = self._store, self._spec is not None, self._meter.available
        cells = all(p in store for p in (CURRENT, CELL_MAX, CELL_MIN))
        wanted: dict[str, tuple[bool, float | None]] = {
            CYCLES: (rated and metered, None), CAPACITY: (rated, None), SOH: (rated, None),
            CONSUMPTION: (metered, None), SPREAD: (cells, None), TREND: (cells, None),
        }
        # The range inherits the staleness of its source, so a stale SoC makes it stale too.
        source = ENERGY if ENERGY in store else SOC if SOC in store and rated else None
        wanted[RANGE] = (metered and source is not None,
                         store.slot(source).stale_after if source else None)
        slots = {}
        for path, (computable, stale_after) in wanted.items():
            entry = lookup(path)
            if not computable or entry is None or path in store:
                continue  # a profile that maps the path itself keeps its vehicle's value
            slots[path] = store.register(
                SignalState(path, entry.unit, entry.kind, entry.group, stale_after))
        return slots

    # ---- periodic --------------------------------------------------------------------

    def update(self, now: float) -> None:
        """Count the throughput since the last call, watch for rest, recompute the range.

        Equivalent full cycles = lifetime *discharged* Ah / rated Ah: one full cycle is
        one capacity's worth taken out (and, by then, put back). Counting both
        directions would count every cycle twice, and Ah rather than Wh keeps the count
        independent of the voltage the charge moved at.
        """
        totals = self._meter.totals
        step, self._last = totals.since(self._last), totals
        self._ah_out += step.ah_out  # the meter's totals only grow
        self._wh_out += step.wh_out
        self._publish_cycles(now)
        self._watch_rest(now)
        self._publish_range(now)

    def _publish_cycles(self, now: float) -> None:
        slot = self._slots.get(CYCLES)
        if slot is None or self._spec is None:
            return
        value = round(self._initial_cycles + self._ah_out / self._spec.capacity_ah, 4)
        if slot.timestamp is None or slot.value != value:
            slot.set(value, now)

    def _watch_rest(self, now: float) -> None:
        """Take a spread sample after a minute at rest: under load each cell's IR drop
        differs and swamps the imbalance the spread is meant to show."""
        if SPREAD not in self._slots:
            return
        current = self._store.slot(CURRENT)
        amps, ok = current.reading()
        ts = current.timestamp
        # Judged by the reading's age, not the slot's few-frame staleness window: one
        # late batch must not throw away a minute of rest already seen.
        if (ts is None or not ok or now - ts > REST_GAP_S or not isinstance(amps, int | float)
                or abs(amps) >= REST_CURRENT_A):
            self._rest_since = self._rest_last = None
            return
        if self._rest_since is None or self._rest_last is None or ts - self._rest_last > REST_GAP_S:
            self._rest_since = ts
        self._rest_last = ts
        high = self._store.good_value(CELL_MAX, now)
        low = self._store.good_value(CELL_MIN, now)
        cells_ts = self._store.slot(CELL_MAX).timestamp
        if (not isinstance(high, int | float) or not isinstance(low, int | float)
                or cells_ts is None or cells_ts - self._rest_since < REST_S):
            return
        last = self._spread.last
        if last is not None and cells_ts - last[0] < SPREAD_EVERY_S:
            return
        self._spread.add(cells_ts, round((float(high) - float(low)) * 1000.0, 1))
        self._publish_spread()
        self.save()

    def _publish_range(self, now: float) -> None:
        slot = self._slots.get(RANGE)
        consumption = self._consumption()
        if slot is None or consumption is None:
            return
        source, energy_wh = self._energy_left(now)
        if source is None or source.timestamp is None:
            return
        slot.stale_after = source.stale_after
        slot.set(round(energy_wh / consumption, 1), source.timestamp)

    def _energy_left(self, now: float) -> tuple[SignalState | None, float]:
        kwh = self._store.good_value(ENERGY, now)
        if isinstance(kwh, int | float) and not isinstance(kwh, bool):
            return self._store.slot(ENERGY), float(kwh) * 1000.0
        soc = self._store.good_value(SOC, now)
        if self._spec is None or not isinstance(soc, int | float) or isinstance(soc, bool):
            return None, 0.0
        capacity = self._capacity_ah() or self._spec.capacity_ah
        return self._store.slot(SOC), float(soc) / 100.0 * capacity * self._spec.nominal_voltage

    # ---- events ------------------------------------------------------------------------

    def on_charge(self, session: ChargeSession) -> float | None:
        """Coulomb-count the capacity from a complete session that raised SoC by 20 points
        or more; returns the accepted estimate (Ah), or None."""
        if (CAPACITY not in self._slots or self._spec is None or session.soc_start is None
                or session.soc_end is None):
            return None
        rise = session.soc_end - session.soc_start
        if rise < MIN_SOC_RISE:
            return None
        if not session.complete:
            # The SoC rose over the unseen part too: its charge is missing, not its points.
            self._counters.inc("insights.capacity_skipped_incomplete")
            return None
        estimate = session.ah / (rise / 100.0)
        rated = self._spec.capacity_ah
        if not CAPACITY_BOUNDS[0] * rated <= estimate <= CAPACITY_BOUNDS[1] * rated:
            # A BMS that recalibrates its SoC mid-charge makes the SoC points meaningless.
            self._counters.inc("insights.capacity_rejected")
            self._rlog.warning("insights.capacity_rejected",
                               f"charge {session.id}: capacity estimate {estimate:.1f} Ah"
                               f" is outside 50-120 % of the rated {rated:g} Ah; ignored")
            return None
        self._capacity = [*self._capacity, (session.end, estimate)][-CAPACITY_KEEP:]
        self._publish_capacity()
        self.save()
        return estimate

    def on_trip(self, trip: Trip) -> None:
        """Add a finished, complete trip of 1 km or more to the consumption history (an
        incomplete one's energy is a lower bound)."""
        if CONSUMPTION not in self._slots or trip.distance_km < TRIP_MIN_KM:
            return
        if not trip.complete:
            self._counters.inc("insights.consumption_skipped_incomplete")
            return
        trips = sorted([*self._trips, (trip.end, trip.distance_km, trip.energy_wh)])
        # Keep at most 20 trips, and no more old ones than it takes to cover 300 km.
        while len(trips) > TRIPS_KEEP or (
                len(trips) > 1 and sum(km for _, km, _ in trips[1:]) >= TRIPS_KEEP_KM):
            trips.pop(0)
        self._trips = trips
        self._publish_consumption()
        self.save()

    # ---- derived values ----------------------------------------------------------------

    def _capacity_ah(self) -> float | None:
        return statistics.median(ah for _, ah in self._capacity) if self._capacity else None

    def _consumption(self) -> float | None:
        """Wh/km over the newest trips until 100 km are covered, weighted by distance,
        so a short hop barely moves it; None when there is no history (or net regen)."""
        km = wh = 0.0
        for _, trip_km, trip_wh in reversed(self._trips):
            if km >= CONSUMPTION_KM:
                break
            km += trip_km
            wh += trip_wh
        return wh / km if km > 0 and wh > 0 else None

    def _publish_capacity(self) -> None:
        capacity = self._capacity_ah()
        if capacity is None or self._spec is None:
            return
        ts = max(end for end, _ in self._capacity)
        self._set(CAPACITY, round(capacity, 1), ts)
        self._set(SOH, round(capacity / self._spec.capacity_ah * 100.0, 1), ts)

    def _publish_consumption(self) -> None:
        value = self._consumption()
        if value is not None:
            self._set(CONSUMPTION, round(value, 1), self._trips[-1][0])

    def _publish_spread(self) -> None:
        last = self._spread.last
        if last is None:
            return
        self._set(SPREAD, last[1], last[0])
        trend = self._spread.trend_per_30_days()
        if trend is not None:
            self._set(TREND, round(trend, 2), last[0])

    def _set(self, path: str, value: float, ts: float) -> None:
        slot = self._slots.get(path)
        if slot is not None:
            slot.set(value, ts)

    def _publish_loaded(self, now: float) -> None:
        if self._ah_out > 0 or self._initial_cycles > 0:
            self._publish_cycles(now)
        self._publish_capacity()
        self._publish_consumption()
        self._publish_spread()

    # ---- persistence -------------------------------------------------------------------

    def save(self, *, force: bool = False) -> None:
        """Write the state file if it changed since the last write; throughput alone waits
        ``THROUGHPUT_SAVE_S`` after the last write unless ``force``d (at stop)."""
        state, written = self._state(), self._written
        if state == written:
            return
        now = self._clock.monotonic()
        if written is not None and not force and now - self._written_at < THROUGHPUT_SAVE_S \
                and all(state[k] == written[k] for k in state if k not in _THROUGHPUT):
            return
        if self._file.save(state):
            self._written, self._written_at = state, now

    def _state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "ah_out": self._ah_out, "wh_out": self._wh_out,
                "initial_cycles": self._initial_cycles,
                "capacity": [list(c) for c in self._capacity],
                "trips": [list(t) for t in self._trips], "spread": self._spread.as_json()}

    def _load(self) -> bool:
        """Take the state file's figures; False when there is none (or it is unusable)."""
        data = self._file.load()
        if data is None:
            return False  # the first start (nothing counted yet), or a broken file
        try:
            # Files written by hand (initial_cycles) may leave the version out.
            if data.get("version", STATE_VERSION) != STATE_VERSION:
                raise ValueError("not a version-1 battery state")
            ah_out, wh_out = finite(data.get("ah_out", 0.0)), finite(data.get("wh_out", 0.0))
            initial = finite(data.get("initial_cycles", 0.0))
            capacity = [(finite(ts), finite(ah)) for ts, ah in data.get("capacity", [])]
            trips = [(finite(end), finite(km), finite(wh)) for end, km, wh in data.get("trips", [])]
            spread = SpreadSeries.from_json(data.get("spread", {}))
            if min(ah_out, wh_out, initial) < 0:
                raise ValueError("negative throughput")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._file.broken(f"{exc}; counting starts from zero")
            return False
        self._ah_out, self._wh_out, self._initial_cycles = ah_out, wh_out, initial
        self._capacity = capacity[-CAPACITY_KEEP:]
        self._trips = sorted(trips)[-TRIPS_KEEP:]
        self._spread = spread
        return True

    def snapshot(self) -> dict[str, Any]:
        """Everything behind the slots, for debugging and the health report."""
        consumption = self._consumption()
        return {
            "lifetime_ah_out": self._ah_out, "lifetime_wh_out": self._wh_out,
            "initial_cycles": self._initial_cycles, "slots": sorted(self._slots),
            "capacity_estimates_ah": [round(ah, 2) for _, ah in self._capacity],
            "capacity_ah": self._capacity_ah(), "trips": len(self._trips),
            "trips_km": round(math.fsum(km for _, km, _ in self._trips), 2),
            "consumption_wh_per_km": None if consumption is None else round(consumption, 2),
            "spread_days": len(self._spread.medians), "spread_last": self._spread.last,
            "spread_trend_mv_per_30d": self._spread.trend_per_30_days(),
            "rest_since": self._rest_since,
        }
