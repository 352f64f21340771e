"""Telling the gateway's faults from the rig's own (hil/scenario/stalls.py): the car records
its stalls, a timeout alert a stall explains is excused, and a failed run whose every
failure the car may have caused runs once more."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
from pathlib import Path

import can
import pytest
from can.interfaces.virtual import VirtualBus

from gateway.clock import ManualClock
from hil.scenario.check import Record, Verdict, evaluate
from hil.scenario.rig import REFERENCE_PROFILE, RigOptions
from hil.scenario.spec import Scenario, load_scenario
from hil.scenario.stalls import CarStalls, in_scenario_time, receive_watches
from hil.scenario.suite import run_twice_if_disturbed
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel
from hil.sim.runner import MAX_CATCH_UP_S, STALL_S, Stall, run_vehicle
from tests.test_sim_faults import speed_limit_frame

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


async def test_a_long_stall_freezes_the_car_instead_of_living_through_it() -> None:
    clock = ManualClock()
    bus = can.Bus(interface="virtual", channel="stalls-freeze", receive_own_messages=False)
    ecus = VehicleEcus(VehicleModel(mode="drive"))
    ecus.receive([speed_limit_frame(20, 0)])  # the valet cap, as the gateway sends it
    stop = asyncio.Event()
    try:
        car = asyncio.create_task(run_vehicle(bus, ecus, clock, stop))
        for _ in range(20):  # 0.1 s on time
            await asyncio.sleep(0)
        before = ecus.model.t
        clock.advance(4.0)  # the host held the car up for 4 s
        for _ in range(2):  # one pass: the catch-up
            await asyncio.sleep(0)
        stop.set()
        await car
    finally:
        bus.shutdown()
    # Only MAX_CATCH_UP_S of the 4 s was simulated: not enough for the MCU to drop the cap
    # it heard no renewal of (0.5 s), so the car does not speed off on the rig's pause.
    assert ecus.model.t - before == pytest.approx(MAX_CATCH_UP_S, abs=0.011)
    assert ecus.model.speed_cap_kmh == 20.0


class RefusingBus(VirtualBus):
    """A real virtual bus that refuses to transmit while ``refusing`` is set, as vcan
    answers ENOBUFS when its softirq falls behind (which this host's kernel cannot show)."""

    refusing = False

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if self.refusing:
            raise can.CanOperationError("Failed to transmit: No buffer space available")
        super().send(msg, timeout)


async def test_frames_the_bus_refuses_wait_and_go_out_in_order_as_a_stall() -> None:
    clock = ManualClock()
    tx = RefusingBus(channel="stalls-refuse", receive_own_messages=False)
    rx = can.Bus(interface="virtual", channel="stalls-refuse")
    stop = asyncio.Event()
    stalls: list[Stall] = []
    try:
        car = asyncio.create_task(run_vehicle(tx, VehicleEcus(VehicleModel(mode="drive")),
                                              clock, stop, stalls=stalls))
        for _ in range(20):
            await asyncio.sleep(0)
        tx.refusing = True
        refused_at = clock.monotonic()
        for _ in range(20):  # 0.1 s in which nothing goes out
            await asyncio.sleep(0)
        tx.refusing = False
        for _ in range(4):
            await asyncio.sleep(0)
        stop.set()
        sent = await car
        frames = []
        while (msg := rx.recv(0)) is not None:
            frames.append(msg)
    finally:
        tx.shutdown()
        rx.shutdown()
    assert len(frames) == sent  # nothing was lost
    drive = [m.data for m in frames if m.arbitration_id == 0x200]  # MCU_Drive, every 20 ms
    counters = [d[6] & 0x0F for d in drive]
    assert all(b == (a + 1) % 16 for a, b in itertools.pairwise(counters)), counters
    [stall] = stalls
    assert stall.start == pytest.approx(refused_at, abs=0.006)
    assert stall.length == pytest.approx(0.1, abs=0.011)


def test_watches_come_from_the_profile_as_the_monitor_computes_them(
        watches: CarStalls) -> None:
    drive = watches.watches["MCU_Drive"]  # 20 ms cycle, stale after 3 cycles
    assert drive.window_s == pytest.approx(0.06)
    assert drive.cycle_s == pytest.approx(0.02)
    assert drive.tolerates_s == pytest.approx(0.035)  # less a step sent early
    assert watches.watches["BMS_Soc"].tolerates_s == pytest.approx(0.195)


def cleared(t: float, message: str) -> Record:
    return Record(t, "alerts", {"transition": "cleared", "alert": {
        "key": f"rx.{message}.timeout", "severity": "warning"}})


def excuse(car: CarStalls, t: float, message: str, cleared_after: float | None = 0.2,
           ) -> str | None:
    """The excuse for a timeout of ``message`` raised at ``t`` (cleared that much later)."""
    raised = timeout(t, message)
    records = [raised] if cleared_after is None else [raised, cleared(t + cleared_after,
                                                                      message)]
    return car.excuse(raised, records)


def test_a_timeout_during_or_just_after_a_long_enough_stall_is_excused(
        watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.1, length=0.1))
    why = excuse(car, 5.3, "MCU_Drive")
    assert why is not None
    assert "stalled 100 ms at 5.0 s" in why and "MCU_Drive is stale after 60 ms" in why
    assert excuse(car, 5.05, "MCU_Drive") is not None  # raised mid-stall
    assert excuse(car, 6.1, "MCU_Drive") is not None  # the last moment: 1 s after its end
    assert excuse(car, 6.2, "MCU_Drive") is None  # later than that
    assert excuse(car, 4.9, "MCU_Drive") is None  # before it


