"""Fields of one NMEA sentence, checked against their raw text (for :mod:`gateway.gnss.nmea`).

pynmeagps is lenient: a field it cannot convert silently becomes ``''``. Each
value used here is therefore read together with the raw field it came from,
and a field that is present but unreadable or out of range refuses the whole
sentence (:class:`Reject`) rather than leaving a hole that looks like "not sent".
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from gateway.gnss.geo import LatLon

KNOTS_KMH = 1.852
_FIX_QUALITY = range(1, 7)  # 7 (manual input) and 8 (simulator) are not measurements
_MODES = "NADPRFEMS"
_FIX_MODES = frozenset("ADPRFE")
_SYSTEM_IDS = {"GP": "1", "GL": "2", "GA": "3", "GB": "4", "BD": "4", "GQ": "5", "GI": "6"}
"""NMEA 4.10 systemId of each constellation's talker; GN without systemId stays GN (u-blox
then numbers satellites uniquely across systems)."""


class Reject(Exception):
    """A line that cannot be used; ``kind`` names its counter (garbage, checksum, malformed)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def malformed(reason: str) -> Reject:
    """A :class:`Reject` for a well-framed sentence with a bad field."""
    return Reject("malformed", reason)


@dataclass
class Sentence:
    """What one used sentence says; None wherever it says nothing."""

    msgid: str
    tod: float | None = None
    date: dt.date | None = None
    has_fix: bool | None = None  # None: the sentence says nothing about the fix
    position: LatLon | None = None
    alt: float | None = None
    num_sv: int | None = None
    hdop: float | None = None
    speed_kmh: float | None = None
    course: float | None = None
    nav_mode: int | None = None
    svs: frozenset[tuple[str, int]] = frozenset()


class Fields:
    """Typed values from pynmeagps, checked against the raw fields they came from."""

    def __init__(self, msg: Any, raw: list[str]) -> None:
        self.msg = msg
        self.raw = raw

    def get(self, i: int, name: str) -> Any:
        """Attribute ``name`` (raw field ``i``): None when empty, Reject when unreadable."""
        value = getattr(self.msg, name, "")
        if value == "" and i < len(self.raw) and self.raw[i] != "":
            raise malformed(f"unreadable {name} {self.raw[i][:12]!r}")
        return None if value == "" else value

    def num(self, i: int, name: str, low: float = 0.0, high: float = math.inf) -> float | None:
        """A finite number within [low, high]."""
        value = self.get(i, name)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise malformed(f"{name} {self.raw[i][:12]!r} out of range")
        return None if value is None else float(value)

    def count(self, i: int, name: str, high: int = 999) -> int | None:
        """A whole number within [0, high]."""
        value = self.get(i, name)
        if value is not None and not 0 <= value <= high:
            raise malformed(f"{name} {self.raw[i][:12]!r} out of range")
        return value if value is None else int(value)

    def tod(self, i: int) -> float | None:
        """The UTC time of day in seconds, to the millisecond."""
        t = self.get(i, "time")
        if t is None:
            return None
        return round(float(t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6), 3)

    def text(self, i: int, name: str, allowed: str, *, one: bool = True) -> str | None:
        """Letters from ``allowed`` (exactly one unless ``one`` is False)."""
        value = self.get(i, name)
        if value is not None and ((one and len(value) != 1) or not set(value) <= set(allowed)):
            raise malformed(f"{name} {self.raw[i][:12]!r} is not one of {allowed}")
        return None if value is None else str(value)

    def position(self, i: int) -> LatLon | None:
        """Latitude and longitude from the four fields starting at ``i``."""
        lat, lon = self.num(i, "lat", -90.0, 90.0), self.num(i + 2, "lon", -180.0, 180.0)
        if lat is None and lon is None:
            return None
        ns, ew = self.raw[i + 1], self.raw[i + 3]
        if lat is None or lon is None or ns not in ("N", "S") or ew not in ("E", "W"):
            raise malformed(f"incomplete position {','.join(self.raw[i:i + 4])[:40]!r}")
        if float(self.raw[i]) % 100.0 >= 60.0 or float(self.raw[i + 2]) % 100.0 >= 60.0:
            raise malformed(f"minutes of arc over 60 in {','.join(self.raw[i:i + 4])[:40]!r}")
        return (lat, lon)


def convert(f: Fields, talker: str, msgid: str) -> Sentence:
    """The :class:`Sentence` for one GGA, GNS, RMC, VTG or GSA; Reject for a bad field."""
    if msgid == "GGA":
        quality = f.count(5, "quality", 8)
        return Sentence(msgid, tod=f.tod(0), position=f.position(1),
                        has_fix=None if quality is None else quality in _FIX_QUALITY,
                        num_sv=f.count(6, "numSV"), hdop=f.num(7, "HDOP"),
                        alt=f.num(8, "alt", -math.inf))
    if msgid == "GNS":
        modes = f.text(5, "posMode", _MODES, one=False)
        return Sentence(msgid, tod=f.tod(0), position=f.position(1),
                        has_fix=None if modes is None else bool(set(modes) & _FIX_MODES),
                        num_sv=f.count(6, "numSV"), hdop=f.num(7, "HDOP"),
                        alt=f.num(8, "alt", -math.inf))
    if msgid == "RMC":
        status = f.text(1, "status", "AV")
        if status is None:
            raise malformed("RMC without a status")
        mode = f.text(11, "posMode", _MODES) if len(f.raw) > 11 else None
        knots = f.num(6, "spd")
        return Sentence(msgid, tod=f.tod(0), date=f.get(8, "date"), position=f.position(2),
                        has_fix=status == "A" and (mode is None or mode in _FIX_MODES),
                        speed_kmh=None if knots is None else knots * KNOTS_KMH,
                        course=_course(f.num(7, "cog", 0.0, 360.0)))
    if msgid == "VTG":
        course = f.num(0, "cogt", 0.0, 360.0)
        knots, kmh = f.num(4, "sogn"), f.num(6, "sogk")
        if len(f.raw) > 8 and f.raw[8] == "N":
            course = knots = kmh = None  # the receiver says the values are not valid
        if kmh is None and knots is not None:
            kmh = knots * KNOTS_KMH
        return Sentence(msgid, speed_kmh=kmh, course=_course(course))
    # GSA: one per constellation; NMEA 4.10 names it in systemId, older ones by the talker.
    nav_mode = f.count(1, "navMode", 3)
    if nav_mode == 0:
        raise malformed("GSA navMode 0")
    system = f.get(17, "systemId") if len(f.raw) > 17 else None
    key = str(system) if system is not None else _SYSTEM_IDS.get(talker, talker)
    svids = (f.count(2 + k, f"svid_{k + 1:02d}") for k in range(12))
    return Sentence(msgid, nav_mode=nav_mode, hdop=f.num(14, "HDOP"),
                    svs=frozenset((key, sv) for sv in svids if sv is not None))


def _course(value: float | None) -> float | None:
    return None if value is None else value % 360.0
