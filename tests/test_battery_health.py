"""Battery health: cycles, capacity, consumption, range and cell spread.

Throughput and capacity come from simulated drives and charges decoded by the
real reference pipeline and integrated by the real PackMeter; the rest is fed
through real state-store slots with hand-computed expectations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import can
import pytest

from gateway.app import Pipeline
from gateway.clock import ManualClock
from gateway.config import load_profile
from gateway.config.location import InsightSettings
from gateway.config.profile import BatterySpec
from gateway.health import Counters, RateLimitedLog
from gateway.insights.battery import (
    CAPACITY,
    CELL_MAX,
    CELL_MIN,
    CONSUMPTION,
    CURRENT,
    CYCLES,
    ENERGY,
    RANGE,
    SOC,
    SOH,
    SPREAD,
    TREND,
    BatteryHealth,
)
from gateway.insights.charging import ChargeRecorder
from gateway.insights.energy import VOLTAGE, PackMeter, Totals
from gateway.insights.sessions import ChargeSession, Trip
from gateway.state import SignalState, StateStore, lookup
from hil.sim.ecus import generate
from hil.sim.model import CAPACITY_AH, VehicleModel
from tests.conftest import REF_PROFILE
from tests.insight_sim import FastModel, InsightSim

START = ManualClock().time()
SPEC = BatterySpec(capacity_ah=120.0, nominal_voltage=96.0)
BATCH_S = 0.01
DAY0 = 19_676 * 86_400.0
"""2023-11-15 00:00 UTC."""


class Rig:
    """The reference pipeline and pack meter on a manual clock, with battery health on top,
    fed frames in 10 ms batches and updated once a second of frame time."""

    def __init__(self, state_file: Path | None = None, spec: BatterySpec | None = SPEC) -> None:
        self.clock = ManualClock()
        self.pipeline = Pipeline.build(load_profile(REF_PROFILE), self.clock)
        self.store = self.pipeline.store
        self.meter = PackMeter(self.store, self.pipeline.counters)
        self.health = BatteryHealth(self.store, self.meter, spec, self.clock,
                                    self.pipeline.counters, self.pipeline.rlog, state_file)
        self._next_update = self.clock.time() + 1.0
        self.batches: list[tuple[float | None, Totals]] = []
        """(SoC after the batch, meter totals after the batch)."""

    def feed(self, frames: Iterable[can.Message]) -> None:
        """Decode ``frames`` in timestamp order."""
        batch: list[can.Message] = []
        for frame in frames:
            if batch and frame.timestamp - batch[0].timestamp >= BATCH_S:
                self._flush(batch)
            batch.append(frame)
        self._flush(batch)

    def _flush(self, batch: list[can.Message]) -> None:
        if not batch:
            return
        self.clock.advance(max(0.0, batch[-1].timestamp - self.clock.time()))
        self.pipeline.decoders["vehicle"].process(batch)
        self.meter.on_batch()
        now = self.clock.time()
        soc = self.store.good_value(SOC, now)
        self.batches.append((float(soc) if isinstance(soc, int | float) else None,
                             self.meter.totals))
        if now >= self._next_update:
            self.health.update(now)
            self._next_update = int(now) + 1.0
        batch.clear()


def value(store: StateStore, path: str) -> object:
    """The value in ``path``'s slot (None while it has none)."""
    return store.slot(path).value


def bare(*paths: str, stale_after: float = 0.3) -> StateStore:
    """A store with slots for ``paths`` (catalog units), as a profile would map them."""
    store = StateStore()
    for path in paths:
        entry = lookup(path)
        assert entry is not None
        store.register(SignalState(path, entry.unit, entry.kind, entry.group, stale_after))
    return store


def health_on(store: StateStore, state_file: Path | None = None,
              spec: BatterySpec | None = SPEC) -> tuple[BatteryHealth, Counters]:
    """Battery health on a hand-made store (its meter needs pack voltage and current)."""
    clock = ManualClock(DAY0)
    counters = Counters()
    rlog = RateLimitedLog(logging.getLogger("test.battery"), clock)
    meter = PackMeter(store, counters)
    return BatteryHealth(store, meter, spec, clock, counters, rlog, state_file), counters


