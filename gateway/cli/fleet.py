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
LOC = "Vehicle.CurrentLocation"
POSITION_SIGNALS = {
    "lat": f"{LOC}.Latitude", "lon": f"{LOC}.Longitude", "alt": f"{LOC}.Altitude",
    "speed": f"{LOC}.Speed", "heading": f"{LOC}.Heading", "accuracy": f"{LOC}.HorizontalAccuracy",
    "fix": f"{LOC}.GNSSReceiver.FixType", "satellites": f"{LOC}.GNSSReceiver.SatellitesUsed",
    "hdop": f"{LOC}.GNSSReceiver.HDOP",
}
"""Fields of a ``location`` position object and the state signals they update."""
STREAMS = ("telemetry", "backfill", "alerts", "events", "location")
"""Topics whose messages are deduplicated on (boot, seq); the rest are retained."""


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
    position: dict[str, Any] | None = None
    """The latest ``location`` position object."""
    last_trip: dict[str, Any] | None = None
    last_charge: dict[str, Any] | None = None

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
        if sub in STREAMS and not self._fresh(sub, data):
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
        elif sub == "location" and isinstance(data.get("position"), dict):
            self.position = data["position"]
            self._merge_position(self.position)
        elif sub == "trips/last" and isinstance(data.get("trip"), dict):
            self.last_trip = data["trip"]
        elif sub == "charging/last" and isinstance(data.get("session"), dict):
            self.last_charge = data["session"]
        return sub

    def _merge_state(self, group: str, data: dict[str, Any]) -> None:
        for path, s in dict(data.get("signals", {})).items():
            self.signals[path] = SignalView(path, s.get("value"), s.get("unit", ""), s.get("ts"),
                                            bool(s.get("valid")), bool(s.get("stale")), group)

    def _merge_position(self, pos: dict[str, Any]) -> None:
        """A position is a live update of the location signals, all with one timestamp."""
        ts = pos.get("ts")
        has_fix = pos.get("fix") not in (None, "NONE")
        for key, path in POSITION_SIGNALS.items():
            value = pos.get(key)
            entry = lookup(path)
            valid = value is not None and (has_fix or key in ("fix", "satellites"))
            self.signals[path] = SignalView(path, value if valid else None,
                                            entry.unit if entry else "", ts, valid, False,
                                            "location")

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
