"""Named monotonic counters.

Every stage counts what it dropped, rejected or failed under a dotted name
(``decode.unknown_id``, ``queue.can.vehicle.dropped``). Counters only go up,
so a health consumer can difference two snapshots to get rates.
"""

from __future__ import annotations

from collections import defaultdict


class Counters:
    """A flat registry of named integer counters."""

    def __init__(self) -> None:
        self._values: defaultdict[str, int] = defaultdict(int)

    def inc(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name`` (created at zero)."""
        self._values[name] += amount

    def get(self, name: str) -> int:
        """Current value of ``name``; zero if it was never incremented."""
        return self._values.get(name, 0)

    def snapshot(self, prefix: str = "") -> dict[str, int]:
        """A copy of the counters whose names start with ``prefix``, sorted by name."""
        return {k: v for k, v in sorted(self._values.items()) if k.startswith(prefix)}
