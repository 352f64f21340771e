"""The local record of finished trips and charging sessions, in one SQLite file.

Trips and sessions are also published as durable events; this log is what the
car itself remembers (for a "recent trips" view, and for looking back when the
server lost something). Every write is its own WAL transaction with
``synchronous=FULL``, and all SQLite work runs on one worker thread so an fsync
on an SD card never stalls the event loop. The log is an insight, not safety:
a failing disk is counted and logged and never raised into the caller, and a
file that is not a database is moved aside and replaced by an empty log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.clock import Clock, SystemClock
from gateway.health import Counters, RateLimitedLog
from gateway.insights.sessions import ChargeSession, Trip
from gateway.persist import transaction

T = TypeVar("T")
Kind = Literal["trip", "charge"]

SCHEMA_VERSION = 1
_TABLES: dict[Kind, str] = {"trip": "trips", "charge": "charges"}
_SCHEMA = (
    *(statement for table in _TABLES.values() for statement in (
        f'CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, "start" REAL NOT NULL,'
        f' "end" REAL NOT NULL, data TEXT NOT NULL)',
        f'CREATE INDEX IF NOT EXISTS {table}_end ON {table} ("end")',
    )),
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class _NotALog(Exception):
    """The file is not a usable log (not a database, damaged, an unknown schema)."""


class _Db:
    """The synchronous side; every method runs on the log's worker thread."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.keep = keep
        self.conn: sqlite3.Connection | None = None

    def open(self, stamp: float) -> Path | None:
        """Open or create the log; returns where a damaged file was moved, if one was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._connect()
            return None
        except _NotALog:
            moved = self._move_aside(stamp)
        self.conn = self._connect()
        return moved

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if [row[0] for row in conn.execute("PRAGMA quick_check")] != ["ok"]:
                raise _NotALog("quick_check failed")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version == 0:
                with transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
            elif version != SCHEMA_VERSION:
                raise _NotALog(f"schema version {version}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if exc.sqlite_errorcode in _CORRUPT:
                raise _NotALog(str(exc)) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, stamp: float) -> Path:
        n = 0
        while (target := self.path.with_name(
                f"{self.path.name}.corrupt-{int(stamp)}{f'-{n}' if n else ''}")).exists():
            n += 1
        # The WAL and SHM go too: replayed into a fresh database they would damage it again.
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.replace(f"{target}{suffix}")
        return target

    def add(self, table: str, record_id: str, start: float, end: float, data: str) -> None:
        """Insert or replace one record and trim the table to the newest ``keep``."""
        conn = self._require()
        with transaction(conn):
            conn.execute(f'INSERT OR REPLACE INTO {table} (id, "start", "end", data)'
                         " VALUES (?, ?, ?, ?)", (record_id, start, end, data))
            conn.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table}"
                         ' ORDER BY "end" DESC, id DESC LIMIT -1 OFFSET ?)', (self.keep,))

    def recent(self, table: str, limit: int) -> list[str]:
        """The ``data`` of the newest ``limit`` records, newest first."""
        rows = self._require().execute(
            f'SELECT data FROM {table} ORDER BY "end" DESC, id DESC LIMIT ?', (limit,))
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _require(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.OperationalError("the insight log is not open")
        return self.conn


class InsightLog:
    """Finished trips and charging sessions, newest ``keep`` of each kind."""

    def __init__(self, path: Path, counters: Counters, rlog: RateLimitedLog, keep: int = 1000,
                 *, clock: Clock | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._db = _Db(Path(path), keep)
        self._counters = counters
        self._rlog = rlog
        # Only stamps the name of a damaged file moved aside.
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def is_open(self) -> bool:
        """True when the log can be written."""
        return self._executor is not None and self._db.conn is not None

    async def open(self) -> None:
        """Open or create the log. Failures are counted (``insights.log_errors``) and
        logged; the log then stays closed and every add is counted as failed."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="insight-log")
        stamp = self._clock.time()
        try:
            moved = await self._call(lambda: self._db.open(stamp))
        except (OSError, sqlite3.Error, _NotALog) as exc:
            self._counters.inc("insights.log_errors")
            self._rlog.error("insights.log_open", f"insight log {self._db.path}: {exc}")
            await self.close()
            return
        if moved is not None:
            self._counters.inc("insights.log_corrupt")
            self._rlog.error("insights.log_corrupt", f"insight log {self._db.path} was not a"
                             f" usable database; moved to {moved.name}, starting a new one")

    async def add(self, record: Trip | ChargeSession) -> bool:
        """Store ``record`` (again: the same id replaces it); False when it could not be."""
        table = _TABLES["trip" if isinstance(record, Trip) else "charge"]
        data = json.dumps(record.as_dict())
        try:
            await self._call(lambda: self._db.add(table, record.id, record.start, record.end,
                                                  data))
        except (OSError, sqlite3.Error) as exc:
            self._counters.inc("insights.log_write_errors")
            self._rlog.error("insights.log_write", f"insight log {self._db.path}: {record.id}"
                             f" not stored: {exc}")
            return False
        return True

    async def recent(self, kind: Kind, limit: int = 10) -> list[dict[str, Any]]:
        """The newest ``limit`` records of ``kind`` (their ``as_dict()``), newest first;
        empty (counted in ``insights.log_read_errors``) when the log cannot be read."""
        table = _TABLES[kind]
        if limit < 1:
            return []
        try:
            rows = await self._call(lambda: self._db.recent(table, limit))
            values = [json.loads(row) for row in rows]
        except (OSError, sqlite3.Error, ValueError) as exc:
            self._counters.inc("insights.log_read_errors")
            self._rlog.error("insights.log_read", f"insight log {self._db.path}: {exc}")
            return []
        return [value for value in values if isinstance(value, dict)]

    async def close(self) -> None:
        """Close the database and stop the worker."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._db.close)
        executor.shutdown(wait=True)

    async def _call(self, job: Callable[[], T]) -> T:
        executor = self._executor
        if executor is None:
            raise sqlite3.OperationalError("the insight log is not open")
        # Shielded: a cancelled caller must not abandon a commit half observed.
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(executor, job))
