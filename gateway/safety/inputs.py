"""Reading rule inputs from the state store: only good values, worst case first.

Everything here is default-deny: a stale, invalid, non-numeric or non-finite
reading is unknown, never a number a rule could act on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

from gateway.safety.levels import Measurement
from gateway.state import SignalState, StateStore

TB = "Vehicle.Powertrain.TractionBattery"
TM = "Vehicle.Powertrain.TractionMotor"
SPEED = "Vehicle.Speed"
MOTOR_SPEED = f"{TM}.Speed"
GNSS_SPEED = "Vehicle.CurrentLocation.Speed"
CURRENT = f"{TB}.CurrentCurrent"
SOC = f"{TB}.StateOfCharge.Current"
IS_CHARGING = f"{TB}.Charging.IsCharging"


Good = tuple[float, float] | None
_memo: dict[int, Good] | None = None


@contextlib.contextmanager
def evaluation() -> Iterator[None]:
    """Within this block, each slot is read and converted once.

    Several rules read the same cells and temperatures; nothing decodes
    while an evaluation runs (one thread), so the first reading holds for all.
    """
    global _memo  # noqa: PLW0603  # scoped to the block, reset on exit
    _memo = {}
    try:
        yield
    finally:
        _memo = None


def good(slot: SignalState, now: float) -> Good:
    """(value, source ts) of a numeric slot if it is valid, fresh and finite."""
    memo = _memo
    if memo is None:
        return _good(slot, now)
    key = id(slot)
    if key in memo:
        return memo[key]
    result = memo[key] = _good(slot, now)
    return result


def _good(slot: SignalState, now: float) -> Good:
    if slot.is_stale(now):
        return None
    value, valid = slot.reading()
    if not valid or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    ts = slot.timestamp
    assert ts is not None  # not stale implies received
    return float(value), ts


def good_bool(slot: SignalState | None, now: float) -> bool | None:
    """A boolean slot's value if it is valid and fresh, else None (unknown)."""
    if slot is None or slot.is_stale(now):
        return None
    value, valid = slot.reading()
    return value if valid and isinstance(value, bool) else None


def worst(slots: Sequence[SignalState], now: float, high: bool) -> Measurement | None:
    """The highest (``high``) or lowest good value of ``slots``; None if none is good.

    ``complete`` says whether every slot was good; with some unknown, the
    result only bounds the true worst case.
    """
    best: tuple[float, float] | None = None
    complete = True
    for slot in slots:
        reading = good(slot, now)
        if reading is None:
            complete = False
            continue
        if best is None or (reading[0] > best[0] if high else reading[0] < best[0]):
            best = reading
    if best is None:
        return None
    return Measurement(best[0], best[1], complete)


def spread(slots: Sequence[SignalState], now: float) -> Measurement | None:
    """max - min over ``slots``, only when every one of them is good."""
    readings = [good(s, now) for s in slots]
    if not readings or any(r is None for r in readings):
        return None
    values = [r[0] for r in readings if r is not None]
    ts = max(r[1] for r in readings if r is not None)
    return Measurement(max(values) - min(values), ts)


def select(store: StateStore, patterns: Iterable[str]) -> list[SignalState]:
    """Mapped slots matching ``patterns`` (fnmatch globs), in the order of the patterns."""
    return store.matching(patterns)


def slot(store: StateStore, path: str) -> SignalState | None:
    """The slot for ``path`` if the profile maps it."""
    return store.slot(path) if path in store else None


def charging_state(store: StateStore, now: float) -> bool | None:
    """True / False when the BMS says so with good data; None when unknown."""
    return good_bool(slot(store, IS_CHARGING), now)
