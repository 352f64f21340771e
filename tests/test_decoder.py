"""The per-frame decode path: every bad-input class, caching, multiplexing, 29-bit, CAN FD."""

from __future__ import annotations

import logging

import can
import pytest

from gateway.app import Pipeline
from gateway.config import load_profile
from gateway.decode import load_dbc
from tests.conftest import AMI_PROFILE, DATA, DBC, frame, seal

TB = "Vehicle.Powertrain.TractionBattery"
BMS = load_dbc(DBC / "reference" / "microev_bms.dbc")
MCU = load_dbc(DBC / "reference" / "microev_mcu.dbc")


def _pack(voltage: float = 99.5, current: float = 10.0, counter: int = 0) -> bytes:
    """A BMS_Pack payload that passes the receive checks (CRC in byte 7)."""
    msg = BMS.get_message_by_name("BMS_Pack")
    return seal(msg.encode({"BMS_PackVoltage": voltage, "BMS_PackCurrent": current,
                            "BMS_ContactorState": 2, "BMS_State": 2,
                            "BMS_Pack_Counter": counter, "BMS_Pack_Checksum": 0}))


def _cells(page: int, volts: tuple[float, float, float]) -> bytes:
    msg = BMS.get_message_by_name("BMS_CellVoltages")
    values: dict[str, float] = {"BMS_CellMux": page}
    for k, v in enumerate(volts):
        values[f"BMS_Cell{page * 3 + k + 1:02d}_V"] = v
    return bytes(msg.encode(values))


def test_multiplexed_cells_land_on_their_own_slots(ref_pipeline, clock):
    t = clock.time()
    batch = [frame(0x110, _cells(p, (3.2 + p / 100, 3.21 + p / 100, 3.22 + p / 100)), t)
             for p in range(10)]
    ref_pipeline.decoders["vehicle"].process(batch)
    got = [ref_pipeline.store.good_value(f"{TB}.Cell.{n}.Voltage", t) for n in range(1, 31)]
    expected = [round(3.2 + p / 100 + k / 100, 3) for p in range(10) for k in range(3)]
    assert got == expected


def test_29_bit_ids_are_not_confused_with_11_bit(ref_pipeline, clock):
    t = clock.time()
    obc = BMS.get_message_by_name("OBC_Status")
    values = {s.name: 0 for s in obc.signals} | {"OBC_OutputVoltage": 100.0,
                                                 "OBC_OutputCurrent": 12.5}
    data = bytes(obc.encode(values))
    decoder = ref_pipeline.decoders["vehicle"]
    # Same number as a standard frame: unknown, and must not decode as the charger.
    decoder.process([frame(0x18FF50E5 & 0x7FF, data, t)])
    assert ref_pipeline.store.good_value(f"{TB}.Charging.ChargeCurrent.DC", t) is None
    decoder.process([frame(0x18FF50E5, data, t, extended=True)])
    assert ref_pipeline.store.good_value(f"{TB}.Charging.ChargeCurrent.DC", t) == 12.5


def test_can_fd_frames_decode(clock):
    pipeline = Pipeline.build(load_profile(DATA / "fd-test.toml"), clock)
    db = pipeline.plans["fd"].databases[0][1]
    block = db.get_message_by_name("FD_CellBlock")
    assert block.is_fd and block.length == 64
    values = {"FD_Counter": 1} | {f"FD_Cell{n:02d}": 3.0 + n / 1000 for n in range(1, 31)}
    short = db.get_message_by_name("FD_Short")
    t = clock.time()
    pipeline.decoders["fd"].process([
        frame(block.frame_id, block.encode(values), t, extended=True, is_fd=True),
        frame(short.frame_id, short.encode({"FD_Speed": 44.5, "FD_Odometer": 1234.5}), t,
              is_fd=True),
    ])
    store = pipeline.store
    assert store.good_value(f"{TB}.Cell.30.Voltage", t) == 3.03
    assert store.good_value(f"{TB}.Cell.1.Voltage", t) == 3.001
    assert store.good_value("Vehicle.Speed", t) == 44.5
    assert store.good_value("Vehicle.TraveledDistance", t) == 1234.5


