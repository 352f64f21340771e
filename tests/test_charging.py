"""Charging sessions from simulated charges through the real decoder, against the model.

Tolerances: energy and charge 1 % (the meter matches the model to ~0.01 %),
start and end SoC 0.1 points (the BMS reports 0.1 % steps; the recorder samples
once a second), maximum power 1 % of the 3.3 kW charger (one-second means of
a noisy current), times 1 s (the once-a-second update).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config.location import InsightSettings
from gateway.insights.charging import CABLE, ChargeRecorder
from gateway.insights.sessions import ChargeSession
from gateway.state.mode import IGNITION, READY, SPEED
from hil.sim.model import CHARGER_POWER_W
from tests.insight_sim import FastModel, InsightSim, Truth, profile_without

END_S = 300.0
IS_CHARGING = "Vehicle.Powertrain.TractionBattery.Charging.IsCharging"
CHARGE_MESSAGES = frozenset({"BMS_Pack", "BMS_Soc", "BMS_Charge", "BCM_Status"})
"""What the charge recorder reads; building only these halves the simulation's time."""
SETTINGS = InsightSettings(charge_end_s=END_S)


@dataclass
class Rig:
    """A simulation with a charge recorder attached, and what it produced when."""

    sim: InsightSim
    recorder: ChargeRecorder
    sessions: list[ChargeSession]
    emitted_at: list[float]


def attach(sim: InsightSim, settings: InsightSettings = SETTINGS,
           state_file: Path | None = None) -> Rig:
    """A charge recorder on ``sim``'s store and meter, updated every simulated second."""
    sessions: list[ChargeSession] = []
    emitted: list[float] = []

    def on_session(session: ChargeSession) -> None:
        sessions.append(session)
        emitted.append(sim.now)

    recorder = ChargeRecorder(sim.store, sim.meter, sim.clock, settings, on_session,
                              state_file, counters=sim.counters)
    sim.each_second.append(recorder.update)
    return Rig(sim, recorder, sessions, emitted)


def plugged_car(**kwargs: Any) -> InsightSim:
    """A parked car at 50 % SoC (the cable is about to go in)."""
    return InsightSim(model=FastModel(mode="park", soc=50.0), messages=CHARGE_MESSAGES,
                      **kwargs)


def assert_energy(session: ChargeSession, truth: Truth) -> None:
    """Energy and charge into the pack against a truth window."""
    assert session.energy_wh == pytest.approx(truth.energy_in_wh, rel=0.01)
    assert session.ah == pytest.approx(truth.ah_in, rel=0.01)


# ---- a 20-minute charge -----------------------------------------------------------------


@dataclass
class Charge:
    rig: Rig
    start: Truth
    end: Truth


@pytest.fixture(scope="module")
def twenty_minutes() -> Charge:
    """Plugged in for 20 minutes at 3.3 kW, then unplugged; a price is set."""
    sim = plugged_car()
    rig = attach(sim, InsightSettings(charge_end_s=END_S, energy_price_per_kwh=0.3,
                                      currency="EUR"))
    sim.park(5, bus_awake=True)
    start = sim.truth()
    sim.charge(1200)
    end = sim.truth()
    sim.park(30, bus_awake=True)
    return Charge(rig, start, end)


def test_twenty_minutes_give_one_session_with_the_model_energy(twenty_minutes: Charge) -> None:
    rig, truth = twenty_minutes.rig, twenty_minutes.end.since(twenty_minutes.start)
    assert len(rig.sessions) == 1
    session = rig.sessions[0]
    assert truth.energy_in_wh == pytest.approx(CHARGER_POWER_W * 1200 / 3600, rel=0.01)
    assert_energy(session, truth)
    assert session.interruptions == 0
    assert session.complete
    assert session.cost == pytest.approx(session.energy_wh / 1000 * 0.3)
    assert session.currency == "EUR"


def test_twenty_minutes_soc_power_and_times(twenty_minutes: Charge) -> None:
    c = twenty_minutes
    session = c.rig.sessions[0]
    assert session.soc_start == pytest.approx(c.start.soc, abs=0.1)
    assert session.soc_end == pytest.approx(c.end.soc, abs=0.1)
    assert session.max_power_w == pytest.approx(CHARGER_POWER_W, rel=0.01)
    assert c.start.at <= session.start <= c.start.at + 1.0
    # Unplugged: the end is the frame that said so as seen by the next once-a-second
    # update, and the session is out at that update.
    assert c.end.at <= session.end <= c.end.at + 1.0
    assert session.end_reason == "unplugged"
    assert c.rig.emitted_at[0] <= session.end + 1.0
    assert session.duration_s == pytest.approx(1200, abs=1.0)
    assert c.rig.recorder.current() is None


# ---- pauses -------------------------------------------------------------------------------


