"""Judging what came out over MQTT against a scenario (hil/scenario/check.py): pass and
fail, and a report that says what was expected and what came out instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from hil.scenario.check import Record, Verdict, all_met_at, evaluate
from hil.scenario.spec import Scenario, load_scenario

SCENARIO = """\
[scenario]
name = "judge"
duration_s = 30
allow_alerts = ["rx.*.timeout"]

[[expect]]  # overvoltage
alert = "battery.cell_overvoltage"
severity = "critical"
not_before = 3
by = 12

[[expect]]  # parked
event = "mode_changed"
where = { "data.to" = "park" }

[[expect]]  # locked
command = "lock"
by = 10

[[forbid]]  # speeding
topic = "telemetry"
where = { "signals.Vehicle.Speed.value" = { ">" = 23 } }
"""


def line_of(needle: str) -> int:
    return next(n for n, line in enumerate(SCENARIO.splitlines(), start=1) if needle in line)


@pytest.fixture
def scenario(tmp_path: Path) -> Scenario:
    path = tmp_path / "judge.toml"
    path.write_text(SCENARIO)
    return load_scenario(path)


def alert(t: float, key: str, transition: str = "raised", severity: str = "critical") -> Record:
    return Record(t, "alerts", {"transition": transition, "alert": {
        "key": key, "severity": severity, "message": f"{key} is {severity}"}})


def event(t: float, kind: str, **data: Any) -> Record:
    return Record(t, "events", {"type": kind, "data": data})


def result(t: float, cmd: str, status: str = "succeeded", reason: str = "") -> Record:
    return Record(t, f"cmd/res/{cmd}-{t:g}", {"cmd": cmd, "status": status, "reason": reason})


def telemetry(t: float, speed: float) -> Record:
    return Record(t, "telemetry", {"v": 1, "seq": 7, "mode": "drive",
                                   "signals": {"Vehicle.Speed": {"value": speed}}})


def all_met() -> list[Record]:
    return [telemetry(-0.5, 0.0), result(2.4, "lock"), alert(4.0, "battery.cell_overvoltage"),
            telemetry(5.0, 18.0), event(6.5, "mode_changed", to="park")]


def judge(scenario: Scenario, records: list[Record], problems: list[str] | None = None,
          ) -> tuple[Verdict, str]:
    verdict = evaluate(scenario, records, 30.0, problems or [])
    return verdict, verdict.report()


def test_all_met_passes_with_the_time_of_each(scenario: Scenario) -> None:
    verdict, report = judge(scenario, all_met())
    assert verdict.passed
    assert report.splitlines()[0] == f"PASS judge ({scenario.file}) after 30.0 s"
    for text in (r"alert battery\.cell_overvoltage raised critical: at 4\.0 s",
                 r"event mode_changed where data\.to == 'park': at 6\.5 s",
                 r"command lock succeeded: at 2\.4 s"):
        assert re.search(rf"^\s+ok\s+{text}$", report, re.MULTILINE), report
    assert len(verdict.lines) == 3


def test_wrong_severity_is_missing_and_the_alert_that_came_is_quoted(
        scenario: Scenario) -> None:
    records = [r for r in all_met() if r.topic != "alerts"]
    records += [alert(4.0, "battery.cell_overvoltage", severity="warning"),
                alert(4.5, "rx.BMS_Soc.timeout")]
    verdict, report = judge(scenario, records)
    assert not verdict.passed
    assert report.splitlines()[0].startswith("FAIL judge")
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if "MISSING" in line)
    assert lines[at].split() == ["MISSING", "alert", "battery.cell_overvoltage", "raised",
                                 "critical,", "between", "3", "and", "12", "s", "(line",
                                 f"{line_of('# overvoltage')})"]
    assert "got (same subject), 1 message(s):" in lines[at + 1]
    assert "4.0 s  alert battery.cell_overvoltage raised warning" in lines[at + 2]
    # Narrowed to the same key: the unrelated (allowed) timeout is not quoted.
    assert "rx.BMS_Soc.timeout" not in report


def test_missing_with_nothing_on_the_topic(scenario: Scenario) -> None:
    records = [r for r in all_met() if r.topic != "alerts"]
    verdict, report = judge(scenario, records)
    assert not verdict.passed
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if "MISSING" in line)
    assert "alert battery.cell_overvoltage raised critical" in lines[at]
    assert lines[at + 1].strip() == "got: nothing on 'alerts'"


def test_missing_with_other_messages_on_the_topic(scenario: Scenario) -> None:
    records = [r for r in all_met() if r.topic != "events"]
    records.append(event(8.0, "trip", distance_km=1.5))
    verdict, report = judge(scenario, records)
    assert not verdict.passed
    assert "MISSING    event mode_changed where data.to == 'park'" in report
    assert "got (on 'events'), 1 message(s):" in report
    assert 'event trip {"distance_km":1.5}' in report


@pytest.mark.parametrize("t", [2.9, 12.1])
def test_a_record_outside_the_window_does_not_count(scenario: Scenario, t: float) -> None:
    records = [r for r in all_met() if r.topic != "alerts"]
    records.append(alert(t, "battery.cell_overvoltage"))
    verdict, report = judge(scenario, records)
    assert not verdict.passed
    assert "MISSING    alert battery.cell_overvoltage" in report
    # It is still shown: "it came, but late" is the useful answer.
    assert f"{t:7.1f} s  alert battery.cell_overvoltage raised critical" in report


@pytest.mark.parametrize("t", [3.0, 12.0])
def test_the_window_includes_its_ends(scenario: Scenario, t: float) -> None:
    records = [r for r in all_met() if r.topic != "alerts"]
    records.append(alert(t, "battery.cell_overvoltage"))
    assert judge(scenario, records)[0].passed


def test_forbidden_message_fails_and_is_quoted(scenario: Scenario) -> None:
    records = [*all_met(), telemetry(7.0, 23.0), telemetry(8.0, 31.5)]
    verdict, report = judge(scenario, records)
    assert not verdict.passed
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if "FORBIDDEN" in line)
    assert lines[at].strip() == (
        "FORBIDDEN  telemetry message where signals.Vehicle.Speed.value > 23 "
        f"(line {line_of('# speeding')}) came out 1 time(s):")
    assert lines[at + 1].strip().startswith("8.0 s  telemetry")
    assert "signals.Vehicle.Speed.value = 31.5" in lines[at + 1]
    assert "FORBIDDEN" not in "".join(lines[at + 1:])


def test_unexpected_alert_fails_but_allowed_and_cleared_ones_do_not(
        scenario: Scenario) -> None:
    allowed = [*all_met(), alert(5.0, "rx.BMS_Soc.timeout", severity="warning"),
               alert(9.0, "rx.BMS_Soc.timeout", "cleared", "warning"),
               alert(9.5, "battery.undervoltage", "cleared")]
    assert judge(scenario, allowed)[0].passed
    verdict, report = judge(scenario, [*allowed, alert(7.0, "battery.overtemp_discharge",
                                                       severity="warning")])
    assert not verdict.passed
    unexpected = [line for line in report.splitlines() if "UNEXPECTED" in line]
    assert len(unexpected) == 1
    assert "alert battery.overtemp_discharge raised warning" in unexpected[0]
    assert "allow_alerts" in unexpected[0]


def test_rig_problems_fail_the_run(scenario: Scenario) -> None:
    verdict, report = judge(scenario, all_met(), ["the gateway exited with status 1 at 4.0 s"])
    assert not verdict.passed
    assert "  PROBLEM    the gateway exited with status 1 at 4.0 s" in report.splitlines()
    assert report.count(" ok ") == 3


def test_all_met_at_is_the_last_first_match(scenario: Scenario) -> None:
    records = all_met()
    assert all_met_at(scenario, records) == 6.5
    later = [*records, alert(9.0, "battery.cell_overvoltage"), event(20.0, "mode_changed",
                                                                     to="park")]
    assert all_met_at(scenario, later) == 6.5
    assert all_met_at(scenario, records[:-1]) is None
    # A match outside its window leaves the expectation unmet.
    late_lock = [*[r for r in records if not r.topic.startswith("cmd/")], result(10.5, "lock")]
    assert all_met_at(scenario, late_lock) is None


def test_topic_expectation_quotes_the_value_it_looks_at(tmp_path: Path) -> None:
    path = tmp_path / "speed.toml"
    path.write_text('[scenario]\nname = "speed"\nduration_s = 20\n\n[[expect]]\n'
                    'topic = "telemetry"\n'
                    'where = { "signals.Vehicle.Speed.value" = { ">=" = 10 } }\n')
    signals: dict[str, dict[str, float]] = {f"Vehicle.Signal{i:02d}": {"value": i}
                                            for i in range(12)}
    signals["Vehicle.Speed"] = {"value": 4.25}
    records = [Record(1.0, "telemetry", {"signals": signals})]
    report = evaluate(load_scenario(path), records, 20.0, []).report()
    assert "signals.Vehicle.Speed.value = 4.25" in report
