"""The HIL rig end to end: simulated car on a udp_multicast bus -> the real gateway process ->
a real mosquitto -> the verdict (hil/scenario/rig.py, suite.py, ``python -m hil run``).
Each scenario runs for about 10 s of real time."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil.broker import Mosquitto, find_mosquitto
from hil.scenario.rig import RigOptions, run_scenario
from hil.scenario.spec import load_scenario

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

# Other rig runs may share this machine: a timeout from a loaded CPU is not what these
# tests are about, so it may come out without failing them.
FROZEN = """\
[scenario]
name = "rig_frozen"
description = "BMS_Pack repeats its counter"
duration_s = 20
allow_alerts = ["rx.*.timeout"]

[vehicle]
mode = "drive"

[[step]]
at = 2
do = "freeze_counter"
message = "BMS_Pack"

[[expect]]
alert = "rx.BMS_Pack.integrity"
not_before = 2
by = 15
"""

IMPOSSIBLE = """\
[scenario]
name = "{name}"
description = "a healthy car cannot raise this"
duration_s = 8
allow_alerts = ["rx.*.timeout"]

[vehicle]
mode = "charge"

[[expect]]
alert = "battery.cell_overvoltage"
severity = "critical"
"""

# The simulated car starts locked, so the rig unlocks it first: the lock that follows
# can then only show up in state/body if the command did it.
LOCK = """\
[scenario]
name = "rig_lock"
description = "the rig unlocks, then locks the car"
duration_s = 20
allow_alerts = ["rx.*.timeout"]

[[step]]
at = 1
do = "command"
cmd = "unlock"

[[step]]
at = 4
do = "command"
cmd = "lock"

[[expect]]
command = "unlock"
not_before = 1
by = 4

[[expect]]
topic = "state/body"
where = { "signals.Vehicle.Cabin.Door.Row1.DriverSide.IsLocked.value" = false }
not_before = 1
by = 4

[[expect]]
command = "lock"
not_before = 4
by = 15

[[expect]]
topic = "state/body"
where = { "signals.Vehicle.Cabin.Door.Row1.DriverSide.IsLocked.value" = true }
not_before = 4
by = 15
"""


def multicast_bus() -> str:
    return f"udp_multicast:239.74.{random.randint(1, 250)}.{random.randint(1, 250)}"


def options(tmp_path: Path, broker: Mosquitto) -> RigOptions:
    bus = multicast_bus()
    return RigOptions(bus, bus, tmp_path / "work", (broker.host, broker.port))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def hil_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hil", "run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, check=False)


async def test_passing_scenario(tmp_path: Path, broker: Mosquitto) -> None:
    scenario = load_scenario(write(tmp_path, "frozen", FROZEN))
    verdict = await run_scenario(scenario, options(tmp_path, broker))
    report = verdict.report()
    assert verdict.passed, report
    assert re.search(r"ok\s+alert rx\.BMS_Pack\.integrity raised: at \d+\.\d s", report)
    log = tmp_path / "work" / "rig_frozen" / "gateway.log"
    assert "BMS_Pack" in log.read_text()


async def test_a_car_stall_is_reported_and_a_second_attempt_keeps_to_itself(
        tmp_path: Path, broker: Mosquitto) -> None:
    scenario = load_scenario(write(tmp_path, "frozen", FROZEN))

    async def hold_the_car_up() -> None:
        # The car runs on this event loop: blocking it is what a busy host does to it.
        await asyncio.sleep(2.0)
        time.sleep(0.4)

    stall = asyncio.create_task(hold_the_car_up())
    second = dataclasses.replace(options(tmp_path, broker), attempt=2)
    verdict = await run_scenario(scenario, second)
    await stall
    report = verdict.report()
    assert verdict.passed, report
    worst = re.search(r"RIG        the simulated car stalled \d+ time\(s\) .*worst (\d+) ms",
                      report)
    assert worst is not None, report
    assert int(worst[1]) >= 400
    work = tmp_path / "work" / "rig_frozen-2"
    assert 'vehicle_id = "hil-rig_frozen-2"' in (work / "gateway.toml").read_text()
    assert (work / "gateway.log").exists()
    assert not (tmp_path / "work" / "rig_frozen").exists()


async def test_failing_scenario_reports_expected_and_got(tmp_path: Path,
                                                         broker: Mosquitto) -> None:
    path = write(tmp_path, "impossible", IMPOSSIBLE.format(name="rig_impossible"))
    verdict = await run_scenario(load_scenario(path), options(tmp_path, broker))
    report = verdict.report()
    assert not verdict.passed
    assert report.startswith(f"FAIL rig_impossible ({path})")
    assert "MISSING    alert battery.cell_overvoltage raised critical" in report
    # What came out instead: nothing, or only the timeouts a loaded machine may allow.
    assert re.search(r"got(: nothing on 'alerts'| \(on 'alerts'\), \d+ message)", report)
    assert "PROBLEM" not in report


async def test_command_step_locks_the_car(tmp_path: Path, broker: Mosquitto) -> None:
    scenario = load_scenario(write(tmp_path, "lock", LOCK))
    verdict = await run_scenario(scenario, options(tmp_path, broker))
    report = verdict.report()
    assert verdict.passed, report
    assert re.search(r"ok\s+command lock succeeded: at", report)
    for locked in (False, True):
        assert re.search(rf"ok\s+state/body message where .*IsLocked\.value == {locked}: at",
                         report), report


def test_cli_bad_file_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    text = IMPOSSIBLE.format(name="rig_bad") + '\n[[step]]\nat = 1\ndo = "teleport"\n'
    path = write(tmp_path, "bad", text)
    line = text.splitlines().index('do = "teleport"') + 1
    done = hil_run(str(path), "--bus", multicast_bus())
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"hil: {path}:{line}: step.do: unknown action" in done.stdout


def test_cli_failing_file_exits_1_and_prints_fail(tmp_path: Path) -> None:
    path = write(tmp_path, "cli", IMPOSSIBLE.format(name="rig_cli"))
    done = hil_run(str(path), "--bus", multicast_bus(), "--workdir", str(tmp_path / "work"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAIL rig_cli ({path})" in done.stdout
    assert "MISSING    alert battery.cell_overvoltage raised critical" in done.stdout
    assert "hil: 0 of 1 scenarios passed; failed: rig_cli" in done.stdout
    assert (tmp_path / "work" / "rig_cli" / "gateway.log").is_file()
