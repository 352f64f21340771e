"""Distances on the Earth, good to centimetres over the few kilometres that matter here.

Geofences, the publish policy, trip distance and the moved-while-parked alert
all ask "how far apart are these two fixes?". Haversine on a sphere of the
mean Earth radius is off by at most 0.5 % against the ellipsoid, far below
GNSS noise. Polygons are handled in a flat local frame (east/north metres
around an origin), which is exact enough for fences up to tens of kilometres.
"""

from __future__ import annotations

import math

EARTH_RADIUS_M = 6_371_008.8
"""Mean Earth radius (IUGG)."""

LatLon = tuple[float, float]


def distance_m(a: LatLon, b: LatLon) -> float:
    """Great-circle distance between two (latitude, longitude) points in degrees."""
    lat1, lon1 = map(math.radians, a)
    lat2, lon2 = map(math.radians, b)
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def heading_change(a: float, b: float) -> float:
    """The smaller angle between two headings in degrees (0..180)."""
    d = abs(a - b) % 360.0
    return 360.0 - d if d > 180.0 else d


class LocalFrame:
    """A flat east/north frame in metres around ``origin``."""

    def __init__(self, origin: LatLon) -> None:
        self.origin = origin
        self._m_per_deg_lat = math.pi * EARTH_RADIUS_M / 180.0
        self._m_per_deg_lon = self._m_per_deg_lat * math.cos(math.radians(origin[0]))

    def to_xy(self, point: LatLon) -> tuple[float, float]:
        """(east, north) metres of ``point`` from the origin."""
        dlon = (point[1] - self.origin[1] + 540.0) % 360.0 - 180.0  # across the antimeridian
        return (dlon * self._m_per_deg_lon, (point[0] - self.origin[0]) * self._m_per_deg_lat)
