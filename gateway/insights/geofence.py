"""Geofences: is the car inside each configured circle or polygon, and when did that change?

Every usable fix is measured against each fence as a signed distance to its
boundary (metres, positive inside). GNSS wanders by metres even when the car
stands still, so a car parked on the edge of a fence would otherwise enter and
leave it every few seconds. Two guards stop that: a fix only counts as inside
once it is ``hysteresis_m`` inside (as outside once ``hysteresis_m`` outside),
and a change needs ``confirm`` such fixes in a row, so one wild fix changes
nothing. Fixes in the band between the two thresholds break a run and change
nothing else.

Enter and exit are durable events. The states are kept in a small JSON file so
that a car that left the depot while the gateway was off still reports the exit
at the next start. Without a recorded state (fresh install, a fence added to the
configuration) the first confirmed state is taken silently: whether the car
*entered* is unknowable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.config.location import GeofenceSpec
from gateway.gnss.fix import Fix
from gateway.gnss.geo import LatLon, LocalFrame, distance_m
from gateway.health import Counters, RateLimitedLog
from gateway.insights.state_file import StateFile

EventSink = Callable[[str, Mapping[str, Any]], None]
"""Where durable events go: (kind, data)."""

XY = tuple[float, float]


def fence_frame(spec: GeofenceSpec) -> LocalFrame:
    """The flat frame a fence is measured in: around its centre or its first vertex."""
    if spec.kind == "circle":
        if spec.center is None:
            raise ValueError(f"circle geofence {spec.name!r} has no centre")
        return LocalFrame(spec.center)
    if len(spec.points) < 3:
        raise ValueError(f"polygon geofence {spec.name!r} needs at least 3 vertices")
    return LocalFrame(spec.points[0])


def signed_distance(spec: GeofenceSpec, frame: LocalFrame, point: LatLon) -> float:
    """Metres from ``point`` to the fence boundary: positive inside, negative outside.

    ``frame`` is :func:`fence_frame` of ``spec`` (only polygons use it).
    """
    if spec.kind == "circle":
        if spec.center is None or spec.radius_m is None:
            raise ValueError(f"circle geofence {spec.name!r} has no centre or radius")
        return spec.radius_m - distance_m(spec.center, point)
    vertices = [frame.to_xy(v) for v in spec.points]
    return polygon_signed_distance(vertices, frame.to_xy(point))


def polygon_signed_distance(vertices: Sequence[XY], p: XY) -> float:
    """Distance from ``p`` to the nearest edge of a closed polygon, negated outside it."""
    n = len(vertices)
    nearest = min(segment_distance(p, vertices[i - 1], vertices[i]) for i in range(n))
    return nearest if point_in_polygon(vertices, p) else -nearest


def point_in_polygon(vertices: Sequence[XY], p: XY) -> bool:
    """Even-odd rule: a ray from ``p`` towards +x crosses the boundary an odd number of times.

    Each edge counts as half-open in y, so a ray through a vertex is counted once
    (or, at a spike, twice), which keeps concave polygons right.
    """
    x, y = p
    inside = False
    for i in range(len(vertices)):
        x1, y1 = vertices[i - 1]
        x2, y2 = vertices[i]
        if (y1 > y) != (y2 > y):
            crossing = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < crossing:
                inside = not inside
    return inside


def segment_distance(p: XY, a: XY, b: XY) -> float:
    """Euclidean distance from ``p`` to the segment ``a``-``b``."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    t = 0.0
    if length2 > 0.0:
        t = ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / length2
        t = min(1.0, max(0.0, t))
    return math.hypot(p[0] - (a[0] + t * dx), p[1] - (a[1] + t * dy))


class _Fence:
    """One fence's confirmed state and the run of fixes that may change it."""

    __slots__ = ("frame", "inside", "run", "run_side", "spec")

    def __init__(self, spec: GeofenceSpec, inside: bool | None) -> None:
        self.spec = spec
        self.frame = fence_frame(spec)
        self.inside = inside
        self.run_side: bool | None = None
        self.run = 0


class Geofences:
    """Tracks every configured fence and emits ``geofence_entered`` / ``geofence_exited``."""

    def __init__(
        self, specs: Sequence[GeofenceSpec], events: EventSink, clock: Clock,
        counters: Counters, rlog: RateLimitedLog, max_hdop: float,
        state_file: Path | None = None, confirm: int = 2,
    ) -> None:
        if confirm < 1:
            raise ValueError("confirm must be at least 1")
        self._events = events
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._max_hdop = max_hdop
        self._file = StateFile(state_file, "geofence", counters, rlog, versioned=False)
        self._confirm = confirm
        self._last_received: float | None = None
        saved = self._load()
        self._fences = {s.name: _Fence(s, saved.get(s.name)) for s in specs}
        # Fences dropped from the configuration are forgotten at the next save (the saved
        # content then differs from what the file holds).

    def inside(self, name: str) -> bool | None:
        """True inside, False outside, None not yet known; KeyError for an unknown fence."""
        return self._fences[name].inside

    def states(self) -> dict[str, bool | None]:
        """Every fence's state, in configuration order."""
        return {name: f.inside for name, f in self._fences.items()}

    def on_fix(self, fix: Fix) -> None:
        """Measure one fix against every fence (unusable fixes are ignored)."""
        position = fix.position
        if position is None or not fix.usable(self._max_hdop):
            return
        if fix.received == self._last_received:
            # The same epoch delivered twice must not count as two confirmations.
            self._counters.inc("insights.geofence_fix_repeated")
            return
        # An earlier time is the wall clock stepping back (NTP, an RTC reset), not an old
        # epoch: the fix counts, and the fixes after it are compared with its time.
        self._last_received = fix.received
        changed = False
        for fence in self._fences.values():
            changed |= self._step(fence, fix, position)
        if changed:
            self.save()

    def save(self) -> None:
        """Write the known states to the state file, if there is one and they changed."""
        self._file.save_if_changed(
            {n: f.inside for n, f in self._fences.items() if f.inside is not None})

    def _step(self, fence: _Fence, fix: Fix, position: LatLon) -> bool:
        """Advance one fence by one fix; True when its confirmed state changed."""
        d = signed_distance(fence.spec, fence.frame, position)
        h = fence.spec.hysteresis_m
        side = True if d >= h else False if d <= -h else None
        if side is None or side == fence.inside:
            fence.run_side, fence.run = None, 0
            return False
        if side != fence.run_side:
            fence.run_side, fence.run = side, 0
        fence.run += 1
        if fence.run < self._confirm:
            return False
        previous = fence.inside
        fence.inside = side
        fence.run_side, fence.run = None, 0
        if previous is not None:
            # Emitted before the state is saved: a crash in between repeats the event at the
            # next start rather than losing it.
            self._events("geofence_entered" if side else "geofence_exited", {
                "fence": fence.spec.name,
                "lat": round(position[0], 7),
                "lon": round(position[1], 7),
                "distance_m": round(d, 1),
                "ts": round(fix.received, 3),
            })
        return True

    def _load(self) -> dict[str, bool]:
        raw = self._file.load(absent={})
        if raw is None:
            return {}
        if not all(isinstance(v, bool) for v in raw.values()):
            self._file.broken("expected an object of fence name -> true/false")
            return {}
        return raw
