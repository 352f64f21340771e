"""Fault injection in the simulated vehicle: counters, checksums, the MCU's speed cap.

Frames are checked the way the gateway would see them: decoded with cantools
from the reference DBCs, checksums recomputed with the gateway's own CRC.
"""

from __future__ import annotations

import itertools
from typing import Any

import can
import pytest

from gateway.checksum import crc8_j1850
from hil.sim import faults
from hil.sim.ecus import BAD_CHECKSUM_XOR, SPEED_CAP_TIMEOUT_S, VehicleEcus, generate
from hil.sim.faults import Event, Simulation
from hil.sim.model import VehicleModel
from tests.safety_replay import decoded, reference_db


def frames_of(frames: list[can.Message], message: str) -> list[can.Message]:
    """The frames of one message."""
    frame_id = reference_db().get_message_by_name(message).frame_id
    return [f for f in frames if f.arbitration_id == frame_id]


def counters(frames: list[can.Message], message: str) -> list[int]:
    """The rolling counter of every frame of ``message``."""
    return [int(v[f"{message}_Counter"]) for _, v in decoded(frames, message)]


def crc_ok(frame: can.Message) -> bool:
    """Byte 7 is the CRC-8 J1850 of bytes 0..6 (the gateway's implementation)."""
    data = bytes(frame.data)
    return data[7] == crc8_j1850(data, 7, frame.arbitration_id)


def advancing(values: list[int]) -> bool:
    """Each counter is the previous one plus one, modulo 16."""
    return all(b == (a + 1) % 16 for a, b in itertools.pairwise(values))


def speed_limit_frame(cap: int, counter: int) -> can.Message:
    """A GW_SpeedLimit request as the gateway sends it: DBC-encoded, counter and CRC set."""
    msg = reference_db().get_message_by_name("GW_SpeedLimit")
    signals: dict[str, Any] = {s.name: 0 for s in msg.signals}
    signals.update(GW_SpeedLimitRequest=cap, GW_TorqueLimitRequest=100,
                   GW_SpeedLimit_Counter=counter % 16)
    data = bytearray(msg.encode(signals))
    data[7] = crc8_j1850(bytes(data), 7, msg.frame_id)
    return can.Message(arbitration_id=msg.frame_id, data=bytes(data), is_extended_id=False)


def reported_cap(frames: list[can.Message]) -> list[int]:
    """MCU_SpeedLimitActive of every MCU_Thermal frame."""
    return [int(v["MCU_SpeedLimitActive"]) for _, v in decoded(frames, "MCU_Thermal")]


# ---- counters and checksums -------------------------------------------------------------


def test_healthy_frames_have_advancing_counters_and_good_crcs() -> None:
    frames = generate(VehicleModel(), 1.0)
    for name in ("BMS_Pack", "MCU_Drive", "BCM_Status"):
        assert len(counters(frames, name)) >= 10
        assert advancing(counters(frames, name)), name
        assert all(crc_ok(f) for f in frames_of(frames, name)), name


def test_frozen_counter_repeats_one_value_with_a_valid_crc() -> None:
    ecus = VehicleEcus(VehicleModel())
    ecus.frozen_counter.add("MCU_Drive")
    frames = faults.Simulation(VehicleModel(), ecus=ecus).advance(0.5)
    frozen = counters(frames, "MCU_Drive")
    assert len(frozen) == 25
    assert set(frozen) == {15}  # frozen before the first frame: the value before 0
    # The frames stay otherwise valid: only the counter check can catch this fault.
    assert all(crc_ok(f) for f in frames_of(frames, "MCU_Drive"))
    assert advancing(counters(frames, "MCU_Thermal"))


def test_counter_resumes_from_where_it_froze() -> None:
    sim = Simulation(VehicleModel(), [Event(0.2, faults.freeze_counter("BMS_Pack")),
                                      Event(0.4, faults.freeze_counter("BMS_Pack", on=False))])
    values = counters(sim.advance(0.6), "BMS_Pack")
    assert values[:10] == list(range(10))
    assert values[10:20] == [9] * 10
    assert values[20:] == [n % 16 for n in range(10, 10 + len(values) - 20)]


def test_bad_checksum_corrupts_only_the_named_message() -> None:
    ecus = VehicleEcus(VehicleModel())
    ecus.bad_checksum.add("BMS_Pack")
    frames = Simulation(VehicleModel(), ecus=ecus).advance(0.5)
    pack = frames_of(frames, "BMS_Pack")
    assert len(pack) == 25
    for f in pack:
        data = bytes(f.data)
        assert data[7] ^ BAD_CHECKSUM_XOR == crc8_j1850(data, 7, f.arbitration_id)
    # Everything else about the frame is intact: the counter still advances.
    assert advancing(counters(frames, "BMS_Pack"))
    others = frames_of(frames, "BMS_CellStats") + frames_of(frames, "MCU_Drive")
    assert all(crc_ok(f) for f in others)


def test_voltages_follow_the_model_step_by_step() -> None:
    # The ECUs work the cell voltages out once per model state: a stale one would show here.
    sim = Simulation(VehicleModel(mode="drive"), step=0.02)
    for _ in range(300):  # six seconds of pulling away: current and voltage keep changing
        frames = sim.advance(0.02)
        (_, pack), = decoded(frames, "BMS_Pack")
        assert pack["BMS_PackVoltage"] == pytest.approx(sim.model.pack_voltage(), abs=0.006)
        pages = decoded(frames, "BMS_CellVoltages")
        for _, page in pages:
            n = page["BMS_CellMux"] * 3 + 1
            assert page[f"BMS_Cell{n:02d}_V"] == pytest.approx(
                sim.model.cell_voltages()[n - 1], abs=0.0006)


