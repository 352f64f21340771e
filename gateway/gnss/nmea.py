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
from dataclasses import dataclass, field
from typing import Any

from pynmeagps import VALCKSUM, VALMSGID, NMEAReader

from gateway.gnss.fields import Fields, Reject, Sentence, convert, malformed
from gateway.gnss.fix import Fix, FixType
from gateway.gnss.geo import LatLon
from gateway.health import Counters, RateLimitedLog

MAX_LINE = 128
"""NMEA allows 82 characters; some receivers exceed it a little, nothing sane goes past this."""
TALKERS = frozenset({"GP", "GN", "GL", "GA", "GB", "BD", "GQ", "GI"})
USED = frozenset({"GGA", "RMC", "VTG", "GSA", "GNS"})
MAX_GSA = 16
"""GSA sentences one epoch takes in: a receiver sends at most one per constellation."""
_TIMED = frozenset({"GGA", "RMC", "GNS"})
_ONCE = frozenset({"GGA", "RMC", "GNS", "VTG"})
"""Sent once per epoch: a repeat starts the next one even when the time is unknown."""
_MIN_FIELDS = {"GGA": 14, "RMC": 11, "VTG": 8, "GSA": 17, "GNS": 12}
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


@dataclass
class _Epoch:
    tod: float | None = None
    received: float = 0.0
    date: dt.date | None = None
    no_fix: bool = False
    sentences: dict[str, Sentence] = field(default_factory=dict)
    gsas: int = 0
    nav_modes: list[int] = field(default_factory=list)
    svs: set[tuple[str, int]] = field(default_factory=set)
    gsa_hdop: float | None = None

    def add(self, s: Sentence, received: float) -> None:
        self.received = received
        self.tod = s.tod if s.tod is not None else self.tod
        self.date = s.date or self.date
        self.no_fix = self.no_fix or s.has_fix is False
        if s.msgid == "GSA":
            self.gsas += 1
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
        except Reject as r:
            self._refuse(r.kind, str(r), text)
            return None
        if sentence is None:
            self._counters.inc("gnss.ignored")
            return None
        if sentence.msgid == "GSA" and self._epoch.gsas >= MAX_GSA:
            # Only GSAs and a line that never goes quiet: nothing would ever complete the
            # epoch, so its memory is bounded here instead.
            self._counters.inc("gnss.gsa_dropped")
            self._rlog.warning("gnss.gsa_dropped",
                               f"GNSS: more than {MAX_GSA} GSA sentences in one epoch; "
                               "the extra ones are ignored")
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

    def _decode(self, text: bytes) -> Sentence | None:
        if len(text) > MAX_LINE:
            raise Reject("garbage", f"line longer than {MAX_LINE} bytes")
        if not is_text(text):
            raise Reject("garbage", "binary data")
        if text[:1] not in (b"$", b"!"):
            raise Reject("garbage", "no '$' at the start")
        body, star, given = text[1:].decode("ascii").rpartition("*")
        if not star:
            raise Reject("checksum", "no checksum (truncated sentence?)")
        if len(given) != 2 or not set(given) <= _HEX:
            raise Reject("checksum", f"checksum field {given[:8]!r} is not two hex digits")
        computed = 0
        for ch in body.encode("ascii"):
            computed ^= ch
        if computed != int(given, 16):
            raise Reject("checksum", f"checksum {given} does not match {computed:02X}")
        address, *data = body.split(",")
        if not (address.isalnum() and address.isupper() and len(address) >= 2):
            raise malformed(f"bad address field {address[:8]!r}")
        talker, msgid = address[:2], address[2:]
        if text[:1] == b"!" or address[0] == "P" or talker not in TALKERS or msgid not in USED:
            return None
        if len(data) < _MIN_FIELDS[msgid]:
            raise malformed(f"{msgid} has {len(data)} fields, expected {_MIN_FIELDS[msgid]}")
        try:
            msg = NMEAReader.parse(text, validate=VALCKSUM | VALMSGID)
        except Exception as exc:  # third-party parser: whatever it raises, the line is bad
            raise malformed(f"{msgid} refused by the parser ({type(exc).__name__})") from exc
        return convert(Fields(msg, data), talker, msgid)

    def _starts_epoch(self, s: Sentence) -> bool:
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
