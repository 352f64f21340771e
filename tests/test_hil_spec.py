"""Scenario files: the shipped ones load and fit the simulated car, and every mistake in a
scenario is one error naming file, line and key (hil/scenario/spec.py, suite.py, live.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import can
import pytest

from gateway.clock import ManualClock, SystemClock
from gateway.config.errors import ConfigError
from hil.scenario.live import LiveVehicle
from hil.scenario.spec import Scenario, compare, load_scenario, lookup, topic_matches
from hil.scenario.suite import SCENARIO_DIR, load_all, scenario_files
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel

ISSUE_SCENARIOS = {"drive", "charge", "cell_overvoltage", "overtemp_ramp", "bms_silence",
                   "frozen_counter", "bad_checksum", "unknown_id_flood", "speedcap_ignored",
                   "gnss_loss"}
HEAD = '[scenario]\nname = "spec"\nduration_s = 20\n\n'
EXPECT = '[[expect]]\nalert = "rx.BMS_Pack.integrity"\n'
_channels = itertools.count()

MakeCar = Callable[[Scenario], LiveVehicle]


def line_of(text: str, needle: str) -> int:
    """The 1-based line holding ``needle``, which must occur on exactly one line."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, f"{needle!r} on lines {hits}"
    return hits[0]


def write(tmp_path: Path, text: str, name: str = "case.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def make_car() -> Iterator[MakeCar]:
    """Builds the simulated car for a scenario on a private virtual bus (and a pty for
    GNSS scenarios); everything opened is closed after the test."""
    buses: list[can.BusABC] = []
    fds: list[int] = []

    def make(scenario: Scenario) -> LiveVehicle:
        bus = can.Bus(interface="virtual", channel=f"hil-spec-{os.getpid()}-{next(_channels)}")
        buses.append(bus)
        master = None
        if scenario.gnss:
            master, slave = os.openpty()
            fds.extend((master, slave))
        model = VehicleModel(mode=scenario.mode, soc=scenario.soc, ambient_c=scenario.ambient_c)
        return LiveVehicle(bus, model, ManualClock(), master)

    yield make
    for bus in buses:
        bus.shutdown()
    for fd in fds:
        os.close(fd)


# --- the shipped scenarios ---------------------------------------------------------------

@pytest.mark.parametrize("path", scenario_files([]), ids=lambda p: p.stem)
def test_shipped_scenario_fits_the_simulated_car(path: Path, make_car: MakeCar) -> None:
    scenario = load_scenario(path)
    assert scenario.expect
    make_car(scenario).check(scenario)


def test_shipped_scenarios_cover_the_issue_and_load_together() -> None:
    files = scenario_files([])
    assert files == sorted(SCENARIO_DIR.glob("*.toml"))
    names = {s.name for s in load_all(files)}
    assert ISSUE_SCENARIOS.issubset(names)


def test_scenario_files_expands_directories(tmp_path: Path) -> None:
    for name in ("b.toml", "a.toml", "notes.txt"):
        (tmp_path / name).write_text("")
    single = tmp_path / "elsewhere.toml"
    assert scenario_files([str(tmp_path), str(single)]) == [
        tmp_path / "a.toml", tmp_path / "b.toml", single]


# --- errors name file:line: key ------------------------------------------------------------

LOAD_ERRORS = {
    "unknown action": (
        HEAD + '[[step]]\nat = 1\ndo = "teleport"\n\n' + EXPECT,
        'do = "teleport"', "step.do", "unknown action"),
    "missing required step key": (
        HEAD + '[[step]]\nat = 1\ndo = "mode"\nmode = "drive"\n\n'
        '[[step]]  # broken\nat = 2\ndo = "set_signal"\nmessage = "BMS_Pack"\nvalue = 3\n\n'
        + EXPECT,
        "# broken", "step.signal", "'set_signal' needs message, signal, value"),
    "step after duration_s": (
        HEAD + '[[step]]\nat = 1\ndo = "mode"\nmode = "drive"\n\n'
        '[[step]]  # late\nat = 21\ndo = "mode"\nmode = "park"\n\n' + EXPECT,
        "# late", "step.at", "after duration_s"),
    "by after duration_s": (
        HEAD + EXPECT + "by = 25\n", "by = 25", "expect.by", "after duration_s (20 s)"),
    "by before not_before": (
        HEAD + EXPECT + "not_before = 10\nby = 5\n", "by = 5", "expect.by",
        "earlier than not_before"),
    "two kinds in one expectation": (
        HEAD + EXPECT + '\n[[expect]]  # both\nalert = "x.y"\nevent = "trip"\n',
        "# both", "expect", "exactly one of alert, event, command or topic"),
    "unknown where operator": (
        HEAD + '[[expect]]\ntopic = "health"\nwhere = { "a.b" = { "~=" = 3 } }\n',
        "where =", "expect.where", "unknown operator '~='"),
    "non-number for >=": (
        HEAD + '[[expect]]\ntopic = "health"\nwhere = { "a.b" = { ">=" = "high" } }\n',
        "where =", "expect.where", ">= needs a number"),
    "flood faster than a CAN bus": (
        HEAD + '[[step]]\nat = 1\ndo = "flood"\nrate_hz = 4001\nduration_s = 2\n\n' + EXPECT,
        "rate_hz = 4001", "step.rate_hz", "at most 4000 frames/s"),
    "flood ids that are not CAN ids": (
        HEAD + '[[step]]\nat = 1\ndo = "flood"\nrate_hz = 10\nduration_s = 2\n'
        'ids = [true]\n\n' + EXPECT,
        "ids = [true]", "step.ids", "a list of CAN identifiers"),
}


@pytest.mark.parametrize("case", LOAD_ERRORS.values(), ids=LOAD_ERRORS.keys())
def test_load_error_names_file_line_and_key(tmp_path: Path,
                                            case: tuple[str, str, str, str]) -> None:
    text, needle, key, detail = case
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert str(err.value).startswith(f"{path}:{line_of(text, needle)}: {key}: ")
    assert detail in err.value.detail


def test_boundaries_that_are_allowed(tmp_path: Path) -> None:
    text = (HEAD + '[[step]]\nat = 20\ndo = "flood"\nrate_hz = 4000\nduration_s = 1\n\n'
            + EXPECT + "not_before = 5\nby = 20\n")
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.steps[0].args["rate_hz"] == 4000
    assert (scenario.expect[0].not_before, scenario.expect[0].by) == (5.0, 20.0)
    assert scenario.last_step_end == 21.0


def test_scenario_without_expectations_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + '[[step]]\nat = 1\ndo = "mode"\nmode = "drive"\n')
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert err.value.file == str(path)
    assert "needs at least one [[expect]]" in str(err.value)


