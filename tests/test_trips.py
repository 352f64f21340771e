"""Trips from simulated drives through the real decoder, checked against the model's truth.

Tolerances: energy 1 % (the meter matches the model to ~0.01 %; each trip end
may include up to a second of standing draw), regeneration 2 %, odometer
distance 0.15 km (the odometer has 0.1 km steps), GNSS distance 2 % (also with
2.5 m of independent noise per fix and axis), wheel-speed
distance 1 %, maximum speed 1 km/h (the speed frame has 0.1 km/h steps and is
sampled once a second), SoC used 0.15 points (0.1 % steps at both ends).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config.location import InsightSettings
from gateway.gnss.geo import distance_m
from gateway.insights.sessions import Trip
from gateway.insights.trips import ODOMETER_MIN_KM, TripRecorder
from tests.insight_sim import InsightSim, Truth, profile_without

GAPS = "insights.energy_gaps"
PARK_S = 300.0
SETTINGS = InsightSettings(trip_end_park_s=PARK_S)
ODOMETER = "Vehicle.TraveledDistance"


@dataclass
class Rig:
    """A simulation with a trip recorder attached, and what it produced."""

    sim: InsightSim
    recorder: TripRecorder
    trips: list[Trip]


def attach(sim: InsightSim, settings: InsightSettings = SETTINGS,
           state_file: Path | None = None) -> Rig:
    """A trip recorder on ``sim``'s store and meter, updated every simulated second."""
    trips: list[Trip] = []
    recorder = TripRecorder(sim.store, sim.meter, sim.clock, settings, trips.append,
                            state_file, counters=sim.counters)
    sim.each_second.append(recorder.update)
    sim.fix_listeners.append(recorder.on_fix)
    return Rig(sim, recorder, trips)


def assert_energy(trip: Trip, truth: Truth) -> None:
    """Energy, discharge and regeneration of ``trip`` against a truth window."""
    net = truth.energy_out_wh - truth.energy_in_wh
    assert trip.energy_wh == pytest.approx(net, rel=0.01)
    assert trip.discharged_wh == pytest.approx(truth.energy_out_wh, rel=0.01)
    assert trip.regen_wh == pytest.approx(truth.energy_in_wh, rel=0.02)


# ---- one lap, then a long park ---------------------------------------------------------


@dataclass
class Lap:
    rig: Rig
    start: Truth
    end: Truth
    open_before_end: dict[str, object] | None
    trips_before_end: int
    state_file: Path
    start_position: tuple[float, float]


@pytest.fixture(scope="module")
def lap(tmp_path_factory: pytest.TempPathFactory) -> Lap:
    """Parked 5 s (bus asleep), one lap of the drive cycle, then parked past the limit."""
    state = tmp_path_factory.mktemp("trip") / "trip.json"
    sim = InsightSim()
    rig = attach(sim, InsightSettings(trip_end_park_s=PARK_S, energy_price_per_kwh=0.25,
                                      currency="EUR"), state)
    sim.park(5)
    start, position = sim.truth(), (sim.model.lat, sim.model.lon)
    sim.drive(sim.lap_s)
    end = sim.truth()
    sim.park(PARK_S - 5)
    open_before_end, trips_before_end = rig.recorder.current(), len(rig.trips)
    sim.park(15)
    return Lap(rig, start, end, open_before_end, trips_before_end, state, position)


def test_one_lap_gives_one_trip_after_the_park_limit(lap: Lap) -> None:
    assert lap.trips_before_end == 0
    assert lap.open_before_end is not None
    assert lap.open_before_end["parked"] is True
    assert len(lap.rig.trips) == 1
    assert lap.rig.recorder.current() is None
    trip = lap.rig.trips[0]
    # Starts at the first evidence seen (the once-a-second update), ends when driving was
    # last seen (the last body-controller frame, 100 ms cycle), not after the park.
    assert lap.start.at <= trip.start <= lap.start.at + 1.0
    assert lap.end.at - 0.2 <= trip.end <= lap.end.at
    assert trip.duration_s == pytest.approx(trip.end - trip.start)
    assert trip.complete


