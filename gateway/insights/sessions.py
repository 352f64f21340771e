"""What a finished trip and a finished charging session are.

Both are published as durable events (``trip``, ``charge_session``), kept in
the local SQLite log, and fed to the battery-health estimator. Times are the
source timestamps of the data that opened and closed them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

DistanceSource = Literal["odometer", "gnss", "speed"]
ChargeEnd = Literal["unplugged", "stopped", "driven_off", "gateway_restart"]


@dataclass(frozen=True)
class Trip:
    """One trip, from ready/ignition-on or first motion to the start of a long enough park."""

    id: str
    start: float
    end: float
    duration_s: float
    distance_km: float
    distance_source: DistanceSource | None
    """Where the distance came from; None when nothing could measure it (distance 0)."""
    energy_wh: float
    """Net energy taken from the pack: discharged minus regenerated."""
    discharged_wh: float
    regen_wh: float
    wh_per_km: float | None
    """None below 0.1 km, where the ratio means nothing."""
    soc_start: float | None
    soc_end: float | None
    soc_used: float | None
    max_speed_kmh: float | None
    odometer_start_km: float | None
    odometer_end_km: float | None
    start_position: tuple[float, float] | None
    end_position: tuple[float, float] | None
    cost: float | None = None
    currency: str = ""
    complete: bool = True
    """False when part of the trip was not observed (a gateway restart, a gap in the pack
    samples): its totals are then a lower bound, and battery health does not learn from it."""

    def as_dict(self) -> dict[str, Any]:
        """The ``data`` of a ``trip`` event (rounded for people, not for the sums)."""
        return _rounded(asdict(self))


@dataclass(frozen=True)
class ChargeSession:
    """One charging session, plug-in (or first current) to unplug or a long stop."""

    id: str
    start: float
    end: float
    duration_s: float
    soc_start: float | None
    soc_end: float | None
    energy_wh: float
    """Energy into the pack (battery side; the wall meter reads more by the charger's loss)."""
    ah: float
    """Charge into the pack, for coulomb counting."""
    max_power_w: float
    interruptions: int
    """Times current stopped for a while and came back within the session."""
    end_reason: ChargeEnd
    cost: float | None = None
    currency: str = ""
    complete: bool = True
    """False when part of the session was not observed (a gateway restart, a gap in the
    pack samples): no capacity estimate is taken from it."""

    def as_dict(self) -> dict[str, Any]:
        """The ``data`` of a ``charge_session`` event."""
        return _rounded(asdict(self))


def _rounded(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, float):
            out[key] = round(value, 3 if key in ("start", "end") else 2)
        elif isinstance(value, tuple):
            out[key] = [round(v, 7) for v in value]
        else:
            out[key] = value
    return out