def charge_with_pause(pause_s: float, sim: InsightSim | None = None,
                      ) -> tuple[Rig, Truth, Truth]:
    """3 min charging, the charger paused ``pause_s`` with the cable in, 3 min more."""
    sim = sim or plugged_car()
    rig = attach(sim)
    sim.park(2, bus_awake=True)
    start = sim.truth()
    sim.charge(180)
    sim.pause_charger()
    sim.charge(pause_s)
    sim.resume_charger()
    sim.charge(180)
    end = sim.truth()
    sim.park(5, bus_awake=True)
    return rig, start, end


def test_a_one_minute_pause_is_one_interruption() -> None:
    rig, start, end = charge_with_pause(60)
    assert len(rig.sessions) == 1
    session = rig.sessions[0]
    assert session.interruptions == 1
    assert_energy(session, end.since(start))
    assert session.duration_s == pytest.approx(420, abs=1.0)
    assert session.cost is None
    assert session.currency == ""


def test_without_a_charging_signal_current_and_cable_tell_the_session() -> None:
    """A BMS that reports no charging state: current into the pack with the cable in opens
    the session, and its noise (0.2 A) while paused is neither flow nor a new session."""
    rig, start, end = charge_with_pause(60, plugged_car(profile=profile_without(IS_CHARGING)))
    assert len(rig.sessions) == 1
    session = rig.sessions[0]
    assert session.interruptions == 1
    assert_energy(session, end.since(start))
    assert start.at <= session.start <= start.at + 1.0


def test_a_ten_second_pause_is_not_an_interruption() -> None:
    rig, start, end = charge_with_pause(10)
    assert [s.interruptions for s in rig.sessions] == [0]
    assert_energy(rig.sessions[0], end.since(start))


def test_a_long_stop_with_the_cable_in_ends_the_session() -> None:
    """The charge stops, the cable stays in: the session ends ``charge_end_s`` later, at
    the moment flow stopped; unplugging afterwards adds nothing."""
    sim = plugged_car()
    rig = attach(sim)
    start = sim.truth()
    sim.charge(120)
    stopped = sim.truth()
    sim.pause_charger()
    sim.charge(END_S - 5)
    assert rig.sessions == []
    assert rig.recorder.current() is not None
    sim.charge(10)
    assert len(rig.sessions) == 1
    session = rig.sessions[0]
    assert session.end_reason == "stopped"
    assert stopped.at - 1.0 <= session.end <= stopped.at
    assert_energy(session, stopped.since(start))
    sim.charge(END_S)  # still plugged in and paused: current noise must not open another
    sim.park(10, bus_awake=True)
    assert len(rig.sessions) == 1


def test_regeneration_while_driving_is_not_charging() -> None:
    sim = InsightSim()
    rig = attach(sim)
    sim.drive(sim.lap_s)
    sim.park(END_S + 5, bus_awake=True)
    assert sim.truth().energy_in_wh > 10  # current did flow into the pack
    assert rig.sessions == []
    assert rig.recorder.current() is None


# ---- restarts -------------------------------------------------------------------------------


def test_a_restart_mid_session_continues_it(tmp_path: Path) -> None:
    state = tmp_path / "charge.json"
    sim = plugged_car()
    rig = attach(sim, state_file=state)
    start = sim.truth()
    sim.charge(150)
    first = rig.recorder.current()
    assert first is not None
    rig.recorder.save()
    sim.restart_gateway()
    rig = attach(sim, state_file=state)
    sim.charge(150)
    end = sim.truth()
    sim.park(5, bus_awake=True)
    assert len(rig.sessions) == 1
    session = rig.sessions[0]
    assert session.id == first["id"]
    assert session.interruptions == 0
    assert_energy(session, end.since(start))
    assert not session.complete  # nothing was lost here, but a restart may lose anything
    assert json.loads(state.read_text()) == {"version": 1, "session": None}


def test_a_session_whose_data_is_gone_after_a_restart_ends_as_such(tmp_path: Path) -> None:
    """Unplugged and parked while the gateway was off: the cable state never comes back,
    so the session ends ``charge_end_s`` after the restart, at the last flow known."""
    state = tmp_path / "charge.json"
    sim = plugged_car()
    rig = attach(sim, state_file=state)
    start = sim.truth()
    sim.charge(120)
    end = sim.truth()
    rig.recorder.save()
    sim.stop_gateway()
    sim.park(60)
    sim.start_gateway()
    rig = attach(sim, state_file=state)
    sim.park(END_S - 5)
    assert rig.sessions == []
    sim.park(10)
    assert len(rig.sessions) == 1
    session = rig.sessions[0]
    assert session.end_reason == "gateway_restart"
    assert end.at - 1.0 <= session.end <= end.at
    assert_energy(session, end.since(start))
    assert not session.complete


def test_a_broken_state_file_is_counted_and_ignored(tmp_path: Path) -> None:
    state = tmp_path / "charge.json"
    state.write_text(json.dumps({"version": 1, "session": {"id": "x", "start": "noon"}}))
    sim = plugged_car()
    rig = attach(sim, state_file=state)
    assert rig.recorder.current() is None
    assert sim.counters.get("insights.state_file_errors") == 1
    sim.charge(30)
    assert rig.recorder.current() is not None


