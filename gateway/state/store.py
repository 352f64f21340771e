"""The vehicle state store.

One :class:`SignalState` per canonical signal, created once at start-up from
the profile. The signals of one CAN frame share one :class:`Sample`: the
frame's source timestamp and its raw decoded values. Recording a frame is two
attribute stores on its sample, whatever the number of signals; a slot looks
its raw value up and converts it (scaling, units, enums) only when read.
Frames arrive hundreds to thousands of times more often than anyone reads a
value (telemetry at 1 Hz, safety at 10 Hz). Readers never see a bare value: they get
a :class:`SignalView` that says whether the value is valid and whether it is
stale *now*, or ask for :meth:`StateStore.good_value`, which answers None for
anything that is not both.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Value = float | int | bool | str
Converter = Callable[[Any], tuple["Value | None", bool]]
"""Raw reading -> (canonical value, valid)."""


def _as_is(raw: Any) -> tuple[Value | None, bool]:
    return raw, True


class Sample:
    """The latest reading of one source (a CAN frame, a page of a multiplexed frame).

    ``timestamp`` is the *source* timestamp (epoch seconds), never the time the
    gateway processed it. ``values`` maps source signal names to raw values;
    None means the source is not available (e.g. its last frame failed a check).
    The dict is shared and must not be mutated.
    """

    __slots__ = ("timestamp", "values")

    def __init__(self) -> None:
        self.timestamp: float | None = None
        self.values: dict[str, Any] | None = None


class SignalState:
    """Slot for one canonical signal: where its raw value lives and how to read it.

    ``key`` names the raw value inside ``sample.values``; ``convert`` turns it
    into the canonical value and says whether it is valid ("signal not
    available" codes are not).
    """

    __slots__ = ("convert", "group", "key", "kind", "path", "sample", "stale_after", "unit")

    def __init__(
        self,
        path: str,
        unit: str,
        kind: str,
        group: str,
        stale_after: float | None,
        convert: Converter | None = None,
        sample: Sample | None = None,
        key: str | None = None,
    ) -> None:
        self.path = path
        self.unit = unit
        self.kind = kind
        self.group = group
        self.stale_after = stale_after
        self.convert: Converter = convert or _as_is
        self.sample = sample or Sample()
        self.key = key or path

    @property
    def timestamp(self) -> float | None:
        """Source timestamp of the latest reading."""
        return self.sample.timestamp

    @property
    def raw(self) -> Any:
        """The latest raw value; None when not available."""
        values = self.sample.values
        return None if values is None else values.get(self.key)

    def reading(self) -> tuple[Value | None, bool]:
        """(value, valid) of the latest raw reading."""
        raw = self.raw
        if raw is None:
            return None, False
        return self.convert(raw)

    @property
    def value(self) -> Value | None:
        """Canonical value; None when not available."""
        return self.reading()[0]

    @property
    def valid(self) -> bool:
        """True when the latest reading is a real value."""
        return self.reading()[1]

    def set(self, raw: Any, timestamp: float) -> None:
        """Record a reading taken at ``timestamp``, for sources that own their slot."""
        self.sample.values = {self.key: raw}
        self.sample.timestamp = timestamp

    def is_stale(self, now: float) -> bool:
        """True when the signal was never received or is older than its window."""
        ts = self.sample.timestamp
        if ts is None:
            return True
        if self.stale_after is None:
            return False
        return now - ts > self.stale_after

    def invalidate(self, timestamp: float) -> None:
        """Mark the signal (and every signal sharing its sample) not available."""
        self.sample.values = None
        self.sample.timestamp = timestamp


@dataclass(frozen=True)
class SignalView:
    """An immutable reading of one signal at a given time."""

    path: str
    value: Value | None
    unit: str
    timestamp: float | None
    valid: bool
    stale: bool
    group: str

    @property
    def good(self) -> bool:
        """Valid and fresh: the only state in which the value may be acted on."""
        return self.valid and not self.stale

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "value": self.value,
            "unit": self.unit,
            "ts": self.timestamp,
            "valid": self.valid,
            "stale": self.stale,
        }


class StateStore:
    """All canonical signals of one vehicle."""

    def __init__(self) -> None:
        self._signals: dict[str, SignalState] = {}
        self._matches: dict[tuple[str, ...], list[SignalState]] = {}

    def register(self, slot: SignalState) -> SignalState:
        """Add ``slot``; registering a path twice is a profile error."""
        if slot.path in self._signals:
            raise ValueError(f"signal {slot.path!r} is mapped twice")
        self._signals[slot.path] = slot
        self._matches.clear()
        return slot

    def matching(self, patterns: Iterable[str]) -> list[SignalState]:
        """Slots matching ``patterns`` (fnmatch globs), in pattern order, each once.

        Cached until the next :meth:`register`: rules ask at every evaluation.
        """
        key = tuple(patterns)
        found = self._matches.get(key)
        if found is None:
            found, seen = [], set()
            for pattern in key:
                for s in self._signals.values():
                    if s.path not in seen and fnmatch.fnmatchcase(s.path, pattern):
                        seen.add(s.path)
                        found.append(s)
            self._matches[key] = found
        return list(found)

    def __contains__(self, path: object) -> bool:
        return path in self._signals

    def __iter__(self) -> Iterator[SignalState]:
        return iter(self._signals.values())

    def __len__(self) -> int:
        return len(self._signals)

    def slot(self, path: str) -> SignalState:
        """The slot for ``path``; KeyError if the profile does not map it."""
        return self._signals[path]

    def view(self, path: str, now: float) -> SignalView:
        """A reading of ``path`` at time ``now``."""
        s = self._signals[path]
        value, valid = s.reading()
        return SignalView(s.path, value, s.unit, s.timestamp, valid, s.is_stale(now), s.group)

    def snapshot(self, now: float) -> list[SignalView]:
        """Readings of every signal at time ``now``, in registration order."""
        return [self.view(path, now) for path in self._signals]

    def good_value(self, path: str, now: float) -> Value | None:
        """The value of ``path`` if it is valid and fresh at ``now``, else None.

        This is the default-deny accessor: a caller cannot get a stale or
        invalid value from it by accident. Unmapped paths also give None.
        """
        s = self._signals.get(path)
        if s is None or s.is_stale(now):
            return None
        value, valid = s.reading()
        return value if valid else None

    def stale_paths(self, now: float) -> list[str]:
        """Paths that are stale at ``now``."""
        return [s.path for s in self._signals.values() if s.is_stale(now)]
