"""The alert book: transitions, the active set, and what reaches the outbox."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from gateway.alerts import Alert, AlertBook, Severity
from gateway.clock import ManualClock
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt.durable import DurablePublisher
from gateway.mqtt.payloads import Envelope
from gateway.mqtt.topics import Topics
from gateway.outbox import Kind, Limits, Outbox
from tests.contract import validate


class Recorder:
    """An AlertSink that keeps what it was given (a real sink, not a stand-in for one)."""

    def __init__(self) -> None:
        self.transitions: list[tuple[str, Alert]] = []
        self.active: list[list[str]] = []

    def alert(self, transition: str, alert: Alert) -> None:
        self.transitions.append((transition, alert))

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        self.active.append([a.key for a in alerts])


def test_raise_update_clear_and_idempotent_reraise() -> None:
    clock = ManualClock()
    sink = Recorder()
    book = AlertBook(clock, sink)
    first = book.raise_("cell.high", Severity.WARNING, "cell high", signal="x", value=3.6,
                        limit=3.55, source_ts=clock.time() - 0.1)
    assert first is not None and first.raised_at == clock.time()
    assert book.raise_("cell.high", Severity.WARNING, "cell high", value=3.61) is None
    clock.advance(2.0)
    updated = book.raise_("cell.high", Severity.CRITICAL, "cell very high", value=3.7, limit=3.65)
    assert updated is not None
    assert updated.raised_at == first.raised_at  # same condition, escalated
    clock.advance(5.0)
    cleared = book.clear("cell.high", value=3.4)
    assert cleared is not None and cleared.cleared_at == clock.time() and cleared.value == 3.4
    assert book.clear("cell.high") is None
    assert [t for t, _ in sink.transitions] == ["raised", "updated", "cleared"]
    assert sink.active == [["cell.high"], ["cell.high"], []]
    assert book.active() == []


async def test_transitions_reach_the_outbox_in_order_and_match_the_contract(
        tmp_path: Path) -> None:
    clock = ManualClock()
    counters = Counters()
    rlog = RateLimitedLog(logging.getLogger("test"), clock)
    outbox = Outbox(tmp_path / "outbox.sqlite", Limits(), clock, counters, rlog)
    await outbox.open()
    topics = Topics("car-1")
    durable = DurablePublisher(topics, Envelope("car-1", "0123456789abcdef"), outbox, clock,
                               counters, rlog)
    book = AlertBook(clock, durable)
    book.raise_("a", Severity.WARNING, "A")
    book.raise_("b", Severity.CRITICAL, "B", value=True)
    book.clear("a")
    durable.close()
    await durable.run()
    rows = await outbox.fetch(100)
    await outbox.close()
    alerts = [json.loads(r.payload) for r in rows if r.kind is Kind.ALERT]
    assert [(a["seq"], a["transition"], a["alert"]["key"]) for a in alerts] == [
        (1, "raised", "a"), (2, "raised", "b"), (3, "cleared", "a")]
    active = [r for r in rows if r.kind is Kind.RETAINED]
    assert len(active) == 1  # coalesced: only the newest active set is pending
    assert active[0].retain
    newest = validate(active[0].topic, active[0].payload)
    assert [a["key"] for a in newest["alerts"]] == ["b"]
    for r in rows:
        validate(r.topic, r.payload)
