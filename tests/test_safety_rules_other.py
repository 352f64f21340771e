"""Motor, 12 V, fault-flag and plausibility rules on the reference car, and what every rule
shares: stale input, hysteresis, alert contents, latching and reset."""

from __future__ import annotations

import pytest

from gateway.alerts import Severity
from gateway.safety.rules import build_rules
from tests.safety_car import STEP, Car, check_limit, held

BMS_BITS = ("CellOverVoltage", "CellUnderVoltage", "OverTempDischarge", "OverTempCharge",
            "UnderTemp", "OverCurrentDischarge", "OverCurrentCharge", "CellImbalance",
            "Insulation", "ContactorWelded", "PrechargeFailed", "AfeComm", "TempSensor")
MCU_BITS = ("OverCurrent", "OverVoltage", "UnderVoltage", "MotorOverTemp", "InverterOverTemp",
            "PositionSensor", "PhaseLoss", "Stall", "CanTimeout", "GateDriver")
KMH_PER_RPM = 2 * 3.141592653589793 * 0.28 * 60 / 1000 / 8.5


@pytest.fixture
def car(ref_pipeline):
    return Car(ref_pipeline)


@pytest.mark.parametrize(("key", "message", "signal", "value", "level", "limit", "debounce"), [
    ("motor.overtemp", "MCU_Thermal", "MCU_MotorTemp", 150, 2, 150.0, 3.0),
    ("motor.overtemp", "MCU_Thermal", "MCU_MotorTemp", 149, 1, 130.0, 3.0),
    ("motor.overtemp", "MCU_Thermal", "MCU_MotorTemp", 130, 1, 130.0, 3.0),
    ("motor.overtemp", "MCU_Thermal", "MCU_MotorTemp", 129, 0, None, 3.0),
    ("motor.inverter_overtemp", "MCU_Thermal", "MCU_InverterTemp", 90, 2, 90.0, 3.0),
    ("motor.inverter_overtemp", "MCU_Thermal", "MCU_InverterTemp", 89, 1, 80.0, 3.0),
    ("motor.inverter_overtemp", "MCU_Thermal", "MCU_InverterTemp", 80, 1, 80.0, 3.0),
    ("motor.inverter_overtemp", "MCU_Thermal", "MCU_InverterTemp", 79, 0, None, 3.0),
    ("aux_battery.low", "BCM_Status", "BCM_Aux12V", 11.00, 2, 11.0, 30.0),
    ("aux_battery.low", "BCM_Status", "BCM_Aux12V", 11.01, 1, 11.8, 30.0),
    ("aux_battery.low", "BCM_Status", "BCM_Aux12V", 11.80, 1, 11.8, 30.0),
    ("aux_battery.low", "BCM_Status", "BCM_Aux12V", 11.81, 0, None, 30.0),
    # Wheel speed against a motor at standstill: 0.1 km/h resolution.
    ("plausibility.speed_vs_motor", "MCU_Drive", "MCU_VehicleSpeed", 5.0, 1, 5.0, 2.0),
    ("plausibility.speed_vs_motor", "MCU_Drive", "MCU_VehicleSpeed", 4.9, 0, None, 2.0),
    # |pack - sum of 30 x 3.300 V| in % of the pack; the 3 % lies between two 10 mV steps.
    ("plausibility.pack_vs_cells", "BMS_Pack", "BMS_PackVoltage", 102.07, 1, 3.0, 5.0),
    ("plausibility.pack_vs_cells", "BMS_Pack", "BMS_PackVoltage", 102.06, 0, None, 5.0),
    ("plausibility.pack_vs_cells", "BMS_Pack", "BMS_PackVoltage", 96.11, 1, 3.0, 5.0),
    ("plausibility.pack_vs_cells", "BMS_Pack", "BMS_PackVoltage", 96.12, 0, None, 5.0),
])
def test_limit_and_one_raw_step_short(car, key, message, signal, value, level, limit, debounce):
    shown = None
    if key == "plausibility.pack_vs_cells":
        shown = abs(value - sum(car.cells)) / value * 100
    check_limit(car, key, message, signal, value, level, limit, debounce, shown)


