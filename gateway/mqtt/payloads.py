"""Payloads of the MQTT contract.

Every payload is a JSON object with the same envelope:

- ``v``: payload format version (1);
- ``vehicle``: the vehicle id;
- ``boot``: random id of this gateway process run;
- ``seq``: per-topic sequence number within the boot, starting at 1;
- ``ts``: when the gateway built the message (epoch seconds).

``(vehicle, boot, seq)`` identifies a message within its topic. QoS 1
delivery is at-least-once, so consumers drop a message whose key they have
seen; a jump in ``seq`` is a gap (QoS 0 telemetry may have gaps, durable
topics never do). Signal values always carry their *source* timestamp.
The JSON Schemas in docs/schemas/ describe each payload exactly.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.state import SignalView

FORMAT_VERSION = 1
Payload = dict[str, Any]


def new_boot_id() -> str:
    """A random 16-hex-digit id for one run of the gateway."""
    return secrets.token_hex(8)


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused rather than sent as invalid JSON."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


class Envelope:
    """Stamps payloads with the envelope, keeping one sequence counter per topic."""

    def __init__(self, vehicle_id: str, boot_id: str) -> None:
        self.vehicle_id = vehicle_id
        self.boot_id = boot_id
        self._seq: dict[str, int] = {}

    def stamp(self, topic: str, ts: float, body: Mapping[str, Any]) -> Payload:
        """``body`` with the envelope fields and the next sequence number of ``topic``."""
        seq = self._seq.get(topic, 0) + 1
        self._seq[topic] = seq
        return {"v": FORMAT_VERSION, "vehicle": self.vehicle_id, "boot": self.boot_id,
                "seq": seq, "ts": round(ts, 3), **body}

    def last_seq(self, topic: str) -> int:
        """The last sequence number used on ``topic`` (0 if none)."""
        return self._seq.get(topic, 0)


def status_body(online: bool, connection: int, version: str, profile: str,
                reason: str | None = None) -> Payload:
    """Body of a ``status`` message: birth (online) or will / goodbye (offline)."""
    body: Payload = {"state": "online" if online else "offline", "connection": connection,
                     "version": version, "profile": profile}
    if reason is not None:
        body["reason"] = reason
    return body


def _sample(view: SignalView) -> Payload:
    """One signal in telemetry: value, source timestamp and, when not good, why."""
    out: Payload = {"value": view.value if view.valid else None,
                    "ts": None if view.timestamp is None else round(view.timestamp, 3)}
    if not view.valid:
        out["quality"] = "invalid"
    elif view.stale:
        out["quality"] = "stale"
    return out


def telemetry_body(mode: str, views: Iterable[SignalView]) -> Payload:
    """Body of a ``telemetry`` or ``backfill`` message."""
    return {"mode": mode, "signals": {v.path: _sample(v) for v in views}}


def state_body(group: str, views: Iterable[SignalView]) -> Payload:
    """Body of a ``state/{group}`` message: every signal of the group, good or not."""
    return {"group": group, "signals": {
        v.path: {"value": v.value if v.valid else None, "unit": v.unit,
                 "ts": None if v.timestamp is None else round(v.timestamp, 3),
                 "valid": v.valid, "stale": v.stale}
        for v in views}}


def event_body(kind: str, data: Mapping[str, Any]) -> Payload:
    """Body of an ``events`` message."""
    return {"type": kind, "data": dict(data)}


def alert_body(transition: str, alert: Mapping[str, Any]) -> Payload:
    """Body of an ``alerts`` message: ``transition`` is raised, updated or cleared."""
    return {"transition": transition, "alert": dict(alert)}


def active_alerts_body(alerts: Iterable[Mapping[str, Any]]) -> Payload:
    """Body of the retained ``alerts/active`` message."""
    return {"alerts": [dict(a) for a in alerts]}


def location_body(position: Mapping[str, Any]) -> Payload:
    """Body of a ``location`` message: one position object (lat and lon never travel apart)."""
    return {"position": dict(position)}


def record_body(kind: str, record: Mapping[str, Any]) -> Payload:
    """Body of ``trips/last`` (``kind`` trip) or ``charging/last`` (``kind`` session)."""
    return {kind: dict(record)}


def health_body(report: Mapping[str, Any]) -> Payload:
    """Body of a ``health`` message: the report's fields at the top level, beside the
    envelope (gateway.health.report builds them; docs/health.md describes them)."""
    reserved = {"v", "vehicle", "boot", "seq", "ts"} & report.keys()
    if reserved:
        raise ValueError(f"a health report must not set envelope fields: {sorted(reserved)}")
    return dict(report)