def trip(n: int, km: float, wh: float) -> Trip:
    """Trip ``n`` of ``km`` using ``wh`` net, ending ``n`` hours after DAY0."""
    end = DAY0 + 3600.0 * n
    return Trip(id=f"t{n}", start=end - 600.0, end=end, duration_s=600.0, distance_km=km,
                distance_source="odometer", energy_wh=wh, discharged_wh=wh, regen_wh=0.0,
                wh_per_km=wh / km if km >= 0.1 else None, soc_start=None, soc_end=None,
                soc_used=None, max_speed_kmh=None, odometer_start_km=None,
                odometer_end_km=None, start_position=None, end_position=None)


def session(n: int, soc_start: float | None, soc_end: float | None, ah: float,
            wh: float | None = None, start: float | None = None,
            end: float | None = None) -> ChargeSession:
    """Charging session ``n`` that put ``ah`` into the pack."""
    end = DAY0 + 86_400.0 * n if end is None else end
    start = end - 7200.0 if start is None else start
    return ChargeSession(id=f"c{n}", start=start, end=end, duration_s=end - start,
                         soc_start=soc_start, soc_end=soc_end,
                         energy_wh=ah * 100.0 if wh is None else wh, ah=ah, max_power_w=3300.0,
                         interruptions=0, end_reason="unplugged")


# ---- equivalent full cycles ------------------------------------------------------------


def test_cycles_from_a_drive_match_the_model_and_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "battery.json"
    model = VehicleModel(mode="drive")
    first = Rig(state)
    first.feed(generate(model, 150.0, step=0.02, start=START))
    first.health.save()
    assert model.ah_out > 1.0  # a real drive, not an idle car
    cycles = value(first.store, CYCLES)
    assert cycles == pytest.approx(model.ah_out / CAPACITY_AH, rel=0.01)

    # A restart: a new pipeline and meter, the count continues from the state file.
    second = Rig(state)
    assert value(second.store, CYCLES) == cycles
    second.feed(generate(model, 150.0, step=0.02, start=START + 200.0))
    assert value(second.store, CYCLES) == pytest.approx(model.ah_out / CAPACITY_AH, rel=0.01)
    assert json.loads(state.read_text())["ah_out"] < model.ah_out  # not saved since
    second.health.save()  # throughput alone waits ten minutes...
    assert json.loads(state.read_text())["ah_out"] < model.ah_out
    second.health.save(force=True)  # ...unless the gateway is stopping
    assert json.loads(state.read_text())["ah_out"] == pytest.approx(model.ah_out, rel=0.01)


def test_the_state_file_is_written_on_change_and_throughput_every_ten_minutes(
        tmp_path: Path) -> None:
    state = tmp_path / "battery.json"
    store = bare(VOLTAGE, CURRENT, stale_after=5.0)
    clock = ManualClock(DAY0)
    counters = Counters()
    meter = PackMeter(store, counters)
    health = BatteryHealth(store, meter, SPEC, clock, counters,
                           RateLimitedLog(logging.getLogger("test.battery"), clock), state)

    def discharge(seconds: int) -> None:
        for _ in range(seconds):  # 100 V x 36 A out of the pack: 1 Ah per 100 s
            clock.advance(1.0)
            store.slot(VOLTAGE).set(100.0, clock.time())
            store.slot(CURRENT).set(-36.0, clock.time())
            meter.on_batch()
            health.update(clock.time())

    def written_ah() -> float | None:
        return json.loads(state.read_text())["ah_out"] if state.exists() else None

    health.save()
    assert written_ah() == 0.0
    state.unlink()
    health.save()
    assert written_ah() is None  # nothing changed: no write
    discharge(300)
    health.save()
    assert written_ah() is None  # throughput alone, 5 minutes after the last write
    discharge(300)
    health.save()
    assert written_ah() == pytest.approx(5.99)  # 10 minutes: the first sample starts the sum
    discharge(100)
    health.on_trip(trip(1, 10.0, 1200.0))  # anything else is written at once, throughput too
    assert written_ah() == pytest.approx(6.99)
    assert len(json.loads(state.read_text())["trips"]) == 1