def test_a_timeout_that_does_not_clear_soon_is_never_excused(watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.1, length=0.1))
    assert excuse(car, 5.2, "MCU_Drive", cleared_after=3.0) is not None
    # A gateway that stopped hearing the bus after the stall keeps the alert raised.
    assert excuse(car, 5.2, "MCU_Drive", cleared_after=3.5) is None
    assert excuse(car, 5.2, "MCU_Drive", cleared_after=None) is None
    # Unless the run ended before it had the time to clear.
    ended = dataclasses.replace(car, ended=8.0)
    assert excuse(ended, 5.2, "MCU_Drive", cleared_after=None) is not None
    assert excuse(ended, 5.0, "MCU_Drive", cleared_after=None) is None


def test_a_stall_too_short_for_the_message_excuses_nothing(watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.04, length=0.04))
    assert excuse(car, 5.2, "MCU_Drive") is not None  # tolerates 35 ms
    assert excuse(car, 5.2, "BMS_Soc") is None  # tolerates 195 ms
    assert excuse(stalls_of(watches, Stall(5.03, 0.03)), 5.2, "MCU_Drive") is None


def test_only_receive_timeouts_are_excused(watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.5, length=0.5))
    other = Record(5.6, "alerts", {"transition": "raised", "alert": {
        "key": "rx.MCU_Drive.integrity", "severity": "warning"}})
    assert car.excuse(other, [other]) is None
    assert excuse(car, 5.6, "NoSuchMessage") is None


def test_disturbed_means_a_stall_the_least_tolerant_message_cannot_absorb(
        watches: CarStalls) -> None:
    assert stalls_of(watches, Stall(3.0, 0.032)).summary() is None
    car = stalls_of(watches, Stall(3.0, 0.032), Stall(8.0, 0.06), Stall(12.25, 0.25))
    assert [s.end for s in car.disturbing()] == [8.0, 12.25]
    summary = car.summary()
    assert summary is not None
    assert "2 time(s)" in summary and "worst 250 ms at 12.0 s" in summary
    assert not car.disturbed_before(7.94)  # the short one at 3 s does not count
    assert car.disturbed_before(7.95)


def test_stalls_are_shifted_to_scenario_time_and_teardown_dropped() -> None:
    stalls = [Stall(98.0, 0.1),  # the gateway's start: its alerts are judged too
              Stall(105.0, 0.1),
              Stall(130.05, 0.1),  # began before the end at 30 s
              Stall(131.0, 0.5)]  # teardown
    kept = in_scenario_time(stalls, 100.0, until=30.0)
    assert [(round(s.end, 3), s.length) for s in kept] == [(-2.0, 0.1), (5.0, 0.1),
                                                           (30.05, 0.1)]


OVERVOLTAGE = Record(3.0, "alerts", {"transition": "raised", "alert": {
    "key": "battery.cell_overvoltage", "severity": "critical"}})


def test_an_excused_alert_does_not_fail_the_run_but_is_reported(
        scenario: Scenario, watches: CarStalls) -> None:
    car = stalls_of(watches, Stall(end=5.1, length=0.1))
    records = [OVERVOLTAGE, timeout(5.2, "MCU_Drive"), cleared(5.3, "MCU_Drive")]
    verdict = evaluate(scenario, records, 20.0, [], car)
    report = verdict.report()
    assert verdict.passed, report
    excused = [line for line in report.splitlines() if line.startswith("  excused ")]
    assert len(excused) == 1
    assert "5.2 s  alert rx.MCU_Drive.timeout raised warning" in excused[0]
    assert excused[0].endswith("MCU_Drive is stale after 60 ms")
    assert "  RIG        the simulated car stalled 1 time(s)" in report
    assert verdict.rerun_because is None  # it passed
    # Without the stall the same alert is a failure, and not the rig's doing.
    plain = evaluate(scenario, records, 20.0, [], watches)
    assert not plain.passed and plain.rerun_because is None
    assert "UNEXPECTED" in plain.report() and "\n  excused " not in plain.report()


