"""Replays of the simulated vehicle through the real pipeline and safety stage.

Healthy drives and charges must raise nothing; each injected fault must
raise exactly its alerts, no sooner than its debounce and no later than
debounce + one tick + one cycle of the message that carries it. Frames come
from hil.sim (see tests/safety_replay.py for how they are fed).
"""

from __future__ import annotations

import bisect
import functools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import can
import pytest

from gateway.alerts import Severity
from gateway.safety import Motion
from hil.sim import faults
from hil.sim.ecus import generate
from hil.sim.faults import Event, Simulation
from hil.sim.model import VehicleModel
from tests.safety_replay import (
    START,
    CapLoop,
    Harness,
    assert_raised_in_time,
    cycle_s,
    decoded,
    drive_with,
    first_bad_crc,
    first_repeated_counter,
    first_ts,
    last_ts,
    replay,
)

FAULT_AT = 5.0
LONG_STEP = 0.05
"""Model step of the long runs (generate's default is 5 ms). Frames are still stamped at
their exact due times; a frame's values are at most 50 ms old, far quicker than a charge or
the drive cycle's 4 s ramps change anything, and the model costs a tenth as much."""
CHARGING_STATE = "Vehicle.Powertrain.TractionBattery.Charging.State"


# ---- long healthy runs --------------------------------------------------------------


@dataclass
class DriveRun:
    """The replayed drive and what the test needs of its frames."""

    harness: Harness
    speeds: list[tuple[float, float]]
    """(timestamp, MCU_VehicleSpeed) of every MCU_Drive frame sent."""
    motion: list[tuple[float, Motion]]
    """The motion verdict at every tick."""


@pytest.fixture(scope="module")
def drive() -> DriveRun:
    """Ten simulated minutes of the drive cycle (three and a half laps)."""
    frames = generate(VehicleModel(mode="drive"), 600.0, step=LONG_STEP, start=START)
    h = Harness()
    motion: list[tuple[float, Motion]] = []
    h.on_tick.append(lambda: motion.append((h.clock.time(), h.safety.monitor.verdicts.motion)))
    h.feed(frames)
    speeds = [(ts, float(v["MCU_VehicleSpeed"])) for ts, v in decoded(frames, "MCU_Drive")]
    return DriveRun(h, speeds, motion)


@dataclass
class ChargeRun:
    """The replayed charge."""

    harness: Harness
    phases: list[str]
    """Charging states the gateway saw, in order, without repeats."""
    minutes: float


@pytest.fixture(scope="module")
def charge() -> ChargeRun:
    """A charge from 95 % until the BMS says Complete, and half a minute beyond."""
    model = VehicleModel(mode="charge", soc=95)
    sim = Simulation(model, step=LONG_STEP, start=START)
    h = Harness()
    phases: list[str] = []

    def probe() -> None:
        state = h.pipeline.store.slot(CHARGING_STATE).value
        if isinstance(state, str) and (not phases or phases[-1] != state):
            phases.append(state)

    h.on_tick.append(probe)
    while model.charge_state != 3 and sim.t < 3600:  # 3 = Complete
        h.feed(sim.advance(10.0))
    minutes = sim.t / 60
    h.feed(sim.advance(30.0))
    return ChargeRun(h, phases, minutes)


def test_drive_raises_no_alerts(drive: DriveRun) -> None:
    assert drive.harness.recorder.transitions == [], drive.harness.recorder.describe()


def test_drive_motion_verdict_follows_the_wheels(drive: DriveRun) -> None:
    stamps = [ts for ts, _ in drive.speeds]
    stationary = 0
    for at, motion in drive.motion[2:]:  # the first ticks come before the first frames
        speed = drive.speeds[bisect.bisect_right(stamps, at) - 1][1]
        if speed > 0.5:  # standstill_kmh: the car is moving
            assert motion is Motion.MOVING, (at - START, speed)
        assert motion is not Motion.UNKNOWN, at - START
        stationary += motion is Motion.STATIONARY
    assert max(s for _, s in drive.speeds) > 55  # the cycle's 60 km/h stretch was driven
    assert stationary > 100  # each lap stops for about 16 s: proven standstill there
    verdicts = drive.harness.safety.monitor.verdicts
    assert verdicts.pack_ok, verdicts.pack_reasons


def test_charge_reaches_cv_and_completes_with_good_verdicts(charge: ChargeRun) -> None:
    assert charge.phases == ["ConstantCurrent", "ConstantVoltage", "Complete"]
    assert 15 < charge.minutes < 30
    verdicts = charge.harness.safety.monitor.verdicts
    assert verdicts.pack_ok, verdicts.pack_reasons
    assert verdicts.charging_allowed, verdicts.charging_reasons
    assert verdicts.motion is Motion.STATIONARY


