"""The pack meter: V x I and wheel speed integrated from decoded frames of the simulated car.

Every test runs the reference car's frames through the real decoder
(tests/insight_sim.py) and compares the meter's totals with the model's ground
truth or with values the test forces on the BMS frame.
"""

from __future__ import annotations

import pytest

from tests.insight_sim import InsightSim, profile_without

GAPS = "insights.energy_gaps"


def test_a_drive_matches_the_model_truth() -> None:
    """Two laps of the drive cycle: out, in (regen), Ah and distance to 0.05 %."""
    sim = InsightSim()
    sim.drive(2 * sim.lap_s)
    truth, got = sim.truth(), sim.meter.totals
    assert truth.energy_in_wh > 20  # the cycle brakes: there is regeneration to split off
    assert got.wh_out == pytest.approx(truth.energy_out_wh, rel=5e-4)
    assert got.wh_in == pytest.approx(truth.energy_in_wh, rel=5e-4)
    assert got.ah_out == pytest.approx(truth.ah_out, rel=5e-4)
    assert got.ah_in == pytest.approx(truth.ah_in, rel=5e-4)
    assert got.km_speed == pytest.approx(truth.distance_km, rel=5e-4)
    assert sim.counters.get(GAPS) == 0


def test_a_charge_matches_the_model_truth() -> None:
    sim = InsightSim()
    sim.charge(120)
    truth, got = sim.truth(), sim.meter.totals
    assert truth.energy_in_wh == pytest.approx(3300 * 120 / 3600, rel=0.01)
    assert got.wh_in == pytest.approx(truth.energy_in_wh, rel=5e-4)
    assert got.ah_in == pytest.approx(truth.ah_in, rel=5e-4)
    assert got.wh_out < 0.05  # sensor noise around a steady charge current, nothing else
    assert sim.meter.power_w == pytest.approx(3300, rel=0.03)


def test_direction_split_of_forced_readings() -> None:
    """100 V and 10 A into the pack for 60 s, then 20 A out for 30 s: 16.7 Wh each way."""
    sim = InsightSim()
    pack = sim.ecus.overrides.setdefault("BMS_Pack", {})
    pack.update(BMS_PackVoltage=100.0, BMS_PackCurrent=-10.0)  # the DBC counts discharge +
    sim.park(60, bus_awake=True)
    assert sim.meter.power_w == pytest.approx(1000.0)  # + = into the pack, as VSS
    pack["BMS_PackCurrent"] = 20.0
    sim.park(30, bus_awake=True)
    got = sim.meter.totals
    # One 20 ms interval straddles the reversal: at most 2 kW x 20 ms = 0.011 Wh either way.
    assert got.wh_in == pytest.approx(1000 * 60 / 3600, abs=0.02)
    assert got.wh_out == pytest.approx(2000 * 30 / 3600, abs=0.02)
    assert got.ah_in == pytest.approx(10 * 60 / 3600, abs=2e-4)
    assert got.ah_out == pytest.approx(20 * 30 / 3600, abs=2e-4)
    assert sim.meter.power_w == pytest.approx(-2000.0)


def test_a_silent_bms_is_a_counted_gap_and_not_bridged() -> None:
    """10 s without BMS frames mid-drive: one gap, and its energy is missing, not guessed."""
    sim = InsightSim()
    sim.drive(40)
    before = sim.truth()
    sim.ecus.silenced.add("BMS")
    sim.run(10)
    during = sim.truth().since(before)
    sim.ecus.silenced.discard("BMS")
    sim.run(40)
    truth, got = sim.truth(), sim.meter.totals
    assert sim.counters.get(GAPS) == 1
    assert during.energy_out_wh > 5  # the car drove on: there was energy to miss
    seen = truth.energy_out_wh - during.energy_out_wh
    # Bridging the gap would have added roughly the missing energy; the meter only has the
    # observed part (plus at most one 20 ms interval at each edge).
    assert got.wh_out == pytest.approx(seen, abs=0.1)
    assert got.wh_out < truth.energy_out_wh - during.energy_out_wh / 2


def test_invalid_readings_break_the_chain() -> None:
    """A "not available" current for 5 s: counted once, power unknown, energy not counted."""
    sim = InsightSim()
    sim.drive(30)
    before = sim.truth()
    sim.not_available("BMS_Pack", "BMS_PackCurrent")
    sim.run(5)
    assert sim.meter.power_w is None
    during = sim.truth().since(before)
    sim.ecus.overrides.pop("BMS_Pack")
    sim.run(30)
    truth, got = sim.truth(), sim.meter.totals
    assert sim.counters.get(GAPS) == 1
    seen_out = truth.energy_out_wh - during.energy_out_wh
    seen_in = truth.energy_in_wh - during.energy_in_wh
    assert got.wh_out + got.wh_in == pytest.approx(seen_out + seen_in, abs=0.1)
    assert sim.meter.power_w is not None


def test_a_clock_set_back_is_a_gap_and_the_meter_goes_on_from_there() -> None:
    """The wall clock jumps back 30 s mid-drive (the frames' timestamps with it): one gap,
    and the drive after the jump is integrated at once, not only once time catches up."""
    sim = InsightSim()
    sim.drive(30)
    sim.start -= 30.0  # every later frame is stamped 30 s earlier than it would have been
    sim.drive(40)
    truth, got = sim.truth(), sim.meter.totals
    assert sim.counters.get(GAPS) == 1
    # Only the 20 ms interval across the jump is missing (<= 60 kW x 20 ms = 0.33 Wh).
    assert got.wh_out == pytest.approx(truth.energy_out_wh, abs=0.35)
    assert got.ah_out == pytest.approx(truth.ah_out, abs=0.004)
    assert got.km_speed == pytest.approx(truth.distance_km, abs=0.001)


def test_a_sleeping_bus_adds_nothing_and_the_same_batch_counts_once() -> None:
    sim = InsightSim()
    sim.park(10, bus_awake=True)
    awake = sim.meter.totals
    assert awake.wh_out == pytest.approx(sim.truth().energy_out_wh, rel=0.05)  # 0.3 A standby
    sim.park(600)
    assert sim.meter.totals == awake
    sim.meter.on_batch()  # nothing new arrived: the same samples are not integrated twice
    assert sim.meter.totals == awake
    assert sim.counters.get(GAPS) == 0  # nothing has come after the silence yet
    sim.park(5, bus_awake=True)
    assert sim.counters.get(GAPS) == 1


def test_unmapped_pack_signals_make_the_meter_unavailable() -> None:
    assert InsightSim().meter.available
    bare = InsightSim(profile=profile_without("Vehicle.Powertrain.TractionBattery.CurrentCurrent"))
    assert not bare.meter.available
    bare.drive(20)
    assert bare.meter.totals.wh_out == 0.0
    assert bare.meter.totals.km_speed > 0.05  # the wheel speed is still integrated
