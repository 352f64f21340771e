"""SpeedCap: the request frame on a real virtual bus, persistence, and its two checks fed by
MCU frames through the reference pipeline's decoder; and one end-to-end run against the
simulated vehicle on a virtual bus in real time."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import can
import pytest

from gateway.alerts import Severity
from gateway.app import Pipeline, Safety
from gateway.clock import ManualClock, SystemClock
from gateway.config import Profile
from gateway.config.safety import SpeedCapSpec
from gateway.safety import SpeedCap, TransmitGuard
from gateway.safety.speedcap import NOT_APPLIED, OVERSPEED
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle
from tests.safety_frames import SPEED_LIMIT, AlertLog, RefFrames, crc8

BUS = "vehicle"
TICK = 1 / 16
GUARD = 4.0
"""Real seconds after which the end-to-end run is declared hung (not a speed threshold)."""


class Rig:
    """A SpeedCap on the reference pipeline, its guard on a virtual bus, and an MCU."""

    def __init__(self, pipeline: Pipeline, clock: ManualClock, state_file: Path,
                 tx: can.BusABC, spec: SpeedCapSpec | None = None) -> None:
        self.pipeline = pipeline
        self.clock = clock
        self.state_file = state_file
        self.log = AlertLog()
        assert pipeline.alerts is not None
        pipeline.alerts.sink = self.log
        self.guard = TransmitGuard(pipeline.profile, pipeline.plans, clock, pipeline.counters,
                                   pipeline.rlog, pipeline.alerts)
        self.guard.attach(BUS, lambda: tx)
        spec = spec or pipeline.profile.safety.speed_cap
        assert spec is not None
        self.spec = spec
        self.cap = self.new_cap()
        self.frames = RefFrames()

    def new_cap(self, spec: SpeedCapSpec | None = None) -> SpeedCap:
        assert self.pipeline.alerts is not None
        return SpeedCap(spec or self.spec, self.guard, BUS, self.pipeline.store,
                        self.pipeline.alerts, self.clock, self.state_file)

    def run(self, seconds: float, speed: float | None = None, reports: int | None = None,
            report_every: int = 2) -> None:
        """``seconds`` of ticks: MCU_Drive with ``speed`` each tick (None: silent), MCU_Thermal
        with ``reports`` every ``report_every`` ticks (None: silent); evaluate each tick."""
        for i in range(round(seconds / TICK)):
            self.clock.advance(TICK)
            now = self.clock.time()
            batch = []
            if speed is not None:
                batch.append(self.frames.frame("MCU_Drive", now, {"MCU_VehicleSpeed": speed}))
            if reports is not None and i % report_every == 0:
                batch.append(self.frames.frame("MCU_Thermal", now,
                                               {"MCU_SpeedLimitActive": reports}))
            self.pipeline.decoders[BUS].process(batch)
            self.cap.evaluate(now)

    def report(self, value: int) -> float:
        """One MCU_Thermal frame now; returns its timestamp."""
        now = self.clock.time()
        self.pipeline.decoders[BUS].process(
            [self.frames.frame("MCU_Thermal", now, {"MCU_SpeedLimitActive": value})])
        return now


@pytest.fixture
def wire() -> Iterator[tuple[can.BusABC, can.BusABC]]:
    channel = f"speedcap-test-{uuid.uuid4().hex}"
    tx = can.Bus(interface="virtual", channel=channel)
    rx = can.Bus(interface="virtual", channel=channel)
    try:
        yield tx, rx
    finally:
        tx.shutdown()
        rx.shutdown()


@pytest.fixture
def rig(ref_pipeline, clock, tmp_path, wire) -> Rig:
    return Rig(ref_pipeline, clock, tmp_path / "speed_cap.json", wire[0])


def _received(rx: can.BusABC) -> list[dict[str, Any]]:
    frames = RefFrames()
    out = []
    while (f := rx.recv(timeout=0)) is not None:
        assert f.arbitration_id == frames.message("GW_SpeedLimit").frame_id
        assert f.data[7] == crc8(bytes(f.data[:7]))
        out.append(frames.decode("GW_SpeedLimit", bytes(f.data)))
    return out


# ---- the request frame and the persisted choice --------------------------------------------


def test_send_puts_the_cap_and_the_fixed_signals_on_the_bus(rig, wire, clock):
    assert rig.cap.active is None and rig.cap.cap_kmh is None
    assert rig.cap.send()
    for name, kmh in (("valet", 20), ("fleet", 60)):
        rig.cap.select(name)
        assert rig.cap.cap_kmh == kmh
        clock.advance(rig.cap.cycle_s)
        assert rig.cap.send()
    got = _received(wire[1])
    assert [v["GW_SpeedLimitRequest"] for v in got] == [255, 20, 60]
    assert all(v["GW_TorqueLimitRequest"] == 100 and v["GW_DerateRequest"] == 0 for v in got)
    assert [v["GW_SpeedLimit_Counter"] for v in got] == [0, 1, 2]


def test_the_choice_persists_across_restarts(rig):
    rig.cap.select("valet")
    assert json.loads(rig.state_file.read_text()) == {"profile": "valet"}
    assert rig.new_cap().active == "valet"
    rig.cap.select(None)
    assert rig.new_cap().active is None
    assert sorted(p.name for p in rig.state_file.parent.iterdir()) == ["speed_cap.json"]


def test_without_a_state_file_nothing_is_written(ref_pipeline, clock, tmp_path, wire):
    rig = Rig(ref_pipeline, clock, tmp_path / "unused.json", wire[0])
    assert ref_pipeline.alerts is not None
    cap = SpeedCap(rig.spec, rig.guard, BUS, ref_pipeline.store, ref_pipeline.alerts, clock)
    cap.select("fleet")
    assert cap.cap_kmh == 60
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", "{}", '{"profile": "sport"}', '{"profile": 5}', b"\xff\xfe", "dir"],
    ids=["not-json", "list", "no-key", "unknown-profile", "not-a-name", "not-utf8",
         "a-directory"],
)
@pytest.mark.parametrize("default", [None, "eu_l6e"])
def test_a_bad_state_file_falls_back_to_the_default(rig, caplog, content, default):
    if content == "dir":
        rig.state_file.mkdir()
    elif isinstance(content, bytes):
        rig.state_file.write_bytes(content)
    else:
        rig.state_file.write_text(content)
    spec = replace(rig.spec, default=default)
    with caplog.at_level(logging.ERROR, logger="gateway.safety.speedcap"):
        cap = rig.new_cap(spec)
    assert cap.active == default
    errors = [r for r in caplog.records if r.name == "gateway.safety.speedcap"]
    assert len(errors) == 1 and str(rig.state_file) in errors[0].getMessage()


def test_a_missing_state_file_is_the_default_quietly(rig, caplog):
    with caplog.at_level(logging.ERROR, logger="gateway.safety.speedcap"):
        assert rig.new_cap(replace(rig.spec, default="fleet")).active == "fleet"
    assert caplog.records == []


def test_an_unknown_profile_name_is_refused(rig):
    rig.cap.select("valet")
    before = rig.state_file.read_text()
    with pytest.raises(KeyError, match="sport"):
        rig.cap.select("sport")
    assert rig.cap.active == "valet"
    assert rig.state_file.read_text() == before


async def test_run_sends_at_the_message_cycle(rig, wire, clock):
    rig.cap.select("eu_l6e")
    task = asyncio.create_task(rig.cap.run())
    for _ in range(6):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    got = _received(wire[1])
    assert len(got) >= 3 and {v["GW_SpeedLimitRequest"] for v in got} == {45}
    assert set(clock.slept) == {rig.cap.cycle_s} and rig.cap.cycle_s == 0.1
    assert rig.pipeline.counters.get("tx.vehicle.sent") == len(got)


# ---- not applied ------------------------------------------------------------------------


def test_not_applied_when_the_mcu_ignores_the_cap_and_cleared_when_it_obeys(rig):
    confirm = rig.spec.confirm_s
    rig.run(3.0, reports=255)  # no cap asked, none reported: fine
    assert rig.log.transitions == []
    rig.cap.select("valet")
    selected = rig.report(255)
    rig.cap.evaluate(selected)
    rig.run(confirm + 1.0, reports=255)
    alert = rig.log.get(NOT_APPLIED)
    assert alert is not None and alert.severity is Severity.CRITICAL
    assert alert.raised_at - selected == confirm
    assert "20 km/h" in alert.message and alert.value == 20
    assert alert.signal == SPEED_LIMIT
    # The MCU now reports the cap: the alert clears once that held for confirm_s.
    rig.clock.advance(TICK)
    obeyed = rig.report(20)
    rig.run(confirm + 1.0, reports=20)
    cleared = [a for t, a in rig.log.transitions if t == "cleared" and a.key == NOT_APPLIED]
    assert len(cleared) == 1 and cleared[0].cleared_at is not None
    assert 0 < cleared[0].cleared_at - obeyed <= confirm + TICK


def test_not_applied_waits_confirm_s_after_the_selection(rig):
    confirm = rig.spec.confirm_s
    rig.run(2.0, reports=255)
    rig.cap.select("valet")
    selected = rig.clock.time()
    # The monitor ticks before the MCU's next report (it reports every 200 ms, the tick is
    # 100 ms): the latest report it sees was sent before the cap was asked for.
    rig.cap.evaluate(selected)
    rig.run(2 * TICK)
    rig.run(confirm + 1.0, reports=255)
    alert = rig.log.get(NOT_APPLIED)
    assert alert is not None
    assert alert.raised_at - selected >= confirm


def test_a_cap_that_stays_after_it_was_lifted_is_not_applied(rig):
    rig.cap.select("valet")
    rig.run(2.0, reports=20)
    assert rig.log.get(NOT_APPLIED) is None
    rig.cap.select(None)
    rig.run(2.0 + rig.spec.confirm_s, reports=20)
    alert = rig.log.get(NOT_APPLIED)
    assert alert is not None and "no cap" in alert.message and alert.value is None


def test_a_silent_mcu_neither_raises_nor_clears_not_applied(rig):
    rig.cap.select("valet")
    rig.run(1.0)  # nothing heard at all
    assert rig.log.transitions == []
    rig.run(2.0, reports=255)
    assert rig.log.get(NOT_APPLIED) is not None
    rig.run(10.0)  # stale: held
    assert rig.log.of(NOT_APPLIED) == ["raised"]


def test_an_invalid_report_neither_raises_nor_clears_not_applied(rig):
    rig.cap.select("valet")
    rig.run(2.0, reports=255)
    assert rig.log.get(NOT_APPLIED) is not None
    for _ in range(40):  # reports of the right cap, but with a broken checksum
        rig.clock.advance(TICK)
        now = rig.clock.time()
        rig.pipeline.decoders[BUS].process([rig.frames.frame(
            "MCU_Thermal", now, {"MCU_SpeedLimitActive": 20}, corrupt=True)])
        assert rig.pipeline.store.view(SPEED_LIMIT, now).valid is False
        rig.cap.evaluate(now)
    assert rig.log.of(NOT_APPLIED) == ["raised"]


def test_without_a_report_signal_there_is_no_confirmation_check(rig):
    rig.cap = rig.new_cap(replace(rig.spec, report=None))
    rig.cap.select("valet")
    rig.run(5.0, reports=255)
    assert rig.log.transitions == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"report": "Vehicle.Powertrain.TractionMotor.NotMapped"}, "not mapped"),
        ({"signal": "GW_SpeedLimitReq"}, "no signal GW_SpeedLimitReq"),
        ({"fixed": {"GW_TorqueLimit": 100.0}}, "no signal GW_TorqueLimit"),
    ],
    ids=["unmapped-report", "unknown-signal", "unknown-fixed-signal"],
)
def test_a_spec_that_does_not_fit_the_dbc_or_profile_is_refused(rig, change, words):
    with pytest.raises(ValueError, match=words):
        rig.new_cap(replace(rig.spec, **change))


@pytest.mark.parametrize("change", [
    {"fixed": {"GW_TorqueLimitRequest": 150.0}},  # the DBC maximum is 100
    {"none_value": 300},                           # does not fit the 8-bit signal
])
def test_a_request_that_cannot_be_encoded_is_refused_at_build(rig, wire, change):
    # Found when the gateway starts, not at the first send: a failing send would end the
    # speed-cap task and the controller would drop the cap.
    with pytest.raises(ValueError, match="cannot carry the request"):
        rig.new_cap(replace(rig.spec, **change))
    assert _received(wire[1]) == []
    assert rig.pipeline.counters.snapshot("tx.") == {}


# ---- overspeed --------------------------------------------------------------------------


def test_overspeed_after_debounce_not_before_and_cleared_after(rig):
    debounce, tolerance = rig.spec.debounce_s, rig.spec.tolerance_kmh
    rig.cap.select("valet")
    rig.run(10.0, speed=20 + tolerance - 0.5, reports=20)  # within the tolerance
    assert rig.log.transitions == []
    rig.clock.advance(TICK)
    first = rig.clock.time()
    rig.pipeline.decoders[BUS].process(
        [rig.frames.frame("MCU_Drive", first, {"MCU_VehicleSpeed": 25.0})])
    rig.cap.evaluate(first)
    rig.run(debounce - TICK, speed=25.0, reports=20)
    assert rig.log.get(OVERSPEED) is None  # held for debounce_s minus one tick
    rig.run(TICK, speed=25.0, reports=20)
    alert = rig.log.get(OVERSPEED)
    assert alert is not None and alert.severity is Severity.WARNING
    assert alert.raised_at - first == debounce
    assert (alert.value, alert.limit) == (25.0, 20 + tolerance)
    assert alert.message == "Speed 25 km/h above the valet cap of 20 km/h"
    rig.run(debounce - TICK, speed=15.0, reports=20)
    assert rig.log.get(OVERSPEED) is not None
    rig.run(2 * TICK, speed=15.0, reports=20)
    assert rig.log.get(OVERSPEED) is None
    assert rig.log.of(OVERSPEED) == ["raised", "cleared"]
    assert rig.log.of(NOT_APPLIED) == []


def test_stale_speed_holds_the_overspeed_state(rig):
    debounce = rig.spec.debounce_s
    rig.cap.select("valet")
    # A pending overspeed is forgotten while the speed is unknown: 2 s + gap + 2 s is not 3 s.
    rig.run(debounce - 1.0, speed=30.0)
    rig.run(1.0)
    rig.run(debounce - 1.0, speed=30.0)
    assert rig.log.get(OVERSPEED) is None
    rig.run(debounce, speed=30.0)
    assert rig.log.get(OVERSPEED) is not None
    rig.run(10 * debounce)  # silent: the alert stays
    assert rig.log.of(OVERSPEED) == ["raised"]
    rig.run(debounce + TICK, speed=0.0)
    assert rig.log.of(OVERSPEED) == ["raised", "cleared"]


def test_lifting_the_cap_ends_an_overspeed(rig):
    rig.cap.select("valet")
    rig.run(rig.spec.debounce_s + TICK, speed=40.0, reports=20)
    assert rig.log.get(OVERSPEED) is not None
    rig.cap.select(None)
    rig.run(rig.spec.debounce_s + TICK, speed=40.0, reports=255)
    assert rig.log.get(OVERSPEED) is None


# ---- end to end -------------------------------------------------------------------------


async def test_valet_caps_the_simulated_vehicle(ref_profile: Profile, tmp_path):
    clock = SystemClock()
    pipeline = Pipeline.build(ref_profile, clock)
    channel = f"speedcap-e2e-{uuid.uuid4().hex}"
    sim_bus = open_sim_bus("virtual", channel)
    ecus = VehicleEcus(VehicleModel())
    stop = asyncio.Event()
    sim = asyncio.create_task(run_vehicle(sim_bus, ecus, clock, stop))
    sources = pipeline.start_live(pipeline.bus_options({BUS: f"virtual:{channel}"}))
    safety = Safety.build(pipeline, tmp_path)
    safety.start(sources)
    loop = asyncio.get_running_loop()

    async def until(value: object) -> None:
        deadline = loop.time() + GUARD
        while pipeline.store.good_value(SPEED_LIMIT, clock.time()) != value:
            assert loop.time() < deadline, f"{SPEED_LIMIT} never read {value!r}"
            await asyncio.sleep(0.02)

    try:
        await until("none")  # traffic flows, and the MCU starts uncapped
        assert safety.speed_cap is not None
        safety.speed_cap.select("valet")
        await until(20)
    finally:
        stop.set()
        await safety.stop()
        await pipeline.stop()
        await sim
        close_quietly(sim_bus)
    assert ecus.model.speed_cap_kmh == 20
    assert json.loads((tmp_path / "speed_cap.json").read_text()) == {"profile": "valet"}
    assert pipeline.counters.get("tx.vehicle.sent") > 0
    assert pipeline.counters.snapshot("tx.blocked") == {}
