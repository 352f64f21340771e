"""Verdicts on the reference car: motion, pack_ok and charging_allowed with their reasons."""

from __future__ import annotations

import math

import pytest

from gateway.config.limits import preset
from gateway.config.safety import SafetySpec
from gateway.safety import Motion
from gateway.safety.monitor import VERDICT_PATHS
from gateway.safety.rules import build_rules
from gateway.safety.verdicts import MotionJudge, charging_verdict, pack_verdict
from gateway.state import SignalState, StateStore
from tests.safety_car import STEP, Car

TB = "Vehicle.Powertrain.TractionBattery"


@pytest.fixture
def car(ref_pipeline):
    return Car(ref_pipeline)


def motions(car: Car, seconds: float) -> list[Motion]:
    out = []
    for _ in range(round(seconds / STEP)):
        out.append(car.step().motion)
    return out


def test_stationary_only_after_the_hold_time(car):
    car.set("MCU_Drive", MCU_VehicleSpeed=30.0, MCU_MotorSpeed=2416)
    assert car.verdicts.motion is Motion.MOVING and car.verdicts.motion_reasons == ("moving",)
    car.set("MCU_Drive", MCU_VehicleSpeed=0.0, MCU_MotorSpeed=0)
    assert (car.verdicts.motion, car.verdicts.motion_reasons) == (Motion.MOVING, ("stopping",))
    seen = motions(car, 1.0)
    assert seen == [Motion.MOVING] * 31 + [Motion.STATIONARY], "1 s after the first standstill"
    assert car.verdicts.stationary and car.verdicts.motion_reasons == ()


@pytest.mark.parametrize(("kmh", "rpm", "moving"), [
    (0.5, 0, False), (0.6, 0, True),   # wheel speed: standstill up to 0.5 km/h
    (0.0, 40, False), (0.0, 41, True),  # motor: 40 rpm = 0.497 km/h, 41 rpm = 0.509 km/h
    (0.0, -41, True),                   # reverse is motion too
])
def test_standstill_threshold_on_every_speed_input(car, kmh, rpm, moving):
    car.set("MCU_Drive", MCU_VehicleSpeed=kmh, MCU_MotorSpeed=rpm)
    car.run(2.0)
    assert car.verdicts.motion is (Motion.MOVING if moving else Motion.STATIONARY)


@pytest.mark.parametrize(("signals", "reason"), [
    ({"MCU_VehicleSpeed": 409.5}, "speed_unavailable"),   # raw 4095: SNA
    ({"MCU_MotorSpeed": -32768}, "motor_speed_unavailable"),  # raw -32768: SNA
])
def test_an_invalid_speed_input_makes_motion_unknown(car, signals, reason):
    car.run(2.0)
    assert car.verdicts.stationary
    car.set("MCU_Drive", **signals)
    assert (car.verdicts.motion, car.verdicts.motion_reasons) == (Motion.UNKNOWN, (reason,))
    car.set("MCU_Drive", MCU_VehicleSpeed=0.0, MCU_MotorSpeed=0)
    assert car.verdicts.motion is Motion.MOVING, "the hold starts again"
    assert motions(car, 1.0)[-1] is Motion.STATIONARY


def test_a_silent_motor_controller_makes_motion_unknown(car):
    car.run(2.0)
    car.silent.add("MCU_Drive")
    seen = motions(car, 0.125)
    # Three 20 ms cycles: stale after 60 ms.
    assert seen[:1] == [Motion.STATIONARY] and seen[-1] is Motion.UNKNOWN
    assert car.verdicts.motion_reasons == ("speed_unavailable",)


@pytest.mark.parametrize(("gnss", "motion"), [
    (5.0, Motion.STATIONARY), (5.1, Motion.MOVING), (-6.0, Motion.MOVING),
    (None, Motion.STATIONARY),  # no fix (a garage) must not block anything
    (math.nan, Motion.STATIONARY), (math.inf, Motion.STATIONARY), (True, Motion.STATIONARY),
    ("fast", Motion.STATIONARY),  # not numbers: unknown, so no evidence either way
])
def test_gnss_only_adds_evidence_of_motion(ref_pipeline, gnss, motion):
    car = Car(ref_pipeline, gnss=True)
    car.gnss_kmh = gnss
    car.run(2.0)
    assert car.verdicts.motion is motion


def test_gnss_motion_restarts_the_hold(ref_pipeline):
    car = Car(ref_pipeline, gnss=True)
    car.run(2.0)
    car.gnss_kmh = 20.0
    assert car.step().motion is Motion.MOVING
    car.gnss_kmh = 0.0
    assert motions(car, 1.0 + STEP) == [Motion.MOVING] * 32 + [Motion.STATIONARY]


