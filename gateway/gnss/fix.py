"""One GNSS epoch: position, motion and quality together, as the receiver reported them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from gateway.gnss.geo import LatLon

FixType = Literal["NONE", "TWO_D", "THREE_D"]
"""As VSS's GNSSReceiver.FixType (without the augmentation variants)."""

UERE_M = 5.0
"""Typical user-equivalent range error of a consumer receiver: HDOP x this is the
horizontal error estimate NMEA 0183 alone allows (GST is rarely enabled)."""


@dataclass(frozen=True)
class Fix:
    """Everything one epoch said about where the car is.

    ``received`` is the gateway clock time when the epoch was complete: the
    same time base as CAN frame timestamps, so staleness works the same way.
    ``utc`` is the receiver's own time of the fix, None until it knows the date.
    Without a fix, ``fix_type`` is ``NONE`` and the position fields are None.
    """

    received: float
    utc: float | None
    fix_type: FixType
    lat: float | None
    lon: float | None
    alt: float | None
    speed_kmh: float | None
    heading: float | None
    satellites: int | None
    hdop: float | None

    @property
    def valid(self) -> bool:
        """True when the epoch has a 2D or 3D position."""
        return self.fix_type != "NONE" and self.lat is not None and self.lon is not None

    @property
    def position(self) -> LatLon | None:
        """(lat, lon) when valid."""
        if self.lat is None or self.lon is None or self.fix_type == "NONE":
            return None
        return (self.lat, self.lon)

    @property
    def accuracy_m(self) -> float | None:
        """Estimated horizontal error in metres (HDOP x UERE), None without HDOP."""
        return None if self.hdop is None else round(self.hdop * UERE_M, 1)

    def usable(self, max_hdop: float) -> bool:
        """Valid and precise enough to act on (geofences, trips, alerts)."""
        return self.valid and self.hdop is not None and self.hdop <= max_hdop

    def utc_iso(self) -> str | None:
        """The receiver's time as ISO 8601 UTC with milliseconds, or None."""
        if self.utc is None:
            return None
        stamp = dt.datetime.fromtimestamp(self.utc, dt.UTC)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def as_dict(self) -> dict[str, Any]:
        """The position object of the MQTT contract (docs/mqtt.md, ``location``)."""
        return {
            "lat": _round(self.lat, 7),
            "lon": _round(self.lon, 7),
            "alt": _round(self.alt, 1),
            "speed": _round(self.speed_kmh, 2),
            "heading": _round(self.heading, 1),
            "fix": self.fix_type,
            "satellites": self.satellites,
            "hdop": _round(self.hdop, 2),
            "accuracy": self.accuracy_m,
            "utc": _round(self.utc, 3),
            "ts": round(self.received, 3),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
