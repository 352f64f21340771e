"""Trips: from ready/ignition-on or first motion to the start of a long enough park.

Driving evidence is a valid reading of the powertrain ready, the ignition ON or
START, or a wheel speed above standstill. Only *fresh* evidence opens a trip: a
parked car's bus sleeps, and its stale last frames must not start one. Once a
trip is open, a valid reading that is merely stale still tells when the car was
last seen driving (the last frame before the bus went to sleep), so it moves the
trip's end forward but never opens anything.

The recorder is evaluated once a second. Energy, charge and the speed integral
come from the :class:`PackMeter` totals; the trip's share is the difference
between the totals at its ends. The start uses the totals of the update before
the one that saw the first evidence and the end those of the first update that
found the car parked, so each end includes at most a second of standing draw
instead of losing a second of driving. The parked minutes that confirm the end
do not count.

Distance is the odometer difference when the odometer was good at both ends
and plausible; otherwise the summed GNSS track (nothing while the car stands,
and steps only well above the fix's error: jitter is not motion); otherwise
the wheel-speed integral, if a good speed was seen in the trip at all.

The open trip lives in a small JSON file, written when it changed: after a
restart the meter starts from zero, so what was accumulated so far is stored,
not raw totals. A trip that went on across a restart, or during which the
meter counted a gap, is ``complete=False`` (its totals are a lower bound). A
finished trip is handed on before the file forgets it: a power cut in between
repeats it (same id) rather than losing it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.config.location import InsightSettings
from gateway.gnss.fix import Fix
from gateway.gnss.geo import LatLon, distance_m
from gateway.health import Counters, RateLimitedLog
from gateway.insights.energy import TB, PackMeter, Totals
from gateway.insights.sessions import DistanceSource, Trip
from gateway.insights.state_file import STATE_VERSION, StateFile, checked, plus, totals_json
from gateway.state import SignalState, StateStore
from gateway.state.mode import IGNITION, READY, SPEED, STANDSTILL_KMH

SOC = f"{TB}.StateOfCharge.Current"
ODOMETER = "Vehicle.TraveledDistance"
MIN_RATIO_KM = 0.1
"""Below this distance Wh/km means nothing."""
SLOW_KMH = 3.0
"""Below this GNSS speed, with the wheels at standstill, the car stands: no track."""
STEP_ERRORS = 4.0
MIN_STEP_M = 10.0
"""A track step counts once it is ``STEP_ERRORS`` times the fix's error estimate and at
least ``MIN_STEP_M``: noise lengthens a step by about (noise / step)^2 (1 Hz fixes at
30 km/h, 2.5 m of noise: +9 %), so short steps wait and add up to one longer chord."""
ODOMETER_MIN_KM = 2.0
"""Shorter odometer deltas lose to GNSS or the speed integral: at 0.1 km resolution the
reading could be off by 5 % or more."""
ODOMETER_SLACK_KM = 0.5
START_GRACE_S = 10.0
"""ECUs wake at different times: a value first seen this soon after the start still
counts as the start value."""
FIX_FRESH_S = 10.0

_log = logging.getLogger(__name__)


def _moving(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and abs(value) > STANDSTILL_KMH


@dataclass
class _Open:
    """An open trip. Energy so far = ``carried`` + ``at_last`` - ``base``."""

    id: str
    start: float
    last_evidence: float
    base: Totals
    at_last: Totals
    carried: Totals = field(default_factory=Totals)
    parked: bool = False
    soc_start: float | None = None
    soc_end: float | None = None
    odo_start: float | None = None
    odo_end: float | None = None
    start_position: LatLon | None = None
    end_position: LatLon | None = None
    anchor: LatLon | None = None
    gnss_m: float = 0.0
    gnss_fixes: int = 0
    max_speed: float | None = None
    restored: bool = False  # read back after a restart: the outage was not observed
    gap_base: int = 0  # the meter's gap count at the start
    gaps_seen: bool = False
    stopped: bool = False  # the track's anchor is where the car stands

    def so_far(self) -> Totals:
        """What the trip accumulated up to its last observation."""
        return plus(self.carried, self.at_last.since(self.base))


class TripRecorder:
    """Opens, follows and closes trips; finished ones go to ``on_trip``."""

    def __init__(
        self, store: StateStore, meter: PackMeter, clock: Clock, settings: InsightSettings,
        on_trip: Callable[[Trip], None], state_file: Path | None = None, *,
        max_hdop: float = 5.0, counters: Counters | None = None,
    ) -> None:
        self._store = store
        self._meter = meter
        self._clock = clock
        self._settings = settings
        self._on_trip = on_trip
        self._max_hdop = max_hdop
        self._counters = counters or Counters()
        self._rlog = RateLimitedLog(_log, clock)
        self._file = StateFile(state_file, "trip", self._counters, self._rlog)
        tests: list[tuple[str, Callable[[Any], bool]]] = [
            (READY, lambda v: v is True), (IGNITION, lambda v: v in ("ON", "START")),
            (SPEED, _moving)]
        self._sources: list[tuple[SignalState, Callable[[Any], bool]]] = [
            (store.slot(path), test) for path, test in tests if path in store]
        self._last_fix: Fix | None = None
        self._prev: tuple[float, Totals] | None = None
        self._trip = self._restore()

    # ---- inputs ------------------------------------------------------------------

    def update(self, now: float) -> None:
        """Open, follow or close the trip (about once a second)."""
        totals = self._meter.totals
        earliest, latest = self._evidence(now)
        trip = self._trip
        if trip is not None:
            if latest is not None and latest > trip.last_evidence:
                if latest - trip.last_evidence >= self._settings.trip_end_park_s:
                    self._close(trip)  # a long park went unobserved (gateway off)
                    trip = None
                else:
                    trip.last_evidence, trip.parked = latest, False
                    self._observe(trip, now, totals)
            elif not trip.parked:
                trip.parked = True
                self._observe(trip, now, totals)
            if trip is not None and now - trip.last_evidence >= self._settings.trip_end_park_s:
                self._close(trip)
                trip = None
        if trip is None and earliest is not None and latest is not None:
            self._open(earliest, latest, now, totals)
        self._prev = (now, totals)

    def on_fix(self, fix: Fix) -> None:
        """Sum the GNSS track of the open trip (the fallback distance)."""
        position = fix.position
        if position is None or not fix.usable(self._max_hdop):
            return
        self._last_fix = fix
        trip = self._trip
        if trip is None:
            return
        if trip.start_position is None:
            trip.start_position = position
        if trip.parked:
            return  # the parked minutes that may end the trip are not part of it
        trip.end_position = position
        trip.gnss_fixes += 1
        if trip.anchor is None:
            trip.anchor = position
            return
        wheels = self._good_number(SPEED, self._clock.time())
        standing = (fix.speed_kmh is None or fix.speed_kmh < SLOW_KMH) and wheels is not None \
            and abs(wheels) <= STANDSTILL_KMH
        if standing and trip.stopped:
            return  # jitter around where the car stands
        step = distance_m(trip.anchor, position)
        if not standing and step < max(STEP_ERRORS * (fix.accuracy_m or 0.0), MIN_STEP_M):
            trip.stopped = False
            return  # keep the anchor: short steps add up to one longer chord
        # The first fix at a standstill ends the chord there: the car may turn before moving on.
        trip.gnss_m += step
        trip.anchor, trip.stopped = position, standing

    # ---- outputs -----------------------------------------------------------------

    def current(self) -> dict[str, Any] | None:
        """A summary of the open trip for the live view, or None."""
        trip = self._trip
        if trip is None:
            return None
        totals = trip.so_far()
        distance, source = self._distance(trip, totals)
        return {"id": trip.id, "start": round(trip.start, 3),
                "duration_s": round(max(0.0, self._clock.time() - trip.start), 1),
                "distance_km": round(distance, 2), "distance_source": source,
                "energy_wh": round(totals.wh_out - totals.wh_in, 2),
                "regen_wh": round(totals.wh_in, 2), "soc_start": trip.soc_start,
                "soc_now": trip.soc_end, "max_speed_kmh": trip.max_speed,
                "parked": trip.parked, "complete": not (trip.restored or trip.gaps_seen)}

    def save(self) -> None:
        """Write the open trip (or its absence) to the state file if that changed since the
        last write (an fsync each, so not every minute of a parked car)."""
        trip = self._trip
        self._file.save_if_changed({"version": STATE_VERSION, "trip": None if trip is None else {
            "id": trip.id, "start": trip.start, "last_evidence": trip.last_evidence,
            "so_far": totals_json(trip.so_far()), "parked": trip.parked,
            "soc_start": trip.soc_start, "soc_end": trip.soc_end,
            "odo_start": trip.odo_start, "odo_end": trip.odo_end,
            "start_position": trip.start_position, "end_position": trip.end_position,
            "anchor": trip.anchor, "gnss_m": trip.gnss_m, "gnss_fixes": trip.gnss_fixes,
            "max_speed": trip.max_speed, "gaps_seen": trip.gaps_seen}})

    # ---- internals ---------------------------------------------------------------

    def _evidence(self, now: float) -> tuple[float | None, float | None]:
        """(earliest fresh, latest valid) source timestamps of driving evidence."""
        earliest: float | None = None
        latest: float | None = None
        for slot, is_evidence in self._sources:
            ts = slot.timestamp
            value, valid = slot.reading()
            if ts is None or not valid or not is_evidence(value):
                continue
            latest = ts if latest is None else max(latest, ts)
            if not slot.is_stale(now):
                earliest = ts if earliest is None else min(earliest, ts)
        return earliest, latest

    def _good_number(self, path: str, now: float) -> float | None:
        value = self._store.good_value(path, now)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None

    def _open(self, start: float, latest: float, now: float, totals: Totals) -> None:
        prev = self._prev
        # The previous update's totals hold the energy of the second in which driving began.
        base = prev[1] if prev is not None and now - prev[0] <= 2.0 else totals
        trip = _Open(uuid.uuid4().hex[:16], start, latest, base, totals,
                     gap_base=self._meter.gaps)
        fix = self._last_fix
        if fix is not None and fix.position is not None and now - fix.received <= FIX_FRESH_S:
            trip.start_position = trip.end_position = trip.anchor = fix.position
            trip.gnss_fixes = 1
        self._trip = trip
        self._observe(trip, now, totals)
        self.save()

    def _observe(self, trip: _Open, now: float, totals: Totals) -> None:
        """Take the values of this moment as the trip's latest."""
        trip.at_last = totals
        soc, odo = self._good_number(SOC, now), self._good_number(ODOMETER, now)
        early = now - trip.start <= START_GRACE_S
        if soc is not None:
            trip.soc_end = soc
            if trip.soc_start is None and early:
                trip.soc_start = soc
        if odo is not None:
            trip.odo_end = odo
            if trip.odo_start is None and early:
                trip.odo_start = odo
        speed = self._good_number(SPEED, now)
        if speed is not None:
            trip.max_speed = max(abs(speed), trip.max_speed or 0.0)
        if early:  # the BMS waking a little after the first evidence ends a silence from before
            trip.gap_base = self._meter.gaps
        elif self._meter.gaps > trip.gap_base:
            trip.gaps_seen = True

    def _distance(self, trip: _Open, totals: Totals) -> tuple[float, DistanceSource | None]:
        if trip.odo_start is not None and trip.odo_end is not None:
            delta = trip.odo_end - trip.odo_start
            # A counter that jumped further than the wheels could have taken the car was
            # reset or rolled over; with no good speed in the trip there is nothing to check.
            speed_seen = trip.max_speed is not None
            limit = 2 * totals.km_speed + ODOMETER_SLACK_KM if speed_seen else None
            fine = trip.gnss_fixes >= 2 or speed_seen
            # A dashboard odometer counts in 0.1 km steps: on a short hop that is most of
            # the distance, so a finer source wins there.
            if delta >= 0 and (limit is None or delta <= limit) and (
                    delta >= ODOMETER_MIN_KM or not fine):
                return delta, "odometer"
        if trip.gnss_fixes >= 2:
            tail = 0.0 if trip.anchor is None or trip.end_position is None \
                else distance_m(trip.anchor, trip.end_position)
            return (trip.gnss_m + tail) / 1000.0, "gnss"
        if trip.max_speed is not None:
            return totals.km_speed, "speed"
        return 0.0, None

    def _close(self, trip: _Open) -> None:
        totals = trip.so_far()
        distance, source = self._distance(trip, totals)
        energy = totals.wh_out - totals.wh_in
        soc_used = (None if trip.soc_start is None or trip.soc_end is None
                    else trip.soc_start - trip.soc_end)
        price = self._settings.energy_price_per_kwh
        result = Trip(
            id=trip.id, start=trip.start, end=trip.last_evidence,
            duration_s=trip.last_evidence - trip.start, distance_km=distance,
            distance_source=source, energy_wh=energy, discharged_wh=totals.wh_out,
            regen_wh=totals.wh_in,
            wh_per_km=energy / distance if distance >= MIN_RATIO_KM else None,
            soc_start=trip.soc_start, soc_end=trip.soc_end, soc_used=soc_used,
            max_speed_kmh=trip.max_speed, odometer_start_km=trip.odo_start,
            odometer_end_km=trip.odo_end, start_position=trip.start_position,
            end_position=trip.end_position,
            cost=None if price is None else energy / 1000.0 * price,
            currency=self._settings.currency if price is not None else "",
            complete=not (trip.restored or trip.gaps_seen))
        self._trip = None
        try:
            self._on_trip(result)
        except Exception as exc:  # the consumer's bug must not stop trip recording
            self._counters.inc("insights.sink_errors")
            self._rlog.error("trip.sink", f"trip: the consumer failed: {exc!r}")
        self.save()  # only now: a power cut before this repeats the trip instead of losing it

    def _restore(self) -> _Open | None:
        data = self._file.load()
        if data is None or data.get("trip") is None:
            return None
        try:
            f = checked(data["trip"], _TRIP_KINDS)
        except ValueError as exc:
            self._file.broken(str(exc))
            return None
        now = self._meter.totals
        return _Open(f["id"], f["start"], f["last_evidence"], base=now, at_last=now,
                     carried=f["so_far"], parked=f["parked"], soc_start=f["soc_start"],
                     soc_end=f["soc_end"], odo_start=f["odo_start"], odo_end=f["odo_end"],
                     start_position=f["start_position"], end_position=f["end_position"],
                     anchor=f["anchor"], gnss_m=f["gnss_m"], gnss_fixes=f["gnss_fixes"],
                     max_speed=f["max_speed"], restored=True, gap_base=self._meter.gaps,
                     gaps_seen=bool(f["gaps_seen"]))


_TRIP_KINDS = {"id": "str", "start": "num", "last_evidence": "num", "so_far": "totals",
               "parked": "bool", "soc_start": "num?", "soc_end": "num?", "odo_start": "num?",
               "odo_end": "num?", "start_position": "point?", "end_position": "point?",
               "anchor": "point?", "gnss_m": "num", "gnss_fixes": "count", "max_speed": "num?",
               "gaps_seen": "bool?"}