def _store(*paths: str) -> StateStore:
    store = StateStore()
    for path in paths:
        store.register(SignalState(path, "", "number", "motion", stale_after=1.0))
    return store


def test_without_a_speed_signal_motion_is_unknown():
    judge = MotionJudge(_store("Vehicle.Powertrain.TractionMotor.Speed"), SafetySpec())
    assert judge.judge(0.0) == (Motion.UNKNOWN, ("no_speed_signal",))


def test_motor_speed_counts_only_with_a_drivetrain_ratio():
    store = _store("Vehicle.Speed", "Vehicle.Powertrain.TractionMotor.Speed")
    store.slot("Vehicle.Speed").set(0.0, 0.0)
    store.slot("Vehicle.Powertrain.TractionMotor.Speed").set(9000, 0.0)
    spec = SafetySpec(stationary_hold_s=0.0)
    assert MotionJudge(store, spec).judge(0.5)[0] is Motion.STATIONARY
    geared = SafetySpec(stationary_hold_s=0.0, gear_ratio=8.5, wheel_radius_m=0.28)
    assert MotionJudge(store, geared).judge(0.5)[0] is Motion.MOVING


def test_pack_ok_when_healthy_and_the_verdict_slots_are_in_the_store(car):
    v = car.run(2.0)
    assert (v.pack_ok, v.pack_reasons, v.charging_allowed, v.charging_reasons) == \
        (True, (), True, ())
    now = car.clock.time()
    store = car.store
    assert store.good_value(VERDICT_PATHS["motion"], now) == "stationary"
    assert store.good_value(VERDICT_PATHS["pack_ok"], now) is True
    assert store.good_value(VERDICT_PATHS["charging_allowed"], now) is True
    assert {VERDICT_PATHS[k] for k in VERDICT_PATHS} == {
        "Vehicle.Safety.Motion", "Vehicle.Safety.PackOk", "Vehicle.Safety.ChargingAllowed"}
    # A stuck safety loop shows as stale verdicts.
    car.clock.advance(1.5)
    assert store.good_value(VERDICT_PATHS["pack_ok"], car.clock.time()) is None


@pytest.mark.parametrize("silent", ["BMS_Pack", "BMS_CellStats", "BMS_Temps"])
def test_missing_core_battery_data_means_pack_not_ok(car, silent):
    car.silent.add(silent)
    v = car.run(1.0)
    assert not v.pack_ok and v.pack_reasons == ("battery_data_unavailable",)
    assert not v.charging_allowed and v.charging_reasons[0] == "pack_not_ok"


def test_a_critical_battery_rule_makes_the_pack_not_ok(car):
    car.set("BMS_CellStats", BMS_MaxCellVoltage=3.62)
    v = car.run(2.0)
    assert v.pack_ok, "a warning does not gate the pack"
    assert v.charging_reasons == ("battery.cell_overvoltage",), "but it stops charging"
    car.set("BMS_CellStats", BMS_MaxCellVoltage=3.66)
    v = car.run(2.0)
    assert v.pack_reasons == ("battery.cell_overvoltage",)
    assert v.charging_reasons == ("pack_not_ok", "battery.cell_overvoltage")


def test_a_motor_rule_does_not_gate_the_pack(car):
    car.set("MCU_Thermal", MCU_MotorTemp=160)
    v = car.run(3.0)
    assert car.level("motor.overtemp") == 2
    assert v.pack_ok and v.charging_allowed


@pytest.mark.parametrize(("max_temp", "min_temp", "reasons"), [
    (45, 25, ("too_hot_to_charge",)),   # the charge window's warning levels
    (44, 25, ()),
    (25, 2, ("too_cold_to_charge",)),
    (25, 3, ()),
])
def test_the_charge_window_is_checked_before_a_charge(car, max_temp, min_temp, reasons):
    v = car.set("BMS_Temps", BMS_MaxTemp=max_temp, BMS_MinTemp=min_temp)
    assert v.charging_reasons == reasons
    assert v.pack_ok


def test_a_single_sensor_outside_the_window_counts(car):
    car.sensors[7] = 46.0
    assert car.step().charging_reasons == ("too_hot_to_charge",)


def test_no_pack_temperature_means_no_charging(car):
    car.silent.update({"BMS_Temps", "BMS_CellTemps"})
    v = car.run(1.0)
    assert v.charging_reasons == ("pack_not_ok", "pack_temperature_unavailable")


def test_verdicts_without_battery_data():
    store = _store("Vehicle.Speed")
    spec = SafetySpec(limits=preset("LFP"))
    rules = build_rules(store, spec)
    assert rules == []
    reasons = pack_verdict(store, rules, 0.0)
    assert reasons == ("no_battery_data",)
    assert charging_verdict(store, rules, spec, reasons, 0.0) == \
        ("pack_not_ok", "pack_temperature_unavailable")
