"""NMEA 0183 lines -> one :class:`Fix` per receiver epoch.

Framing and the checksum are checked here, before pynmeagps sees a line:
its parser is lenient (a field it cannot convert silently becomes ``''``), so
every field used is also checked against its raw text, and a sentence with a
field that is present but unreadable is refused as a whole.

A receiver sends a burst of sentences per epoch (u-blox: RMC, VTG, GGA, GSA
per constellation, GSV, GLL). The timed ones (GGA, RMC, GNS) carry the UTC
time of day; VTG and GSA join the epoch being assembled. A new time of day
closes the previous epoch; so does :meth:`NmeaParser.flush`, which the reader
calls when the line goes quiet after a burst.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from pynmeagps import VALCKSUM, VALMSGID, NMEAReader

from gateway.gnss.fix import Fix, FixType
from gateway.gnss.geo import LatLon
from gateway.health import Counters, RateLimitedLog

MAX_LINE = 128
"""NMEA allows 82 characters; some receivers exceed it a little, nothing sane goes past this."""
TALKERS = frozenset({"GP", "GN", "GL", "GA", "GB", "BD", "GQ", "GI"})
USED = frozenset({"GGA", "RMC", "VTG", "GSA", "GNS"})
KNOTS_KMH = 1.852
_TIMED = frozenset({"GGA", "RMC", "GNS"})
_ONCE = frozenset({"GGA", "RMC", "GNS", "VTG"})
"""Sent once per epoch: a repeat starts the next one even when the time is unknown."""
_MIN_FIELDS = {"GGA": 14, "RMC": 11, "VTG": 8, "GSA": 17, "GNS": 12}
_FIX_QUALITY = range(1, 7)  # 7 (manual input) and 8 (simulator) are not measurements
_MODES = "NADPRFEMS"
_FIX_MODES = frozenset("ADPRFE")
_SYSTEM_IDS = {"GP": "1", "GL": "2", "GA": "3", "GB": "4", "BD": "4", "GQ": "5", "GI": "6"}
"""NMEA 4.10 systemId of each constellation's talker; GN without systemId stays GN (u-blox
then numbers satellites uniquely across systems)."""
_PRINTABLE = bytes(range(0x20, 0x7F))
_HEX = frozenset("0123456789ABCDEFabcdef")
_HALF_DAY = 43_200.0


def is_text(data: bytes) -> bool:
    """True when ``data`` is printable ASCII only (what an NMEA sentence is made of)."""
    return not data.translate(None, _PRINTABLE)


def excerpt(data: bytes, limit: int = 40) -> str:
    """A printable rendering of the start of ``data``, at most ``limit`` characters + "..."."""
    parts: list[str] = []
    size = 0
    for b in data:
        if size >= limit:
            return "".join(parts) + "..."
        part = chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}"
        parts.append(part)
        size += len(part)
    return "".join(parts)


class _Reject(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind  # the counter: garbage, checksum or malformed


def _malformed(reason: str) -> _Reject:
    return _Reject("malformed", reason)


@dataclass
class _Sentence:
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


@dataclass
class _Epoch:
    tod: float | None = None
    received: float = 0.0
    date: dt.date | None = None
    no_fix: bool = False
    sentences: dict[str, _Sentence] = field(default_factory=dict)
    nav_modes: list[int] = field(default_factory=list)
    svs: set[tuple[str, int]] = field(default_factory=set)
    gsa_hdop: float | None = None

    def add(self, s: _Sentence, received: float) -> None:
        self.received = received
        self.tod = s.tod if s.tod is not None else self.tod
        self.date = s.date or self.date
        self.no_fix = self.no_fix or s.has_fix is False
        if s.msgid == "GSA":
            if s.nav_mode is not None:
                self.nav_modes.append(s.nav_mode)
            self.svs |= s.svs
            self.gsa_hdop = self.gsa_hdop if self.gsa_hdop is not None else s.hdop
        else:
            self.sentences.setdefault(s.msgid, s)

    def first(self, attr: str, order: tuple[str, ...]) -> Any:
        for msgid in order:
            s = self.sentences.get(msgid)
            value = None if s is None else getattr(s, attr)
            if value is not None:
                return value
        return None


class NmeaParser:
    """Turns lines into fixes, counting and logging every line it cannot use."""

    def __init__(self, counters: Counters, rlog: RateLimitedLog) -> None:
        self._counters = counters
        self._rlog = rlog
        self._epoch = _Epoch()
        self._ref: tuple[dt.date, float] | None = None  # last date seen and its time of day

    def feed(self, line: bytes, received: float) -> Fix | None:
        """Take one line; returns the previous epoch's fix when this line starts a new one."""
        text = line.rstrip(b"\r\n")
        if not text:
            return None
        try:
            sentence = self._decode(text)
        except _Reject as r:
            self._refuse(r.kind, str(r), text)
            return None
        if sentence is None:
            self._counters.inc("gnss.ignored")
            return None
        self._counters.inc("gnss.sentences")
        fix = self._complete() if self._starts_epoch(sentence) else None
        self._epoch.add(sentence, received)
        return fix

    def flush(self, received: float) -> Fix | None:
        """Complete the pending epoch now (the line went quiet after a burst).

        ``received`` is the time of the flush. The fix keeps the time of the
        epoch's last line: the epoch was complete then, the quiet only shows it.
        """
        return self._complete()

    def reject_garbage(self, data: bytes, reason: str) -> None:
        """Count and log bytes that are not NMEA at all (for the reader's framing)."""
        self._refuse("garbage", reason, data)

    def _refuse(self, kind: str, reason: str, data: bytes) -> None:
        self._counters.inc(f"gnss.errors.{kind}")
        self._rlog.warning(f"gnss.{kind}", f"GNSS: {reason}: '{excerpt(data)}'")

    def _decode(self, text: bytes) -> _Sentence | None:
        if len(text) > MAX_LINE:
            raise _Reject("garbage", f"line longer than {MAX_LINE} bytes")
        if not is_text(text):
            raise _Reject("garbage", "binary data")
        if text[:1] not in (b"$", b"!"):
            raise _Reject("garbage", "no '$' at the start")
        body, star, given = text[1:].decode("ascii").rpartition("*")
        if not star:
            raise _Reject("checksum", "no checksum (truncated sentence?)")
        if len(given) != 2 or not set(given) <= _HEX:
            raise _Reject("checksum", f"checksum field {given[:8]!r} is not two hex digits")
        computed = 0
        for ch in body.encode("ascii"):
            computed ^= ch
        if computed != int(given, 16):
            raise _Reject("checksum", f"checksum {given} does not match {computed:02X}")
        address, *data = body.split(",")
        if not (address.isalnum() and address.isupper() and len(address) >= 2):
            raise _malformed(f"bad address field {address[:8]!r}")
        talker, msgid = address[:2], address[2:]
        if text[:1] == b"!" or address[0] == "P" or talker not in TALKERS or msgid not in USED:
            return None
        if len(data) < _MIN_FIELDS[msgid]:
            raise _malformed(f"{msgid} has {len(data)} fields, expected {_MIN_FIELDS[msgid]}")
        try:
            msg = NMEAReader.parse(text, validate=VALCKSUM | VALMSGID)
        except Exception as exc:  # third-party parser: whatever it raises, the line is bad
            raise _malformed(f"{msgid} refused by the parser ({type(exc).__name__})") from exc
        return _convert(_Fields(msg, data), talker, msgid)

    def _starts_epoch(self, s: _Sentence) -> bool:
        ep = self._epoch
        if s.msgid in _TIMED and _TIMED & ep.sentences.keys():
            if s.tod != ep.tod:
                return True  # a new time of day, or a time where there was none
            if s.tod is not None:
                return False  # the same time from another talker joins the epoch
        return s.msgid in _ONCE and s.msgid in ep.sentences

    def _complete(self) -> Fix | None:
        ep, self._epoch = self._epoch, _Epoch()
        if not _TIMED & ep.sentences.keys():
            return None  # only VTG/GSA: nothing says where or when
        position: LatLon | None = ep.first("position", ("GGA", "GNS", "RMC"))
        alt: float | None = ep.first("alt", ("GGA", "GNS"))
        nav = max(ep.nav_modes, default=None)
        fix_type: FixType
        if ep.no_fix or position is None or nav == 1:
            fix_type = "NONE"
        elif nav is not None:
            fix_type = "THREE_D" if nav == 3 else "TWO_D"
        else:
            fix_type = "THREE_D" if alt is not None else "TWO_D"
        counts = [s.num_sv for s in ep.sentences.values() if s.num_sv is not None]
        if ep.nav_modes:
            counts.append(len(ep.svs))  # GGA stops at 12 on some receivers; GSA lists them all
        satellites = max(counts, default=None)
        self._counters.inc("gnss.fixes")
        if fix_type == "NONE" or position is None:
            # Whatever else the epoch said, without a fix it says nothing about the car.
            return Fix(ep.received, self._utc(ep), "NONE", None, None, None, None, None,
                       satellites, None)
        hdop = ep.first("hdop", ("GGA", "GNS"))
        return Fix(ep.received, self._utc(ep), fix_type, position[0], position[1], alt,
                   speed_kmh=ep.first("speed_kmh", ("VTG", "RMC")),
                   heading=ep.first("course", ("RMC", "VTG")), satellites=satellites,
                   hdop=hdop if hdop is not None else ep.gsa_hdop)

    def _utc(self, ep: _Epoch) -> float | None:
        if ep.tod is None:
            return None
        if ep.date is not None:
            day = ep.date
        elif self._ref is not None:
            # GGA-only epochs: the last RMC date, moved a day when the clock wrapped.
            day, ref_tod = self._ref
            if ep.tod < ref_tod - _HALF_DAY:
                day += dt.timedelta(days=1)
            elif ep.tod > ref_tod + _HALF_DAY:
                day -= dt.timedelta(days=1)
        else:
            return None
        self._ref = (day, ep.tod)
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() + ep.tod


