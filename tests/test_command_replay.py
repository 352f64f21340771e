"""The replay cache on real SQLite files: records, pruning, persistence, damage, errors."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.commands.replay import Record, ReplayCache, ReplayCacheError, ReplayStore

NOW = 1_700_000_000.0
KID = "0123456789abcdef"
FAR = int((NOW + 86_400) * 1000)
"""An expiry far in the future, in epoch milliseconds."""


def rec(n: int, *, final: bool = False, result: bytes = b"accepted") -> Record:
    return Record(f"{n:032x}", hashlib.sha256(str(n).encode()).digest(), KID, final, result)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplayStore]:
    s = ReplayStore(tmp_path / "commands.sqlite")
    s.open(NOW)
    yield s
    s.close()


async def test_record_then_lookup_and_first_record_wins(tmp_path):
    cache = ReplayCache(tmp_path / "commands.sqlite")
    await cache.open(NOW)
    try:
        first = rec(1)
        assert await cache.lookup(first.id) is None
        assert await cache.record(first, FAR, NOW) is True
        assert await cache.lookup(first.id) == first
        imposter = Record(first.id, b"other digest", "fedcba9876543210", True, b"forged")
        assert await cache.record(imposter, FAR, NOW + 1) is False
        assert await cache.lookup(first.id) == first
    finally:
        await cache.close()


async def test_update_and_unfinished(tmp_path):
    cache = ReplayCache(tmp_path / "commands.sqlite")
    await cache.open(NOW)
    try:
        for n in (1, 2, 3):
            assert await cache.record(rec(n), FAR, NOW)
        await cache.update(rec(2).id, b"succeeded", True)
        await cache.update(rec(3).id, b"still running", False)
        await cache.update(rec(9).id, b"nobody", True)  # unknown id: nothing is created
        assert await cache.lookup(rec(2).id) == rec(2, final=True, result=b"succeeded")
        assert await cache.lookup(rec(9).id) is None
        unfinished = sorted(await cache.unfinished(), key=lambda r: r.id)
        assert unfinished == [rec(1), rec(3, result=b"still running")]
    finally:
        await cache.close()


def test_a_record_is_committed_at_once(store):
    assert store.record(rec(1), FAR, NOW)
    other = sqlite3.connect(store.path)
    try:
        rows = other.execute("SELECT id, final FROM commands").fetchall()
    finally:
        other.close()
    assert rows == [(rec(1).id, 0)]


async def test_cache_survives_close_and_reopen(tmp_path):
    path = tmp_path / "commands.sqlite"
    cache = ReplayCache(path)
    await cache.open(NOW)
    await cache.open(NOW + 50)  # already open: nothing changes
    assert cache.created == NOW
    await cache.record(rec(1), FAR, NOW)
    await cache.record(rec(2), FAR, NOW)
    await cache.update(rec(1).id, b"done", True)
    await cache.close()
    await cache.close()

    again = ReplayCache(path)
    await again.open(NOW + 1000)
    try:
        assert again.created == NOW
        assert await again.lookup(rec(1).id) == rec(1, final=True, result=b"done")
        assert await again.unfinished() == [rec(2)]
        assert await again.record(rec(2), FAR, NOW + 1000) is False
    finally:
        await again.close()


async def test_open_without_a_time_stamps_the_current_time(tmp_path):
    cache = ReplayCache(tmp_path / "commands.sqlite")
    before = time.time()
    await cache.open()
    try:
        assert before <= cache.created <= time.time()
    finally:
        await cache.close()


def test_prune_keeps_rows_until_their_command_expired_past_skew(store):
    safe_ms = int((NOW - 10) * 1000)
    old, retention = NOW - 7200, 3600.0
    store.record(rec(1), safe_ms - 1, old)  # old and expired beyond skew: goes
    store.record(rec(2), safe_ms, old)  # old, but not yet expired past skew: stays
    store.record(rec(3), FAR, old)  # old, still valid: stays
    store.record(rec(4), safe_ms - 1, NOW - retention)  # exactly at retention: stays
    store.record(rec(5), 0, NOW - 10)  # recent, long expired: stays
    assert store.prune(NOW, retention, 10.0) == 1
    assert [store.lookup(rec(n).id) is not None for n in range(1, 6)] == [
        False, True, True, True, True]
    # A second later rows 2 and 4 are past both limits as well.
    assert store.prune(NOW + 1, retention, 10.0) == 2
    assert [store.lookup(rec(n).id) is not None for n in range(1, 6)] == [
        False, False, True, False, True]
    assert store.prune(NOW + 1, retention, 10.0) == 0


def test_prune_enforces_max_rows_only_among_expired_rows(tmp_path):
    s = ReplayStore(tmp_path / "commands.sqlite", max_rows=3)
    s.open(NOW)
    try:
        expired = int((NOW - 60) * 1000)
        for n in range(5):  # recent (within retention) but expired, oldest first
            s.record(rec(n), expired, NOW - 50 + n)
        s.record(rec(10), FAR, NOW - 100)  # the oldest rows are still valid
        s.record(rec(11), FAR, NOW - 99)
        assert s.prune(NOW, 3600.0, 10.0) == 4
        kept = [n for n in (0, 1, 2, 3, 4, 10, 11) if s.lookup(rec(n).id) is not None]
        assert kept == [4, 10, 11]
        assert s.full()
    finally:
        s.close()


def test_prune_never_drops_unexpired_rows_even_beyond_max_rows(tmp_path):
    s = ReplayStore(tmp_path / "commands.sqlite", max_rows=2)
    s.open(NOW)
    try:
        for n in range(3):
            s.record(rec(n), FAR, NOW - 10_000)
        assert s.prune(NOW, 3600.0, 10.0) == 0
        assert all(s.lookup(rec(n).id) is not None for n in range(3))
        assert s.full()
    finally:
        s.close()


def test_full_counts_rows_against_max_rows(tmp_path):
    s = ReplayStore(tmp_path / "commands.sqlite", max_rows=2)
    s.open(NOW)
    try:
        assert not s.full()
        s.record(rec(1), FAR, NOW)
        assert not s.full()
        s.record(rec(2), FAR, NOW)
        assert s.full()
    finally:
        s.close()


async def test_corrupt_file_is_moved_aside_and_replaced(tmp_path):
    path = tmp_path / "commands.sqlite"
    garbage = bytes(range(256)) * 16 + b"definitely not SQLite"
    path.write_bytes(garbage)
    cache = ReplayCache(path)
    await cache.open(NOW + 5.7)
    try:
        aside = tmp_path / f"commands.sqlite.corrupt-{int(NOW + 5.7)}"
        assert cache.store.moved_aside == aside
        assert aside.read_bytes() == garbage
        assert cache.created == NOW + 5.7
        assert await cache.lookup(rec(1).id) is None
        assert await cache.record(rec(1), FAR, NOW + 6)
    finally:
        await cache.close()
    again = ReplayStore(path)
    again.open(NOW + 100)
    try:
        assert again.moved_aside is None
        assert again.created == NOW + 5.7
        assert again.lookup(rec(1).id) == rec(1)
    finally:
        again.close()


def test_unknown_schema_version_is_treated_as_corrupt(tmp_path):
    path = tmp_path / "commands.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    s = ReplayStore(path)
    s.open(NOW)
    try:
        assert s.moved_aside is not None and s.moved_aside.is_file()
        assert s.created == NOW
        assert s.record(rec(1), FAR, NOW)
    finally:
        s.close()


async def test_every_operation_on_a_closed_cache_raises(tmp_path):
    cache = ReplayCache(tmp_path / "commands.sqlite")
    for _ in range(2):  # before the first open, then after close
        with pytest.raises(ReplayCacheError, match="not open"):
            await cache.lookup(rec(1).id)
        with pytest.raises(ReplayCacheError, match="not open"):
            await cache.record(rec(1), FAR, NOW)
        with pytest.raises(ReplayCacheError, match="not open"):
            await cache.update(rec(1).id, b"x", True)
        with pytest.raises(ReplayCacheError, match="not open"):
            await cache.unfinished()
        with pytest.raises(ReplayCacheError, match="not open"):
            await cache.prune(NOW, 3600.0, 10.0)
        with pytest.raises(ReplayCacheError, match="not open"):
            await cache.full()
        await cache.open(NOW)
        await cache.close()
    bare = ReplayStore(tmp_path / "other.sqlite")
    with pytest.raises(ReplayCacheError, match="not open"):
        bare.lookup(rec(1).id)


def test_sqlite_errors_during_use_become_replay_cache_errors(store):
    other = sqlite3.connect(store.path)
    other.execute("DROP TABLE commands")
    other.commit()
    other.close()
    calls = [lambda: store.lookup(rec(1).id), lambda: store.record(rec(1), FAR, NOW),
             lambda: store.update(rec(1).id, b"x", True), store.unfinished,
             lambda: store.prune(NOW, 1.0, 1.0), store.full]
    for call in calls:
        with pytest.raises(ReplayCacheError, match=str(store.path)):
            call()


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
async def test_unusable_path_is_an_error_and_leaves_the_cache_closed(tmp_path, where):
    if where == "directory":
        path = tmp_path / "commands.sqlite"
        path.mkdir()
    else:
        (tmp_path / "state").write_text("a file, not a directory")
        path = tmp_path / "state" / "commands.sqlite"
    cache = ReplayCache(path)
    with pytest.raises(ReplayCacheError, match="replay cache"):
        await cache.open(NOW)
    with pytest.raises(ReplayCacheError, match="not open"):
        await cache.lookup(rec(1).id)
    if where == "directory":
        path.rmdir()
    else:
        (tmp_path / "state").unlink()
    await cache.open(NOW)  # the obstacle is gone: a retry works
    try:
        assert await cache.record(rec(1), FAR, NOW)
    finally:
        await cache.close()


async def test_read_only_directory_is_an_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop root from writing")
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        cache = ReplayCache(directory / "commands.sqlite")
        with pytest.raises(ReplayCacheError, match="replay cache"):
            await cache.open(NOW)
    finally:
        directory.chmod(0o700)