def test_charge_raises_no_alerts(charge: ChargeRun) -> None:
    assert charge.harness.recorder.transitions == [], charge.harness.recorder.describe()


def test_car_switched_off_raises_no_alerts() -> None:
    # The whole bus falls quiet at once: it sleeps, which is no receive timeout.
    events = [Event(FAULT_AT, faults.silence(node)) for node in ("BMS", "OBC", "MCU", "BCM")]
    h = replay(faults.run(VehicleModel(mode="drive"), FAULT_AT + 1.0, events, start=START),
               linger=3.0)
    assert h.recorder.transitions == [], h.recorder.describe()


# ---- injected faults ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One injected fault and the single alert it must raise."""

    events: list[Event]
    seconds: float
    key: str
    severity: Severity
    message: str
    detect_s: float
    """Debounce, plus any frames the receive check tolerates before it rejects."""
    first_fault: Callable[[list[can.Message]], float]


CASES = {
    "bms_fault_bit": Case(
        [Event(FAULT_AT, faults.set_signal("BMS_Faults", "BMS_Flt_Insulation", 1))], 7.0,
        "bms.fault.Insulation", Severity.CRITICAL, "BMS_Faults", 0.3,
        lambda fr: first_ts(fr, "BMS_Faults", lambda v: v["BMS_Flt_Insulation"] == 1)),
    "aux_12v_low": Case(
        [Event(FAULT_AT, faults.set_signal("BCM_Status", "BCM_Aux12V", 10.5))], 37.0,
        "aux_battery.low", Severity.CRITICAL, "BCM_Status", 30.0,
        lambda fr: first_ts(fr, "BCM_Status", lambda v: v["BCM_Aux12V"] < 11.0)),
    "bad_checksum": Case(
        [Event(FAULT_AT, faults.corrupt_checksum("BMS_Pack"))], 7.0,
        "rx.BMS_Pack.integrity", Severity.WARNING, "BMS_Pack", 0.5,
        lambda fr: first_bad_crc(fr, "BMS_Pack")),
    # The counter check is a leaky bucket: the 5th repeat (counter_tolerance) is rejected.
    "frozen_counter": Case(
        [Event(FAULT_AT, faults.freeze_counter("MCU_Drive"))], 7.0,
        "rx.MCU_Drive.integrity", Severity.WARNING, "MCU_Drive", 0.5 + 4 * 0.02,
        lambda fr: first_repeated_counter(fr, "MCU_Drive")),
}


@functools.cache
def run_case(name: str) -> tuple[list[can.Message], Harness]:
    """Frames and the harness that replayed them, once per case."""
    case = CASES[name]
    frames = drive_with(case.events, case.seconds)
    return frames, replay(frames)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fault_raises_exactly_its_alert_in_time(name: str) -> None:
    case = CASES[name]
    frames, h = run_case(name)
    assert h.recorder.raised_keys() == {case.key}, h.recorder.describe()
    assert h.recorder.history(case.key) == [("raised", case.severity)]
    assert_raised_in_time(h, case.key, case.severity, case.first_fault(frames), case.detect_s,
                          case.message)


def test_frozen_speed_counter_makes_motion_unknown() -> None:
    _, h = run_case("frozen_counter")
    verdicts = h.safety.monitor.verdicts
    assert verdicts.motion is Motion.UNKNOWN
    assert verdicts.motion_reasons == ("speed_unavailable",)
    assert h.pipeline.counters.get("rx.MCU_Drive.bad_counter") > 50


def test_cell_overvoltage_latches_until_reset() -> None:
    fault = "BMS_CellStats"
    frames = drive_with([Event(FAULT_AT, faults.set_signal(fault, "BMS_MaxCellVoltage", 3.70)),
                         Event(10.0, faults.clear_overrides(fault))], 16.0)
    h = Harness()
    split = bisect.bisect_right([f.timestamp for f in frames], START + 8.0)
    h.feed(frames[:split])
    key = "battery.cell_overvoltage"
    assert h.recorder.active_keys() == {key}
    assert h.safety.monitor.reset() == []  # the fault is still there: a reset cannot hide it
    h.feed(frames[split:])
    # Gone for six seconds, still critical: this latch needs an explicit reset.
    assert h.recorder.active_keys() == {key}
    assert "needs a reset" in h.recorder.active[0].message
    assert not h.safety.monitor.verdicts.pack_ok
    assert h.safety.monitor.reset() == [key]
    assert h.recorder.active_keys() == set()
    assert h.recorder.raised_keys() == {key}, h.recorder.describe()
    assert h.recorder.history(key) == [("raised", Severity.CRITICAL),
                                       ("updated", Severity.CRITICAL),  # now waits for reset
                                       ("cleared", Severity.CRITICAL)]
    assert_raised_in_time(h, key, Severity.CRITICAL,
                          first_ts(frames, fault, lambda v: v["BMS_MaxCellVoltage"] > 3.69),
                          2.0, fault)


