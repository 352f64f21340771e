"""The ``Vehicle.CurrentLocation`` signals: ten slots, one sample, one fix.

All ten share a single :class:`Sample`, so a fix replaces every value and the
timestamp in one step: a reader can never see the latitude of one epoch with
the longitude of the next, and the whole branch goes stale together.
"""

from __future__ import annotations

from typing import Any

from gateway.gnss.fix import Fix
from gateway.state.catalog import LOC, lookup
from gateway.state.store import Sample, SignalState, StateStore

PATHS: dict[str, str] = {
    "lat": f"{LOC}.Latitude",
    "lon": f"{LOC}.Longitude",
    "alt": f"{LOC}.Altitude",
    "heading": f"{LOC}.Heading",
    "speed": f"{LOC}.Speed",
    "accuracy": f"{LOC}.HorizontalAccuracy",
    "utc": f"{LOC}.Timestamp",
    "fix": f"{LOC}.GNSSReceiver.FixType",
    "satellites": f"{LOC}.GNSSReceiver.SatellitesUsed",
    "hdop": f"{LOC}.GNSSReceiver.HDOP",
}
"""Key in the shared sample -> catalog path."""


class LocationSlots:
    """The location branch of the state store, written one fix at a time."""

    def __init__(self, sample: Sample, slots: dict[str, SignalState]) -> None:
        self.sample = sample
        self.slots = slots

    @classmethod
    def register(cls, store: StateStore, stale_after: float) -> LocationSlots:
        """Register the ten paths in ``store``; they go stale ``stale_after`` s after a fix."""
        sample = Sample()
        slots = {}
        for key, path in PATHS.items():
            entry = lookup(path)
            if entry is None:
                raise KeyError(f"{path} is missing from the signal catalog")
            slots[key] = store.register(SignalState(
                path, entry.unit, entry.kind, entry.group, stale_after, sample=sample, key=key))
        return cls(sample, slots)

    def record(self, fix: Fix) -> None:
        """Publish ``fix`` to the store, stamped with the time it was received.

        Without a position, everything that describes one is None (invalid);
        the fix type, satellite count and receiver time still say something.
        """
        values: dict[str, Any] = {
            "fix": fix.fix_type,
            "satellites": fix.satellites,
            "utc": fix.utc_iso(),
        }
        if fix.valid:
            values.update(lat=fix.lat, lon=fix.lon, alt=fix.alt, heading=fix.heading,
                          speed=fix.speed_kmh, accuracy=fix.accuracy_m, hdop=fix.hdop)
        # One assignment each: the values dict is replaced, never mutated, as readers share it.
        self.sample.values = values
        self.sample.timestamp = fix.received