def test_lap_energy_regen_and_soc(lap: Lap) -> None:
    trip, truth = lap.rig.trips[0], lap.end.since(lap.start)
    assert_energy(trip, truth)
    assert trip.energy_wh == pytest.approx(trip.discharged_wh - trip.regen_wh)
    assert trip.soc_start == pytest.approx(lap.start.soc, abs=0.06)
    assert trip.soc_used == pytest.approx(-truth.soc, abs=0.15)


def test_lap_distance_speed_and_position(lap: Lap) -> None:
    trip, truth = lap.rig.trips[0], lap.end.since(lap.start)
    # One lap is under 2 km: the odometer's 0.1 km steps lose to the GNSS track there.
    assert truth.distance_km < ODOMETER_MIN_KM
    assert trip.distance_source == "gnss"
    assert trip.distance_km == pytest.approx(truth.distance_km, rel=0.02)
    assert trip.odometer_start_km == pytest.approx(lap.start.odometer_km, abs=0.06)
    assert trip.wh_per_km == pytest.approx(trip.energy_wh / trip.distance_km)
    true_ratio = (truth.energy_out_wh - truth.energy_in_wh) / truth.distance_km
    assert trip.wh_per_km == pytest.approx(true_ratio, rel=0.01 + 0.15 / truth.distance_km)
    assert trip.max_speed_kmh == pytest.approx(truth.max_speed_kmh, abs=1.0)
    assert trip.start_position is not None
    # The first fix after the first evidence: the car has moved for at most a second.
    assert distance_m(trip.start_position, lap.start_position) < 5.0
    assert trip.end_position == pytest.approx((lap.rig.sim.model.lat, lap.rig.sim.model.lon))


def test_lap_cost_and_event(lap: Lap) -> None:
    trip = lap.rig.trips[0]
    assert trip.cost == pytest.approx(trip.energy_wh / 1000 * 0.25)
    assert trip.currency == "EUR"
    data = json.loads(json.dumps(trip.as_dict()))
    assert data["distance_source"] == "gnss"
    assert data["energy_wh"] == round(trip.energy_wh, 2)
    stored = json.loads(lap.state_file.read_text())
    assert stored == {"version": 1, "trip": None}  # closed trips are not kept open


# ---- when a trip must not start or must not split ------------------------------------


def test_no_trip_while_parked() -> None:
    """Asleep for 30 min, awake with the ignition off for 2 min, then after a trip the
    stale last frames (ready, moving) must not open another one."""
    rig = attach(InsightSim())
    rig.sim.park(1800)
    rig.sim.park(120, bus_awake=True)
    assert rig.trips == []
    assert rig.recorder.current() is None
    rig.sim.drive(60)  # ends at speed: the last frames before the bus sleeps say "moving"
    rig.sim.park(PARK_S + 5)
    assert len(rig.trips) == 1
    rig.sim.park(3600)
    assert len(rig.trips) == 1
    assert rig.recorder.current() is None


@pytest.mark.parametrize("bus_awake", [True, False])
def test_a_short_stop_does_not_split_the_trip(bus_awake: bool) -> None:
    rig = attach(InsightSim())
    sim = rig.sim
    start = sim.truth()
    sim.drive(sim.lap_s)
    sim.park(PARK_S - 60, bus_awake=bus_awake)
    sim.drive(sim.lap_s)
    end = sim.truth()
    # Awake, the park's standby draw (~2.4 Wh, 2 % of the trip) reaches the meter: it
    # must not count.
    sim.park(PARK_S + 5, bus_awake=bus_awake)
    assert len(rig.trips) == 1
    trip = rig.trips[0]
    assert trip.duration_s == pytest.approx(end.at - start.at, abs=1.2)
    assert_energy(trip, end.since(start))
    assert end.distance_km - start.distance_km >= ODOMETER_MIN_KM
    assert trip.distance_source == "odometer"
    assert trip.distance_km == pytest.approx(end.distance_km - start.distance_km, abs=0.15)