@pytest.mark.parametrize(("node", "message", "bit"),
                         [("bms", "BMS_Faults", b) for b in BMS_BITS]
                         + [("mcu", "MCU_Faults", b) for b in MCU_BITS])
def test_every_fault_flag_is_critical_after_its_debounce(car, node, message, bit):
    key = f"{node}.fault.{bit}"
    check_limit(car, key, message, f"{message[:3]}_Flt_{bit}", 1, 2, 1.0, 0.3)
    assert "fault" in car.active(key).message and bit in car.active(key).message
    # latch "clear": the flag going away clears it after clear_s (1 s).
    car.set(message, **{f"{message[:3]}_Flt_{bit}": 0})
    assert held(car, key, 1.0) == [2] * 31 + [0]


@pytest.mark.parametrize("message", ["BMS_Faults", "MCU_Faults"])
@pytest.mark.parametrize(("raw", "level"), [(0, 0), (1, 1), (2, 1), (3, 2)])
def test_controller_fault_level(car, message, raw, level):
    # The DBC's value table: None, Warning, Derate, Shutdown.
    key = f"{message[:3].lower()}.fault_level"
    limit = {0: None, 1: 1.0, 2: 2.0}[level]
    check_limit(car, key, message, f"{message[:3]}_FaultLevel", raw, level, limit, 0.3,
                shown=float(level))


def test_speed_vs_motor_uses_the_drivetrain_ratio_in_both_directions(car):
    # 50 km/h forward and in reverse: 4026 rpm x 0.012419 km/h per rpm = 49.999 km/h
    for rpm in (4026, -4026):
        car.set("MCU_Drive", MCU_VehicleSpeed=50.0, MCU_MotorSpeed=rpm)
        assert set(held(car, "plausibility.speed_vs_motor", 4.0)) == {0}
        assert car.rule("plausibility.speed_vs_motor").machine.value == pytest.approx(
            abs(50.0 - 4026 * KMH_PER_RPM))
    car.set("MCU_Drive", MCU_MotorSpeed=4500)  # 55.89 km/h against 50.0
    assert held(car, "plausibility.speed_vs_motor", 2.0)[-1] == 1


@pytest.mark.parametrize(("gnss", "level"), [(30.0, 1), (29.9, 0), (10.0, 1), (10.1, 0)])
def test_speed_vs_gnss_with_a_registered_gnss_slot(ref_pipeline, gnss, level):
    car = Car(ref_pipeline, gnss=True)
    key = "plausibility.speed_vs_gnss"
    assert car.rule(key).inputs[1] is car.gnss
    car.gnss_kmh = gnss
    car.set("MCU_Drive", MCU_VehicleSpeed=20.0, MCU_MotorSpeed=1610)  # motor agrees
    levels = held(car, key, 5.0)
    assert levels[-2:] == [0, level]
    if level:
        alert = car.active(key)
        assert alert is not None
        assert (alert.severity, alert.limit) == (Severity.WARNING, 10.0)
        assert alert.value == pytest.approx(abs(gnss - 20.0))


def test_speed_vs_gnss_holds_while_gnss_is_missing(ref_pipeline):
    car = Car(ref_pipeline, gnss=True)
    key = "plausibility.speed_vs_gnss"
    car.set("MCU_Drive", MCU_VehicleSpeed=40.0, MCU_MotorSpeed=3221)
    assert set(held(car, key, 10.0)) == {0}, "no fix yet: nothing to compare"
    car.gnss_kmh = 60.0
    assert held(car, key, 5.0 + STEP)[-2:] == [0, 1]
    car.gnss_kmh = None  # the receiver loses its fix; the slot goes stale after 2 s
    car.set("MCU_Drive", MCU_VehicleSpeed=60.0, MCU_MotorSpeed=4831)
    assert set(held(car, key, 10.0)) == {1}, "stale GNSS neither confirms nor clears"


def test_soc_jump_raises_at_once_and_clears_60_s_after_the_window(car):
    key = "plausibility.soc_jump"
    car.set("BMS_Soc", BMS_SoC=64.9)
    assert car.level(key) == 0
    car.set("BMS_Soc", BMS_SoC=65.0)  # 5.0 points within the 10 s window, no debounce
    assert car.level(key) == 1
    assert car.active(key).value == pytest.approx(5.0)
    levels = held(car, key, 75.0)
    # The 60 % reading leaves the window after 10 s; the level clears 60 s after that.
    first_clear = levels.index(0)
    assert 69.0 <= (first_clear + 1) * STEP <= 70.0 + STEP
    assert set(levels[first_clear:]) == {0}


