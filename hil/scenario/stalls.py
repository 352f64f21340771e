"""Telling the gateway's faults from the rig's own: stalls of the simulated car.

A real ECU sends on its cycle whatever else happens. The simulated car is a Python task
on a shared machine (in User-Mode Linux, one virtual CPU for the car, the daemon and the
broker), and now and then it wakes late. The gateway then sees a fast message fall
silent for longer than its staleness window, and is right to say so. The car records
each stall (:class:`hil.sim.runner.Stall`); this module turns them into two answers:

- an ``rx.<Message>.timeout`` alert that a stall explains, and that clears again once
  the car is back, is *excused*: the message really was missing on the bus, and the
  report says so instead of failing;
- a failed run in which nothing but expectations failed, each after a stall long enough
  to make a watched message look silent, is *run again* by the suite, which says so.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

from gateway.config import load_profile
from gateway.decode import build_plans
from gateway.state import StateStore
from hil.scenario.check import Record
from hil.sim.runner import MAX_STALLS, Stall

ALERT_LAG_S = 1.0
"""From the end of a stall to the alert reaching the rig: one evaluation tick, then the
broker; generous, because the machine that stalled is the one that delivers it."""
CLEARED_WITHIN_S = 3.0
"""An excused timeout must clear this soon after it was raised: the message is back once
the car is. One that stays raised is a gateway that stopped hearing the bus."""
EARLY_S = 0.005
"""The car sends a frame up to one simulation step before it is due."""
_TIMEOUT_KEY = re.compile(r"rx\.(?P<name>.+)\.timeout")


@dataclass(frozen=True)
class Watch:
    """How long a message may be silent before the gateway's timeout alert, and its cycle."""

    window_s: float
    cycle_s: float

    @property
    def tolerates_s(self) -> float:
        """The longest stall of its sender that cannot make this message look silent: the
        frame after a stall comes at most one cycle plus the stall after the last one, which
        may have gone out a step early."""
        return self.window_s - self.cycle_s - EARLY_S


@functools.cache
def receive_watches(profile: Path) -> dict[str, Watch]:
    """Every cyclic mapped message of ``profile`` with the window its timeout uses
    (:meth:`MessagePlan.stale_window`, as the safety monitor reads it)."""
    out: dict[str, Watch] = {}
    for bus in build_plans(load_profile(profile), StateStore()).values():
        for plan in bus.mapped.values():
            window = plan.stale_window()
            if window is not None and plan.cycle_s:
                out[plan.name] = Watch(window, plan.cycle_s)
    return out


@dataclass(frozen=True)
class CarStalls:
    """The car's stalls in scenario seconds (``Stall.end`` relative to time 0)."""

    stalls: tuple[Stall, ...]
    watches: dict[str, Watch]
    ended: float = math.inf
    """When the run ended: a timeout raised shortly before had no time to clear."""

    def excuse(self, record: Record, records: list[Record]) -> str | None:
        """Why a raised ``rx.<Message>.timeout`` alert is the car's doing, or None: it came
        during or just after a stall that message cannot absorb, and cleared soon after."""
        key = str(record.payload.get("alert", {}).get("key", ""))
        m = _TIMEOUT_KEY.fullmatch(key)
        watch = self.watches.get(m["name"]) if m else None
        if m is None or watch is None:
            return None
        if record.t + CLEARED_WITHIN_S <= self.ended and \
                not _cleared_soon(key, record.t, records):
            return None
        for s in self.stalls:
            if s.length > watch.tolerates_s and s.start <= record.t <= s.end + ALERT_LAG_S:
                return (f"the simulated car stalled {s.length * 1000:.0f} ms at "
                        f"{s.start:.1f} s; {m['name']} is stale after "
                        f"{watch.window_s * 1000:.0f} ms")
        return None

    def disturbing(self) -> list[Stall]:
        """Stalls long enough to make the least tolerant watched message look silent."""
        if not self.watches:
            return []
        least = min(w.tolerates_s for w in self.watches.values())
        return [s for s in self.stalls if s.length > least]

    def disturbed_before(self, t: float) -> bool:
        """Whether a disturbing stall began before scenario time ``t``."""
        return any(s.start < t for s in self.disturbing())

    def summary(self) -> str | None:
        """One line on the disturbing stalls, or None when there were none."""
        bad = self.disturbing()
        if not bad:
            return None
        worst = max(bad, key=lambda s: s.length)
        count = f"{len(bad)}{' or more' if len(self.stalls) >= MAX_STALLS else ''}"
        return (f"the simulated car stalled {count} time(s) long enough for a fast message "
                f"to look silent (worst {worst.length * 1000:.0f} ms at {worst.start:.1f} s)")


def _cleared_soon(key: str, raised_at: float, records: list[Record]) -> bool:
    return any(r.topic == "alerts" and r.payload.get("transition") == "cleared"
               and r.payload.get("alert", {}).get("key") == key
               and raised_at <= r.t <= raised_at + CLEARED_WITHIN_S for r in records)


def in_scenario_time(stalls: list[Stall], t0: float, until: float) -> tuple[Stall, ...]:
    """``stalls`` (monotonic) shifted so that ``t0`` is scenario time 0, keeping those that
    began before ``until``, when the run ended and teardown began. Those of the gateway's
    start stay: alerts from then are judged too."""
    shifted = (Stall(s.end - t0, s.length) for s in stalls)
    return tuple(s for s in shifted if s.start <= until)
