"""The local log of trips and charging sessions: a real SQLite file in tmp_path."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.health import Counters, RateLimitedLog
from gateway.insights.log import InsightLog
from gateway.insights.sessions import ChargeSession, Trip

T0 = 1_700_000_000.0


def trip(n: int, km: float = 12.5, wh: float = 1500.0) -> Trip:
    """Trip number ``n``, ending an hour after the previous one."""
    end = T0 + 3600.0 * n
    return Trip(id=f"trip-{n}", start=end - 900.0, end=end, duration_s=900.0, distance_km=km,
                distance_source="odometer", energy_wh=wh, discharged_wh=wh + 100.0,
                regen_wh=100.0, wh_per_km=wh / km, soc_start=80.0, soc_end=67.0, soc_used=13.0,
                max_speed_kmh=62.0, odometer_start_km=100.0, odometer_end_km=100.0 + km,
                start_position=(48.85837, 2.29448), end_position=(48.86, 2.3))


def charge(n: int, ah: float = 60.0) -> ChargeSession:
    """Charging session number ``n``."""
    end = T0 + 3600.0 * n
    return ChargeSession(id=f"charge-{n}", start=end - 7200.0, end=end, duration_s=7200.0,
                         soc_start=30.0, soc_end=80.0, energy_wh=ah * 99.0, ah=ah,
                         max_power_w=3300.0, interruptions=0, end_reason="unplugged")


class Rig:
    """An insight log on ``path`` with its own counters."""

    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.clock = ManualClock(T0)
        self.counters = Counters()
        self.log = InsightLog(path, self.counters,
                              RateLimitedLog(logging.getLogger("test.insight_log"), self.clock),
                              keep, clock=self.clock)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "insights.db"


async def test_recent_gives_the_newest_records_of_each_kind_first(db: Path) -> None:
    rig = Rig(db)
    await rig.log.open()
    for n in (1, 3, 2):
        assert await rig.log.add(trip(n))
    assert await rig.log.add(charge(5))
    trips = await rig.log.recent("trip")
    assert [t["id"] for t in trips] == ["trip-3", "trip-2", "trip-1"]
    assert trips[0] == trip(3).as_dict()
    assert trips[0]["start_position"] == [48.85837, 2.29448]
    assert await rig.log.recent("trip", limit=1) == [trip(3).as_dict()]
    assert await rig.log.recent("charge") == [charge(5).as_dict()]
    await rig.log.close()


async def test_the_log_is_in_wal_mode_with_full_sync(db: Path) -> None:
    rig = Rig(db)
    await rig.log.open()
    await rig.log.add(trip(1))
    await rig.log.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT id, start, \"end\" FROM trips").fetchall() == [
            ("trip-1", trip(1).start, trip(1).end)]
    finally:
        conn.close()


async def test_only_the_newest_rows_are_kept_per_table(db: Path) -> None:
    rig = Rig(db, keep=3)
    await rig.log.open()
    for n in range(1, 7):
        await rig.log.add(trip(n))
    await rig.log.add(charge(1))
    assert [t["id"] for t in await rig.log.recent("trip", 10)] == ["trip-6", "trip-5", "trip-4"]
    assert [c["id"] for c in await rig.log.recent("charge", 10)] == ["charge-1"]
    await rig.log.close()


async def test_adding_the_same_id_again_replaces_the_record(db: Path) -> None:
    rig = Rig(db)
    await rig.log.open()
    await rig.log.add(charge(1, ah=40.0))
    await rig.log.add(charge(1, ah=41.5))
    stored = await rig.log.recent("charge")
    assert len(stored) == 1
    assert stored[0]["ah"] == 41.5
    await rig.log.close()


async def test_records_survive_a_reopen(db: Path) -> None:
    first = Rig(db)
    await first.log.open()
    await first.log.add(trip(1))
    await first.log.add(charge(2))
    await first.log.close()
    second = Rig(db)
    await second.log.open()
    assert await second.log.recent("trip") == [trip(1).as_dict()]
    assert await second.log.recent("charge") == [charge(2).as_dict()]
    await second.log.close()


async def test_a_file_that_is_not_a_database_is_moved_aside_and_replaced(db: Path) -> None:
    garbage = b"this is not an SQLite database\n" * 200
    db.write_bytes(garbage)
    rig = Rig(db)
    await rig.log.open()
    assert rig.log.is_open
    assert rig.counters.get("insights.log_corrupt") == 1
    aside = db.with_name(f"{db.name}.corrupt-{int(T0)}")
    assert aside.read_bytes() == garbage
    assert await rig.log.add(trip(1))
    assert [t["id"] for t in await rig.log.recent("trip")] == ["trip-1"]
    await rig.log.close()


async def test_a_full_disk_is_counted_and_the_log_recovers(db: Path) -> None:
    rig = Rig(db)
    await rig.log.open()
    await rig.log.add(trip(1))
    # Without root, SQLite's page limit is the way to make a write hit "disk is full".
    conn = rig.log._db.conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    assert not await rig.log.add(replace(trip(2), id="x" * 20_000))
    assert rig.counters.get("insights.log_write_errors") == 1
    conn.execute("PRAGMA max_page_count = 1000000")
    assert await rig.log.add(trip(3))
    assert [t["id"] for t in await rig.log.recent("trip")] == ["trip-3", "trip-1"]
    await rig.log.close()


async def test_an_unopened_log_counts_failures_instead_of_raising(db: Path) -> None:
    rig = Rig(db)
    assert not await rig.log.add(trip(1))
    assert await rig.log.recent("trip") == []
    assert rig.counters.get("insights.log_write_errors") == 1
    assert rig.counters.get("insights.log_read_errors") == 1


async def test_a_log_that_cannot_be_created_stays_closed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the log's directory should be")
    rig = Rig(blocker / "insights.db")
    await rig.log.open()
    assert not rig.log.is_open
    assert rig.counters.get("insights.log_errors") == 1
    assert not await rig.log.add(trip(1))
