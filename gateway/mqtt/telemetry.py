"""Live telemetry, retained state and offline backfill, from the state store.

One task ticks a few times a second; it never looks at frames. Each tick:

- tracks the vehicle mode (drive / charge / park) and emits ``mode_changed``;
- when the mode's interval has passed and the link is up, publishes the
  signals that changed since they were last sent (beyond their deadband, or
  whose quality changed: good, stale, invalid) as one QoS 0 message;
- republishes a ``state/{group}`` whose content changed, at most once per
  ``state_interval`` (through the outbox, so it coalesces while offline);
- while offline, records a snapshot of the good signals into the outbox
  every ``offline_interval``, for the ``backfill`` topic.

Deadbands and the slow state rate exist for the cellular bill: a car reports
hundreds of values many times a second, and almost all of it is noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gateway.clock import Clock
from gateway.config.settings import TelemetrySettings
from gateway.health import Counters
from gateway.mqtt import payloads
from gateway.mqtt.durable import DurablePublisher
from gateway.mqtt.topics import GROUPS, Topics
from gateway.state import SignalView, StateStore
from gateway.state.mode import ModeTracker

LIVE_ELSEWHERE = frozenset({"location"})
"""Groups whose live updates have their own topic (state and backfill still carry them)."""

Seen = tuple[str, object]
"""What was last reported of a signal: its quality and value."""


class LivePublisher(Protocol):
    """The part of the link telemetry needs."""

    @property
    def connected(self) -> bool:
        """True while a connection is up."""
        ...

    async def publish_live(self, topic: str, payload: bytes) -> bool:
        """QoS 0 publish; False when it was not sent."""
        ...


def quality(view: SignalView) -> str:
    """good, stale or invalid."""
    if not view.valid:
        return "invalid"
    return "stale" if view.stale else "good"


class ChangeFilter:
    """Per-signal memory of what was last reported, with deadbands."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self._settings = settings
        self._deadband: dict[str, float] = {}
        self.seen: dict[str, Seen] = {}

    def _band(self, view: SignalView) -> float:
        band = self._deadband.get(view.path)
        if band is None:
            band = self._deadband[view.path] = self._settings.deadband(view.path, view.unit)
        return band

    def changed(self, view: SignalView) -> bool:
        """True when ``view`` differs from what was last reported."""
        prev = self.seen.get(view.path)
        q = quality(view)
        if prev is None:
            return view.timestamp is not None  # never received: nothing to say yet
        if prev[0] != q:
            return True
        if q != "good":
            return False
        old, new = prev[1], view.value
        if isinstance(new, int | float) and not isinstance(new, bool) \
                and isinstance(old, int | float) and not isinstance(old, bool):
            band = self._band(view)
            return abs(new - old) > band if band > 0 else new != old
        return new != old

    def select(self, views: Iterable[SignalView]) -> list[SignalView]:
        """The views that changed."""
        return [v for v in views if self.changed(v)]

    def commit(self, views: Iterable[SignalView]) -> None:
        """Remember ``views`` as reported."""
        for v in views:
            self.seen[v.path] = (quality(v), v.value)


class Telemetry:
    """The publishing task; see the module docstring."""

    def __init__(
        self, store: StateStore, settings: TelemetrySettings, link: LivePublisher,
        durable: DurablePublisher, topics: Topics, envelope: payloads.Envelope, clock: Clock,
        counters: Counters, tick: float = 0.25,
    ) -> None:
        self._store = store
        self._settings = settings
        self._link = link
        self._durable = durable
        self._topics = topics
        self._envelope = envelope
        self._clock = clock
        self._counters = counters
        self.tick = tick
        self.modes = ModeTracker(store)
        self._live = ChangeFilter(settings)
        self._groups = {g: ChangeFilter(settings) for g in GROUPS}
        self._group_paths = {g: [s.path for s in store if s.group == g] for g in GROUPS}
        self._next_live = 0.0
        self._next_backfill = 0.0
        self._next_state = dict.fromkeys(GROUPS, 0.0)
        self._force_state = True

    def force_state(self) -> None:
        """Republish every group on the next tick (after a reconnect)."""
        self._force_state = True

    async def run(self) -> None:
        """Tick forever."""
        while True:
            await self.step()
            await self._clock.sleep(self.tick)

    async def step(self) -> None:
        """One tick (public so tests can drive it on a manual clock)."""
        now, mono = self._clock.time(), self._clock.monotonic()
        change = self.modes.update(now)
        if change is not None:
            new, old = change
            if old is not None:
                self._durable.event("mode_changed", {"from": old, "to": new})
            self._next_live = mono  # a new mode reports at once
        mode = self.modes.mode or "drive"
        views = self._store.snapshot(now)
        self._publish_state(views, mono)
        if self._link.connected:
            self._next_backfill = mono
            if mono >= self._next_live:
                self._next_live = mono + self._settings.interval(mode)
                await self._publish_live(mode, views, now)
        elif mono >= self._next_backfill:
            self._next_backfill = mono + self._settings.offline_interval
            good = [v for v in views if v.good]
            if good:
                self._durable.backfill(mode, good)
                self._counters.inc("telemetry.backfill_recorded")

    async def _publish_live(self, mode: str, views: Sequence[SignalView], now: float) -> None:
        # Position goes out whole on the location topic: a deadband per signal could
        # send a latitude without its longitude.
        changed = self._live.select(v for v in views if v.group not in LIVE_ELSEWHERE)
        if not changed:
            return
        body = payloads.telemetry_body(mode, changed)
        payload = payloads.encode(self._envelope.stamp(self._topics.telemetry, now, body))
        if await self._link.publish_live(self._topics.telemetry, payload):
            # Only what reached the socket counts as reported; the rest goes next time.
            self._live.commit(changed)
            self._counters.inc("telemetry.messages")
            self._counters.inc("telemetry.values", len(changed))

    def _publish_state(self, views: Sequence[SignalView], mono: float) -> None:
        by_path = {v.path: v for v in views}
        force, self._force_state = self._force_state, False
        for group, paths in self._group_paths.items():
            if not paths:
                continue
            group_views = [by_path[p] for p in paths]
            filt = self._groups[group]
            due = mono >= self._next_state[group]
            if force or (due and filt.select(group_views)):
                self._durable.state(group, group_views)
                filt.commit(group_views)
                self._next_state[group] = mono + self._settings.state_interval