def test_duplicate_names_across_files_are_refused(tmp_path: Path) -> None:
    first = write(tmp_path, HEAD + EXPECT, "first.toml")
    second = write(tmp_path, HEAD + EXPECT, "second.toml")
    with pytest.raises(ConfigError) as err:
        load_all([first, second])
    assert str(err.value).startswith(f"{second}")
    assert err.value.key == "scenario.name"
    assert "'spec'" in str(err.value)
    assert str(first) in str(err.value)


# --- errors only the simulated car can find ----------------------------------------------

def _bms_pack_id() -> int:
    frame_id: int = VehicleEcus(VehicleModel()).db.get_message_by_name("BMS_Pack").frame_id
    return frame_id


CAR_ERRORS = {
    "message the car lacks": ('do = "set_signal"\nmessage = "BMS_Nope"\nsignal = "X"\n'
                              "value = 1", "sends no message 'BMS_Nope'"),
    "signal the car lacks": ('do = "set_signal"\nmessage = "BMS_Pack"\nsignal = "BMS_Nope"\n'
                             "value = 1", "BMS_Pack has no signal 'BMS_Nope'"),
    "flood of the car's own ids": (f'do = "flood"\nrate_hz = 10\nduration_s = 1\n'
                                   f"ids = [0x7A0, {_bms_pack_id()}]",
                                   f"flood ids {hex(_bms_pack_id())} belong to the car's DBC"),
    "cell beyond the pack": ('do = "cell_fault"\ncell = 97\nvolts = 0.3', "cell must be 1 to"),
    "gnss step without a receiver": ('do = "gnss"\nstate = "silent"',
                                     "needs gnss = true in [scenario]"),
}


@pytest.mark.parametrize("case", CAR_ERRORS.values(), ids=CAR_ERRORS.keys())
def test_car_check_names_the_steps_line(tmp_path: Path, make_car: MakeCar,
                                        case: tuple[str, str]) -> None:
    body, detail = case
    # The bad step comes second in the file but first in time: the line must follow the
    # step through the loader's sort.
    text = (HEAD + '[[step]]\nat = 5\ndo = "mode"\nmode = "drive"\n\n'
            f"[[step]]  # bad\nat = 1\n{body}\n\n" + EXPECT)
    path = write(tmp_path, text)
    scenario = load_scenario(path)
    with pytest.raises(ConfigError) as err:
        make_car(scenario).check(scenario)
    assert str(err.value).startswith(f"{path}:{line_of(text, '# bad')}: step: ")
    assert detail in err.value.detail


