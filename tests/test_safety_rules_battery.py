"""Battery rules on the reference car: real CAN frames through the decoder into the store.

Each limit is checked at the limit and one raw DBC step short of it, with the
debounce timed to the step; the charge-only rules only while charging.
"""

from __future__ import annotations

import pytest

from gateway.safety import Motion
from tests.safety_car import STEP, Car, check_limit, held

TB = "Vehicle.Powertrain.TractionBattery"

CHARGE_RULES = ("battery.overtemp_charge", "battery.undertemp_charge")
DISCHARGE_RULES = ("battery.overtemp_discharge", "battery.undertemp_discharge")


@pytest.fixture
def car(ref_pipeline):
    return Car(ref_pipeline)


def test_the_reference_profile_builds_every_rule(car):
    keys = {r.key for r in car.monitor.rules}
    battery = {"battery.cell_overvoltage", "battery.cell_undervoltage", "battery.cell_imbalance",
               "battery.overtemp_discharge", "battery.overtemp_charge",
               "battery.undertemp_discharge", "battery.undertemp_charge",
               "battery.overcurrent_discharge", "battery.overcurrent_charge",
               "battery.insulation", "battery.soc_low"}
    other = {"motor.overtemp", "motor.inverter_overtemp", "aux_battery.low",
             "bms.fault_level", "mcu.fault_level", "plausibility.speed_vs_motor",
             "plausibility.soc_jump", "plausibility.pack_vs_cells"}
    bms_bits = {"CellOverVoltage", "CellUnderVoltage", "OverTempDischarge", "OverTempCharge",
                "UnderTemp", "OverCurrentDischarge", "OverCurrentCharge", "CellImbalance",
                "Insulation", "ContactorWelded", "PrechargeFailed", "AfeComm", "TempSensor"}
    mcu_bits = {"OverCurrent", "OverVoltage", "UnderVoltage", "MotorOverTemp",
                "InverterOverTemp", "PositionSensor", "PhaseLoss", "Stall", "CanTimeout",
                "GateDriver"}
    assert keys == (battery | other | {f"bms.fault.{b}" for b in bms_bits}
                    | {f"mcu.fault.{b}" for b in mcu_bits})
    assert "plausibility.speed_vs_gnss" not in keys, "the profile maps no GNSS speed"


def test_a_healthy_car_raises_nothing(car):
    verdicts = car.run(20.0)
    assert car.sink.events == []
    assert all(r.machine.level == 0 for r in car.monitor.rules)
    assert verdicts.pack_ok and verdicts.charging_allowed
    assert verdicts.motion is Motion.STATIONARY


