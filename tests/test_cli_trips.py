"""``ev-gateway trips`` reads the local log the daemon writes, newest first."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.clock import ManualClock
from gateway.health import Counters, RateLimitedLog
from gateway.insights.log import InsightLog
from tests.test_insight_log import charge, trip


async def _fill(state_dir: Path) -> None:
    log = InsightLog(state_dir / "insights.sqlite", Counters(),
                     RateLimitedLog(logging.getLogger("test"), ManualClock()))
    await log.open()
    for n in range(3):
        assert await log.add(trip(n))
    assert await log.add(charge(0))
    await log.close()


async def test_trips_and_charges_come_out_newest_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await _fill(tmp_path)
    assert main(["trips", "--state-dir", str(tmp_path), "--limit", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in lines] == [trip(2).id, trip(1).id]
    assert lines[0] == json.loads(json.dumps(trip(2).as_dict()))
    assert main(["trips", "--state-dir", str(tmp_path), "--charges"]) == 0
    sessions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["id"] for s in sessions] == [charge(0).id]


def test_no_log_yet_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trips", "--state-dir", str(tmp_path)]) == 1
    assert "no local log" in capsys.readouterr().err
    assert not (tmp_path / "insights.sqlite").exists()  # a reader creates nothing