def test_the_state_file_is_written_only_when_it_changes(tmp_path: Path) -> None:
    state = tmp_path / "charge.json"
    sim = plugged_car()
    rig = attach(sim, state_file=state)
    rig.recorder.save()
    assert json.loads(state.read_text()) == {"version": 1, "session": None}
    state.unlink()
    sim.park(5, bus_awake=True)
    rig.recorder.save()
    assert not state.exists()  # nothing open and nothing changed: no write
    sim.charge(30)
    opened = json.loads(state.read_text())["session"]  # written when the session opened
    rig.recorder.save()
    assert json.loads(state.read_text())["session"]["so_far"] != opened["so_far"]
    state.unlink()
    rig.recorder.save()
    assert not state.exists()


def test_a_finished_session_is_handed_on_before_its_state_file_is_cleared(
        tmp_path: Path) -> None:
    """The consumer stores the record durably; until it has, a power cut must find the
    session in the state file (and repeat it under the same id) rather than lose it."""
    state = tmp_path / "charge.json"
    sim = plugged_car()
    in_file: list[tuple[str, Any]] = []

    def on_session(session: ChargeSession) -> None:
        in_file.append((session.id, json.loads(state.read_text())["session"]))

    recorder = ChargeRecorder(sim.store, sim.meter, sim.clock, SETTINGS, on_session, state,
                              counters=sim.counters)
    sim.each_second.append(recorder.update)
    sim.charge(30)
    sim.park(5, bus_awake=True)
    assert len(in_file) == 1
    session_id, stored = in_file[0]
    assert stored is not None
    assert stored["id"] == session_id
    assert json.loads(state.read_text()) == {"version": 1, "session": None}


# ---- driving off, and gaps ------------------------------------------------------------------


@pytest.mark.parametrize(("unmapped", "reason"), [
    ((CABLE,), "driven_off"), ((CABLE, READY, IGNITION, SPEED), "stopped")])
def test_regeneration_after_driving_off_is_not_charge(unmapped: tuple[str, ...],
                                                      reason: str) -> None:
    """A car that does not report its cable, charged and then driven off: regeneration on
    the road neither keeps the session open nor adds to it. The session ends at the first
    sign of driving; on a car that reports none, ``charge_end_s`` after the charge."""
    sim = plugged_car(profile=profile_without(*unmapped))
    rig = attach(sim)
    sim.park(2, bus_awake=True)
    start = sim.truth()
    sim.charge(300)
    end = sim.truth()
    sim.drive(END_S + 10)
    assert sim.truth().since(end).energy_in_wh > 5  # regeneration did flow into the pack
    assert [s.end_reason for s in rig.sessions] == [reason]
    session = rig.sessions[0]
    assert end.at - 1.0 <= session.end <= end.at
    assert reason != "driven_off" or rig.emitted_at[0] <= end.at + 1.0  # at once
    assert_energy(session, end.since(start))
    assert session.max_power_w == pytest.approx(CHARGER_POWER_W, rel=0.01)
    assert (session.interruptions, session.complete) == (0, True)


def test_a_gap_in_the_pack_samples_makes_a_session_incomplete() -> None:
    """A BMS silent for 5 s mid-charge: what flowed then is unknown. A silence after the
    charge stopped, with the cable still in, leaves the session's energy whole."""
    sim = plugged_car()
    rig = attach(sim)
    for paused in (False, True):
        start = sim.truth()
        sim.charge(60)
        stopped = sim.truth()
        if paused:
            sim.pause_charger()
            sim.charge(40)
        sim.ecus.silenced.add("BMS")
        sim.run(5)
        sim.ecus.silenced.discard("BMS")
        sim.run(20)
        sim.park(5, bus_awake=True)
        sim.resume_charger()
    assert sim.counters.get("insights.energy_gaps") == 2
    assert [s.end_reason for s in rig.sessions] == ["unplugged", "unplugged"]
    assert [s.complete for s in rig.sessions] == [False, True]
    assert_energy(rig.sessions[1], stopped.since(start))


def test_ignition_on_while_plugged_in_is_not_driving_off() -> None:
    """Preconditioning: the driver switches the ignition on with the cable in. Only the
    cable coming out (or motion) ends the session."""
    sim = plugged_car()
    rig = attach(sim)
    sim.park(5, bus_awake=True)
    start = sim.truth()
    sim.ecus.overrides["BCM_Status"] = {"BCM_Ignition": 2}  # ON
    sim.charge(120)
    end = sim.truth()
    sim.ecus.overrides.clear()
    sim.park(10, bus_awake=True)
    assert [s.end_reason for s in rig.sessions] == ["unplugged"]
    assert_energy(rig.sessions[0], end.since(start))