STALLED = Stall(end=4.0, length=0.5)


@pytest.mark.parametrize(("records", "problems", "stall", "rerun"), [
    ([], [], STALLED, True),  # missing, and the car stalled before it was due
    ([], [], Stall(end=25.0, length=0.5), False),  # the stall came after the run's end
    ([], [], Stall(end=4.0, length=0.032), False),  # too short to matter
    ([], ["the gateway exited with status 1 at 9.0 s"], STALLED, False),
    ([OVERVOLTAGE, timeout(9.0, "BMS_Soc")], [], STALLED, False),  # unexplained alert
], ids=["stalled-before-due", "stalled-after", "short-stall", "crash", "unexpected-alert"])
def test_a_failed_run_is_the_rigs_doing_only_when_every_failure_can_be(
        scenario: Scenario, watches: CarStalls, records: list[Record], problems: list[str],
        stall: Stall, rerun: bool) -> None:
    verdict = evaluate(scenario, records, 20.0, problems, stalls_of(watches, stall))
    assert not verdict.passed
    assert (verdict.rerun_because is not None) is rerun
    if rerun:
        assert verdict.rerun_because == stalls_of(watches, stall).summary()


def test_a_forbidden_message_is_never_the_rigs_doing(tmp_path: Path,
                                                     watches: CarStalls) -> None:
    path = tmp_path / "forbid.toml"
    path.write_text(SCENARIO + '[[forbid]]\nevent = "mode_changed"\n')
    forbidding = load_scenario(path)
    moved = Record(6.0, "events", {"type": "mode_changed", "data": {"to": "drive"}})
    car = stalls_of(watches, STALLED)
    assert evaluate(forbidding, [OVERVOLTAGE, moved], 20.0, [], car).rerun_because is None
    assert evaluate(forbidding, [moved], 20.0, [], car).rerun_because is None
    assert evaluate(forbidding, [], 20.0, [], car).rerun_because is not None


def verdict(scenario: Scenario, passed: bool, rerun: str | None) -> Verdict:
    return Verdict(scenario, passed, 20.0, [f"  attempt passed={passed}"], rerun)


@pytest.mark.parametrize(("first", "second", "runs", "passed"), [
    ((False, "the car stalled"), (True, None), 2, True),
    ((False, "the car stalled"), (False, "the car stalled"), 2, False),
    ((False, None), (True, None), 1, False),  # a failure the rig cannot explain stands
    ((True, None), (False, None), 1, True),  # a pass is a pass
])
def test_a_failure_the_rig_may_have_caused_runs_once_more_and_the_second_decides(
        scenario: Scenario, first: tuple[bool, str | None], second: tuple[bool, str | None],
        runs: int, passed: bool) -> None:
    attempts = [verdict(scenario, *first), verdict(scenario, *second)]
    calls: list[int] = []

    def run(attempt: int) -> Verdict:
        calls.append(attempt)
        return attempts[attempt - 1]

    out = io.StringIO()
    decided, again = run_twice_if_disturbed(run, out)
    assert calls == [1, 2][:runs]
    assert again is (runs == 2)
    assert decided is attempts[runs - 1] and decided.passed is passed
    if again:  # the discarded attempt is still shown, and why it did not count
        assert "FAIL stalls" in out.getvalue()
        assert "--- stalls again: the car stalled before each failed expectation" \
            in out.getvalue()
    else:
        assert out.getvalue() == ""


def test_a_second_attempt_has_its_own_vehicle_id(scenario: Scenario, tmp_path: Path) -> None:
    first = RigOptions("virtual:a", "virtual:a", tmp_path, ("127.0.0.1", 1883))
    second = dataclasses.replace(first, attempt=2)
    assert first.vehicle_id(scenario) == "hil-stalls"
    assert second.vehicle_id(scenario) == "hil-stalls-2"


def test_a_forbidden_receive_timeout_that_a_stall_explains_is_excused(
        tmp_path: Path, watches: CarStalls) -> None:
    path = tmp_path / "quiet.toml"
    path.write_text(SCENARIO + '[[forbid]]\nalert = "rx.*"\n')
    quiet = load_scenario(path)
    records = [OVERVOLTAGE, timeout(5.2, "MCU_Drive"), cleared(5.3, "MCU_Drive")]
    explained = evaluate(quiet, records, 20.0, [], stalls_of(watches, Stall(5.1, 0.1)))
    assert explained.passed, explained.report()
    assert "\n  excused " in explained.report()
    unexplained = evaluate(quiet, records, 20.0, [], watches)
    assert not unexplained.passed and unexplained.rerun_because is None
    assert "FORBIDDEN  alert rx.* raised" in unexplained.report()