# (key, message, signal, value, level, limit, debounce, shown)
LIMITS = [
    ("battery.cell_overvoltage", "BMS_CellStats", "BMS_MaxCellVoltage", 3.650, 2, 3.65, 2.0),
    ("battery.cell_overvoltage", "BMS_CellStats", "BMS_MaxCellVoltage", 3.649, 1, 3.6, 2.0),
    ("battery.cell_overvoltage", "BMS_CellStats", "BMS_MaxCellVoltage", 3.600, 1, 3.6, 2.0),
    ("battery.cell_overvoltage", "BMS_CellStats", "BMS_MaxCellVoltage", 3.599, 0, None, 2.0),
    ("battery.cell_undervoltage", "BMS_CellStats", "BMS_MinCellVoltage", 2.500, 2, 2.5, 2.0),
    ("battery.cell_undervoltage", "BMS_CellStats", "BMS_MinCellVoltage", 2.501, 1, 2.8, 2.0),
    ("battery.cell_undervoltage", "BMS_CellStats", "BMS_MinCellVoltage", 2.800, 1, 2.8, 2.0),
    ("battery.cell_undervoltage", "BMS_CellStats", "BMS_MinCellVoltage", 2.801, 0, None, 2.0),
    ("battery.overtemp_discharge", "BMS_Temps", "BMS_MaxTemp", 60, 2, 60.0, 5.0),
    ("battery.overtemp_discharge", "BMS_Temps", "BMS_MaxTemp", 59, 1, 55.0, 5.0),
    ("battery.overtemp_discharge", "BMS_Temps", "BMS_MaxTemp", 55, 1, 55.0, 5.0),
    ("battery.overtemp_discharge", "BMS_Temps", "BMS_MaxTemp", 54, 0, None, 5.0),
    ("battery.undertemp_discharge", "BMS_Temps", "BMS_MinTemp", -20, 2, -20.0, 5.0),
    ("battery.undertemp_discharge", "BMS_Temps", "BMS_MinTemp", -19, 1, -15.0, 5.0),
    ("battery.undertemp_discharge", "BMS_Temps", "BMS_MinTemp", -15, 1, -15.0, 5.0),
    ("battery.undertemp_discharge", "BMS_Temps", "BMS_MinTemp", -14, 0, None, 5.0),
    # The DBC counts discharge as positive; the rules see amps out of / into the pack.
    ("battery.overcurrent_discharge", "BMS_Pack", "BMS_PackCurrent", 360.0, 2, 360.0, 2.0),
    ("battery.overcurrent_discharge", "BMS_Pack", "BMS_PackCurrent", 359.9, 1, 300.0, 2.0),
    ("battery.overcurrent_discharge", "BMS_Pack", "BMS_PackCurrent", 300.0, 1, 300.0, 2.0),
    ("battery.overcurrent_discharge", "BMS_Pack", "BMS_PackCurrent", 299.9, 0, None, 2.0),
    ("battery.overcurrent_charge", "BMS_Pack", "BMS_PackCurrent", -180.0, 2, 180.0, 2.0, 180.0),
    ("battery.overcurrent_charge", "BMS_Pack", "BMS_PackCurrent", -179.9, 1, 120.0, 2.0, 179.9),
    ("battery.overcurrent_charge", "BMS_Pack", "BMS_PackCurrent", -120.0, 1, 120.0, 2.0, 120.0),
    ("battery.overcurrent_charge", "BMS_Pack", "BMS_PackCurrent", -119.9, 0, None, 2.0),
    # 0.1 and 0.5 kOhm/V at 96 V: 9.6 and 48 kOhm, on a 1 kOhm grid.
    ("battery.insulation", "BMS_Faults", "BMS_InsulationResistance", 9, 2, 9.6, 5.0),
    ("battery.insulation", "BMS_Faults", "BMS_InsulationResistance", 10, 1, 48.0, 5.0),
    ("battery.insulation", "BMS_Faults", "BMS_InsulationResistance", 48, 1, 48.0, 5.0),
    ("battery.insulation", "BMS_Faults", "BMS_InsulationResistance", 49, 0, None, 5.0),
    ("battery.soc_low", "BMS_Soc", "BMS_SoC", 5.0, 2, 5.0, 10.0),
    ("battery.soc_low", "BMS_Soc", "BMS_SoC", 5.1, 1, 15.0, 10.0),
    ("battery.soc_low", "BMS_Soc", "BMS_SoC", 15.0, 1, 15.0, 10.0),
    ("battery.soc_low", "BMS_Soc", "BMS_SoC", 15.1, 0, None, 10.0),
]


@pytest.mark.parametrize(("key", "message", "signal", "value", "level", "limit", "debounce",
                          "shown"),
                         [(*c, None) if len(c) == 7 else c for c in LIMITS],
                         ids=[f"{c[0]}={c[3]}" for c in LIMITS])
def test_limit_and_one_raw_step_short(car, key, message, signal, value, level, limit, debounce,
                                      shown):
    check_limit(car, key, message, signal, value, level, limit, debounce, shown)


@pytest.mark.parametrize(("key", "charge_state", "value", "level", "limit"), [
    ("battery.overtemp_charge", 1, 50, 2, 50.0),
    ("battery.overtemp_charge", 1, 49, 1, 45.0),
    ("battery.overtemp_charge", 2, 45, 1, 45.0),
    ("battery.overtemp_charge", 1, 44, 0, None),
    ("battery.undertemp_charge", 1, 0, 2, 0.0),
    ("battery.undertemp_charge", 1, 1, 1, 2.0),
    ("battery.undertemp_charge", 2, 2, 1, 2.0),
    ("battery.undertemp_charge", 1, 3, 0, None),
])
def test_charge_temperature_limits_while_charging(car, key, charge_state, value, level, limit):
    car.set("BMS_Charge", BMS_ChargeState=charge_state)
    signal = "BMS_MaxTemp" if "overtemp" in key else "BMS_MinTemp"
    check_limit(car, key, "BMS_Temps", signal, value, level, limit, 5.0)


