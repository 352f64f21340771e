"""Keeping the gateway's retained topics its own.

Anyone with write access to the broker can publish retained garbage on
``status`` or ``state/...``, and every app that opens afterwards would read
it. The gateway subscribes to the retained topics it owns and puts its own
message back when something else appears there. Valid messages from an
earlier run of this gateway are legitimate last-known values and are left
alone. Re-asserting is rate-limited per topic, so two gateways misconfigured
with the same vehicle id cannot ping-pong the broker to death.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gateway.health import Counters, RateLimitedLog
from gateway.mqtt.payloads import FORMAT_VERSION
from gateway.mqtt.topics import Topics

REASSERT_INTERVAL = 5.0
_BOOT = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Fix:
    """A retained message to publish to undo a foreign one."""

    topic: str
    payload: bytes


def _envelope_problem(payload: bytes, vehicle_id: str) -> str | None:
    """Why ``payload`` is not one of this vehicle's contract messages (None if it is)."""
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return "not JSON"
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("v") != FORMAT_VERSION:
        return "unknown format version"
    if data.get("vehicle") != vehicle_id:
        return "another vehicle id"
    boot, seq, ts = data.get("boot"), data.get("seq"), data.get("ts")
    if not isinstance(boot, str) or not _BOOT.match(boot):
        return "bad boot id"
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "bad seq"
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        return "bad ts"
    return None


class Ownership:
    """Remembers what the gateway last published on its retained topics and spots intruders."""

    def __init__(self, topics: Topics, counters: Counters, rlog: RateLimitedLog,
                 reassert_interval: float = REASSERT_INTERVAL) -> None:
        self._topics = topics
        self._owned = set(topics.owned_retained())
        self._counters = counters
        self._rlog = rlog
        self._interval = reassert_interval
        self._last: dict[str, bytes] = {}
        self._reasserted: dict[str, float] = {}

    def sent(self, topic: str, payload: bytes) -> None:
        """Record a retained message the gateway published."""
        self._last[topic] = payload

    def _problem(self, topic: str, payload: bytes) -> str | None:
        ours = self._last.get(topic)
        if payload == ours:
            return None
        if not payload:
            # An empty retained message deletes; harmless unless it deleted ours.
            return "our retained message was deleted" if ours is not None else None
        if topic == self._topics.status:
            # While connected, the only valid status is the birth of this connection.
            return _envelope_problem(payload, self._topics.vehicle_id) or "not our birth"
        return _envelope_problem(payload, self._topics.vehicle_id)

    def check(self, topic: str, payload: bytes, now: float) -> Fix | None:
        """Inspect a message seen on an owned topic; returns what to publish to repair it."""
        if topic not in self._owned:
            return None
        problem = self._problem(topic, payload)
        if problem is None:
            return None
        self._counters.inc("mqtt.foreign_messages")
        last = self._reasserted.get(topic)
        if last is not None and now - last < self._interval:
            self._counters.inc("mqtt.foreign_reassert_suppressed")
            return None
        self._reasserted[topic] = now
        self._rlog.warning(f"mqtt.foreign.{topic}",
                           f"mqtt: foreign message on {topic} ({problem}); re-asserting ours")
        return Fix(topic, self._last.get(topic, b""))
