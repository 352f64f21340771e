"""What an alert is.

Rules elsewhere (safety limits, insights) decide *when* something is wrong;
this package owns the alert lifecycle (raise, update, clear, the active set)
so every producer's alerts look the same to the phone app and the fleet.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

Scalar = float | int | bool | str


class Severity(enum.Enum):
    """How bad: warnings inform, critical alerts call for action."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Alert:
    """One active (or just cleared) condition.

    ``key`` identifies the condition (``bms.cell_overvoltage``); at most one
    alert per key is active. ``source_ts`` is the source timestamp of the data
    that triggered it; ``raised_at`` / ``cleared_at`` are gateway times.
    """

    key: str
    severity: Severity
    message: str
    raised_at: float
    signal: str | None = None
    value: Scalar | None = None
    limit: Scalar | None = None
    source_ts: float | None = None
    cleared_at: float | None = None

    def cleared(self, at: float, value: Scalar | None = None,
                source_ts: float | None = None) -> Alert:
        """This alert, cleared at ``at`` (with the value that cleared it, if known)."""
        return replace(self, cleared_at=at,
                       value=self.value if value is None else value,
                       source_ts=self.source_ts if source_ts is None else source_ts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``alert`` object of the MQTT contract)."""
        return {
            "key": self.key,
            "severity": self.severity.value,
            "message": self.message,
            "signal": self.signal,
            "value": self.value,
            "limit": self.limit,
            "source_ts": None if self.source_ts is None else round(self.source_ts, 3),
            "raised_at": round(self.raised_at, 3),
            "cleared_at": None if self.cleared_at is None else round(self.cleared_at, 3),
        }