@pytest.mark.parametrize(("charge_state", "applies"), [
    (0, "discharge"),  # idle
    (3, "discharge"),  # complete
    (1, "charge"),     # constant current
    (7, "both"),       # SNA: unknown, so the stricter of both applies
    (6, "both"),       # outside the value table: invalid, unknown
])
def test_charge_and_discharge_temperature_rules_by_charging_state(car, charge_state, applies):
    car.set("BMS_Charge", BMS_ChargeState=charge_state)
    car.set("BMS_Temps", BMS_MaxTemp=55, BMS_MinTemp=0)
    car.run(5.0)
    charge = {"battery.overtemp_charge": 2, "battery.undertemp_charge": 2}
    discharge = {"battery.overtemp_discharge": 1, "battery.undertemp_discharge": 0}
    off = dict.fromkeys(charge, 0) | dict.fromkeys(discharge, 0)
    want = off | (charge if applies != "discharge" else {}) | \
        (discharge if applies != "charge" else {})
    assert {k: car.level(k) for k in want} == want


def test_starting_a_charge_clears_a_discharge_rule_after_clear_s(car):
    car.set("BMS_Temps", BMS_MaxTemp=61)
    car.run(5.0)
    assert car.level("battery.overtemp_discharge") == 2
    car.set("BMS_Charge", BMS_ChargeState=1)
    levels = held(car, "battery.overtemp_discharge", 5.0)
    assert levels == [2] * 159 + [0], "not applicable while charging: cleared after clear_s"
    assert car.level("battery.overtemp_charge") == 2, "the charge limit took over"
    assert [t for t, _ in car.sink.of("battery.overtemp_discharge")] == ["raised", "cleared"]


@pytest.mark.parametrize(("cell", "key", "volts", "level"), [
    (1, "battery.cell_overvoltage", 3.650, 2),
    (30, "battery.cell_overvoltage", 3.649, 1),
    (17, "battery.cell_undervoltage", 2.500, 2),
    (2, "battery.cell_undervoltage", 2.501, 1),
])
def test_a_single_cell_on_any_mux_page_counts(car, cell, key, volts, level):
    car.cells[cell - 1] = volts
    car.run(2.0 + STEP)
    assert car.level(key) == level
    assert car.rule(key).machine.value == volts


def test_the_opposite_statistic_is_ignored(car):
    # A BMS's Min statistic says nothing about the highest cell, and vice versa.
    car.set("BMS_CellStats", BMS_MinCellVoltage=3.7, BMS_MaxCellVoltage=2.4)
    car.run(4.0)
    assert car.level("battery.cell_overvoltage") == 0
    assert car.level("battery.cell_undervoltage") == 0


@pytest.mark.parametrize(("spread_mv", "level"), [(100, 2), (99, 1), (50, 1), (49, 0)])
def test_cell_imbalance_limit_at_rest(car, spread_mv, level):
    car.cells[5] = (3300 + spread_mv) / 1000
    car.step()
    levels = held(car, "battery.cell_imbalance", 10.0)
    assert levels[-2:] == [0, level], "raised exactly at the 10 s debounce"


@pytest.mark.parametrize("amps", [10.1, -10.1, 250.0])
def test_cell_imbalance_is_not_judged_under_load(car, amps):
    car.set("BMS_Pack", BMS_PackCurrent=amps)
    car.set_cells(3.45)
    assert set(held(car, "battery.cell_imbalance", 20.0)) == {0}
    car.set("BMS_Pack", BMS_PackCurrent=10.0)  # 10 A is still rest
    assert held(car, "battery.cell_imbalance", 10.0)[-1] == 2


def test_load_or_unknown_current_holds_an_imbalance_without_clearing_it(car):
    car.set_cells(3.45)
    car.run(10.0)
    assert car.level("battery.cell_imbalance") == 2
    car.set_cells(3.3)  # balanced again, but under load: no judgement
    car.set("BMS_Pack", BMS_PackCurrent=120.0)
    assert set(held(car, "battery.cell_imbalance", 20.0)) == {2}
    car.set("BMS_Pack", BMS_PackCurrent=-3276.8)  # raw -32768: not available
    assert set(held(car, "battery.cell_imbalance", 20.0)) == {2}
    car.set("BMS_Pack", BMS_PackCurrent=0.0)
    assert held(car, "battery.cell_imbalance", 10.0)[-1] == 0


@pytest.mark.parametrize(("soc", "judged"), [
    (19.9, False), (20.0, True), (90.0, True), (90.1, False),
    (102.3, False),  # raw 1023: not available
])
def test_cell_imbalance_is_judged_only_inside_the_soc_window(car, soc, judged):
    # The ends of the voltage curve are steep: a harmless SoC spread looks like imbalance.
    car.set("BMS_Soc", BMS_SoC=soc)
    car.set_cells(3.45)
    assert held(car, "battery.cell_imbalance", 10.0)[-1] == (2 if judged else 0)
