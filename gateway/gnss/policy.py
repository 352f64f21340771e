"""When a fix goes out on the MQTT ``location`` topic.

A car at rest would otherwise publish the same position every second, and a
car on the move would flood a metered link. A fix is published when it says
something new: the first one, a fix lost or regained, a move of
``min_distance_m``, a turn while moving, or simply because ``max_interval_s``
(``parked_interval_s`` when parked) passed. ``min_interval_s`` caps the rate of
everything except a change of validity, which the consumer must learn at once.
"""

from __future__ import annotations

from gateway.config.location import GnssSettings
from gateway.gnss.fix import Fix
from gateway.gnss.geo import LatLon, distance_m, heading_change

TURN_MIN_SPEED_KMH = 5.0
"""Below walking pace, the course over ground is mostly noise."""


class PublishPolicy:
    """Decides whether a fix is worth publishing; remembers the last one published."""

    def __init__(self, settings: GnssSettings) -> None:
        self._settings = settings
        self._last_mono: float | None = None
        self._last_valid = False
        self._last_position: LatLon | None = None
        self._last_heading: float | None = None

    def due(self, fix: Fix, mono: float, parked: bool) -> bool:
        """True when ``fix`` should be published at monotonic time ``mono``."""
        s = self._settings
        if self._last_mono is None or fix.valid != self._last_valid:
            return True
        elapsed = mono - self._last_mono
        if elapsed < s.min_interval_s:
            return False
        if elapsed >= (s.parked_interval_s if parked else s.max_interval_s):
            return True
        position = fix.position
        if position is None:
            return False  # still no fix: only the periodic repeat above
        if self._last_position is not None \
                and distance_m(position, self._last_position) >= s.min_distance_m:
            return True
        return (fix.heading is not None and self._last_heading is not None
                and fix.speed_kmh is not None and fix.speed_kmh >= TURN_MIN_SPEED_KMH
                and heading_change(fix.heading, self._last_heading) >= s.heading_change_deg)

    def commit(self, fix: Fix, mono: float) -> None:
        """Record that ``fix`` was published at ``mono``."""
        self._last_mono = mono
        self._last_valid = fix.valid
        self._last_position = fix.position
        self._last_heading = fix.heading
