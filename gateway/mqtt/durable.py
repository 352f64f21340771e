"""The durable path: QoS 1 messages go to the outbox before anything else.

Producers (alert rules, the telemetry recorder, event sources) must never
wait on the disk, since they share the event loop with CAN decoding. So the
methods here are synchronous: they build the payload at once (the sequence
number, hence the order, is fixed at that moment) and hand it to a bounded
queue; one writer task commits what has accumulated in one SQLite
transaction per batch. The link drains the outbox to the broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.alerts import Alert
from gateway.clock import Clock
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt import payloads
from gateway.mqtt.topics import Topics
from gateway.outbox import Entry, Kind, Outbox, OutboxError
from gateway.queues import BatchQueue, Overflow
from gateway.state import SignalView

PENDING_MAX = 50_000
"""Entries waiting for their commit. Reaching it means SQLite has stalled for
a long time (a dying SD card); the oldest entries are then dropped and counted
in ``queue.outbox.pending.dropped``, the one case where durable messages can be lost."""
COMMIT_BATCH = 1000
RETRY_DELAY = 1.0


class DurablePublisher:
    """Builds durable payloads and queues them for the outbox."""

    def __init__(self, topics: Topics, envelope: payloads.Envelope, outbox: Outbox,
                 clock: Clock, counters: Counters, rlog: RateLimitedLog) -> None:
        self.topics = topics
        self._counters = counters
        self._rlog = rlog
        self.envelope = envelope
        self._outbox = outbox
        self._clock = clock
        self._queue: BatchQueue[Entry] = BatchQueue(
            "outbox.pending", PENDING_MAX, Overflow.DROP_OLDEST, counters)

    def _put(self, kind: Kind, topic: str, body: Mapping[str, Any], retain: bool = False) -> None:
        now = self._clock.time()
        payload = payloads.encode(self.envelope.stamp(topic, now, body))
        self._queue.put_nowait([Entry(kind, topic, payload, now, retain)])

    def alert(self, transition: str, alert: Alert) -> None:
        """An alert transition on ``alerts``."""
        self._put(Kind.ALERT, self.topics.alerts, payloads.alert_body(transition, alert.as_dict()))

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        """The retained active set on ``alerts/active``."""
        self._put(Kind.RETAINED, self.topics.alerts_active,
                  payloads.active_alerts_body(a.as_dict() for a in alerts), retain=True)

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        """Something that happened, on ``events``."""
        self._put(Kind.EVENT, self.topics.events, payloads.event_body(kind, data))

    def state(self, group: str, views: Iterable[SignalView]) -> None:
        """Retained last-known values of one group on ``state/{group}``."""
        self._put(Kind.RETAINED, self.topics.state(group), payloads.state_body(group, views),
                  retain=True)

    def backfill(self, mode: str, views: Iterable[SignalView]) -> None:
        """A telemetry snapshot recorded while offline, on ``backfill``."""
        self._put(Kind.BACKFILL, self.topics.backfill, payloads.telemetry_body(mode, views))

    def record(self, topic: str, kind: str, record: Mapping[str, Any]) -> None:
        """A retained summary (the last trip, the last charging session) on ``topic``."""
        self._put(Kind.RETAINED, topic, payloads.record_body(kind, record), retain=True)

    def retained(self, topic: str, payload: bytes) -> None:
        """A ready-made retained message (e.g. Home Assistant discovery)."""
        self._queue.put_nowait([Entry(Kind.RETAINED, topic, payload, self._clock.time(), True)])

    @property
    def pending(self) -> int:
        """Entries not yet committed."""
        return self._queue.depth

    async def run(self) -> None:
        """Commit queued entries, a batch per transaction, until the queue is closed.

        A failed commit (disk full, I/O error) is retried with the same batch,
        so the order is kept and nothing is skipped.
        """
        while (batch := await self._queue.get_many(COMMIT_BATCH)) is not None:
            while True:
                try:
                    await self._outbox.put(batch)
                    break
                except OutboxError as exc:
                    self.report_failure(exc)
                    await self._clock.sleep(RETRY_DELAY)

    def report_failure(self, exc: OutboxError) -> None:
        """Count and log (rate-limited) a failed outbox operation."""
        self._counters.inc("outbox.failures")
        self._rlog.error("outbox.failure", f"outbox: {exc}; retrying")

    def close(self) -> None:
        """Stop accepting entries; ``run`` commits what is queued and returns."""
        self._queue.close()
