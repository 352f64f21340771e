"""The ev-gateway command line and the demo, as users run them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import can
import pytest

from gateway.cli import main
from hil.sim.ecus import generate
from hil.sim.model import VehicleModel
from tests.conftest import REF_PROFILE, ROOT, frame


@pytest.fixture(scope="module")
def drive_log(tmp_path_factory) -> tuple[Path, int]:
    """Five seconds of simulated driving plus three bad frames, as a candump -L log."""
    path = tmp_path_factory.mktemp("logs") / "drive.log"
    frames = generate(VehicleModel(), 5.0, start=1_700_000_000.0)
    frames.insert(10, frame(0x7DF, b"\x02\x01\x0c", frames[10].timestamp))
    frames.insert(20, frame(0x100, b"\x01", frames[20].timestamp))
    frames.insert(30, can.Message(arbitration_id=0x123, is_error_frame=True,
                                  timestamp=frames[30].timestamp))
    with can.Logger(str(path)) as writer:
        for f in frames:
            f.channel = "vcan0"
            writer(f)
    return path, len(frames)


def test_decode_prints_one_json_line_per_frame(drive_log, capsys):
    path, count = drive_log
    assert main(["decode", "--profile", str(REF_PROFILE), str(path)]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == count
    errors = sorted(r["error"] for r in records if "error" in r)
    assert errors == ["error_frame", "unknown_id", "wrong_dlc"]
    pack = next(r for r in records if r.get("name") == "BMS_Pack")
    assert pack["channel"] == "vcan0" and pack["id"] == "0x100"
    assert set(pack) >= {"t", "channel", "id", "name", "signals", "vss"}
    assert pack["signals"]["BMS_ContactorState"] == "Closed"
    assert pack["vss"]["Vehicle.Powertrain.TractionBattery.ContactorState"] == "Closed"
    obc = next(r for r in records if r.get("name") == "OBC_Status")
    assert obc["ext"] is True and obc["id"] == "0x18FF50E5"
    assert f"{count} frames" in captured.err


def test_decode_with_plain_dbc_files(drive_log, capsys):
    path, count = drive_log
    dbcs = [str(ROOT / "dbc" / "reference" / f"microev_{n}.dbc") for n in ("bms", "mcu", "bcm")]
    args = ["decode"] + [a for d in dbcs for a in ("--dbc", d)] + [str(path)]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == count
    assert all("vss" not in r for r in records)


def test_decode_rejects_an_unknown_log_format(tmp_path, capsys):
    bogus = tmp_path / "capture.pcapng"
    bogus.write_bytes(b"\x00")
    assert main(["decode", "--profile", str(REF_PROFILE), str(bogus)]) == 2
    assert "unknown log format" in capsys.readouterr().err


def test_bad_profile_fails_with_one_clear_line(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text(REF_PROFILE.read_text().replace('signal = "BMS_SoH"', 'signal = "BMS_S0H"')
                      .replace('"../reference/', f'"{ROOT}/dbc/reference/'))
    assert main(["check", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"ev-gateway: {broken}:") and "BMS_S0H" in err
    assert "Traceback" not in err


def test_run_replays_a_log_into_the_state_view(drive_log, capsys):
    path, _ = drive_log
    status = main(["run", "--profile", str(REF_PROFILE), "--replay", str(path), "--fast",
                   "--view"])
    assert status == 0
    out = capsys.readouterr().out
    assert "BATTERY" in out and "StateOfCharge.Current" in out
    assert "bad frames 3" in out


def test_demo_shows_live_decoded_values():
    """The README's demo, in miniature: simulator -> CAN -> gateway -> mosquitto -> MQTT view."""
    result = subprocess.run(
        [sys.executable, "-m", "hil", "demo", "--duration", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.split("ev-gateway watch | demo-001")[-1]
    status = last.splitlines()[1]
    assert status.startswith("ONLINE")
    assert re.search(r"telemetry [1-9]\d* msgs \(0 lost\)", status), status
    # After a few seconds of driving the view, fed only by MQTT, shows fresh values.
    speed_line = next(line for line in last.splitlines() if "  Speed " in line)
    assert "km/h" in speed_line and "STALE" not in speed_line
    assert "Cell.*.Voltage (30/30 fresh)" in last
    assert "Traceback" not in result.stderr