def test_cycles_continue_from_a_seeded_count(tmp_path: Path) -> None:
    state = tmp_path / "battery.json"
    state.write_text(json.dumps({"initial_cycles": 250.5}))
    store = bare(VOLTAGE, CURRENT)
    _, counters = health_on(store, state)
    assert value(store, CYCLES) == 250.5
    assert counters.get("insights.state_file_errors") == 0


# ---- capacity from a simulated charge ------------------------------------------------


@dataclass
class DcFastCharge(FastModel):
    """The reference car on a 3C DC charger (constant current up to the charge limit).

    Only the charger differs from the model's 3.3 kW on-board one, so that 60 points of
    SoC take 12 simulated minutes instead of over two hours; SoC, cells and the BMS
    frames are the model's own.
    """

    charge_current_a: float = 3.0 * CAPACITY_AH

    def _charge(self, dt: float) -> None:
        self.speed_kmh = self.motor_torque = 0.0
        done = self.soc >= self.charge_limit
        self.charge_state = 3 if done else 1
        self.pack_current = 0.0 if done else -self.charge_current_a


@dataclass(frozen=True)
class SimulatedCharge:
    model: VehicleModel
    rig: Rig
    full: ChargeSession
    """20 -> 80 %."""
    short: ChargeSession
    """The first 10 points of the same charge."""


def session_between(rig: Rig, first: int, last: int) -> ChargeSession:
    """The session from batch ``first`` to batch ``last`` of ``rig``, from its meter."""
    soc_start, start_totals = rig.batches[first]
    soc_end, end_totals = rig.batches[last]
    used = end_totals.since(start_totals)
    return session(0, soc_start, soc_end, used.ah_in, used.wh_in, start=START, end=START + 1)


@pytest.fixture(scope="module")
def charged() -> SimulatedCharge:
    model = DcFastCharge(mode="charge", soc=20.0, charge_limit=80)
    rig = Rig()
    # 72 Ah at 360 A is 720 s; the rest is the charger holding at the limit.
    rig.feed(generate(model, 740.0, step=0.02, start=START))
    first = next(i for i, (soc, _) in enumerate(rig.batches) if soc is not None)
    at_30 = next(i for i, (soc, _) in enumerate(rig.batches) if soc is not None and soc >= 30)
    return SimulatedCharge(model, rig, session_between(rig, first, len(rig.batches) - 1),
                           session_between(rig, first, at_30))


def test_capacity_from_a_20_to_80_charge_is_within_3_percent(charged: SimulatedCharge) -> None:
    assert charged.full.soc_start == 20.0
    assert charged.full.soc_end == 80.0
    # The BMS reports the model's pack SoC, itself counted against 120 Ah; the cells'
    # SoC offsets move only their voltages. So 120 Ah is the truth to meet.
    estimate = charged.rig.health.on_charge(charged.full)
    assert estimate == pytest.approx(CAPACITY_AH, rel=0.03)
    store = charged.rig.store
    assert value(store, CAPACITY) == pytest.approx(CAPACITY_AH, rel=0.03)
    assert value(store, SOH) == pytest.approx(100.0, abs=3.0)
    assert store.slot(CAPACITY).timestamp == charged.full.end