def test_soc_drift_outside_the_window_is_no_jump(car):
    key = "plausibility.soc_jump"
    for soc in (61.0, 62.0, 63.0, 64.0, 65.0, 66.0):  # 1 point per 3 s: 3.x within 10 s
        car.set("BMS_Soc", BMS_SoC=soc)
        assert set(held(car, key, 3.0)) == {0}
    car.quiet(1.0)
    car.set("BMS_Soc", BMS_SoC=55.0)
    assert car.level(key) == 1, "after the gap, the jump still counts against the window"


def test_pack_vs_cells_needs_a_positive_pack_voltage_and_every_cell(car):
    key = "plausibility.pack_vs_cells"
    car.set("BMS_Pack", BMS_PackVoltage=0.0)
    assert set(held(car, key, 10.0)) == {0}
    assert car.rule(key).measure(car.clock.time()) is None
    car.set("BMS_Pack", BMS_PackVoltage=110.0)
    car.silent.add("BMS_CellVoltages")
    assert set(held(car, key, 10.0)) == {0}, "a silent cell page: no sum to compare"
    car.silent.clear()
    assert held(car, key, 5.0 + STEP)[-2:] == [0, 1]


@pytest.mark.parametrize(("key", "message", "bad", "good"), [
    ("battery.cell_overvoltage", "BMS_CellStats", {"BMS_MaxCellVoltage": 3.7},
     {"BMS_MaxCellVoltage": 3.3}),
    ("motor.overtemp", "MCU_Thermal", {"MCU_MotorTemp": 160}, {"MCU_MotorTemp": 40}),
    ("battery.overcurrent_discharge", "BMS_Pack", {"BMS_PackCurrent": 400.0},
     {"BMS_PackCurrent": 0.0}),
    ("bms.fault.AfeComm", "BMS_Faults", {"BMS_Flt_AfeComm": 1}, {"BMS_Flt_AfeComm": 0}),
    ("plausibility.speed_vs_motor", "MCU_Drive", {"MCU_VehicleSpeed": 30.0},
     {"MCU_VehicleSpeed": 0.0}),
])
def test_stale_input_neither_raises_nor_clears(car, key, message, bad, good):
    debounce = car.rule(key).machine.spec.debounce_s
    car.set(message, **bad)
    car.quiet(1.0)  # beyond every stale window, before the debounce
    car.quiet(debounce + 1.0)
    assert car.level(key) == 0, "silence does not complete a debounce"
    car.set(message, **bad)
    assert car.level(key) == 0, "the debounce restarted when data came back"
    car.run(debounce)
    level = car.level(key)
    assert level > 0
    car.set(message, **good)
    car.quiet(60.0)
    assert car.level(key) == level, "a silent ECU never looks fixed"
    assert [t for t, _ in car.sink.of(key)] == ["raised"]


def test_frames_failing_their_crc_are_unknown_input(car):
    key = "bms.fault_level"
    car.set("BMS_Faults", BMS_FaultLevel=3)
    car.run(0.5)
    assert car.level(key) == 2
    car.corrupt.add("BMS_Faults")
    car.set("BMS_Faults", BMS_FaultLevel=0)  # claims to be fine, but fails its CRC
    assert set(held(car, key, 5.0)) == {2}
    assert car.pipeline.counters.get("rx.BMS_Faults.bad_checksum") > 100
    car.corrupt.clear()
    assert held(car, key, 1.0 + STEP)[-2:] == [2, 0]


def test_hysteresis_through_real_frames(car):
    key = "motor.overtemp"
    car.set("MCU_Thermal", MCU_MotorTemp=130)
    car.run(3.0)
    assert car.level(key) == 1
    car.set("MCU_Thermal", MCU_MotorTemp=125)  # 130 - 5: still on
    assert set(held(car, key, 30.0)) == {1}
    car.set("MCU_Thermal", MCU_MotorTemp=124)
    assert held(car, key, 3.0)[-2:] == [1, 0]