# --- payload paths and comparisons --------------------------------------------------------

def test_lookup_follows_keys_that_contain_dots() -> None:
    payload = {"signals": {"Vehicle.Speed": {"value": 3}, "Vehicle": {"Other": 1}},
               "gnss": {"fix": None}}
    assert lookup(payload, "signals.Vehicle.Speed.value") == (True, 3)
    assert lookup(payload, "signals.Vehicle.Other") == (True, 1)
    assert lookup(payload, "gnss.fix") == (True, None)
    assert lookup(payload, "") == (True, payload)


@pytest.mark.parametrize("path", ["signals.Vehicle.Speed.unit", "signals.Vehicle.Speed.value.x",
                                  "nothing", "signals.Vehicle"])
def test_lookup_of_an_absent_path(path: str) -> None:
    payload = {"signals": {"Vehicle.Speed": {"value": 3}}}
    assert lookup(payload, path) == (False, None)


@pytest.mark.parametrize(("op", "actual", "expected", "result"), [
    ("==", "THREE_D", "THREE_*", True),
    ("==", "TWO_D", "THREE_*", False),
    ("!=", "moving", "stationary", True),
    ("!=", "stationary", "station*", False),
    ("match", "rx.BMS_Pack.timeout", "rx.*.timeout", True),
    ("match", 3, "3", False),
    ("==", True, 1, False),
    ("==", 1, True, False),
    ("==", False, 0, False),
    ("!=", True, 1, True),
    ("==", True, True, True),
    ("==", 80, 80.0, True),
    ("==", "80", 80, False),
    (">=", 10, 10, True),
    (">", 10, 10, False),
    ("<", 9.5, 10, True),
    ("<=", 10.5, 10, False),
    (">", "11", 10, False),
    (">", None, 10, False),
    (">=", True, 0, False),
])
def test_compare(op: str, actual: object, expected: object, result: bool) -> None:
    assert compare(op, actual, expected) is result


@pytest.mark.parametrize(("pattern", "topic", "result"), [
    ("cmd/res/+", "cmd/res/0f3a", True),
    ("cmd/res/+", "cmd/res", False),
    ("cmd/res/+", "cmd/res/a/b", False),
    ("state/+", "state/body", True),
    ("+/body", "state/body", True),
    ("state/body", "state/safety", False),
    ("alerts", "alerts", True),
    ("alerts", "alerts/active", False),
])
def test_topic_matches(pattern: str, topic: str, result: bool) -> None:
    assert topic_matches(pattern, topic) is result


async def test_a_flood_sends_exactly_rate_times_duration_frames_of_its_ids() -> None:
    # The flood scenario expects the gateway to count every frame, so the car must send
    # exactly rate x duration of them, spread over the stated identifiers.
    tx = can.Bus(interface="virtual", channel="hil-flood-count")
    rx = can.Bus(interface="virtual", channel="hil-flood-count")
    try:
        car = LiveVehicle(tx, VehicleModel(), SystemClock())
        await car._flood([0x7A0, 0x18FF00F9], 400, 0.5)
        ids = []
        while (msg := rx.recv(0)) is not None:
            ids.append((msg.arbitration_id, msg.is_extended_id))
    finally:
        tx.shutdown()
        rx.shutdown()
    assert car.flooded == 200
    assert len(ids) == 200
    assert set(ids) == {(0x7A0, False), (0x18FF00F9, True)}


async def test_a_ramp_step_moves_the_signal_in_real_time_and_holds_the_end() -> None:
    bus = can.Bus(interface="virtual", channel="hil-ramp")
    clock = ManualClock()
    try:
        car = LiveVehicle(bus, VehicleModel(), clock)
        ramp = asyncio.create_task(car._ramp({"message": "BMS_Temps", "signal": "BMS_MaxTemp",
                                              "from": 20.0, "to": 60.0, "over_s": 2.0}))
        for _ in range(10_000):  # bounded: a ramp that never sleeps must fail, not hang
            if clock.monotonic() >= 1.0:
                break
            await asyncio.sleep(0)
        assert clock.monotonic() == pytest.approx(1.0)
        # Half-way in time, half-way in value (updates come every 0.1 s).
        assert car.ecus.overrides["BMS_Temps"]["BMS_MaxTemp"] == pytest.approx(40.0, abs=2.0)
        await ramp
    finally:
        bus.shutdown()
    assert clock.monotonic() == pytest.approx(2.0)
    assert car.ecus.overrides["BMS_Temps"]["BMS_MaxTemp"] == 60.0