# ---- distance fallbacks ----------------------------------------------------------------


def gnss_drive(sim: InsightSim) -> tuple[Rig, Truth, Truth]:
    """A lap, 4 min standing in the trip with GNSS jitter, another lap, a long park."""
    rig = attach(sim)
    start = sim.truth()
    sim.drive(sim.lap_s)
    sim.park(PARK_S - 60, bus_awake=True)
    sim.drive(sim.lap_s)
    end = sim.truth()
    sim.park(PARK_S + 5)
    return rig, start, end


@pytest.mark.parametrize(("odometer", "noise_m"),
                         [("unmapped", 0.5), ("invalid", 0.5), ("unmapped", 1.5),
                          ("unmapped", 2.5)])
def test_gnss_distance_when_the_odometer_is_missing(odometer: str, noise_m: float) -> None:
    """Standing 4 min (in the trip's parked phase) and the stops of the cycle (ready, wheels
    at standstill) add jitter, not distance; while moving, noise of 2.5 m per fix would
    lengthen 1 Hz steps by 3 to 9 % if each step counted."""
    if odometer == "unmapped":
        sim = InsightSim(profile=profile_without(ODOMETER), gnss_noise_m=noise_m)
    else:
        sim = InsightSim(gnss_noise_m=noise_m)
        sim.not_available("BCM_Odometer", "BCM_Odometer")
    rig, start, end = gnss_drive(sim)
    assert len(rig.trips) == 1
    trip = rig.trips[0]
    assert trip.distance_source == "gnss"
    assert trip.odometer_start_km is None
    assert trip.distance_km == pytest.approx(end.distance_km - start.distance_km, rel=0.02)
    assert_energy(trip, end.since(start))


@pytest.mark.parametrize("gnss", ["off", "no fix", "imprecise"])
def test_speed_integral_without_odometer_and_gnss(gnss: str) -> None:
    sim = InsightSim(gnss=gnss != "off")
    sim.not_available("BCM_Odometer", "BCM_Odometer")
    sim.model.gnss_fix = gnss != "no fix"
    if gnss == "imprecise":
        sim.hdop = 9.0  # worse than the 5.0 a fix must have to be used
    rig = attach(sim)
    sim.drive(sim.lap_s)
    sim.park(PARK_S + 5)
    trip, truth = rig.trips[0], sim.truth()
    assert trip.distance_source == "speed"
    assert trip.distance_km == pytest.approx(truth.distance_km, rel=0.01)
    assert trip.start_position is None


@pytest.mark.parametrize("odometer", [True, False])
def test_a_speed_never_good_in_the_trip_neither_checks_nor_measures(odometer: bool) -> None:
    """Speed mapped but "not available" all along: it integrated nothing, so it cannot make
    the odometer implausible, and it is no distance source."""
    sim = InsightSim(gnss=False)
    sim.not_available("MCU_Drive", "MCU_VehicleSpeed")
    if not odometer:
        sim.not_available("BCM_Odometer", "BCM_Odometer")
    rig = attach(sim)
    start = sim.truth()
    sim.drive(sim.lap_s)
    end = sim.truth()
    sim.park(PARK_S + 5)
    (trip,) = rig.trips
    assert trip.max_speed_kmh is None
    if odometer:
        assert trip.distance_source == "odometer"
        assert trip.distance_km == pytest.approx(end.distance_km - start.distance_km, abs=0.15)
    else:
        assert (trip.distance_km, trip.distance_source) == (0.0, None)


