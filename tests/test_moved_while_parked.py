"""Moved while parked: the parked latch, the anchor across restarts, towing vs GNSS jitter."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.alerts import Alert, AlertBook, Severity
from gateway.clock import ManualClock
from gateway.gnss.fix import Fix
from gateway.gnss.geo import EARTH_RADIUS_M, distance_m
from gateway.health import Counters
from gateway.insights.parked import (
    ALERT_KEY,
    IGNITION,
    LATITUDE,
    ODOMETER,
    READY,
    MovedWhileParked,
)
from gateway.state import SignalState, StateStore, lookup

M_PER_DEG_LAT = math.pi * EARTH_RADIUS_M / 180.0
HOME = (52.52, 13.405)
STALE_S = 2.0


class Recorder:
    """An AlertSink that keeps every transition."""

    def __init__(self) -> None:
        self.transitions: list[tuple[str, Alert]] = []

    def alert(self, transition: str, alert: Alert) -> None:
        self.transitions.append((transition, alert))

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        pass


def north_of(origin: tuple[float, float], metres: float, east: float = 0.0) -> tuple[float, float]:
    m_lon = M_PER_DEG_LAT * math.cos(math.radians(origin[0]))
    return (origin[0] + metres / M_PER_DEG_LAT, origin[1] + east / m_lon)


class Car:
    """A real store with the ignition and ready slots, a real alert book, and the alert."""

    def __init__(self, tmp_path: Path, clock: ManualClock | None = None,
                 threshold: float = 100.0) -> None:
        self.clock = clock or ManualClock()
        self.store = StateStore()
        for path, stale in ((IGNITION, STALE_S), (READY, STALE_S), (LATITUDE, 3.0),
                            (ODOMETER, STALE_S)):
            entry = lookup(path)
            assert entry is not None
            self.store.register(SignalState(path, entry.unit, entry.kind, entry.group, stale))
        self.sink = Recorder()
        self.book = AlertBook(self.clock, self.sink)
        self.counters = Counters()
        self.state_file = tmp_path / "parked.json"
        self.mwp = MovedWhileParked(self.store, self.book, self.clock, threshold, max_hdop=5.0,
                                    state_file=self.state_file, confirm=2,
                                    counters=self.counters)

    def bus(self, ignition: str | None, ready: bool | None = None,
            odometer: float | None = None) -> None:
        """One bus frame now, then the once-a-second evaluation."""
        now = self.clock.time()
        if ignition is not None:
            self.store.slot(IGNITION).set(ignition, now)
        if ready is not None:
            self.store.slot(READY).set(ready, now)
        if odometer is not None:
            self.store.slot(ODOMETER).set(odometer, now)
        self.mwp.update(now)

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)
        self.mwp.update(self.clock.time())

    def fix(self, point: tuple[float, float], hdop: float = 1.0,
            received: float | None = None) -> None:
        """A fix a second later (``received`` overrides its time, as a clock step would)."""
        self.clock.advance(1.0)
        t = self.clock.time() if received is None else received
        self.mwp.on_fix(Fix(t, t, "THREE_D", point[0], point[1], 40.0, 0.0, None, 10, hdop))
        self.mwp.update(self.clock.time())

    def park_at(self, point: tuple[float, float], odometer: float | None = None) -> None:
        self.bus("OFF", ready=False, odometer=odometer)
        assert self.mwp.parked
        self.fix(point)
        assert self.mwp.anchor == point

    def raised(self) -> list[Alert]:
        return [a for t, a in self.sink.transitions if t == "raised" and a.key == ALERT_KEY]


def test_towed_away_raises_once(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.park_at(HOME)
    # The bus goes to sleep: ignition stale from here on. Towed north at 16 m/s.
    car.tick(10.0)
    track = [north_of(HOME, 16.0 * k) for k in range(1, 40)]
    raised_after = None
    for n, point in enumerate(track, start=1):
        car.fix(point)
        if car.raised() and raised_after is None:
            raised_after = n
    # 112 m (n=7) is the first fix beyond 100 m + 5 m accuracy; the second one raises.
    assert raised_after == 8
    [alert] = car.raised()
    assert alert.severity is Severity.CRITICAL
    assert alert.message == "moved 128 m while parked (ignition off)"
    assert alert.value == 128 and alert.limit == 100.0 and alert.signal == LATITUDE
    assert alert.source_ts == pytest.approx(car.clock.time() - 31.0)
    assert [k for k, _ in car.sink.transitions] == ["raised"]
    assert car.mwp.parked and car.mwp.anchor == HOME


def test_gnss_jitter_around_the_anchor_does_not_raise(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.park_at(HOME)
    rng = random.Random(11)
    for _ in range(600):
        car.fix(north_of(HOME, rng.uniform(-60.0, 60.0), rng.uniform(-60.0, 60.0)))
    for _ in range(5):  # a multipath spell far off, flagged by its HDOP
        car.fix(north_of(HOME, 400.0), hdop=9.0)
    assert car.sink.transitions == []


def test_single_outliers_do_not_raise(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.park_at(HOME)
    for _ in range(10):
        car.fix(north_of(HOME, 500.0))
        car.fix(north_of(HOME, 5.0))
    assert car.sink.transitions == []
    car.fix(north_of(HOME, 500.0))
    car.fix(north_of(HOME, 500.0))
    assert len(car.raised()) == 1


def test_anchor_survives_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    first = Car(tmp_path, clock)
    first.park_at(HOME)
    assert json.loads(first.state_file.read_text()) == {"parked": True, "anchor": list(HOME),
                                                        "odometer": None}
    clock.advance(8 * 3600.0)  # the head unit reboots overnight; the bus is asleep
    second = Car(tmp_path, clock)
    assert second.mwp.parked and second.mwp.anchor == HOME
    second.tick()
    far = north_of(HOME, 300.0)
    second.fix(far)
    assert second.mwp.anchor == HOME  # not replaced by the first fix after the restart
    second.fix(far)
    [alert] = second.raised()
    assert alert.value == round(distance_m(HOME, far))


def test_stays_parked_while_ignition_is_stale_or_invalid(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.park_at(HOME)
    car.tick(STALE_S * 10)
    assert car.store.good_value(IGNITION, car.clock.time()) is None
    assert car.mwp.parked and car.mwp.anchor == HOME
    car.store.slot(IGNITION).invalidate(car.clock.time())
    car.store.slot(READY).invalidate(car.clock.time())
    car.tick()
    assert car.mwp.parked and car.mwp.anchor == HOME


def test_ignition_on_clears_and_resets_the_anchor(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.park_at(HOME)
    car.fix(north_of(HOME, 250.0))
    car.fix(north_of(HOME, 260.0))
    assert len(car.raised()) == 1
    car.clock.advance(1.0)
    car.bus("ON")
    assert not car.mwp.parked and car.mwp.anchor is None
    assert [k for k, _ in car.sink.transitions] == ["raised", "cleared"]
    assert car.sink.transitions[1][1].source_ts == car.clock.time()
    assert car.book.active() == []
    assert json.loads(car.state_file.read_text()) == {"parked": False, "anchor": None,
                                                      "odometer": None}
    car.fix(north_of(HOME, 900.0))  # driving: no anchor, no alert
    car.fix(north_of(HOME, 950.0))
    assert car.mwp.anchor is None and len(car.raised()) == 1
    # Parked again at the new place: a new anchor, and the alert can be raised again.
    car.bus("ACC", ready=False)
    spot = north_of(HOME, 1000.0)
    car.fix(spot)
    assert car.mwp.parked and car.mwp.anchor == spot
    car.fix(north_of(spot, 400.0))
    car.fix(north_of(spot, 400.0))
    assert len(car.raised()) == 2


def test_ready_is_evidence_of_driving(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.bus("OFF", ready=True)  # contradictory: the powertrain says ready, so not parked
    assert not car.mwp.parked
    car.bus("OFF", ready=False)
    assert car.mwp.parked
    car.clock.advance(1.0)
    car.bus(None, ready=True)
    assert not car.mwp.parked


def test_no_anchor_before_parking_and_not_from_poor_fixes(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.fix(HOME)
    assert not car.mwp.parked and car.mwp.anchor is None
    car.bus("OFF", ready=False)
    car.fix(north_of(HOME, 30.0), hdop=9.0)
    assert car.mwp.anchor is None
    car.fix(HOME)
    assert car.mwp.anchor == HOME


@pytest.mark.parametrize("content", ["{", '{"parked": "yes", "anchor": null}',
                                     '{"parked": true, "anchor": [1]}', "[]",
                                     '{"parked": true, "anchor": null, "odometer": "12"}'])
def test_broken_state_file_is_counted_and_treated_as_absent(tmp_path: Path,
                                                            content: str) -> None:
    (tmp_path / "parked.json").write_text(content)
    car = Car(tmp_path)
    assert car.counters.get("insights.state_file_errors") == 1
    assert not car.mwp.parked and car.mwp.anchor is None
    car.park_at(HOME)
    assert json.loads(car.state_file.read_text())["anchor"] == list(HOME)


def test_restored_anchor_is_dropped_when_the_car_was_driven_meanwhile(tmp_path: Path) -> None:
    clock = ManualClock()
    first = Car(tmp_path, clock)
    first.park_at(HOME, odometer=1234.5)
    assert json.loads(first.state_file.read_text())["odometer"] == 1234.5
    # The gateway is down while the car is driven 2.3 km and parked again.
    clock.advance(3600.0)
    second = Car(tmp_path, clock)
    assert second.mwp.parked and second.mwp.anchor == HOME
    elsewhere = north_of(HOME, 2000.0)
    second.bus("OFF", ready=False, odometer=1236.8)
    for _ in range(5):
        second.fix(elsewhere)
    assert second.sink.transitions == []
    assert second.mwp.anchor == elsewhere
    assert second.counters.get("insights.parked_reanchored") == 1
    assert json.loads(second.state_file.read_text()) == {
        "parked": True, "anchor": list(elsewhere), "odometer": 1236.8}
    # The new anchor is watched like any other.
    second.fix(north_of(elsewhere, 400.0))
    second.fix(north_of(elsewhere, 400.0))
    assert len(second.raised()) == 1


def test_restored_anchor_is_dropped_even_after_fixes_came_first(tmp_path: Path) -> None:
    clock = ManualClock()
    Car(tmp_path, clock).park_at(HOME, odometer=99.9)
    clock.advance(3600.0)
    second = Car(tmp_path, clock)
    elsewhere = north_of(HOME, 800.0)
    second.fix(elsewhere)
    second.fix(elsewhere)  # the receiver was quicker than the bus: raised on the old anchor
    assert len(second.raised()) == 1
    second.bus(None, odometer=100.0)  # one step of 0.1 km: it was driven
    assert second.book.active() == []
    assert [k for k, _ in second.sink.transitions] == ["raised", "cleared"]
    second.fix(elsewhere)
    assert second.mwp.anchor == elsewhere and second.mwp.parked


def test_restored_anchor_is_kept_when_the_odometer_did_not_move(tmp_path: Path) -> None:
    clock = ManualClock()
    Car(tmp_path, clock).park_at(HOME, odometer=1234.5)
    clock.advance(3600.0)
    second = Car(tmp_path, clock)  # towed while the gateway was down: odometer unchanged
    second.bus("OFF", ready=False, odometer=1234.5)
    far = north_of(HOME, 500.0)
    second.fix(far)
    second.fix(far)
    assert len(second.raised()) == 1
    assert second.counters.get("insights.parked_reanchored") == 0


def test_a_clock_step_backwards_does_not_stop_fixes_from_counting(tmp_path: Path) -> None:
    car = Car(tmp_path)
    car.park_at(HOME)
    stepped = car.clock.time() - 3600.0  # NTP pulled the wall clock back an hour
    far = north_of(HOME, 300.0)
    car.fix(far, received=stepped)
    car.fix(far, received=stepped)  # the same epoch again: not a second confirmation
    assert car.raised() == []
    car.fix(far, received=stepped + 1.0)
    [alert] = car.raised()
    assert alert.source_ts == stepped + 1.0
