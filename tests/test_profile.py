"""Profile and DBC validation: every error names the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import Pipeline
from gateway.clock import ManualClock
from gateway.config import ConfigError, load_profile
from tests.conftest import DBC, frame

REF_DBC = DBC / "reference" / "microev_bms.dbc"

GOOD = f"""\
[vehicle]
name = "test"

[[bus]]
name = "vehicle"
interface = "virtual"
channel = "t"
dbc = ["{REF_DBC}"]

[[signal]]
path = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
message = "BMS_Pack"
signal = "BMS_PackVoltage"
"""


def _write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Pipeline.build(load_profile(path), ManualClock())
    return info.value


def test_a_good_minimal_profile_loads(tmp_path):
    pipeline = Pipeline.build(load_profile(_write(tmp_path, GOOD)), ManualClock())
    assert "Vehicle.Powertrain.TractionBattery.CurrentVoltage" in pipeline.store


@pytest.mark.parametrize(
    ("edit", "line", "key", "words"),
    [
        (lambda t: t.replace('signal = "BMS_PackVoltage"', 'signal = "BMS_PackVoltag"'), 13,
         "signal.signal", "did you mean BMS_PackVoltage"),
        (lambda t: t.replace('message = "BMS_Pack"', 'message = "BMS_Pak"'), 12,
         "signal.message", "no message 'BMS_Pak'"),
        (lambda t: t.replace('channel = "t"', 'channel = "t"\nbitrat = 500000'), 8,
         "bus[0].bitrat", "unknown key"),
        (lambda t: t.replace('channel = "t"', 'channel = 7'), 7, "bus[0].channel",
         "expected a string"),
        (lambda t: t.replace(str(REF_DBC), "missing.dbc"), 8, "bus[0].dbc", "not found"),
        (lambda t: t + '\n[defaults]\nstale_cycles = 0\n', 16, "defaults.stale_cycles",
         ">= 1"),
        (lambda t: t.replace('name = "test"', ""), 1, "vehicle.name", "missing"),
        (lambda t: t + '\n[[signal]]\npath = "Vehicle.Custom.Thing"\nmessage = "BMS_Pack"\n'
                       'signal = "BMS_State"\n', 16, "signal.path", "not in the signal catalog"),
        (lambda t: t + '\n[[signal]]\npath = "Vehicle.Powertrain.TractionBattery.'
                       'CurrentVoltage"\nmessage = "BMS_Soc"\nsignal = "BMS_SoC"\n', 16,
         "signal.path", "mapped twice"),
        (lambda t: t + '\n[[signal]]\npath = "Vehicle.Speed"\nmessage = "BMS_Pack"\n'
                       'signal = "BMS_PackCurrent"\n', 15, "signal.source_unit",
         "cannot convert BMS_PackCurrent from 'A' to 'km/h'"),
        (lambda t: t + '\n[messages.BMS_Nope]\ncycle_ms = 10\n', 15, "messages.BMS_Nope",
         "no such message"),
    ],
    ids=["signal-typo", "message-typo", "unknown-key", "wrong-type", "missing-dbc",
         "range", "missing-name", "custom-without-kind", "duplicate-path", "unit-mismatch",
         "unknown-message-setting"],
)
def test_errors_name_file_line_and_key(tmp_path, edit, line, key, words):
    path = _write(tmp_path, edit(GOOD))
    err = _error(path)
    text = str(err)
    assert text.startswith(f"{path}:{line}: "), text
    assert key in text and words in text, text
    assert "\n" not in text, "one line"


def test_toml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, GOOD.replace('channel = "t"', 'channel = "t'))
    err = _error(path)
    assert err.line == 7 and str(err).startswith(f"{path}:7: invalid TOML")


def test_broken_dbc_names_dbc_file_and_line(tmp_path):
    dbc = tmp_path / "broken.dbc"
    lines = REF_DBC.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("BO_ 257"))
    lines[index] = "BO_ 257 BMS_Soc 8 BMS"  # missing colon
    dbc.write_text("\n".join(lines) + "\n")
    path = _write(tmp_path, GOOD.replace(str(REF_DBC), str(dbc)))
    err = _error(path)
    assert err.file == str(dbc)
    assert err.line == index + 1
    assert "invalid DBC" in str(err)


def test_message_without_cycle_time_must_be_declared(tmp_path):
    ami = DBC / "citroen-ami" / "Ami_Rocks-e.dbc"
    text = f"""[vehicle]
name = "x"
[[bus]]
name = "vehicle"
interface = "virtual"
channel = "x"
dbc = ["{ami}"]
[[signal]]
path = "Vehicle.Speed"
message = "ECU_Odo"
signal = "ECU_Speed"
"""
    err = _error(_write(tmp_path, text))
    assert "no GenMsgCycleTime" in str(err) and "[messages.ECU_Odo] cycle_ms" in str(err)
    fixed = _write(tmp_path, text + "[messages.ECU_Odo]\ncycle_ms = 0\n", "fixed.toml")
    pipeline = Pipeline.build(load_profile(fixed), ManualClock())
    assert pipeline.store.slot("Vehicle.Speed").stale_after is None  # event-driven


def test_a_new_vehicle_needs_no_code(tmp_path):
    """A custom DBC with a custom signal, unit conversion and enum: profile only."""
    dbc = tmp_path / "scooter.dbc"
    dbc.write_text("""VERSION ""
NS_ :
BS_:
BU_: VCU
BO_ 1537 VCU_Info: 4 VCU
 SG_ VCU_SpeedMph : 0|8@1+ (0.5,0) [0|127.5] "mph" Vector__XXX
 SG_ VCU_Mode : 8|2@1+ (1,0) [0|3] "" Vector__XXX
 SG_ VCU_SeatTempF : 16|8@1+ (1,0) [0|255] "degF" Vector__XXX
BA_DEF_ BO_ "GenMsgCycleTime" INT 0 65535;
BA_ "GenMsgCycleTime" BO_ 1537 100;
VAL_ 1537 VCU_Mode 0 "Walk" 1 "City" 2 "Sport" ;
""")
    path = _write(tmp_path, """[vehicle]
name = "scooter"
[[bus]]
name = "vehicle"
interface = "virtual"
channel = "s"
dbc = ["scooter.dbc"]
[[signal]]
path = "Vehicle.Speed"
message = "VCU_Info"
signal = "VCU_SpeedMph"
[[signal]]
path = "Vehicle.Private.RideMode"
message = "VCU_Info"
signal = "VCU_Mode"
kind = "string"
enum = "dbc"
[[signal]]
path = "Vehicle.Private.SeatTemperature"
message = "VCU_Info"
signal = "VCU_SeatTempF"
kind = "number"
unit = "degC"
""")
    clock = ManualClock()
    pipeline = Pipeline.build(load_profile(path), clock)
    t = clock.time()
    pipeline.decoders["vehicle"].process([frame(0x601, bytes([60, 2, 212, 0]), t)])
    store = pipeline.store
    assert store.good_value("Vehicle.Speed", t) == pytest.approx(48.28032)  # 30 mph
    assert store.good_value("Vehicle.Private.RideMode", t) == "Sport"
    assert store.good_value("Vehicle.Private.SeatTemperature", t) == pytest.approx(100.0)


def test_shipped_profiles_load():
    for name in ("microev-ref.toml", "citroen-ami.toml"):
        profile = load_profile(DBC / "profiles" / name)
        pipeline = Pipeline.build(profile, ManualClock())
        assert len(pipeline.store) > 10
