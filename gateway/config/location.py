"""Site settings for position and insights: ``[gnss]``, ``[[geofence]]``, ``[insights]``.

They are per installation, not per car model: which serial port the receiver
is on, where the depot is, what a kWh costs. docs/configuration.md describes
every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config.toml_table import Table

BAUD_RATES = (4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
LatLon = tuple[float, float]


@dataclass(frozen=True)
class GnssSettings:
    """The serial GNSS receiver and how often its position is published."""

    enabled: bool = False
    device: str = "/dev/ttyACM0"
    """A device path, or any pyserial URL (``socket://host:port`` for a networked receiver)."""
    baud: int = 9600
    rate_hz: float = 1.0
    """Epochs per second the receiver sends; a position is stale after three missed ones."""
    max_hdop: float = 5.0
    """Fixes with a worse HDOP are published but not used for geofences, trips or alerts."""
    min_distance_m: float = 25.0
    min_interval_s: float = 1.0
    max_interval_s: float = 30.0
    parked_interval_s: float = 300.0
    heading_change_deg: float = 20.0
    lost_alert_s: float = 30.0
    """Seconds without any parsed epoch (with or without a fix) before the
    ``gnss.receiver_lost`` alert is raised."""

    @property
    def stale_after(self) -> float:
        """Seconds after which the last position no longer counts as current."""
        return 3.0 / self.rate_hz


@dataclass(frozen=True)
class GeofenceSpec:
    """A named circle or polygon; vertices and centre are (latitude, longitude) degrees."""

    name: str
    kind: Literal["circle", "polygon"]
    center: LatLon | None = None
    radius_m: float | None = None
    points: tuple[LatLon, ...] = ()
    hysteresis_m: float = 20.0
    """A fix must be this far inside to enter and this far outside to exit."""
    line: int | None = None


@dataclass(frozen=True)
class InsightSettings:
    """Trips, charging sessions and the moved-while-parked alert."""

    trip_end_park_s: float = 300.0
    """A trip ends once the car has been parked this long."""
    charge_end_s: float = 300.0
    """A charging session ends once current has not flowed for this long with the cable in
    (at once when the cable is pulled); shorter pauses are interruptions."""
    moved_while_parked_m: float = 100.0
    energy_price_per_kwh: float | None = None
    currency: str = ""


@dataclass(frozen=True)
class LocationSettings:
    """Everything in this module, as one field of Settings."""

    gnss: GnssSettings = field(default_factory=GnssSettings)
    geofences: tuple[GeofenceSpec, ...] = ()
    insights: InsightSettings = field(default_factory=InsightSettings)


def parse_gnss(t: Table, present: bool = False) -> GnssSettings:
    """``[gnss]``; a ``present`` table (even an empty one) means enabled unless
    ``enabled = false``."""
    t.check_keys(["enabled", "device", "baud", "rate_hz", "max_hdop", "min_distance_m",
                  "min_interval_s", "max_interval_s", "parked_interval_s",
                  "heading_change_deg", "lost_alert_s"])
    default = GnssSettings()
    device = t.opt_str("device", default.device) or ""
    if not device.strip():
        t.fail("device", "expected a device path or pyserial URL, got an empty string")
    baud = t.opt_int("baud", default.baud)
    if baud not in BAUD_RATES:
        t.fail("baud", f"expected one of {', '.join(map(str, BAUD_RATES))}, got {baud}")
    rate = _number(t, "rate_hz", default.rate_hz, 0.1, 50.0)
    min_interval = _number(t, "min_interval_s", default.min_interval_s, 0.0, 3600.0)
    max_interval = _number(t, "max_interval_s", default.max_interval_s, 1.0, 86400.0)
    if max_interval < min_interval:
        t.fail("max_interval_s", f"expected at least min_interval_s ({min_interval:g})")
    lost_alert = _lost_alert(t, default.lost_alert_s)
    if lost_alert <= 2.0 / rate:
        # Shorter than two epochs, a healthy receiver would raise and clear it every epoch.
        t.fail("lost_alert_s", f"expected more than two epochs at rate_hz = {rate:g} "
                               f"({2.0 / rate:g} s), got {lost_alert:g}")
    return GnssSettings(
        enabled=t.opt_bool("enabled", present or bool(t.data)),
        device=device,
        baud=baud,
        rate_hz=rate,
        max_hdop=_number(t, "max_hdop", default.max_hdop, 0.5, 99.0),
        min_distance_m=_number(t, "min_distance_m", default.min_distance_m, 0.0, 100_000.0),
        min_interval_s=min_interval,
        max_interval_s=max_interval,
        parked_interval_s=_number(t, "parked_interval_s", default.parked_interval_s, 1.0,
                                  86400.0),
        heading_change_deg=_number(t, "heading_change_deg", default.heading_change_deg, 1.0,
                                   180.0),
        lost_alert_s=lost_alert,
    )


def parse_geofences(tables: list[Table]) -> tuple[GeofenceSpec, ...]:
    """``[[geofence]]`` entries: a unique name and exactly one of ``circle`` / ``polygon``."""
    out: list[GeofenceSpec] = []
    seen: set[str] = set()
    for t in tables:
        t.check_keys(["name", "circle", "polygon", "hysteresis_m"])
        name = t.req_str("name")
        if name in seen:
            t.fail("name", f"geofence {name!r} is defined twice")
        seen.add(name)
        hysteresis = _number(t, "hysteresis_m", 20.0, 0.0, 10_000.0)
        if ("circle" in t.data) == ("polygon" in t.data):
            t.fail(None, "expected exactly one of circle = { lat, lon, radius_m } "
                         "or polygon = [[lat, lon], ...]")
        if "circle" in t.data:
            c = t.sub("circle", t.table, f"{t.label}.circle")
            assert c is not None  # present, checked above
            c.check_keys(["lat", "lon", "radius_m"])
            center = (_coordinate(c, "lat", 90.0), _coordinate(c, "lon", 180.0))
            radius = _number(c, "radius_m", None, 1.0, 1_000_000.0)
            if radius <= hysteresis:
                t.fail("hysteresis_m", f"expected less than the radius ({radius:g} m)")
            out.append(GeofenceSpec(name, "circle", center=center, radius_m=radius,
                                    hysteresis_m=hysteresis, line=t.line))
        else:
            points = _polygon(t, t.data["polygon"])
            out.append(GeofenceSpec(name, "polygon", points=points, hysteresis_m=hysteresis,
                                    line=t.line))
    return tuple(out)


def parse_insights(t: Table) -> InsightSettings:
    """``[insights]``."""
    t.check_keys(["trip_end_park_min", "charge_end_min", "moved_while_parked_m",
                  "energy_price_per_kwh", "currency"])
    price = t.opt_float("energy_price_per_kwh", None)
    if price is not None and (not math.isfinite(price) or price < 0):
        t.fail("energy_price_per_kwh", f"expected a number >= 0, got {price}")
    return InsightSettings(
        trip_end_park_s=_number(t, "trip_end_park_min", 5.0, 0.1, 1440.0) * 60.0,
        charge_end_s=_number(t, "charge_end_min", 5.0, 0.1, 1440.0) * 60.0,
        moved_while_parked_m=_number(t, "moved_while_parked_m", 100.0, 10.0, 100_000.0),
        energy_price_per_kwh=price,
        currency=t.opt_str("currency", "") or "",
    )


def _number(t: Table, key: str, default: float | None, low: float, high: float) -> float:
    if default is None and key not in t.data:
        t.fail(key, f"missing; expected a number from {low:g} to {high:g}")
    value = t.opt_float(key, default)
    if value is None or not math.isfinite(value) or not low <= value <= high:
        t.fail(key, f"expected a number from {low:g} to {high:g}, got {value}")
    return value


def _lost_alert(t: Table, default: float) -> float:
    # Zero would raise the alert between any two epochs, so the range is open at 0.
    value = t.opt_float("lost_alert_s", default)
    if value is None or not math.isfinite(value) or not 0.0 < value <= 3600.0:
        t.fail("lost_alert_s", f"expected a number above 0 and at most 3600, got {value}")
    return value


def _coordinate(t: Table, key: str, bound: float) -> float:
    return _number(t, key, None, -bound, bound)


def _polygon(t: Table, value: Any) -> tuple[LatLon, ...]:
    rule = "expected a list of at least 3 [lat, lon] pairs in degrees"
    if not isinstance(value, list) or len(value) < 3:
        t.fail("polygon", rule)
    points: list[LatLon] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in item)):
            t.fail("polygon", f"{rule}, got {item!r}")
        lat, lon = float(item[0]), float(item[1])
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            t.fail("polygon", f"{rule}; {item!r} is out of range")
        points.append((lat, lon))
    if len(set(points)) < 3:
        t.fail("polygon", f"{rule}; the vertices must be distinct")
    return tuple(points)
