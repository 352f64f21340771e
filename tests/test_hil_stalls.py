"""Telling the gateway's faults from the rig's own (hil/scenario/stalls.py): the car records
its stalls, a timeout alert a stall explains is excused, and a failed run the car
disturbed runs once more."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import can
import pytest

from gateway.clock import ManualClock
from hil.scenario.check import Record, Verdict, evaluate
from hil.scenario.rig import REFERENCE_PROFILE
from hil.scenario.spec import Scenario, load_scenario
from hil.scenario.stalls import CarStalls, in_scenario_time, receive_watches
from hil.scenario.suite import run_twice_if_disturbed
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel
from hil.sim.runner import STALL_S, Stall, run_vehicle

SCENARIO = """\
[scenario]
name = "stalls"
duration_s = 20

[[expect]]
alert = "battery.cell_overvoltage"
"""


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    path = tmp_path / "stalls.toml"
    path.write_text(SCENARIO)
    return load_scenario(path)


@pytest.fixture(scope="module")
def watches() -> CarStalls:
    return CarStalls((), receive_watches(REFERENCE_PROFILE))


def timeout(t: float, message: str) -> Record:
    return Record(t, "alerts", {"transition": "raised", "alert": {
        "key": f"rx.{message}.timeout", "severity": "warning",
        "message": f"{message} not received"}})


def stalls_of(base: CarStalls, *stalls: Stall) -> CarStalls:
    return CarStalls(stalls, base.watches)


async def run_car_held_up(channel: str, hold_s: float) -> tuple[list[Stall], float]:
    """Run the car on virtual time, on time at first, then held up for ``hold_s``; the
    stalls it recorded and the monotonic time the hold ended."""
    clock = ManualClock()
    bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    stop = asyncio.Event()
    stalls: list[Stall] = []
    try:
        car = asyncio.create_task(run_vehicle(bus, VehicleEcus(VehicleModel(mode="drive")),
                                              clock, stop, stalls=stalls))
        for _ in range(50):  # on time: each pass sleeps exactly one step
            await asyncio.sleep(0)
        assert stalls == []
        clock.advance(hold_s)  # the host held the car up
        held_until = clock.monotonic()
        for _ in range(50):
            await asyncio.sleep(0)
        stop.set()
        await car
    finally:
        bus.shutdown()
    return stalls, held_until


async def test_the_car_records_a_stall_with_its_length_and_end() -> None:
    stalls, held_until = await run_car_held_up("stalls-car", 0.2)
    assert len(stalls) == 1
    assert stalls[0].end == pytest.approx(held_until)
    assert stalls[0].length == pytest.approx(0.205)  # the stall plus the step it slept


async def test_lateness_under_the_threshold_is_not_a_stall() -> None:
    stalls, _ = await run_car_held_up("stalls-car-2", STALL_S * 0.8)
    assert stalls == []


def test_watches_come_from_the_profile_as_the_monitor_computes_them(
        watches: CarStalls) -> None:
    drive = watches.watches["MCU_Drive"]  # 20 ms cycle, stale after 3 cycles
    assert drive.window_s == pytest.approx(0.06)
    assert drive.cycle_s == pytest.approx(0.02)
    assert drive.tolerates_s == pytest.approx(0.04)
    assert watches.watches["BMS_Soc"].tolerates_s == pytest.approx(0.2)


def test_a_timeout_during_or_just_after_a_long_enough_stall_is_excused(
        watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.1, length=0.1))
    why = car.excuse(timeout(5.3, "MCU_Drive"))
    assert why is not None
    assert "stalled 100 ms at 5.0 s" in why and "MCU_Drive is stale after 60 ms" in why
    assert car.excuse(timeout(5.05, "MCU_Drive")) is not None  # raised mid-stall
    assert car.excuse(timeout(7.0, "MCU_Drive")) is None  # long after it
    assert car.excuse(timeout(4.5, "MCU_Drive")) is None  # before it


def test_a_stall_too_short_for_the_message_excuses_nothing(watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.05, length=0.05))
    assert car.excuse(timeout(5.2, "MCU_Drive")) is not None  # tolerates 40 ms
    assert car.excuse(timeout(5.2, "BMS_Soc")) is None  # tolerates 200 ms


def test_only_receive_timeouts_are_excused(watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.5, length=0.5))
    other = Record(5.6, "alerts", {"transition": "raised", "alert": {
        "key": "rx.MCU_Drive.integrity", "severity": "warning"}})
    assert car.excuse(other) is None
    assert car.excuse(timeout(5.6, "NoSuchMessage")) is None


def test_disturbed_means_a_stall_the_least_tolerant_message_cannot_absorb(
        watches: CarStalls) -> None:
    assert stalls_of(watches, Stall(3.0, 0.035)).summary() is None
    car = stalls_of(watches, Stall(3.0, 0.035), Stall(8.0, 0.06), Stall(12.25, 0.25))
    assert [s.end for s in car.disturbing()] == [8.0, 12.25]
    summary = car.summary()
    assert summary is not None
    assert "2 time(s)" in summary and "worst 250 ms at 12.0 s" in summary


def test_stalls_are_shifted_to_scenario_time_and_kept_only_while_judged() -> None:
    stalls = [Stall(98.0, 0.1),  # start-up, well before time 0
              Stall(99.5, 0.1),  # its alert could still arrive after time 0
              Stall(105.0, 0.1),
              Stall(130.05, 0.1),  # began before the end at 30 s
              Stall(131.0, 0.5)]  # teardown
    kept = in_scenario_time(stalls, 100.0, until=30.0)
    assert [(round(s.end, 3), s.length) for s in kept] == [(-0.5, 0.1), (5.0, 0.1),
                                                           (30.05, 0.1)]


def test_an_excused_alert_does_not_fail_the_run_but_is_reported(
        scenario: Scenario, watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.1, length=0.1))
    met = Record(3.0, "alerts", {"transition": "raised", "alert": {
        "key": "battery.cell_overvoltage", "severity": "critical"}})
    records = [met, timeout(5.2, "MCU_Drive")]
    verdict = evaluate(scenario, records, 20.0, [], excuse=car.excuse,
                       disturbed=car.summary())
    report = verdict.report()
    assert verdict.passed, report
    excused = [line for line in report.splitlines() if line.startswith("  excused ")]
    assert len(excused) == 1
    assert "5.2 s  alert rx.MCU_Drive.timeout raised warning" in excused[0]
    assert excused[0].endswith("MCU_Drive is stale after 60 ms")
    assert "  RIG        the simulated car stalled 1 time(s)" in report
    # Without the stall the same alert is a failure.
    plain = evaluate(scenario, records, 20.0, [], excuse=watches.excuse)
    assert not plain.passed
    assert "UNEXPECTED" in plain.report() and "\n  excused " not in plain.report()


def verdict(scenario: Scenario, passed: bool, disturbed: str | None) -> Verdict:
    return Verdict(scenario, passed, 20.0, [f"  attempt passed={passed}"], disturbed)


@pytest.mark.parametrize(("first", "second", "runs", "passed"), [
    ((False, "the car stalled"), (True, None), 2, True),
    ((False, "the car stalled"), (False, "the car stalled"), 2, False),
    ((False, None), (True, None), 1, False),  # an undisturbed failure stands
    ((True, "the car stalled"), (False, None), 1, True),  # a pass is a pass
])
def test_a_failed_disturbed_run_runs_once_more_and_the_second_decides(
        scenario: Scenario, first: tuple[bool, str | None], second: tuple[bool, str | None],
        runs: int, passed: bool) -> None:
    attempts = [verdict(scenario, *first), verdict(scenario, *second)]
    calls: list[Verdict] = []

    def run() -> Verdict:
        calls.append(attempts[len(calls)])
        return calls[-1]

    out = io.StringIO()
    decided, again = run_twice_if_disturbed(run, out)
    assert len(calls) == runs
    assert again is (runs == 2)
    assert decided is calls[-1] and decided.passed is passed
    if again:  # the discarded attempt is still shown, and why it did not count
        assert "FAIL stalls" in out.getvalue()
        assert "--- stalls again: the car stalled in that run" in out.getvalue()
    else:
        assert out.getvalue() == ""
