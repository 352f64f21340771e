"""The set of active alerts and its transitions.

Producers say what is wrong now (``raise_``) and when it is over
(``clear``); the book turns that into raised / updated / cleared transitions
and keeps the active set, and hands both to a sink (the MQTT durable path).
Re-raising an alert that is already active at the same severity changes
nothing, so rules may call ``raise_`` on every evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from gateway.alerts.model import Alert, Scalar, Severity
from gateway.clock import Clock


class AlertSink(Protocol):
    """Where alert transitions go."""

    def alert(self, transition: str, alert: Alert) -> None:
        """One transition: raised, updated or cleared."""
        ...

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        """The whole active set, after it changed."""
        ...


class AlertBook:
    """Active alerts by key."""

    def __init__(self, clock: Clock, sink: AlertSink | None = None) -> None:
        self._clock = clock
        self.sink = sink
        self._active: dict[str, Alert] = {}

    def active(self) -> list[Alert]:
        """Active alerts, oldest first."""
        return list(self._active.values())

    def raise_(
        self, key: str, severity: Severity, message: str, *, signal: str | None = None,
        value: Scalar | None = None, limit: Scalar | None = None, source_ts: float | None = None,
        refresh: bool = False,
    ) -> Alert | None:
        """Raise ``key`` (or change its severity); returns the alert if anything changed.

        With ``refresh``, a new message at the same severity is published as an update
        too (a latched alert that now only waits for a reset, say).
        """
        current = self._active.get(key)
        if current is not None and current.severity is severity and not (
                refresh and current.message != message):
            return None
        if current is None:
            alert = Alert(key, severity, message, self._clock.time(), signal, value, limit,
                          source_ts)
            transition = "raised"
        else:
            alert = replace(current, severity=severity, message=message, value=value,
                            limit=limit, source_ts=source_ts)
            transition = "updated"
        self._active[key] = alert
        self._emit(transition, alert)
        return alert

    def clear(self, key: str, *, value: Scalar | None = None,
              source_ts: float | None = None) -> Alert | None:
        """Clear ``key``; returns the cleared alert, or None if it was not active."""
        current = self._active.pop(key, None)
        if current is None:
            return None
        alert = current.cleared(self._clock.time(), value, source_ts)
        self._emit("cleared", alert)
        return alert

    def republish(self) -> None:
        """Send the active set again (after a reconnect)."""
        if self.sink is not None:
            self.sink.active_alerts(self.active())

    def _emit(self, transition: str, alert: Alert) -> None:
        if self.sink is not None:
            self.sink.alert(transition, alert)
            self.sink.active_alerts(self.active())
