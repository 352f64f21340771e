"""Store-and-forward outbox for QoS 1 MQTT messages.

Alerts, events, retained state and offline telemetry ("backfill") are written
to a SQLite file before anything is sent, and a row is deleted only after the
broker's PUBACK for it. What that guarantees:

- Durability: the database runs in WAL mode with ``synchronous=FULL``, so a
  ``put`` that returned has been fsynced and survives a kill -9 or power loss.
- Atomicity: each ``put`` is one transaction; after a crash a batch is either
  entirely present or entirely absent, never partly written.
- Order: rows drain by priority (alerts, events, retained, backfill), then in
  insertion order; ids only grow, also across restarts.
- Bounds: total size is capped by dropping the oldest backfill first, and old
  backfill expires; alerts and events are never dropped, and retained topics
  keep only their newest pending value.
- At-least-once delivery: a crash between PUBACK and delete resends a message,
  so consumers must deduplicate (e.g. on a sequence number in the payload).

A database that fails its integrity check at open is moved aside and replaced
by an empty one rather than stopping the gateway.
"""

from gateway.outbox.outbox import Outbox
from gateway.outbox.store import Entry, Kind, Limits, OutboxError, OutboxStore, Row

__all__ = ["Entry", "Kind", "Limits", "Outbox", "OutboxError", "OutboxStore", "Row"]
