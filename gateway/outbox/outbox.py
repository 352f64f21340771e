"""The asyncio face of the outbox.

SQLite commits wait for fsync, which can take tens of milliseconds on an SD
card; the event loop is also decoding CAN frames and must not stall. All
database work therefore runs on one dedicated worker thread, which also keeps
the store's single connection on a single thread. Bookkeeping (counters,
stats, the rows-pending event) stays on the loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.clock import Clock
from gateway.health import Counters, RateLimitedLog
from gateway.outbox.store import DropReport, Entry, Limits, OutboxError, OutboxStore, Row

T = TypeVar("T")


class Outbox:
    """Durable, bounded store-and-forward queue for QoS 1 messages."""

    def __init__(
        self, path: Path, limits: Limits, clock: Clock, counters: Counters, rlog: RateLimitedLog
    ) -> None:
        self._path = Path(path)
        self._store = OutboxStore(self._path, limits, clock=clock)
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._executor: ThreadPoolExecutor | None = None
        self._rows_pending = asyncio.Event()
        self._stats = self._store.stats()
        self._oldest: float | None = None

    async def open(self) -> None:
        """Open the database on the worker thread, recovering from a corrupt file."""
        if self._executor is not None:
            raise OutboxError(f"outbox {self._path} is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            moved = await self._call(self._store.open)
        except BaseException:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False)
            raise
        if moved is not None:
            self._counters.inc("outbox.recovered_corrupt")
            self._rlog.warning("outbox.recovered_corrupt",
                               f"outbox {self._path} was corrupt; moved it to {moved}"
                               " and started an empty one")

    async def close(self) -> None:
        """Close the database and stop the worker; safe to call more than once."""
        executor = self._executor
        if executor is None:
            return
        try:
            await self._call(self._store.close)
        finally:
            # Refuse new work from now on; anything queued earlier already ran before close.
            self._executor = None
            executor.shutdown(wait=True)
            self._rows_pending.set()  # a waiter must see the close, not sleep forever

    async def put(self, entries: Sequence[Entry]) -> list[int]:
        """Store ``entries`` atomically; returns their ids once durably committed."""
        batch = list(entries)

        def account(result: tuple[list[int], DropReport]) -> None:
            for entry in batch:
                self._counters.inc(f"outbox.in.{entry.kind.name.lower()}")
            self._count_drops(result[1])
            if result[1].over_limit:
                self._counters.inc("outbox.over_limit")
                self._rlog.warning(
                    "outbox.over_limit",
                    f"outbox holds {self._stats['bytes']} bytes of messages that are never"
                    " dropped, above max_bytes; keeping them")
            if self._stats["rows"]:
                self._rows_pending.set()

        ids, _ = await self._call(lambda: self._store.append(batch), account)
        return ids

    async def fetch(self, limit: int) -> list[Row]:
        """Up to ``limit`` pending rows in drain order."""
        return await self._call(lambda: self._store.fetch(limit))

    async def delete(self, ids: Sequence[int]) -> None:
        """Forget rows the broker acknowledged."""
        wanted = list(ids)
        await self._call(lambda: self._store.delete(wanted),
                         lambda n: self._counters.inc("outbox.delivered", n))

    async def expire(self) -> None:
        """Drop backfill older than the age bound, as of ``clock.time()``."""
        now = self._clock.time()
        await self._call(lambda: self._store.expire(now), self._count_drops)

    async def next_counter(self, name: str) -> int:
        """Next value of a persisted, strictly increasing counter."""
        return await self._call(lambda: self._store.next_counter(name))

    async def wait_for_rows(self) -> None:
        """Return once at least one row is pending (at once if one already is)."""
        while True:
            if self._executor is None:
                raise OutboxError(f"outbox {self._path} is not open")
            if self._stats["rows"]:
                return
            self._rows_pending.clear()
            await self._rows_pending.wait()

    def stats(self) -> dict[str, int]:
        """Stats as of the last completed operation (no I/O)."""
        return dict(self._stats)

    def oldest_created(self) -> float | None:
        """Creation time of the oldest pending row, as of the last completed operation."""
        return self._oldest

    @property
    def depth(self) -> int:
        """Rows pending, as of the last completed operation."""
        return self._stats["rows"]

    # ------------------------------------------------------------------ internals

    def _count_drops(self, report: DropReport) -> None:
        if report.backfill_full:
            self._counters.inc("outbox.dropped.backfill_full", report.backfill_full)
        if report.backfill_age:
            self._counters.inc("outbox.dropped.backfill_age", report.backfill_age)

    async def _call(self, job: Callable[[], T], after: Callable[[T], None] | None = None) -> T:
        """Run ``job`` on the worker; ``after`` then runs on the loop with its result.

        The bookkeeping is a done-callback on a shielded future so that it still
        happens when the awaiting task is cancelled: the commit happened regardless.
        """
        executor = self._executor
        if executor is None:
            raise OutboxError(f"outbox {self._path} is not open")
        store = self._store

        def work() -> tuple[T, dict[str, int], float | None]:
            result = job()
            return result, store.stats(), store.oldest_created()

        future = asyncio.get_running_loop().run_in_executor(executor, work)

        def done(fut: asyncio.Future[tuple[T, dict[str, int], float | None]]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            result, self._stats, self._oldest = fut.result()
            if after is not None:
                after(result)

        future.add_done_callback(done)
        result, _, _ = await asyncio.shield(future)
        return result