class _Fields:
    """Typed values from pynmeagps, checked against the raw fields they came from."""

    def __init__(self, msg: Any, raw: list[str]) -> None:
        self.msg = msg
        self.raw = raw

    def get(self, i: int, name: str) -> Any:
        value = getattr(self.msg, name, "")
        if value == "" and i < len(self.raw) and self.raw[i] != "":
            raise _malformed(f"unreadable {name} {self.raw[i][:12]!r}")
        return None if value == "" else value

    def num(self, i: int, name: str, low: float = 0.0, high: float = math.inf) -> float | None:
        value = self.get(i, name)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise _malformed(f"{name} {self.raw[i][:12]!r} out of range")
        return None if value is None else float(value)

    def count(self, i: int, name: str, high: int = 999) -> int | None:
        value = self.get(i, name)
        if value is not None and not 0 <= value <= high:
            raise _malformed(f"{name} {self.raw[i][:12]!r} out of range")
        return value if value is None else int(value)

    def tod(self, i: int) -> float | None:
        t = self.get(i, "time")
        if t is None:
            return None
        return round(float(t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6), 3)

    def text(self, i: int, name: str, allowed: str, *, one: bool = True) -> str | None:
        value = self.get(i, name)
        if value is not None and ((one and len(value) != 1) or not set(value) <= set(allowed)):
            raise _malformed(f"{name} {self.raw[i][:12]!r} is not one of {allowed}")
        return None if value is None else str(value)

    def position(self, i: int) -> LatLon | None:
        lat, lon = self.num(i, "lat", -90.0, 90.0), self.num(i + 2, "lon", -180.0, 180.0)
        if lat is None and lon is None:
            return None
        ns, ew = self.raw[i + 1], self.raw[i + 3]
        if lat is None or lon is None or ns not in ("N", "S") or ew not in ("E", "W"):
            raise _malformed(f"incomplete position {','.join(self.raw[i:i + 4])[:40]!r}")
        if float(self.raw[i]) % 100.0 >= 60.0 or float(self.raw[i + 2]) % 100.0 >= 60.0:
            raise _malformed(f"minutes of arc over 60 in {','.join(self.raw[i:i + 4])[:40]!r}")
        return (lat, lon)