def test_overtemperature_ramp_warns_then_goes_critical() -> None:
    ramp = faults.ramp("BMS_Temps", "BMS_MaxTemp", FAULT_AT, FAULT_AT + 12, 50, 62, every=1.0)
    frames = drive_with(ramp, 23.0)
    h = replay(frames)
    key = "battery.overtemp_discharge"
    assert h.recorder.raised_keys() == {key}, h.recorder.describe()
    assert h.recorder.history(key) == [("raised", Severity.WARNING),
                                       ("updated", Severity.CRITICAL)]
    for level, severity in ((55, Severity.WARNING), (60, Severity.CRITICAL)):
        def hot(v: dict[str, Any], level: int = level) -> bool:
            return bool(v["BMS_MaxTemp"] >= level)

        fault_ts = first_ts(frames, "BMS_Temps", hot)
        assert_raised_in_time(h, key, severity, fault_ts, 5.0, "BMS_Temps")


BMS_TIMEOUT_WINDOWS = {
    # Three cycles of the message (times its pages: every cell page comes round once in
    # ten frames, every temperature page once in two).
    "BMS_Pack": 0.06, "BMS_Soc": 0.3, "BMS_CellStats": 0.3, "BMS_Temps": 0.3,
    "BMS_Faults": 0.3, "BMS_CellVoltages": 0.6, "BMS_CellTemps": 0.6,
}
"""The BMS messages the safety rules read. BMS_Charge and BMS_ChargeRequest are not among
them (no rule input), so their silence raises nothing of its own."""


def test_bms_silence_times_out_exactly_the_messages_the_rules_read() -> None:
    frames = drive_with([Event(FAULT_AT, faults.silence("BMS"))], FAULT_AT + 3.0)
    h = replay(frames)
    expected = {f"rx.{m}.timeout" for m in BMS_TIMEOUT_WINDOWS}
    assert h.recorder.raised_keys() == expected, h.recorder.describe()
    assert h.recorder.active_keys() == expected
    for message, window in BMS_TIMEOUT_WINDOWS.items():
        first_missing = last_ts(frames, message) + cycle_s(message)
        assert_raised_in_time(h, f"rx.{message}.timeout", Severity.WARNING, first_missing,
                              window - cycle_s(message), message)
    verdicts = h.safety.monitor.verdicts
    assert not verdicts.pack_ok
    assert "battery_data_unavailable" in verdicts.pack_reasons
    assert not verdicts.charging_allowed


# ---- speed cap, closed loop -----------------------------------------------------------


@pytest.fixture
def cap_loop() -> Iterator[CapLoop]:
    """The valet cap selected, the gateway's requests reaching the simulated MCU."""
    h = Harness()
    assert h.safety.speed_cap is not None
    h.safety.speed_cap.select("valet")
    loop = CapLoop(h, Simulation(VehicleModel(mode="drive"), start=START),
                   f"speedcap-{uuid.uuid4().hex}")
    yield loop
    loop.close()


def test_compliant_mcu_holds_the_cap_without_alerts(cap_loop: CapLoop) -> None:
    cap_loop.run(20.0)
    h = cap_loop.harness
    assert h.recorder.transitions == [], h.recorder.describe()
    assert cap_loop.sent == 200  # one request per tick, none blocked
    speeds = [v["MCU_VehicleSpeed"] for _, v in decoded(cap_loop.frames, "MCU_Drive")]
    assert 19.0 <= max(speeds) <= 20 + 3  # the cycle asks for 30: the cap did the limiting
    reports = [v["MCU_SpeedLimitActive"] for _, v in decoded(cap_loop.frames, "MCU_Thermal")]
    assert reports[0] == 255  # sent before the first request arrived
    assert set(reports[1:]) == {20}


def test_mcu_ignoring_the_cap_raises_not_applied_then_overspeed(cap_loop: CapLoop) -> None:
    cap_loop.sim.ecus.ignore_speed_cap = True
    cap_loop.run(12.0)
    h = cap_loop.harness
    assert h.recorder.raised_keys() == {"speedcap.not_applied", "speedcap.overspeed"}, \
        h.recorder.describe()
    assert h.recorder.history("speedcap.not_applied") == [("raised", Severity.CRITICAL)]
    assert h.recorder.history("speedcap.overspeed") == [("raised", Severity.WARNING)]
    assert_raised_in_time(h, "speedcap.not_applied", Severity.CRITICAL, START, 1.0,
                          "MCU_Thermal")
    over = first_ts(cap_loop.frames, "MCU_Drive", lambda v: v["MCU_VehicleSpeed"] >= 23.0)
    assert_raised_in_time(h, "speedcap.overspeed", Severity.WARNING, over, 3.0, "MCU_Drive")