def test_alerts_carry_value_limit_source_time_and_severity(car):
    key = "battery.cell_undervoltage"
    car.lag = 1 / 64  # frames stamped a bit before the gateway sees them
    car.set("BMS_CellStats", BMS_MinCellVoltage=2.75)
    car.run(2.0)
    [(transition, alert)] = car.sink.of(key)
    assert transition == "raised"
    assert (alert.severity, alert.value, alert.limit) == (Severity.WARNING, 2.75, 2.8)
    assert alert.source_ts == car.clock.time() - car.lag != alert.raised_at
    assert alert.signal == "Vehicle.Powertrain.TractionBattery.CellVoltage.Min"
    assert alert.message.startswith("Cell under-voltage: 2.75 V") and "2.8 V" in alert.message
    car.set("BMS_CellStats", BMS_MinCellVoltage=2.4)
    car.run(2.0)
    transition, alert = car.sink.of(key)[-1]
    assert (transition, alert.severity, alert.value, alert.limit) == \
        ("updated", Severity.CRITICAL, 2.4, 2.5)
    car.set("BMS_CellStats", BMS_MinCellVoltage=3.3)
    car.run(2.0)
    transition, alert = car.sink.of(key)[-1]
    assert (transition, alert.value) == ("cleared", 3.3), "latch clear: gone once all clear"
    assert alert.source_ts == car.clock.time() - car.lag


def test_clear_latch_keeps_critical_while_a_warning_remains(car):
    key = "battery.insulation"
    car.set("BMS_Faults", BMS_InsulationResistance=5)
    car.run(5.0)
    car.set("BMS_Faults", BMS_InsulationResistance=30)  # only a warning now
    assert set(held(car, key, 20.0)) == {2}
    assert car.active(key).severity is Severity.CRITICAL
    car.set("BMS_Faults", BMS_InsulationResistance=2500)
    assert held(car, key, 5.0)[-2:] == [2, 0]
    assert car.active(key) is None


def test_reset_latch_and_monitor_reset(car):
    key = "battery.cell_overvoltage"
    car.set("BMS_CellStats", BMS_MaxCellVoltage=3.7)
    car.run(2.0)
    assert car.monitor.reset() == [], "a reset while still faulty does nothing"
    assert car.level(key) == 2
    car.set("BMS_CellStats", BMS_MaxCellVoltage=3.3)
    car.run(30.0)
    assert car.level(key) == 2 and car.rule(key).machine.waiting_for_reset
    assert car.active(key).severity is Severity.CRITICAL
    text, limit = car.rule(key).describe(2)
    assert text.endswith("(latched: needs a reset)") and limit == 3.65
    assert car.monitor.reset("motor.overtemp") == []
    assert car.monitor.reset(key) == [key]
    assert car.active(key) is None
    assert car.sink.of(key)[-1][0] == "cleared"
    assert car.monitor.reset(key) == [], "nothing left to reset"
    car.run(5.0)
    assert car.level(key) == 0


def test_a_latch_waiting_for_reset_is_published(car):
    key = "battery.cell_overvoltage"
    car.set("BMS_CellStats", BMS_MaxCellVoltage=3.7)
    car.run(2.0)
    car.set("BMS_CellStats", BMS_MaxCellVoltage=3.3)
    car.run(5.0)
    transition, alert = car.sink.of(key)[-1]
    assert transition == "updated" and alert.severity is Severity.CRITICAL
    assert alert.message.endswith("(latched: needs a reset)")
    assert car.active(key) == alert


def test_describe_without_a_level_or_a_value(car):
    rule = car.rule("motor.overtemp")
    assert rule.describe(0) == ("Motor over-temperature", None)
    unmeasured = {r.key: r for r in build_rules(car.store, car.monitor.spec)}["motor.overtemp"]
    assert unmeasured.describe(2) == ("Motor over-temperature", 150.0)


def test_flag_rules_name_no_value(car):
    car.set("BMS_Faults", BMS_Flt_Insulation=1)
    car.run(0.5)
    alert = car.active("bms.fault.Insulation")
    assert alert.message == "BMS reports fault Insulation"
    assert (alert.value, alert.limit) == (1.0, 1.0)
