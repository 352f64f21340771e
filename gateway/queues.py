"""Bounded, named, counted queues between stages.

Every hand-off in the gateway goes through one of these. Each queue has a name
(it shows up in health counters), a bound, and a stated policy for what
happens when the bound is hit:

- ``DROP_OLDEST``: live data. The newest frames describe the car now, so old
  batches are discarded and counted (``queue.<name>.dropped``).
- ``BLOCK``: finite sources such as log replays. The producer waits, nothing
  is lost, and the file simply reads more slowly.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from gateway.health import Counters

T = TypeVar("T")


class Overflow(enum.Enum):
    """What a full queue does with new input."""

    DROP_OLDEST = "drop_oldest"
    BLOCK = "block"


class BatchQueue(Generic[T]):
    """An asyncio queue of batches, bounded by the total number of items.

    Bounding by items rather than by batches keeps memory predictable whatever
    the batch sizes are. Not thread-safe: threads hand batches over with
    ``loop.call_soon_threadsafe(queue.put_nowait, batch)``, one call per batch.
    """

    def __init__(
        self, name: str, max_items: int, overflow: Overflow, counters: Counters
    ) -> None:
        if max_items <= 0:
            raise ValueError("max_items must be positive")
        self.name = name
        self.max_items = max_items
        self.overflow = overflow
        self._counters = counters
        self._batches: deque[Sequence[T]] = deque()
        self._items = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False

    @property
    def depth(self) -> int:
        """Items currently queued."""
        return self._items

    def put_nowait(self, batch: Sequence[T]) -> None:
        """Enqueue a batch; on overflow apply the queue's policy (DROP_OLDEST only)."""
        if not batch or self._closed:
            return
        self._batches.append(batch)
        self._items += len(batch)
        self._counters.inc(f"queue.{self.name}.in", len(batch))
        while self._items > self.max_items and len(self._batches) > 1:
            if self.overflow is Overflow.BLOCK:
                break
            old = self._batches.popleft()
            self._items -= len(old)
            self._counters.inc(f"queue.{self.name}.dropped", len(old))
        if self._items >= self.max_items:
            self._writable.clear()
        self._readable.set()

    async def put(self, batch: Sequence[T]) -> None:
        """Enqueue a batch, waiting for room when the policy is BLOCK."""
        if self.overflow is Overflow.BLOCK:
            while self._items >= self.max_items and not self._closed:
                await self._writable.wait()
        self.put_nowait(batch)

    async def get(self) -> Sequence[T] | None:
        """The oldest batch; None once the queue is closed and drained."""
        while not self._batches:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        batch = self._batches.popleft()
        self._items -= len(batch)
        if self._items < self.max_items:
            self._writable.set()
        return batch

    async def get_many(self, max_items: int) -> list[T] | None:
        """Every queued item up to about ``max_items`` (whole batches), waiting for the first.

        None once the queue is closed and drained. Consumers that pay per call
        (a database transaction) use this to amortise the cost.
        """
        first = await self.get()
        if first is None:
            return None
        items = list(first)
        while self._batches and len(items) + len(self._batches[0]) <= max_items:
            batch = self._batches.popleft()
            self._items -= len(batch)
            items.extend(batch)
        if self._items < self.max_items:
            self._writable.set()
        return items

    def close(self) -> None:
        """No more input: ``get`` drains what is queued, then returns None."""
        self._closed = True
        self._readable.set()
        self._writable.set()
