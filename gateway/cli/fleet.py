"""What a subscriber learns about one vehicle from its MQTT topics.

This is the consumer side of the contract, written as a fleet backend or a
phone app would: it reads only what is on the broker, deduplicates QoS 1
messages on (topic, boot, seq), counts gaps, and merges retained state with
live telemetry. ``ev-gateway watch`` draws it; the tests use it as their
subscriber.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.mqtt.topics import PREFIX
from gateway.state import SignalView, lookup

RECENT = 8


@dataclass
class StreamStats:
    """Sequence bookkeeping for one topic of one boot."""

    last_seq: int = 0
    messages: int = 0
    duplicates: int = 0
    gaps: int = 0


@dataclass
class FleetView:
    """One vehicle as seen from the broker."""

    vehicle_id: str
    status: dict[str, Any] | None = None
    signals: dict[str, SignalView] = field(default_factory=dict)
    active_alerts: list[dict[str, Any]] = field(default_factory=list)
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    streams: dict[tuple[str, str], StreamStats] = field(default_factory=dict)
    malformed: int = 0
    telemetry_values: int = 0

    @property
    def base(self) -> str:
        """The vehicle's topic prefix."""
        return f"{PREFIX}/{self.vehicle_id}/"

    def _fresh(self, topic: str, data: dict[str, Any]) -> bool:
        """Track seq per (topic, boot); False for a duplicate."""
        key = (topic, str(data.get("boot")))
        stats = self.streams.setdefault(key, StreamStats())
        seq = data.get("seq")
        if not isinstance(seq, int):
            return True
        if seq <= stats.last_seq:
            stats.duplicates += 1
            return False
        if stats.last_seq and seq > stats.last_seq + 1:
            stats.gaps += seq - stats.last_seq - 1
        stats.last_seq = seq
        stats.messages += 1
        return True

    def handle(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns its sub-topic (``state/battery``) if it was used."""
        if not topic.startswith(self.base) or not payload:
            return None
        sub = topic[len(self.base):]
        try:
            data = json.loads(payload)
        except ValueError:
            self.malformed += 1
            return None
        if not isinstance(data, dict) or data.get("vehicle") != self.vehicle_id:
            self.malformed += 1
            return None
        # Retained topics carry the latest value; only streams are deduplicated.
        if sub in ("telemetry", "backfill", "alerts", "events") and not self._fresh(sub, data):
            return None
        if sub == "status":
            self.status = data
        elif sub.startswith("state/"):
            self._merge_state(sub[len("state/"):], data)
        elif sub == "telemetry":
            self._merge_telemetry(data)
        elif sub == "alerts/active":
            self.active_alerts = list(data.get("alerts", []))
        elif sub == "alerts":
            self.alerts.append(data)
        elif sub == "events":
            self.events.append(data)
        return sub

    def _merge_state(self, group: str, data: dict[str, Any]) -> None:
        for path, s in dict(data.get("signals", {})).items():
            self.signals[path] = SignalView(path, s.get("value"), s.get("unit", ""), s.get("ts"),
                                            bool(s.get("valid")), bool(s.get("stale")), group)

    def _merge_telemetry(self, data: dict[str, Any]) -> None:
        for path, s in dict(data.get("signals", {})).items():
            self.telemetry_values += 1
            old = self.signals.get(path)
            entry = lookup(path)
            unit = old.unit if old else (entry.unit if entry else "")
            group = old.group if old else (entry.group if entry else "health")
            q = s.get("quality")
            self.signals[path] = SignalView(path, s.get("value"), unit, s.get("ts"),
                                            q != "invalid", q == "stale", group)

    def stats(self, sub: str) -> StreamStats:
        """Totals for a stream over all boots."""
        total = StreamStats()
        for (topic, _), s in self.streams.items():
            if topic == sub:
                total.messages += s.messages
                total.duplicates += s.duplicates
                total.gaps += s.gaps
        return total
