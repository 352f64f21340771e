"""Real third-party DBCs: the Citroen Ami (shipped) and foxBMS 2 (from shared/)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.app import Pipeline
from gateway.cli import main
from gateway.config import load_profile
from tests.conftest import AMI_PROFILE, DATA, DBC, frame

TB = "Vehicle.Powertrain.TractionBattery"


def test_ami_dbc_is_shipped_with_its_license():
    assert (DBC / "citroen-ami" / "Ami_Rocks-e.dbc").is_file()
    assert "MIT License" in (DBC / "citroen-ami" / "LICENSE").read_text()


def test_ami_frames_decode_through_the_profile(clock):
    pipeline = Pipeline.build(load_profile(AMI_PROFILE), clock)
    db = pipeline.plans["vehicle"].databases[0][1]
    batt = db.get_message_by_name("BMS_45V_Batt_V")
    display = db.get_message_by_name("Display")
    t = clock.time()
    pipeline.decoders["vehicle"].process([
        frame(batt.frame_id, batt.encode({"BMS_45V_Batt_Current": -12.3,
                                          "BMS_45V_Batt_Voltage": 47.81,
                                          "BMS_45V_Batt_SoC": 76}, strict=False), t),
        frame(display.frame_id, display.encode({"gear": 2, "remaining_distance": 54,
                                                "ready": 1, "manual_brake": 0},
                                               strict=False), t),
    ])
    store = pipeline.store
    assert store.good_value(f"{TB}.CurrentVoltage", t) == 47.81
    assert store.good_value(f"{TB}.StateOfCharge.Current", t) == 76
    assert store.good_value("Vehicle.Powertrain.Transmission.SelectedGear", t) == "Drive"
    assert store.good_value("Vehicle.Powertrain.Range", t) == 54_000  # km -> m
    assert store.good_value("Vehicle.Powertrain.IsReady", t) is True


def test_ami_degree_sign_survives_cp1252(clock):
    pipeline = Pipeline.build(load_profile(AMI_PROFILE), clock)
    temp = pipeline.plans["vehicle"].databases[0][1].get_message_by_name("BMS_45V_Temp")
    assert temp.get_signal_by_name("BMS_45V_Batt_Temperatur_1_NOK").unit == "\u00b0C"


def test_foxbms_trace_decodes_every_frame(foxbms_dir, capsys):
    status = main(["decode", "--dbc", str(foxbms_dir / "foxbms.dbc"),
                   str(foxbms_dir / "can-log.trc")])
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 9
    assert all("error" not in rec for rec in lines), lines
    cells = next(rec for rec in lines if rec["name"] == "f_CellVoltages")
    assert cells["signals"]["f_CellVoltages_Mux"] == "CellVoltages_008_011"
    assert cells["signals"]["CellVoltage_008"] == 1996


def test_foxbms_profile_maps_multiplexed_cells_with_unit_conversion(foxbms_dir, clock):
    pipeline = Pipeline.build(load_profile(DATA / "foxbms.toml"), clock)
    assert len([s for s in pipeline.store if ".Cell." in s.path]) > 100
    frames = asyncio.run(_replay(pipeline, foxbms_dir / "can-log.trc"))
    assert frames == 9
    now = clock.time()
    # CellVoltage_008 = 1996 mV is cell 9 (index_offset 1), in volts.
    assert pipeline.store.view(f"{TB}.Cell.9.Voltage", now).value == 1.996
    assert pipeline.store.view(f"{TB}.BmsState", now).value == "ERROR"
    assert pipeline.counters.get("decode.unknown_id") == 0


async def _replay(pipeline: Pipeline, path) -> int:
    return await pipeline.replay(path, "bms", speed=None)


@pytest.mark.parametrize("name", ["microev-ref.toml", "citroen-ami.toml"])
def test_check_command_accepts_shipped_profiles(name, capsys):
    assert main(["check", str(DBC / "profiles" / name)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("ok: ")