def test_repeated_payload_skips_decode_but_refreshes_timestamp(ref_pipeline, clock):
    decoder = ref_pipeline.decoders["vehicle"]
    counters = ref_pipeline.counters
    t0 = clock.time()
    # The cache is keyed on the whole payload, so a repeat means a repeated counter too.
    # Two repeats stay well inside the counter's leaky bucket (rejects at the 5th in a
    # row), so every frame here is consumed and only the cache is under test.
    decoder.process([frame(0x100, _pack(counter=0), t0)])
    assert counters.get("decode.decoded") == 1
    decoder.process([frame(0x100, _pack(counter=0), t0 + 0.02),
                     frame(0x100, _pack(counter=0), t0 + 0.04)])
    assert counters.get("decode.decoded") == 1, "identical payloads must not be decoded again"
    view = ref_pipeline.store.view(f"{TB}.CurrentVoltage", t0 + 0.04)
    assert view.timestamp == t0 + 0.04 and view.good
    # A new value arrives with the counter advanced, as a live sender would send it.
    decoder.process([frame(0x100, _pack(voltage=98.0, counter=1), t0 + 0.06)])
    assert counters.get("decode.decoded") == 2
    assert ref_pipeline.store.good_value(f"{TB}.CurrentVoltage", t0 + 0.06) == 98.0


def test_cache_stays_bounded_with_rolling_counters(ref_pipeline, clock):
    decoder = ref_pipeline.decoders["vehicle"]
    t = clock.time()
    # The counter advances by one every frame (as on a live bus), so none is rejected and
    # every payload is new: only the cache bound decides what the cache holds.
    decoder.process([frame(0x100, _pack(counter=i % 16, voltage=90 + i / 100), t)
                     for i in range(500)])
    plan = next(p for p in ref_pipeline.plans["vehicle"].mapped.values() if p.name == "BMS_Pack")
    assert len(plan.cache) <= 32
    assert ref_pipeline.counters.get("decode.cache_resets") > 0
    assert ref_pipeline.store.good_value(f"{TB}.CurrentVoltage", t) == 94.99


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (frame(0x7DF, b"\x02\x01\x0c\x00\x00\x00\x00\x00", 0.0), "unknown_id"),
        (frame(0x100, b"\x01\x02\x03", 0.0), "wrong_dlc"),
        (can.Message(arbitration_id=0x100, is_error_frame=True, timestamp=0.0), "error_frame"),
        (can.Message(arbitration_id=0x100, is_remote_frame=True, dlc=8, timestamp=0.0),
         "remote_frame"),
        # Multiplexer page 200 does not exist in the DBC.
        (frame(0x110, b"\xc8\x00\x00\x00\x00\x00\x00\x00", 0.0), "undecodable"),
    ],
    ids=["unknown_id", "wrong_dlc", "error_frame", "remote_frame", "undecodable"],
)
def test_bad_input_is_counted_logged_once_and_never_raises(ref_pipeline, clock, caplog, bad,
                                                           reason):
    decoder = ref_pipeline.decoders["vehicle"]
    t = clock.time()
    good = frame(0x100, _pack(), t)
    with caplog.at_level(logging.WARNING):
        decoder.process([bad] * 1000 + [good])
    assert ref_pipeline.counters.get(f"decode.{reason}") == 1000
    assert ref_pipeline.counters.get(f"decode.vehicle.{reason}") == 1000
    lines = [r for r in caplog.records if reason.replace("_", " ") in r.getMessage()]
    assert len(lines) == 1, "one line per reason per interval, not one per frame"
    assert "Traceback" not in caplog.text
    # The loop went on: the good frame after the flood was decoded.
    assert ref_pipeline.store.good_value(f"{TB}.CurrentVoltage", t) == 99.5