def _convert(f: _Fields, talker: str, msgid: str) -> _Sentence:
    if msgid == "GGA":
        quality = f.count(5, "quality", 8)
        return _Sentence(msgid, tod=f.tod(0), position=f.position(1),
                         has_fix=None if quality is None else quality in _FIX_QUALITY,
                         num_sv=f.count(6, "numSV"), hdop=f.num(7, "HDOP"),
                         alt=f.num(8, "alt", -math.inf))
    if msgid == "GNS":
        modes = f.text(5, "posMode", _MODES, one=False)
        return _Sentence(msgid, tod=f.tod(0), position=f.position(1),
                         has_fix=None if modes is None else bool(set(modes) & _FIX_MODES),
                         num_sv=f.count(6, "numSV"), hdop=f.num(7, "HDOP"),
                         alt=f.num(8, "alt", -math.inf))
    if msgid == "RMC":
        status = f.text(1, "status", "AV")
        if status is None:
            raise _malformed("RMC without a status")
        mode = f.text(11, "posMode", _MODES) if len(f.raw) > 11 else None
        knots = f.num(6, "spd")
        return _Sentence(msgid, tod=f.tod(0), date=f.get(8, "date"), position=f.position(2),
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
        return _Sentence(msgid, speed_kmh=kmh, course=_course(course))
    # GSA: one per constellation; NMEA 4.10 names it in systemId, older ones by the talker.
    nav_mode = f.count(1, "navMode", 3)
    if nav_mode == 0:
        raise _malformed("GSA navMode 0")
    system = f.get(17, "systemId") if len(f.raw) > 17 else None
    key = str(system) if system is not None else _SYSTEM_IDS.get(talker, talker)
    svids = (f.count(2 + k, f"svid_{k + 1:02d}") for k in range(12))
    return _Sentence(msgid, nav_mode=nav_mode, hdop=f.num(14, "HDOP"),
                     svs=frozenset((key, sv) for sv in svids if sv is not None))


def _course(value: float | None) -> float | None:
    return None if value is None else value % 360.0