def test_no_distance_source_at_all() -> None:
    sim = InsightSim(profile=profile_without(ODOMETER, "Vehicle.Speed"), gnss=False)
    rig = attach(sim)
    sim.drive(60)
    sim.park(PARK_S + 5)
    assert len(rig.trips) == 1  # ready and ignition still tell a trip
    trip = rig.trips[0]
    assert (trip.distance_km, trip.distance_source, trip.wh_per_km) == (0.0, None, None)
    assert trip.max_speed_kmh is None
    assert trip.energy_wh > 0


@pytest.mark.parametrize("odometer_km", [0.0, 999_999.0])
def test_a_reset_or_jumping_odometer_falls_back(odometer_km: float) -> None:
    sim = InsightSim()
    rig = attach(sim)
    sim.drive(sim.lap_s)
    sim.ecus.overrides["BCM_Odometer"] = {"BCM_Odometer": odometer_km}
    sim.drive(30)
    sim.park(PARK_S + 5)
    trip = rig.trips[0]
    assert trip.odometer_end_km == odometer_km
    assert trip.distance_source == "gnss"
    assert trip.distance_km == pytest.approx(sim.truth().distance_km, rel=0.02)


# ---- restarts and the state file ------------------------------------------------------


def restarted(rig: Rig, state: Path) -> Rig:
    """Save, restart the gateway and attach a new recorder that reads the state file."""
    rig.recorder.save()
    rig.sim.restart_gateway()
    return attach(rig.sim, state_file=state)


def test_a_restart_mid_trip_continues_it(tmp_path: Path) -> None:
    state = tmp_path / "trip.json"
    rig = attach(InsightSim(), state_file=state)
    sim = rig.sim
    start = sim.truth()
    sim.drive(100)
    first = rig.recorder.current()
    assert first is not None
    rig = restarted(rig, state)
    again = rig.recorder.current()
    assert again is not None
    assert (again["id"], again["start"], again["energy_wh"]) == \
        (first["id"], first["start"], first["energy_wh"])
    sim.drive(sim.lap_s)
    end = sim.truth()
    sim.park(PARK_S + 5)
    assert len(rig.trips) == 1
    trip = rig.trips[0]
    assert trip.id == first["id"]
    assert not trip.complete  # nothing was lost here, but a restart may lose a lot
    assert_energy(trip, end.since(start))
    assert trip.distance_km == pytest.approx(end.distance_km - start.distance_km, abs=0.15)
    assert trip.max_speed_kmh == pytest.approx(end.max_speed_kmh, abs=1.0)


def test_a_trip_left_open_by_a_long_outage_ends_at_its_last_evidence(tmp_path: Path) -> None:
    state = tmp_path / "trip.json"
    rig = attach(InsightSim(), state_file=state)
    sim = rig.sim
    start = sim.truth()
    sim.drive(80)
    end = sim.truth()
    rig.recorder.save()
    sim.stop_gateway()
    sim.park(PARK_S + 100)
    sim.start_gateway()
    rig = attach(sim, state_file=state)
    sim.drive(1)  # the first update after the restart already sees the car driving
    assert len(rig.trips) == 1
    old = rig.trips[0]
    assert end.at - 1.0 <= old.end <= end.at
    assert not old.complete
    assert_energy(old, end.since(start))
    current = rig.recorder.current()
    assert current is not None
    assert current["id"] != old.id  # the drive after the outage is a new trip


def test_a_broken_state_file_is_counted_and_ignored(tmp_path: Path) -> None:
    state = tmp_path / "trip.json"
    sim = InsightSim()
    for content in ("{not json", json.dumps({"version": 1, "trip": {"id": 7}})):
        state.write_text(content)
        rig = attach(sim, state_file=state)
        assert rig.recorder.current() is None
    assert sim.counters.get("insights.state_file_errors") == 2