def test_wrong_length_invalidates_the_previous_value(ref_pipeline, clock):
    decoder = ref_pipeline.decoders["vehicle"]
    t = clock.time()
    decoder.process([frame(0x100, _pack(), t)])
    assert ref_pipeline.store.good_value(f"{TB}.CurrentVoltage", t) == 99.5
    decoder.process([frame(0x100, _pack()[:6], t + 0.01)])
    view = ref_pipeline.store.view(f"{TB}.CurrentVoltage", t + 0.01)
    assert not view.valid and view.value is None


def test_signal_not_available_is_invalid_not_a_number(ref_pipeline, clock):
    t = clock.time()
    drive = MCU.get_message_by_name("MCU_Drive")
    data = drive.encode({"MCU_MotorSpeed": 0, "MCU_VehicleSpeed": 0, "MCU_MotorTorque": 0,
                         "MCU_Gear": 1, "MCU_DriveMode": 1, "MCU_Drive_Counter": 0,
                         "MCU_Drive_Checksum": 0}, scaling=False)
    raw = bytearray(data)
    raw[2] = 0xFF  # vehicle speed raw 4095 = SNA (12 bits from bit 16)
    raw[3] |= 0x0F
    # Sealed after the edit: the SNA must reach the decode tables, not fail the CRC.
    ref_pipeline.decoders["vehicle"].process([frame(0x200, seal(raw), t)])
    speed = ref_pipeline.store.view("Vehicle.Speed", t)
    assert speed.timestamp == t and not speed.valid and speed.value is None
    assert ref_pipeline.store.good_value("Vehicle.Powertrain.Transmission.SelectedGear", t) == \
        "Drive"


def test_raw_value_outside_the_enum_is_invalid(ref_pipeline, clock):
    t = clock.time()
    body = load_dbc(DBC / "reference" / "microev_bcm.dbc").get_message_by_name("BCM_Status")
    values = {s.name: 0 for s in body.signals} | {"BCM_LockDriver": 2}  # 2 = Fault
    ref_pipeline.decoders["vehicle"].process([frame(0x300, seal(body.encode(values)), t)])
    view = ref_pipeline.store.view("Vehicle.Cabin.Door.Row1.DriverSide.IsLocked", t)
    assert not view.valid
    assert ref_pipeline.store.good_value("Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked", t) \
        is False


def test_placeholder_dbc_ranges_do_not_drop_values(clock):
    """The Ami DBC says [0|1] for the odometer; a real odometer reads thousands of km."""
    pipeline = Pipeline.build(load_profile(AMI_PROFILE), clock)
    odo = pipeline.plans["vehicle"].databases[0][1].get_message_by_name("ECU_Odo")
    assert odo.get_signal_by_name("ECU_Odometer").maximum == 1
    t = clock.time()
    data = odo.encode({"ECU_Odometer": 8123.4, "ECU_Speed": 38}, strict=False)
    pipeline.decoders["vehicle"].process([frame(0x581, data, t)])
    assert pipeline.store.good_value("Vehicle.TraveledDistance", t) == 8123.4
    assert pipeline.store.good_value("Vehicle.Speed", t) == 38


def test_messages_in_the_dbc_but_not_mapped_are_counted_quietly(ref_pipeline, clock, caplog):
    gw = MCU.get_message_by_name("GW_SpeedLimit")
    data = gw.encode({s.name: 0 for s in gw.signals})
    with caplog.at_level(logging.WARNING):
        ref_pipeline.decoders["vehicle"].process([frame(gw.frame_id, data, clock.time())] * 10)
    assert ref_pipeline.counters.get("decode.unmapped") == 10
    assert ref_pipeline.counters.get("decode.unknown_id") == 0
    assert caplog.records == []
