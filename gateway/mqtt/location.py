"""Live position on the ``location`` topic.

Fixes arrive from the GNSS reader about once a second; the publish policy
(gateway/gnss/policy.py) picks the ones worth a cellular message: moved far
enough, turned, the fix lost or regained, or a heartbeat interval passed.
Sending is asynchronous while fixes arrive synchronously, so a one-slot
mailbox sits between them: a newer fix replaces one not yet sent (counted in
``location.superseded``), because only the latest position matters.

QoS 0 like telemetry: while the broker is unreachable nothing is queued here;
the offline backfill snapshots and the retained ``state/location`` carry the
position instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.clock import Clock
from gateway.gnss.fix import Fix
from gateway.gnss.policy import PublishPolicy
from gateway.health import Counters
from gateway.mqtt import payloads
from gateway.mqtt.telemetry import LivePublisher
from gateway.mqtt.topics import Topics


class LocationPublisher:
    """Publishes the fixes the policy selects; ``on_fix`` is the GNSS reader's callback."""

    def __init__(self, policy: PublishPolicy, link: LivePublisher, topics: Topics,
                 envelope: payloads.Envelope, clock: Clock, counters: Counters,
                 parked: Callable[[], bool]) -> None:
        self._policy = policy
        self._link = link
        self._topics = topics
        self._envelope = envelope
        self._clock = clock
        self._counters = counters
        self._parked = parked
        self._pending: Fix | None = None
        self._wake = asyncio.Event()

    def on_fix(self, fix: Fix) -> None:
        """Take a fix; it is queued when the policy says it is due."""
        if not self._link.connected:
            return
        if not self._policy.due(fix, self._clock.monotonic(), self._parked()):
            return
        if self._pending is not None:
            self._counters.inc("location.superseded")
        self._pending = fix
        self._wake.set()

    async def run(self) -> None:
        """Send queued fixes until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            fix, self._pending = self._pending, None
            if fix is not None:
                await self._send(fix)

    async def _send(self, fix: Fix) -> None:
        topic = self._topics.location
        body = payloads.location_body(fix.as_dict())
        payload = payloads.encode(self._envelope.stamp(topic, self._clock.time(), body))
        if await self._link.publish_live(topic, payload):
            # Only a fix that reached the socket resets the distance and time budget.
            self._policy.commit(fix, self._clock.monotonic())
            self._counters.inc("location.messages")
