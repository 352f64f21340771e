"""The durable half of the outbox: a single SQLite file, used from one thread.

Every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction on a WAL database
with ``synchronous=FULL``, so a commit that returned is on stable storage and
a crash at any instant leaves either the whole batch or none of it.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.clock import Clock, SystemClock
from gateway.persist import transaction

SCHEMA_VERSION = 1
# Rows looked at per step when trimming backfill: big enough to free space in
# one or two statements, small enough not to load a large share of the table.
_TRIM_CHUNK = 512
# SQLite's bound-parameter limit is large on modern builds; stay well below it.
_DELETE_CHUNK = 500
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SCHEMA = (
    "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL,"
    " topic TEXT NOT NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL,"
    " created REAL NOT NULL, size INTEGER NOT NULL)",
    "CREATE INDEX messages_kind_id ON messages (kind, id)",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class OutboxError(Exception):
    """The outbox database failed (disk full, I/O error, not open, unreadable)."""


class Kind(enum.IntEnum):
    """What a message is; the value is its drain priority (lower drains first)."""

    ALERT = 0
    EVENT = 1
    RETAINED = 2
    BACKFILL = 3


@dataclass(frozen=True)
class Entry:
    """A message to store. ``created`` is epoch seconds, used for the age bound."""

    kind: Kind
    topic: str
    payload: bytes
    created: float
    retain: bool = False


@dataclass(frozen=True)
class Row:
    """A stored message; ``id`` grows with insertion and is never reused."""

    id: int
    kind: Kind
    topic: str
    payload: bytes
    created: float
    retain: bool


@dataclass(frozen=True)
class Limits:
    """Bounds of the outbox. Sizes count payload plus UTF-8 topic bytes."""

    max_bytes: int = 64 * 1024 * 1024
    max_backfill_age: float = 7 * 24 * 3600.0
    max_payload: int = 256 * 1024


@dataclass
class DropReport:
    """What one append or expire dropped."""

    backfill_full: int = 0
    backfill_age: int = 0
    over_limit: bool = False


@dataclass
class _Totals:
    """Row counts per kind and total size, mirrored in memory to avoid scans."""

    size: int = 0
    rows: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))

    def copy(self) -> _Totals:
        return _Totals(self.size, dict(self.rows))

    def add(self, kind: Kind, size: int) -> None:
        self.rows[kind] += 1
        self.size += size

    def remove(self, deleted: Iterable[tuple[int, int]]) -> int:
        """Account for deleted ``(kind, size)`` rows; returns how many there were."""
        count = 0
        for kind, size in deleted:
            self.rows[Kind(kind)] -= 1
            self.size -= size
            count += 1
        return count


class _CorruptError(Exception):
    """The file is not a usable SQLite database."""


class OutboxStore:
    """Synchronous SQLite storage for outgoing messages. Not thread-safe."""

    def __init__(self, path: Path, limits: Limits, *, clock: Clock | None = None) -> None:
        self._path = Path(path)
        self._limits = limits
        # Only names the file of a corrupt database moved aside.
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._conn: sqlite3.Connection | None = None
        self._totals = _Totals()

    def open(self) -> Path | None:
        """Open or create the database; returns where a corrupt file was moved, if any."""
        if self._conn is not None:
            raise OutboxError(f"outbox {self._path} is already open")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"outbox directory for {self._path}: {exc}") from exc
        try:
            self._conn = self._connect()
            return None
        except _CorruptError:
            moved = self._move_aside()
        try:
            self._conn = self._connect()
        except _CorruptError as exc:
            raise OutboxError(f"outbox {self._path}: fresh database unusable: {exc}") from exc
        return moved

    def close(self) -> None:
        """Close the connection (a clean close also checkpoints the WAL)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def append(self, entries: Sequence[Entry]) -> tuple[list[int], DropReport]:
        """Store ``entries`` in one transaction, then trim backfill to ``max_bytes``.

        Returned ids follow ``entries``; an id may already be gone if a later entry of
        the batch coalesced it or the size bound trimmed it.
        """
        sized = [(entry, self._checked_size(entry)) for entry in entries]
        report = DropReport()
        if not sized:
            return [], report
        totals = self._totals.copy()
        ids: list[int] = []
        with self._transaction("append") as conn:
            for entry, size in sized:
                if entry.kind is Kind.RETAINED:
                    totals.remove(conn.execute(
                        "DELETE FROM messages WHERE kind = ? AND topic = ? RETURNING kind, size",
                        (int(Kind.RETAINED), entry.topic)).fetchall())
                cur = conn.execute(
                    "INSERT INTO messages (kind, topic, payload, retain, created, size)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (int(entry.kind), entry.topic, entry.payload, int(entry.retain),
                     entry.created, size))
                ids.append(int(cur.fetchone()[0]))
                totals.add(entry.kind, size)
            report.backfill_full = self._trim(conn, totals)
        report.over_limit = totals.size > self._limits.max_bytes
        self._totals = totals
        return ids, report

    def fetch(self, limit: int) -> list[Row]:
        """Up to ``limit`` pending rows, by priority then insertion order."""
        if limit < 0:
            raise ValueError(f"fetch limit must not be negative, got {limit}")
        with self._guard("fetch") as conn:
            rows = conn.execute(
                "SELECT id, kind, topic, payload, created, retain FROM messages"
                " ORDER BY kind, id LIMIT ?", (limit,)).fetchall()
        return [Row(int(i), Kind(k), str(t), bytes(p), float(c), bool(r))
                for i, k, t, p, c, r in rows]

    def delete(self, ids: Sequence[int]) -> int:
        """Delete rows by id in one transaction; missing ids are ignored."""
        unique = sorted(set(ids))
        if not unique:
            return 0
        totals = self._totals.copy()
        deleted = 0
        with self._transaction("delete") as conn:
            for start in range(0, len(unique), _DELETE_CHUNK):
                chunk = unique[start:start + _DELETE_CHUNK]
                marks = ",".join("?" * len(chunk))
                deleted += totals.remove(conn.execute(
                    f"DELETE FROM messages WHERE id IN ({marks}) RETURNING kind, size",
                    chunk).fetchall())
        self._totals = totals
        return deleted

    def expire(self, now: float) -> DropReport:
        """Delete backfill created before ``now - max_backfill_age``."""
        totals = self._totals.copy()
        with self._transaction("expire") as conn:
            dropped = totals.remove(conn.execute(
                "DELETE FROM messages WHERE kind = ? AND created < ? RETURNING kind, size",
                (int(Kind.BACKFILL), now - self._limits.max_backfill_age)).fetchall())
        self._totals = totals
        return DropReport(backfill_age=dropped)

    def next_counter(self, name: str) -> int:
        """Increment and return the persisted counter ``name`` (the first call gives 1)."""
        with self._transaction("next_counter") as conn:
            row = conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, 1) ON CONFLICT (name)"
                " DO UPDATE SET value = value + 1 RETURNING value", (name,)).fetchone()
        return int(row[0])

    def stats(self) -> dict[str, int]:
        """Pending rows and bytes, in total and per kind (from memory, no I/O)."""
        totals = self._totals
        stats = {"rows": sum(totals.rows.values()), "bytes": totals.size}
        stats.update({kind.name.lower(): count for kind, count in totals.rows.items()})
        return stats

    def oldest_created(self) -> float | None:
        """When the oldest pending row was made (ids grow with creation, and the primary
        key makes this one index step); None when the outbox is empty or closed."""
        if self._conn is None:
            return None
        row = self._conn.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    # ------------------------------------------------------------------ internals

    def _checked_size(self, entry: Entry) -> int:
        if not isinstance(entry.kind, Kind):
            raise ValueError(f"outbox entry kind must be a Kind, got {entry.kind!r}")
        if not entry.topic:
            raise ValueError("outbox entry has an empty topic")
        if len(entry.payload) > self._limits.max_payload:
            raise ValueError(f"outbox payload for {entry.topic} is {len(entry.payload)} bytes,"
                             f" above max_payload {self._limits.max_payload}")
        return len(entry.payload) + len(entry.topic.encode())

    def _trim(self, conn: sqlite3.Connection, totals: _Totals) -> int:
        """Delete the oldest backfill until under ``max_bytes``; returns rows dropped."""
        dropped = 0
        while totals.size > self._limits.max_bytes and totals.rows[Kind.BACKFILL] > 0:
            excess = totals.size - self._limits.max_bytes
            chunk = conn.execute(
                "SELECT id, size FROM messages WHERE kind = ? ORDER BY id LIMIT ?",
                (int(Kind.BACKFILL), _TRIM_CHUNK)).fetchall()
            if not chunk:
                break
            freed, last_id = 0, int(chunk[-1][0])
            for row_id, size in chunk:
                freed += size
                if freed >= excess:
                    last_id = int(row_id)
                    break
            dropped += totals.remove(conn.execute(
                "DELETE FROM messages WHERE kind = ? AND id <= ? RETURNING kind, size",
                (int(Kind.BACKFILL), last_id)).fetchall())
        return dropped

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self._path} is not open")
        return self._conn

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[sqlite3.Connection]:
        """Turn any sqlite3 failure into one OutboxError with a one-line message."""
        conn = self._require()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {op} failed on {self._path}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, op: str) -> Iterator[sqlite3.Connection]:
        with self._guard(op) as conn, transaction(conn):
            yield conn

    def _connect(self) -> sqlite3.Connection:
        """Open, verify and migrate; raises _CorruptError or OutboxError."""
        try:
            conn = sqlite3.connect(self._path, isolation_level=None)
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox open failed on {self._path}: {exc}") from exc
        try:
            check = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise _CorruptError("; ".join(check[:3]))
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"outbox {self._path}: cannot enable WAL (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            # After a checkpoint the WAL is cut back, so it cannot keep a burst's size forever.
            conn.execute("PRAGMA journal_size_limit = 4194304")
            self._migrate(conn)
            self._totals = _Totals()
            for kind, count, size in conn.execute(
                    "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY kind"):
                self._totals.rows[Kind(kind)] = int(count)
                self._totals.size += int(size)
        except sqlite3.Error as exc:
            conn.close()
            if exc.sqlite_errorcode in _CORRUPT_CODES:
                raise _CorruptError(str(exc)) from exc
            raise OutboxError(f"outbox open failed on {self._path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise OutboxError(f"outbox {self._path} has schema version {version};"
                              f" this build knows {SCHEMA_VERSION}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _move_aside(self) -> Path:
        """Rename the database and its WAL/SHM out of the way; returns the new main path."""
        stamp = int(self._clock.time())
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        serial = 0
        while target.exists():
            serial += 1
            target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}.{serial}")
        # WAL and SHM go first: a stale WAL left beside a fresh database would be replayed into it.
        try:
            for suffix in ("-wal", "-shm", ""):
                source = Path(f"{self._path}{suffix}")
                if source.exists():
                    os.replace(source, f"{target}{suffix}")
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise OutboxError(f"outbox {self._path} is corrupt and cannot be moved: {exc}") from exc
        return target
