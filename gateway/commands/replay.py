"""The replay cache: every authenticated command id, with the result it got, in SQLite.

A command id is recorded (``synchronous=FULL``, so it is on disk) before
any frame for it is sent; after a crash or power cut the id is still known
and the command cannot run again. Each row keeps the SHA-256 of the signed
body and the latest signed result, so a retransmission of the same
envelope gets the same answer while a different envelope reusing the id
is refused.

Rows are kept for ``retention_s`` and never dropped before their command
has expired (plus the clock-skew allowance): only then can the expiry
check take over from the cache. A fresh database (first start, a deleted
or corrupt file) records its creation time; commands issued before it are
refused, since the cache cannot know whether they ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE commands (id TEXT PRIMARY KEY, digest BLOB NOT NULL, kid TEXT NOT NULL,"
    " expires_ms INTEGER NOT NULL, received REAL NOT NULL, final INTEGER NOT NULL,"
    " result BLOB NOT NULL)",
    "CREATE INDEX commands_received ON commands (received)",
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value REAL NOT NULL)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class ReplayCacheError(Exception):
    """The replay cache cannot be used (I/O error, disk full, unreadable file)."""


@dataclass(frozen=True)
class Record:
    """What the cache knows of one command id."""

    id: str
    digest: bytes
    kid: str
    final: bool
    result: bytes


class ReplayStore:
    """Synchronous SQLite side of the cache; used from one thread only."""

    def __init__(self, path: Path, max_rows: int = 50_000) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self._conn: sqlite3.Connection | None = None
        self.created = 0.0
        """Epoch seconds when this database was created."""
        self.moved_aside: Path | None = None

    def open(self, now: float) -> None:
        """Open or create the database; a corrupt file is moved aside and replaced."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = self._connect(now)
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise
                self.moved_aside = self._aside(now)
                self.path.rename(self.moved_aside)
                self._conn = self._connect(now)
        except (OSError, sqlite3.Error) as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None

    def _aside(self, now: float) -> Path:
        """A name for a corrupt file that keeps every earlier one."""
        n = 0
        while (target := self.path.with_name(
                f"{self.path.name}.corrupt-{int(now)}{f'-{n}' if n else ''}")).exists():
            n += 1
        return target

    def _connect(self, now: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('created', ?)", (now,))
                conn.execute("COMMIT")
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"unknown schema version {version}")
            self.created = float(conn.execute(
                "SELECT value FROM meta WHERE name = 'created'").fetchone()[0])
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close the database."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ReplayCacheError(f"replay cache {self.path} is not open")
        return self._conn

    def lookup(self, command_id: str) -> Record | None:
        """The record of ``command_id``, if any."""
        try:
            row = self._db().execute(
                "SELECT id, digest, kid, final, result FROM commands WHERE id = ?",
                (command_id,)).fetchone()
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None
        if row is None:
            return None
        return Record(row[0], bytes(row[1]), row[2], bool(row[3]), bytes(row[4]))

    def record(self, record: Record, expires_ms: int, received: float) -> bool:
        """Insert ``record``; False (nothing written) when its id is already there."""
        try:
            cur = self._db().execute(
                "INSERT OR IGNORE INTO commands (id, digest, kid, expires_ms, received, final,"
                " result) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.digest, record.kid, expires_ms, received, int(record.final),
                 record.result))
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None
        return cur.rowcount == 1

    def update(self, command_id: str, result: bytes, final: bool) -> None:
        """Replace the stored result of ``command_id``."""
        try:
            self._db().execute("UPDATE commands SET result = ?, final = ? WHERE id = ?",
                               (result, int(final), command_id))
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None

    def unfinished(self) -> list[Record]:
        """Commands accepted but never finished: the gateway stopped while running them."""
        try:
            rows = self._db().execute(
                "SELECT id, digest, kid, final, result FROM commands WHERE final = 0"
            ).fetchall()
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None
        return [Record(r[0], bytes(r[1]), r[2], False, bytes(r[4])) for r in rows]

    def prune(self, now: float, retention_s: float, skew_s: float) -> int:
        """Forget rows older than ``retention_s`` (or beyond ``max_rows``) whose command
        expired more than ``skew_s`` ago; returns how many were deleted."""
        safe_ms = int((now - skew_s) * 1000)
        try:
            db = self._db()
            deleted = db.execute(
                "DELETE FROM commands WHERE received < ? AND expires_ms < ?",
                (now - retention_s, safe_ms)).rowcount
            excess = db.execute("SELECT COUNT(*) FROM commands").fetchone()[0] - self.max_rows
            if excess > 0:
                deleted += db.execute(
                    "DELETE FROM commands WHERE id IN (SELECT id FROM commands"
                    " WHERE expires_ms < ? ORDER BY received LIMIT ?)",
                    (safe_ms, excess)).rowcount
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None
        return deleted

    def full(self) -> bool:
        """True when ``max_rows`` unexpired commands fill the cache."""
        try:
            count = self._db().execute("SELECT COUNT(*) FROM commands").fetchone()[0]
        except sqlite3.Error as exc:
            raise ReplayCacheError(f"replay cache {self.path}: {exc}") from None
        return bool(count >= self.max_rows)


class ReplayCache:
    """The asyncio face of :class:`ReplayStore`: each call runs on one worker thread,
    so an fsync on an SD card never stalls the event loop."""

    def __init__(self, path: Path, max_rows: int = 50_000) -> None:
        self.store = ReplayStore(path, max_rows)
        self._executor: ThreadPoolExecutor | None = None

    @property
    def created(self) -> float:
        """Epoch seconds when the database was created."""
        return self.store.created

    async def open(self, now: float | None = None) -> None:
        """Open the database (``now`` stamps a new one; default: the current time)."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-cache")
        stamp = time.time() if now is None else now
        try:
            await self._call(lambda: self.store.open(stamp))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the database and stop the worker."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self.store.close)
        executor.shutdown(wait=True)

    async def lookup(self, command_id: str) -> Record | None:
        """See :meth:`ReplayStore.lookup`."""
        return await self._call(lambda: self.store.lookup(command_id))

    async def record(self, record: Record, expires_ms: int, received: float) -> bool:
        """See :meth:`ReplayStore.record`."""
        return await self._call(lambda: self.store.record(record, expires_ms, received))

    async def update(self, command_id: str, result: bytes, final: bool) -> None:
        """See :meth:`ReplayStore.update`."""
        await self._call(lambda: self.store.update(command_id, result, final))

    async def unfinished(self) -> list[Record]:
        """See :meth:`ReplayStore.unfinished`."""
        return await self._call(self.store.unfinished)

    async def prune(self, now: float, retention_s: float, skew_s: float) -> int:
        """See :meth:`ReplayStore.prune`."""
        return await self._call(lambda: self.store.prune(now, retention_s, skew_s))

    async def full(self) -> bool:
        """See :meth:`ReplayStore.full`."""
        return await self._call(self.store.full)

    async def _call(self, job: Callable[[], T]) -> T:
        executor = self._executor
        if executor is None:
            raise ReplayCacheError(f"replay cache {self.store.path} is not open")
        # Shielded: a cancelled caller must not leave a half-observed commit behind.
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(executor, job))