def test_simulation_without_events_matches_generate() -> None:
    start = 1_700_000_000.0
    expected = generate(VehicleModel(mode="drive"), 3.0, start=start)
    sim = Simulation(VehicleModel(mode="drive"), start=start)
    got = sim.advance(1.0) + sim.advance(2.0)
    assert [(f.arbitration_id, bytes(f.data), f.timestamp) for f in got] == \
        [(f.arbitration_id, bytes(f.data), f.timestamp) for f in expected]


def test_events_apply_from_their_time_on() -> None:
    events = [Event(1.0, faults.set_signal("BCM_Status", "BCM_Aux12V", 10.5)),
              Event(2.0, faults.clear_overrides("BCM_Status"))]
    values = decoded(faults.run(VehicleModel(), 3.0, events), "BCM_Status")
    low = [ts for ts, v in values if v["BCM_Aux12V"] == pytest.approx(10.5)]
    assert low
    assert min(low) >= 1.0 - 0.005
    assert max(low) < 2.0
    assert len(low) == 10


def test_ramp_steps_evenly_and_holds_the_end_value() -> None:
    events = faults.ramp("BMS_Temps", "BMS_MaxTemp", 1.0, 3.0, 50.0, 54.0, every=0.5)
    assert [(e.at, e.action is not None) for e in events] == \
        [(1.0, True), (1.5, True), (2.0, True), (2.5, True), (3.0, True)]
    temps = [v["BMS_MaxTemp"] for _, v in decoded(faults.run(VehicleModel(), 4.0, events),
                                                  "BMS_Temps")]
    assert temps[-10:] == [54] * 10
    assert [t for t in temps if t >= 50][:20:5] == [50, 51, 52, 53]
    with pytest.raises(ValueError, match="ramp"):
        faults.ramp("BMS_Temps", "BMS_MaxTemp", 1.0, 1.0, 50.0, 54.0)


def test_silence_stops_and_restarts_a_node() -> None:
    events = [Event(1.0, faults.silence("BMS")), Event(2.0, faults.silence("BMS", on=False))]
    frames = faults.run(VehicleModel(), 3.0, events)
    pack_ts = [f.timestamp for f in frames_of(frames, "BMS_Pack")]
    assert not [ts for ts in pack_ts if 1.0 + 0.005 < ts < 2.0]
    assert [ts for ts in pack_ts if ts > 2.0]
    assert [f for f in frames_of(frames, "MCU_Drive") if 1.0 < f.timestamp < 2.0]


# ---- the MCU and GW_SpeedLimit ----------------------------------------------------------


def test_compliant_mcu_applies_and_reports_the_cap() -> None:
    sim = Simulation(VehicleModel(mode="drive"))
    sim.advance(0.1)
    sim.ecus.receive([speed_limit_frame(20, 0)])
    assert sim.model.speed_cap_kmh == 20.0
    frames = sim.advance(0.4)
    assert reported_cap(frames) == [20, 20]
    assert {v["MCU_DerateState"] for _, v in decoded(frames, "MCU_Thermal")} == {4}


def test_mcu_ignoring_the_cap_takes_the_frames_but_reports_none() -> None:
    sim = Simulation(VehicleModel(mode="drive"))
    sim.ecus.ignore_speed_cap = True
    frames: list[can.Message] = []
    for k in range(80):
        frames += sim.advance(0.1)
        sim.ecus.receive([speed_limit_frame(20, k)])
    assert len(sim.ecus.received) == 80
    assert sim.model.speed_cap_kmh is None
    assert set(reported_cap(frames)) == {255}
    # Left alone by the cap, the drive cycle takes the car past 20 km/h.
    assert max(v["MCU_VehicleSpeed"] for _, v in decoded(frames, "MCU_Drive")) > 25


def test_cap_is_dropped_half_a_second_after_the_last_request() -> None:
    sim = Simulation(VehicleModel(mode="drive"))
    sim.advance(0.1)
    sim.ecus.receive([speed_limit_frame(20, 0)])
    heard = sim.model.t
    sim.advance(SPEED_CAP_TIMEOUT_S - 0.05)
    assert sim.model.speed_cap_kmh == 20.0
    frames = sim.advance(0.1)
    assert sim.model.speed_cap_kmh is None
    assert sim.model.t - heard >= SPEED_CAP_TIMEOUT_S
    frames += sim.advance(0.4)
    assert reported_cap(frames)[-1] == 255


def test_cap_held_while_requests_keep_coming() -> None:
    sim = Simulation(VehicleModel(mode="drive"))
    frames: list[can.Message] = []
    for k in range(40):  # 4 s, one request every 100 ms: never 500 ms without one
        sim.ecus.receive([speed_limit_frame(20, k)])
        frames += sim.advance(0.1)
    assert sim.model.speed_cap_kmh == 20.0
    assert set(reported_cap(frames)) == {20}


def test_no_cap_request_lifts_the_cap() -> None:
    sim = Simulation(VehicleModel(mode="drive"))
    sim.ecus.receive([speed_limit_frame(20, 0)])
    sim.advance(0.1)
    sim.ecus.receive([speed_limit_frame(255, 1)])
    assert sim.model.speed_cap_kmh is None
    assert reported_cap(sim.advance(0.4)) == [255, 255]


def test_cap_set_on_the_model_directly_does_not_expire() -> None:
    # Not from a GW_SpeedLimit frame: the controller's own configuration, as before.
    model = VehicleModel(mode="drive", speed_cap_kmh=30.0)
    frames = Simulation(model).advance(2.0)
    assert model.speed_cap_kmh == 30.0
    assert set(reported_cap(frames)) == {30}