def test_a_charge_partly_unseen_gives_no_capacity(tmp_path: Path) -> None:
    """The gateway restarts mid-charge and misses a third of it: the SoC rose over the whole
    charge but only two thirds of its charge were counted, which looks like an 80 Ah pack."""
    sim = InsightSim(model=DcFastCharge(mode="park", soc=20.0, charge_limit=80), gnss=False,
                     messages={"BMS_Pack", "BMS_Soc", "BMS_Charge", "BCM_Status"})
    sessions: list[ChargeSession] = []

    def attach() -> ChargeRecorder:
        health = BatteryHealth(sim.store, sim.meter, SPEC, sim.clock, sim.counters,
                               sim.pipeline.rlog)

        def on_session(session: ChargeSession) -> None:
            sessions.append(session)
            health.on_charge(session)

        recorder = ChargeRecorder(sim.store, sim.meter, sim.clock, InsightSettings(),
                                  on_session, tmp_path / "charge.json", counters=sim.counters)
        sim.each_second.append(recorder.update)
        return recorder

    first = attach()
    sim.park(2, bus_awake=True)
    sim.charge(150)
    first.save()  # as the wiring does every minute
    sim.stop_gateway()
    sim.charge(150)
    sim.start_gateway()
    attach()
    sim.charge(150)
    sim.park(5, bus_awake=True)
    assert len(sessions) == 1
    session = sessions[0]
    assert session.soc_start is not None and session.soc_end is not None
    rise = session.soc_end - session.soc_start
    assert rise == pytest.approx(37.5, abs=0.5)
    assert session.ah / (rise / 100.0) == pytest.approx(80.0, rel=0.02)  # within the bounds
    assert not session.complete
    assert sim.counters.get("insights.capacity_skipped_incomplete") == 1
    assert sim.store.slot(CAPACITY).timestamp is None


def test_a_ten_point_charge_gives_no_estimate(charged: SimulatedCharge) -> None:
    store = bare(VOLTAGE, CURRENT)
    health, _ = health_on(store)
    assert charged.short.soc_end is not None and charged.short.soc_start is not None
    assert charged.short.soc_end - charged.short.soc_start == pytest.approx(10.0)
    assert charged.short.ah > 10.0
    assert health.on_charge(charged.short) is None
    assert store.slot(CAPACITY).timestamp is None


def test_capacity_is_the_median_of_the_last_five_and_gives_soh() -> None:
    store = bare(VOLTAGE, CURRENT)
    health, counters = health_on(store)
    # 60 points each: Ah / 0.6 = 110, 100, 108, (200: rejected), 105, 112, 90.
    for n, ah in enumerate((66.0, 60.0, 64.8, 120.0, 63.0, 67.2, 54.0), start=1):
        health.on_charge(session(n, 20.0, 80.0, ah))
    assert counters.get("insights.capacity_rejected") == 1
    # The last five accepted: 100, 108, 105, 112, 90 -> median 105 Ah, 105 / 120 = 87.5 %.
    assert value(store, CAPACITY) == 105.0
    assert value(store, SOH) == 87.5
    assert store.slot(SOH).timestamp == DAY0 + 86_400.0 * 7


def test_an_absurd_estimate_is_rejected() -> None:
    store = bare(VOLTAGE, CURRENT)
    health, counters = health_on(store)
    # A SoC jump from a BMS recalibration: 60 points for 20 Ah would be a 33 Ah pack.
    assert health.on_charge(session(1, 20.0, 80.0, 20.0)) is None
    assert health.on_charge(session(2, None, 80.0, 60.0)) is None
    assert counters.get("insights.capacity_rejected") == 1
    assert store.slot(CAPACITY).timestamp is None


# ---- consumption and range -----------------------------------------------------------


def test_consumption_is_weighted_by_distance_over_the_last_100_km() -> None:
    store = bare(VOLTAGE, CURRENT)
    health, _ = health_on(store)
    health.on_trip(trip(1, 40.0, 8000.0))   # 200 Wh/km, beyond the newest 100 km
    health.on_trip(trip(2, 50.0, 5000.0))   # 100 Wh/km
    health.on_trip(trip(3, 60.0, 7200.0))   # 120 Wh/km
    health.on_trip(trip(4, 0.2, 200.0))     # a 200 m hop: not a consumption sample
    health.on_trip(trip(5, 2.0, 600.0))     # 300 Wh/km
    # Newest first until 100 km: 2 + 60 + 50 km; (600 + 7200 + 5000) / 112 = 114.29.
    assert value(store, CONSUMPTION) == 114.3
    assert store.slot(CONSUMPTION).timestamp == DAY0 + 3600.0 * 5


