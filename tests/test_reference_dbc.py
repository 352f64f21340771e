"""The reference micro-EV's DBC files: structure, and encode -> decode round trips."""

from __future__ import annotations

import math
from typing import Any

import pytest
from cantools.database.can import Message, Signal

from gateway.decode import load_dbc
from tests.conftest import DBC, frame, seal

FILES = ["microev_bms.dbc", "microev_mcu.dbc", "microev_bcm.dbc"]
MESSAGES = [(f, m) for f in FILES for m in load_dbc(DBC / "reference" / f).messages]
SAFETY = {"BMS_Pack", "BMS_CellStats", "BMS_Temps", "BMS_Faults", "MCU_Drive", "MCU_Thermal",
          "MCU_Faults", "BCM_Status", "GW_SpeedLimit", "GW_ChargeControl"}


def _ids(item: tuple[str, Message]) -> str:
    return item[1].name


def _sample(sig: Signal, k: int) -> float:
    """A representable in-range value, different per signal (so swapped signals are caught)."""
    lo = sig.minimum if sig.minimum is not None else 0
    hi = sig.maximum if sig.maximum is not None else 1
    raw = round((lo + (hi - lo) * ((0.37 + 0.11 * k) % 1.0) - sig.offset) / sig.scale)
    return float(raw * sig.scale + sig.offset)


@pytest.mark.parametrize("item", MESSAGES, ids=[_ids(i) for i in MESSAGES])
def test_every_message_round_trips(item: tuple[str, Message]) -> None:
    _, message = item
    pages: list[Any] = sorted({i for s in message.signals for i in (s.multiplexer_ids or [])})
    pages = pages or [None]
    for page in pages:
        values = {}
        for k, sig in enumerate(message.signals):
            if sig.multiplexer_ids is not None and page not in sig.multiplexer_ids:
                continue
            values[sig.name] = page if sig.is_multiplexer else _sample(sig, k)
        data = message.encode(values, strict=True)
        assert len(data) == message.length
        decoded: Any = message.decode(data, decode_choices=False)
        assert decoded.keys() == values.keys()
        for name, value in values.items():
            scale = message.get_signal_by_name(name).scale
            assert math.isclose(decoded[name], value, abs_tol=abs(scale) / 2), name


@pytest.mark.parametrize("item", MESSAGES, ids=[_ids(i) for i in MESSAGES])
def test_messages_declare_timing_and_nodes(item: tuple[str, Message]) -> None:
    _, message = item
    assert message.senders, "every message names its sender"
    assert all(s.receivers for s in message.signals), "every signal names its receivers"
    if message.name != "GW_BodyCommand":  # the only event-driven frame
        assert message.cycle_time and message.cycle_time > 0
    if message.name in SAFETY:
        names = {s.name for s in message.signals}
        assert f"{message.name}_Counter" in names
        assert f"{message.name}_Checksum" in names
        checksum = message.get_signal_by_name(f"{message.name}_Checksum")
        assert (checksum.start, checksum.length) == (56, 8), "checksum lives in byte 7"


def test_ids_are_unique_across_files() -> None:
    keys = [(m.frame_id, m.is_extended_frame) for _, m in MESSAGES]
    assert len(keys) == len(set(keys))


def test_reference_frames_decode_into_canonical_state(ref_pipeline, clock) -> None:
    """Canonical values carry the profile's conversions: sign flips, enums, mux pages, units."""
    bms = {m.name: m for f, m in MESSAGES}
    decoder = ref_pipeline.decoders["vehicle"]
    t = clock.time()
    # BMS_Pack and BCM_Status carry a CRC the decoder checks: seal them so they are consumed.
    pack = seal(bms["BMS_Pack"].encode({
        "BMS_PackVoltage": 99.52, "BMS_PackCurrent": 42.5, "BMS_ContactorState": 2,
        "BMS_State": 2, "BMS_Pack_Counter": 3, "BMS_Pack_Checksum": 0}))
    cells = bms["BMS_CellVoltages"].encode({
        "BMS_CellMux": 9, "BMS_Cell28_V": 3.281, "BMS_Cell29_V": 3.302, "BMS_Cell30_V": 3.299})
    obc = bms["OBC_Status"].encode({
        "OBC_OutputVoltage": 101.3, "OBC_OutputCurrent": 30.2, "OBC_Flt_Hardware": 0,
        "OBC_Flt_OverTemp": 1, "OBC_Flt_InputVoltage": 0, "OBC_Flt_BatteryNotDetected": 0,
        "OBC_Flt_CommTimeout": 0, "OBC_Temperature": 41})
    body = seal(bms["BCM_Status"].encode({
        "BCM_LockDriver": 1, "BCM_LockPassenger": 0, "BCM_LockTailgate": 3,
        "BCM_DoorOpenDriver": 0, "BCM_DoorOpenPassenger": 1, "BCM_TailgateOpen": 0,
        "BCM_Ignition": 2, "BCM_Ready": 1, "BCM_ChargePort": 0, "BCM_Aux12V": 12.61,
        "BCM_LastLockSource": 3, "BCM_CmdAckSeq": 5, "BCM_Status_Counter": 0,
        "BCM_Status_Checksum": 0}))
    decoder.process([
        frame(0x100, pack, t), frame(0x110, cells, t), frame(0x300, body, t),
        frame(0x18FF50E5, obc, t, extended=True),
    ])
    store = ref_pipeline.store
    tb = "Vehicle.Powertrain.TractionBattery"
    assert store.good_value(f"{tb}.CurrentVoltage", t) == 99.52
    assert store.good_value(f"{tb}.CurrentCurrent", t) == -42.5  # VSS: discharge is negative
    assert store.good_value(f"{tb}.ContactorState", t) == "Closed"
    assert store.good_value(f"{tb}.Cell.29.Voltage", t) == 3.302
    assert store.good_value(f"{tb}.Cell.1.Voltage", t) is None  # page 0 not seen yet
    assert store.good_value(f"{tb}.Charging.ChargeVoltage.DC", t) == 101.3
    assert store.good_value(f"{tb}.Charging.ChargerFault.OverTemp", t) is True
    assert store.good_value(f"{tb}.Charging.ChargerTemperature", t) == 41
    assert store.good_value("Vehicle.Cabin.Door.Row1.DriverSide.IsLocked", t) is True
    assert store.good_value("Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked", t) is False
    # 3 = SNA on the tailgate lock: not locked, not unlocked: invalid.
    view = store.view("Vehicle.Body.Trunk.Rear.IsLocked", t)
    assert not view.valid and view.value is None
    assert store.good_value("Vehicle.LowVoltageSystemState", t) == "ON"
    assert store.good_value("Vehicle.LowVoltageBattery.CurrentVoltage", t) == 12.61
