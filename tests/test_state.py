"""Staleness and the default-deny accessors of the state store."""

from __future__ import annotations

import pytest

from gateway.decode import load_dbc
from gateway.state import SignalState, StateStore
from tests.conftest import DBC, frame, seal

TB = "Vehicle.Powertrain.TractionBattery"
BMS = load_dbc(DBC / "reference" / "microev_bms.dbc")


def test_never_received_is_stale_and_has_no_good_value():
    store = StateStore()
    store.register(SignalState("Vehicle.Speed", "km/h", "number", "motion", stale_after=0.06))
    view = store.view("Vehicle.Speed", 100.0)
    assert view.stale and not view.valid and not view.good
    assert store.good_value("Vehicle.Speed", 100.0) is None
    assert store.good_value("Vehicle.NotMapped", 100.0) is None


def test_value_turns_stale_after_its_window():
    store = StateStore()
    slot = store.register(SignalState("Vehicle.Speed", "km/h", "number", "motion", 0.06))
    slot.set(42.0, 100.0)
    assert store.good_value("Vehicle.Speed", 100.059) == 42.0
    assert store.good_value("Vehicle.Speed", 100.0601) is None
    assert store.view("Vehicle.Speed", 100.0601).stale
    assert store.stale_paths(100.0601) == ["Vehicle.Speed"]


def test_event_driven_signals_never_go_stale():
    store = StateStore()
    slot = store.register(SignalState("Vehicle.Body.CommandAckSeq", "", "number", "body", None))
    slot.set(3, 0.0)
    assert store.good_value("Vehicle.Body.CommandAckSeq", 1e9) == 3


def test_registering_a_path_twice_is_refused():
    store = StateStore()
    store.register(SignalState("Vehicle.Speed", "km/h", "number", "motion", 0.1))
    with pytest.raises(ValueError, match="mapped twice"):
        store.register(SignalState("Vehicle.Speed", "km/h", "number", "motion", 0.1))


def test_windows_follow_the_dbc_cycle_times(ref_pipeline):
    store = ref_pipeline.store
    # BMS_Pack: 20 ms x 3 cycles. BMS_Soc: 100 ms x 3.
    assert store.slot(f"{TB}.CurrentVoltage").stale_after == pytest.approx(0.06)
    assert store.slot(f"{TB}.StateOfCharge.Current").stale_after == pytest.approx(0.3)
    # A cell is on one page of ten, each page every 20 ms: 200 ms x 3.
    assert store.slot(f"{TB}.Cell.7.Voltage").stale_after == pytest.approx(0.6)
    assert store.slot(f"{TB}.TemperatureSensor.12.Temperature").stale_after == pytest.approx(0.6)


def test_silent_bms_makes_its_values_stale_while_others_stay_fresh(ref_pipeline, clock):
    pack = BMS.get_message_by_name("BMS_Pack")
    soc = BMS.get_message_by_name("BMS_Soc")
    decoder = ref_pipeline.decoders["vehicle"]
    t0 = clock.time()
    for i in range(10):  # 200 ms of BMS_Pack at 20 ms
        # A live stream: the counter advances every frame and each frame carries its CRC,
        # so staleness (not a receive check) is the only reason the value can go.
        data = seal(pack.encode({s.name: 0 for s in pack.signals} | {"BMS_PackVoltage": 99.0,
                                                                   "BMS_Pack_Counter": i % 16}))
        decoder.process([frame(pack.frame_id, data, t0 + i * 0.02)])
    decoder.process([frame(soc.frame_id, soc.encode({s.name: 0 for s in soc.signals}
                                                     | {"BMS_SoC": 55.5}), t0 + 0.18)])
    last = t0 + 0.18
    store = ref_pipeline.store
    assert store.good_value(f"{TB}.CurrentVoltage", last + 0.05) == 99.0
    # The pack frame stops: 60 ms later its values are stale, the SoC (300 ms window) is not.
    assert store.good_value(f"{TB}.CurrentVoltage", last + 0.061) is None
    assert store.good_value(f"{TB}.StateOfCharge.Current", last + 0.061) == 55.5
    assert store.good_value(f"{TB}.StateOfCharge.Current", last + 0.301) is None


def test_snapshot_reports_every_signal_with_its_flags(ref_pipeline, clock):
    views = ref_pipeline.store.snapshot(clock.time())
    assert len(views) == len(ref_pipeline.store) > 100
    assert all(v.stale and not v.valid for v in views)
    assert {v.group for v in views} >= {"battery", "motion", "body", "charging", "health"}