def test_a_failing_consumer_does_not_stop_recording() -> None:
    sim = InsightSim()
    seen: list[Trip] = []

    def fail(trip: Trip) -> None:
        seen.append(trip)
        raise RuntimeError("disk full")

    recorder = TripRecorder(sim.store, sim.meter, sim.clock, SETTINGS, fail,
                            counters=sim.counters)
    sim.each_second.append(recorder.update)
    for _ in range(2):
        sim.drive(30)
        sim.park(PARK_S + 5)
    assert len(seen) == 2
    assert sim.counters.get("insights.sink_errors") == 2


def test_the_state_file_is_written_only_when_it_changed(tmp_path: Path) -> None:
    """Each write is an fsync: a deleted file stays deleted while there is nothing new."""
    state = tmp_path / "trip.json"
    rig = attach(InsightSim(), state_file=state)
    rig.recorder.save()
    assert json.loads(state.read_text()) == {"version": 1, "trip": None}
    state.unlink()
    rig.recorder.save()
    assert not state.exists()
    rig.sim.drive(30)  # opening a trip writes it at once
    current = rig.recorder.current()
    assert current is not None
    assert json.loads(state.read_text())["trip"]["id"] == current["id"]
    rig.recorder.save()  # 30 s of driving since: a change
    state.unlink()
    rig.recorder.save()
    assert not state.exists()
    rig.sim.park(5, bus_awake=True)  # one observation as parked, then nothing changes
    rig.recorder.save()
    assert json.loads(state.read_text())["trip"]["parked"] is True
    state.unlink()
    rig.sim.park(60, bus_awake=True)
    rig.recorder.save()
    assert not state.exists()


def test_a_finished_trip_is_handed_on_before_the_state_file_forgets_it(tmp_path: Path) -> None:
    """A power cut between the hand-off and the file's update repeats the trip (same id),
    marked incomplete, instead of losing it."""
    state = tmp_path / "trip.json"
    sim = InsightSim()
    handed: list[tuple[Trip, dict[str, object]]] = []
    recorder = TripRecorder(sim.store, sim.meter, sim.clock, SETTINGS,
                            lambda trip: handed.append((trip, json.loads(state.read_text()))),
                            state, counters=sim.counters)
    sim.each_second.append(recorder.update)
    sim.drive(60)
    recorder.save()
    sim.park(PARK_S + 5)
    ((trip, on_disk),) = handed
    assert isinstance(on_disk["trip"], dict)
    assert on_disk["trip"]["id"] == trip.id
    assert json.loads(state.read_text()) == {"version": 1, "trip": None}
    state.write_text(json.dumps(on_disk))  # the power cut came just after the hand-off
    sim.restart_gateway()
    rig = attach(sim, state_file=state)
    sim.park(2)
    assert [(t.id, t.complete) for t in rig.trips] == [(trip.id, False)]


def test_a_gap_in_the_pack_samples_makes_the_trip_incomplete() -> None:
    rig = attach(InsightSim())
    sim = rig.sim
    sim.drive(30)
    sim.ecus.silenced.add("BMS")
    sim.run(5)
    sim.ecus.silenced.discard("BMS")
    sim.run(30)
    sim.park(PARK_S + 5)
    assert sim.counters.get(GAPS) == 1
    assert [t.complete for t in rig.trips] == [False]


def test_a_bms_waking_late_at_the_start_leaves_the_trip_complete() -> None:
    """The bus sleeps after a park; at the drive the BMS wakes 3 s after the others: the gap
    it closes is the sleep before the trip, not a hole in it."""
    sim = InsightSim()
    sim.park(5, bus_awake=True)
    sim.park(600)
    rig = attach(sim)
    sim.model.mode = "drive"
    sim.bus_awake = True
    sim.ecus.silenced.add("BMS")
    sim.run(3)
    assert rig.recorder.current() is not None
    sim.ecus.silenced.discard("BMS")
    sim.run(sim.lap_s)
    sim.park(PARK_S + 5)
    assert sim.counters.get(GAPS) == 1
    assert [t.complete for t in rig.trips] == [True]
