"""The SQLite outbox: order, coalescing, bounds, persistence, corruption and kill -9 safety."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.health import Counters, RateLimitedLog
from gateway.outbox import Entry, Kind, Limits, Outbox, OutboxError, OutboxStore, Row

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).resolve().parent / "outbox_writer.py"
LOGGER = "test.outbox"
DAY = 24 * 3600.0
T0 = 1_700_000_000.0


def entry(kind: Kind, payload: str, topic: str = "t", created: float = T0) -> Entry:
    """An entry whose size is len(topic) + len(payload) (ASCII)."""
    return Entry(kind, topic, payload.encode(), created, retain=kind is Kind.RETAINED)


def payloads(rows: list[Row]) -> list[str]:
    return [row.payload.decode() for row in rows]


def opened(path: Path, limits: Limits | None = None) -> OutboxStore:
    store = OutboxStore(path, limits or Limits())
    assert store.open() is None
    return store


@pytest.fixture
def store(tmp_path):
    store = opened(tmp_path / "outbox.db")
    yield store
    store.close()


@pytest.fixture
async def make_outbox(tmp_path, clock):
    """Opens Outboxes on tmp_path with fresh Counters; closes them after the test."""
    made: list[Outbox] = []

    async def make(limits: Limits | None = None) -> tuple[Outbox, Counters]:
        counters = Counters()
        rlog = RateLimitedLog(logging.getLogger(LOGGER), clock)
        box = Outbox(tmp_path / "outbox.db", limits or Limits(), clock, counters, rlog)
        await box.open()
        made.append(box)
        return box, counters

    yield make
    for box in made:
        await box.close()


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- order and coalescing


def test_fetch_drains_by_priority_then_insertion_order(store: OutboxStore) -> None:
    batch = [entry(Kind.BACKFILL, "b1"), entry(Kind.ALERT, "a1"), entry(Kind.RETAINED, "r1"),
             entry(Kind.EVENT, "e1"), entry(Kind.BACKFILL, "b2"), entry(Kind.ALERT, "a2")]
    ids, report = store.append(batch)

    assert ids == sorted(ids) and len(set(ids)) == 6
    assert report.backfill_full == 0 and not report.over_limit
    assert payloads(store.fetch(100)) == ["a1", "a2", "e1", "r1", "b1", "b2"]
    assert payloads(store.fetch(3)) == ["a1", "a2", "e1"]
    first = store.fetch(1)[0]
    assert first == Row(ids[1], Kind.ALERT, "t", b"a1", T0, False)

    # Ids already gone (or never there) are ignored and not counted.
    assert store.delete([ids[1], ids[3], ids[1], 999_999]) == 2
    assert payloads(store.fetch(100)) == ["a2", "r1", "b1", "b2"]
    assert store.stats() == {"rows": 4, "bytes": 12, "alert": 1, "event": 0,
                             "retained": 1, "backfill": 2}


def test_retained_topics_keep_only_the_newest_pending_value(store: OutboxStore) -> None:
    (old_a,), _ = store.append([entry(Kind.RETAINED, "on", "state/a")])
    store.append([entry(Kind.RETAINED, "v1", "state/b"), entry(Kind.ALERT, "x", "state/a")])
    (new_a,), _ = store.append([entry(Kind.RETAINED, "off", "state/a")])

    rows = store.fetch(100)
    assert [(r.kind, r.topic, r.payload) for r in rows] == [
        (Kind.ALERT, "state/a", b"x"),  # only RETAINED rows coalesce
        (Kind.RETAINED, "state/b", b"v1"),
        (Kind.RETAINED, "state/a", b"off"),
    ]
    assert rows[-1].id == new_a and rows[-1].retain
    assert store.delete([old_a]) == 0  # a publisher acking the replaced row is harmless
    assert store.stats()["retained"] == 2
    assert store.stats()["bytes"] == len("state/b") + 2 + len("state/a") * 2 + 1 + 3


# --------------------------------------------------------------------------- bounds


def test_size_bound_drops_the_oldest_backfill_first(tmp_path: Path) -> None:
    store = opened(tmp_path / "outbox.db", Limits(max_bytes=50))
    ten = [entry(Kind.BACKFILL, f"b{i}".ljust(9)) for i in range(8)]  # 10 bytes each
    ids, report = store.append(ten[:5])
    assert report.backfill_full == 0 and store.stats()["bytes"] == 50

    assert store.append(ten[5:6])[1].backfill_full == 1
    assert store.append(ten[6:8])[1].backfill_full == 2
    alert_ids, report = store.append([entry(Kind.ALERT, "a0".ljust(9))])
    assert report.backfill_full == 1 and not report.over_limit
    rows = store.fetch(100)
    assert [r.payload.strip() for r in rows] == [b"a0", b"b4", b"b5", b"b6", b"b7"]
    kept_backfill = [r.id for r in rows[1:]]
    assert kept_backfill == sorted(kept_backfill) and kept_backfill[0] == ids[4]

    # 25 new bytes: the three oldest backfill rows go, exactly enough to fit again.
    big_ids, report = store.append([entry(Kind.BACKFILL, "x" * 24)])
    assert report.backfill_full == 3
    assert [r.id for r in store.fetch(100)] == [alert_ids[0], kept_backfill[-1], big_ids[0]]
    assert store.stats()["bytes"] == 45
    store.close()


async def test_alerts_and_events_are_kept_even_above_the_bound(
        make_outbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    box, counters = await make_outbox(Limits(max_bytes=30))
    await box.put([entry(Kind.BACKFILL, "b0".ljust(9)), entry(Kind.BACKFILL, "b1".ljust(9))])
    await box.put([entry(Kind.ALERT, "a0".ljust(9)), entry(Kind.EVENT, "e0".ljust(9))])
    await box.put([entry(Kind.ALERT, "a1".ljust(9))])
    assert counters.get("outbox.dropped.backfill_full") == 2
    assert counters.get("outbox.over_limit") == 0

    await box.put([entry(Kind.EVENT, "e1".ljust(9))])
    await box.put([entry(Kind.RETAINED, "r0".ljust(9))])
    await box.put([entry(Kind.BACKFILL, "b2".ljust(9))])  # dropped at once: nothing else can go

    assert payloads(await box.fetch(100)) == [p.ljust(9) for p in ("a0", "a1", "e0", "e1", "r0")]
    assert box.depth == 5 and box.stats()["bytes"] == 50
    assert counters.get("outbox.over_limit") == 3
    assert counters.get("outbox.dropped.backfill_full") == 3
    assert counters.snapshot("outbox.in.") == {"outbox.in.alert": 2, "outbox.in.backfill": 3,
                                               "outbox.in.event": 2, "outbox.in.retained": 1}
    assert len(warnings_logged(caplog)) == 1  # rate-limited, not one line per put


async def test_expire_drops_only_backfill_older_than_the_age(
        make_outbox, clock: ManualClock) -> None:
    box, counters = await make_outbox(Limits(max_backfill_age=7 * DAY))
    start = clock.time()
    await box.put([entry(Kind.BACKFILL, "old", created=start),
                   entry(Kind.ALERT, "alert", created=start),
                   entry(Kind.EVENT, "event", created=start)])
    clock.advance(3 * DAY)
    await box.put([entry(Kind.BACKFILL, "newer", created=clock.time())])

    clock.advance(4 * DAY)  # "old" is exactly at the age: kept
    await box.expire()
    assert box.depth == 4 and counters.get("outbox.dropped.backfill_age") == 0

    clock.advance(1.0)
    await box.expire()
    assert payloads(await box.fetch(100)) == ["alert", "event", "newer"]
    assert counters.get("outbox.dropped.backfill_age") == 1

    clock.advance(3 * DAY)
    await box.expire()
    assert payloads(await box.fetch(100)) == ["alert", "event"]
    assert counters.get("outbox.dropped.backfill_age") == 2


def test_a_batch_with_an_oversize_entry_writes_nothing(tmp_path: Path) -> None:
    store = opened(tmp_path / "outbox.db", Limits(max_payload=100))
    batch = [entry(Kind.ALERT, "fine"), entry(Kind.EVENT, "fine"), entry(Kind.EVENT, "x" * 101)]
    with pytest.raises(ValueError, match="max_payload"):
        store.append(batch)
    assert store.fetch(100) == [] and store.stats()["rows"] == 0

    store.append([entry(Kind.EVENT, "x" * 100)])  # the limit itself is allowed
    assert store.stats()["rows"] == 1
    store.close()


def test_a_failing_disk_raises_outbox_error_and_keeps_the_store_consistent(
        store: OutboxStore) -> None:
    store.append([entry(Kind.ALERT, "kept")])
    before = store.stats()
    conn = store._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # a real SQLITE_FULL on the next growth

    with pytest.raises(OutboxError, match="full"):
        store.append([entry(Kind.EVENT, "x" * 50_000), entry(Kind.EVENT, "y" * 50_000)])
    assert store.stats() == before
    assert payloads(store.fetch(100)) == ["kept"]

    conn.execute("PRAGMA max_page_count = 1073741823")
    store.append([entry(Kind.EVENT, "after")])
    assert payloads(store.fetch(100)) == ["kept", "after"]


# --------------------------------------------------------------------------- persistence


def test_rows_and_counters_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "outbox.db"
    store = opened(path)
    assert [store.next_counter("mqtt.seq") for _ in range(2)] == [1, 2]
    assert store.next_counter("other") == 1
    ids, _ = store.append([entry(k, f"{k.name}{i}") for i in range(3) for k in Kind])
    store.delete([max(ids)])  # the highest id must still never come back
    before, stats = store.fetch(100), store.stats()
    store.close()

    store = opened(path)
    assert store.fetch(100) == before
    assert store.stats() == stats
    assert store.next_counter("mqtt.seq") == 3
    new_ids, _ = store.append([entry(Kind.BACKFILL, "later")])
    assert new_ids[0] > max(ids)
    store.close()


async def test_a_corrupt_file_is_moved_aside_and_replaced(
        tmp_path: Path, make_outbox, clock: ManualClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    garbage = b"this is not an sqlite database\x00\xff" * 200
    (tmp_path / "outbox.db").write_bytes(garbage)

    box, counters = await make_outbox()

    moved = tmp_path / f"outbox.db.corrupt-{int(clock.time())}"
    assert moved.read_bytes() == garbage
    assert counters.get("outbox.recovered_corrupt") == 1
    assert [m for m in warnings_logged(caplog) if str(moved) in m] == warnings_logged(caplog)
    assert len(warnings_logged(caplog)) == 1
    (row_id,) = await box.put([entry(Kind.ALERT, "fresh")])
    assert [(r.id, r.payload) for r in await box.fetch(10)] == [(row_id, b"fresh")]
    assert await box.next_counter("mqtt.seq") == 1


def test_a_database_with_damaged_pages_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    store = opened(path)
    store.append([entry(Kind.BACKFILL, "p" * 300) for _ in range(200)])
    store.close()
    with path.open("r+b") as f:  # keep the header, wreck the pages after it
        f.seek(4096)
        f.write(random.Random(7).randbytes(3 * 4096))

    store = OutboxStore(path, Limits())
    moved = store.open()
    assert moved is not None and moved.name.startswith("outbox.db.corrupt-") and moved.exists()
    assert store.stats()["rows"] == 0 and store.fetch(10) == []
    store.append([entry(Kind.EVENT, "works")])
    assert payloads(store.fetch(10)) == ["works"]
    store.close()


# --------------------------------------------------------------------------- async facade


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_wait_for_rows_is_woken_by_put(make_outbox) -> None:
    box, counters = await make_outbox()
    waiter = asyncio.create_task(box.wait_for_rows())
    await settle()
    assert not waiter.done()

    ids = await box.put([entry(Kind.EVENT, "wake")])
    await asyncio.wait_for(waiter, 5.0)
    await asyncio.wait_for(box.wait_for_rows(), 5.0)  # rows pending: returns at once

    await box.delete([*ids, ids[0] + 100])
    assert counters.get("outbox.delivered") == 1 and box.depth == 0
    waiter = asyncio.create_task(box.wait_for_rows())
    await settle()
    assert not waiter.done()
    await box.close()
    with pytest.raises(OutboxError):
        await asyncio.wait_for(waiter, 5.0)


async def test_a_closed_outbox_refuses_work(make_outbox) -> None:
    box, _ = await make_outbox()
    await box.close()
    await box.close()  # idempotent
    with pytest.raises(OutboxError, match="not open"):
        await box.put([entry(Kind.ALERT, "late")])
    with pytest.raises(OutboxError, match="not open"):
        await box.fetch(1)


# --------------------------------------------------------------------------- kill -9


def launch(db: Path, *mode: str) -> subprocess.Popen[bytes]:
    # Unbuffered pipes: readline must not pull later lines into a buffer select() cannot see.
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(db), *mode], cwd=ROOT, bufsize=0,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the writer printed nothing"
    line = proc.stdout.readline().decode()
    assert line.endswith("\n"), f"the writer died: {proc.stderr.read().decode()}"
    return line.strip()


def kill_9(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out.decode()


def check_database(db: Path) -> list[Row]:
    """Integrity, intact payloads, whole batches only; returns the rows in drain order."""
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = opened(db, Limits(max_bytes=1 << 40))
    try:
        rows = store.fetch(10_000_000)
    finally:
        store.close()
    found: Counter[tuple[int, int]] = Counter()
    sizes = {}
    for row in rows:
        doc = json.loads(row.payload)
        assert hashlib.sha256(doc["body"].encode()).hexdigest() == doc["sha"]
        found[doc["run"], doc["batch"]] += 1
        sizes[doc["run"], doc["batch"]] = doc["n"]
    assert found == Counter(sizes), "a batch was only partly committed"
    return rows


def test_kill_9_mid_stream_keeps_every_committed_batch_whole(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    rng = random.Random(1234)
    delays = [0.05, 0.5, *(rng.uniform(0.05, 0.5) for _ in range(3))]
    runs: list[int] = []
    ids_so_far: set[int] = set()
    for delay in delays:
        proc = launch(db, "stream")
        runs.append(int(read_line(proc).split()[1]))
        time.sleep(delay)
        printed = [int(line) for line in kill_9(proc).split("\n")[:-1]]  # last may be torn

        assert printed, "the writer committed nothing before the kill"
        assert printed == sorted(set(printed))
        assert printed[0] > max(ids_so_far, default=0), "an id was reused after a crash"
        ids = {row.id for row in check_database(db)}
        assert set(printed) <= ids
        assert ids_so_far <= ids
        ids_so_far = ids
    assert runs == list(range(1, len(delays) + 1))


def test_kill_9_after_a_fill_keeps_all_ten_thousand_alerts_in_order(tmp_path: Path) -> None:
    db = tmp_path / "fill.db"
    proc = launch(db, "fill", "10000")
    assert read_line(proc) == "ready 1"
    assert read_line(proc, timeout=300.0) == "done"
    kill_9(proc)

    rows = check_database(db)
    assert len(rows) == 10_000
    assert {row.kind for row in rows} == {Kind.ALERT}
    assert [json.loads(row.payload)["batch"] for row in rows] == list(range(10_000))
    assert all(a.id < b.id for a, b in itertools.pairwise(rows))