def test_an_incomplete_trip_is_no_consumption_sample() -> None:
    store = bare(VOLTAGE, CURRENT)
    health, counters = health_on(store)
    # A restart mid-trip: 10 km seen, but only part of its energy (a lower bound).
    health.on_trip(dataclasses.replace(trip(1, 10.0, 600.0), complete=False))
    assert store.slot(CONSUMPTION).timestamp is None
    assert counters.get("insights.consumption_skipped_incomplete") == 1
    health.on_trip(trip(2, 10.0, 1200.0))
    assert value(store, CONSUMPTION) == 120.0


def test_range_from_soc_and_consumption_goes_stale_with_the_soc() -> None:
    store = bare(VOLTAGE, CURRENT, SOC, stale_after=0.3)
    health, _ = health_on(store)
    t = DAY0 + 100.0
    store.slot(SOC).set(50.0, t)
    health.update(t + 0.1)
    assert store.slot(RANGE).timestamp is None  # no trips yet: no made-up Wh/km
    health.on_trip(trip(1, 10.0, 1200.0))        # 120 Wh/km
    health.update(t + 0.1)
    # 50 % of 120 Ah x 96 V = 5760 Wh; / 120 Wh/km = 48 km.
    view = store.view(RANGE, t + 0.2)
    assert (view.value, view.timestamp, view.good) == (48.0, t, True)
    assert store.slot(RANGE).stale_after == 0.3
    health.update(t + 1.0)  # the SoC frame stopped
    assert store.view(RANGE, t + 1.0).stale
    assert store.good_value(RANGE, t + 1.0) is None
    # A measured capacity of 108 Ah replaces the rating: 50 % x 108 x 96 / 120 = 43.2 km.
    health.on_charge(session(1, 20.0, 80.0, 64.8))
    store.slot(SOC).set(50.0, t + 2.0)
    health.update(t + 2.0)
    assert store.good_value(RANGE, t + 2.0) == 43.2


def test_range_prefers_the_bms_energy_left() -> None:
    store = bare(VOLTAGE, CURRENT, SOC, ENERGY, stale_after=0.5)
    health, _ = health_on(store)
    health.on_trip(trip(1, 10.0, 1200.0))
    t = DAY0 + 10.0
    store.slot(SOC).set(90.0, t)
    store.slot(ENERGY).set(4.5, t)
    health.update(t)
    assert store.good_value(RANGE, t) == 37.5  # 4500 Wh / 120 Wh/km


# ---- cell spread at rest ---------------------------------------------------------------


def rest(health: BatteryHealth, store: StateStore, start: float,
         spreads: list[tuple[int, float]], amps: float = 0.3) -> float:
    """Feed one reading a second of ``amps`` and cells ``mv`` apart, for each
    (seconds, mv) in turn; returns the time after the last."""
    t = start
    for seconds, mv in spreads:
        for _ in range(seconds):
            store.slot(CURRENT).set(amps, t)
            store.slot(CELL_MAX).set(3.300 + mv / 1000.0, t)
            store.slot(CELL_MIN).set(3.300, t)
            health.update(t)
            t += 1.0
    return t


def test_spread_trend_from_daily_medians_of_rest_samples(tmp_path: Path) -> None:
    state = tmp_path / "battery.json"
    store = bare(VOLTAGE, CURRENT, CELL_MAX, CELL_MIN, stale_after=1.0)
    health, _ = health_on(store, state)
    morning = 10 * 3600.0
    # Day 0: a 21-minute rest sampled at 60 s, 660 s and 1260 s: 9, 30, 10 mV -> median 10.
    rest(health, store, DAY0 + morning, [(600, 9.0), (600, 30.0), (61, 10.0)])
    assert (value(store, SPREAD), store.slot(SPREAD).timestamp) == (10.0, DAY0 + morning + 1260)
    rest(health, store, DAY0 + 86_400 + morning, [(61, 11.0)])
    assert store.slot(TREND).timestamp is None  # two days are not a trend
    rest(health, store, DAY0 + 2 * 86_400 + morning, [(61, 13.0)])
    # Days 0, 1, 2 at 10, 11, 13 mV: slope 1.5 mV/day.
    assert value(store, TREND) == 45.0
    rest(health, store, DAY0 + 4 * 86_400 + morning, [(61, 14.0)])
    # Days 0, 1, 2, 4 at 10, 11, 13, 14: Sxy = 9, Sxx = 8.75 -> 1.0286 mV/day x 30.
    assert value(store, TREND) == 30.86
    assert store.slot(TREND).timestamp == DAY0 + 4 * 86_400 + morning + 60

    restarted = bare(VOLTAGE, CURRENT, CELL_MAX, CELL_MIN)
    health_on(restarted, state)
    assert value(restarted, TREND) == 30.86
    assert value(restarted, SPREAD) == 14.0


def test_no_spread_sample_under_load_or_after_a_short_rest() -> None:
    store = bare(VOLTAGE, CURRENT, CELL_MAX, CELL_MIN, stale_after=1.0)
    health, _ = health_on(store)
    t = rest(health, store, DAY0, [(700, 40.0)], amps=-35.0)  # charging: IR drops differ
    t = rest(health, store, t, [(50, 8.0)])                   # 50 s quiet
    t = rest(health, store, t, [(1, 40.0)], amps=12.0)        # a blip restarts the minute
    t = rest(health, store, t, [(60, 8.0)])                   # 59 s since the blip
    assert store.slot(SPREAD).timestamp is None
    rest(health, store, t, [(1, 8.0)])                        # the 60th second
    assert (value(store, SPREAD), store.slot(SPREAD).timestamp) == (8.0, t)


def test_a_silent_bms_breaks_the_rest() -> None:
    store = bare(VOLTAGE, CURRENT, CELL_MAX, CELL_MIN, stale_after=1.0)
    health, _ = health_on(store)
    t = rest(health, store, DAY0, [(40, 8.0)])
    for k in range(10):  # no readings for 10 s: whether the pack rested is unknown
        health.update(t + k)
    rest(health, store, t + 10.0, [(40, 8.0)])
    assert store.slot(SPREAD).timestamp is None


# ---- what needs what, and a broken state file ---------------------------------------


def test_without_a_battery_spec_only_what_can_be_computed_is_registered() -> None:
    rig = Rig(spec=None)
    store = rig.store
    for path in (CYCLES, CAPACITY, SOH):
        assert path not in store
    for path in (CONSUMPTION, RANGE, SPREAD, TREND):  # the BMS reports energy left
        assert path in store
        assert store.slot(path).timestamp is None
        assert store.slot(path).group == "battery"
    assert rig.health.on_charge(session(1, 20.0, 80.0, 72.0)) is None

    no_cells = bare(VOLTAGE, CURRENT, SOC)
    health_on(no_cells)
    assert SPREAD not in no_cells
    assert TREND not in no_cells
    assert RANGE in no_cells


def test_a_broken_state_file_is_counted_and_counting_starts_from_zero(tmp_path: Path) -> None:
    state = tmp_path / "battery.json"
    for content in ("{not json", json.dumps({"ah_out": -5.0}),
                    json.dumps({"capacity": [[1.0, "big"]]}), json.dumps([1, 2])):
        state.write_text(content)
        store = bare(VOLTAGE, CURRENT)
        health, counters = health_on(store, state)
        assert counters.get("insights.state_file_errors") == 1, content
        assert store.slot(CYCLES).timestamp is None
        health.update(DAY0)
        assert value(store, CYCLES) == 0.0
    health.on_charge(session(1, 20.0, 80.0, 66.0))  # saved at once: the file is good again
    restarted = bare(VOLTAGE, CURRENT)
    _, counters = health_on(restarted, state)
    assert counters.get("insights.state_file_errors") == 0
    assert value(restarted, CAPACITY) == 110.0
