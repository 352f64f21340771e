"""The health report: what an operator needs to know about one gateway, as one object.

It is built on the event loop every ``[health] interval_s`` from small,
cheap readings (counters, the state store's staleness, the alert book, the
outbox's in-memory stats, the GNSS reader, the loop-lag sampler). The same
snapshot is published on the ``health`` topic and rendered for Prometheus,
so both say the same thing and a metrics scrape never touches live state.
Rates are counter differences over the clock's monotonic time since the
previous report; docs/health.md describes every field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import __version__
from gateway.alerts.model import Alert
from gateway.clock import Clock
from gateway.gnss.fix import Fix
from gateway.health.counters import Counters
from gateway.health.lag import LoopLag
from gateway.state import StateStore

STALE_PATHS_SHOWN = 20
"""Stale signals named in a report; the count covers them all."""
NOT_ERRORS = frozenset({"decoded", "unmapped", "cache_resets"})
"""``decode.<name>`` counters that count normal work, not bad frames."""
Report = dict[str, Any]


class GnssSource(Protocol):
    """What the report reads of the GNSS receiver (gateway.gnss.reader.GnssReader)."""

    @property
    def connected(self) -> bool:
        """True while the serial port is open."""
        ...

    @property
    def last_fix(self) -> Fix | None:
        """The latest epoch, with or without a position."""
        ...


@dataclass
class Sources:
    """What a report is built from; None for a part this gateway runs without."""

    counters: Counters
    buses: Sequence[str]
    store: StateStore
    alerts: Callable[[], Sequence[Alert]]
    lag: LoopLag
    mqtt_connected: Callable[[], bool] | None = None
    outbox_stats: Callable[[], Mapping[str, int]] | None = None
    """Rows and bytes waiting in the outbox file, in total and per kind."""
    outbox_pending: Callable[[], int] | None = None
    """Entries handed to the durable path but not yet committed to the file."""
    outbox_oldest: Callable[[], float | None] | None = None
    """Creation time (clock.time()) of the oldest unsent row (``Outbox.oldest_created``);
    the report carries ``oldest_age_s`` only when one is given."""
    gnss: GnssSource | None = None


def _increase(now: Mapping[str, int], before: Mapping[str, int], prefix: str
              ) -> dict[str, dict[str, int]]:
    """``{reason: {total, recent}}`` for the counters ``<prefix><reason>`` (one level)."""
    out: dict[str, dict[str, int]] = {}
    for name, total in now.items():
        reason = name[len(prefix):]
        if not name.startswith(prefix) or "." in reason or reason in NOT_ERRORS:
            continue
        out[reason] = {"total": total, "recent": total - before.get(name, 0)}
    return out


class HealthReporter:
    """Builds reports, remembering the counters of the previous one for rates."""

    def __init__(self, sources: Sources, clock: Clock, version: str = __version__) -> None:
        self.sources = sources
        self._clock = clock
        self._version = version
        self._started = clock.monotonic()
        self._before = self._counters()
        self._before_at = self._started
        self.latest: Report | None = None
        """The last report built; readers must not modify it."""

    def _counters(self) -> dict[str, int]:
        counters = self.sources.counters
        return {**counters.snapshot("can."), **counters.snapshot("decode."),
                **counters.snapshot("tx.blocked."), **counters.snapshot("queue.can.")}

    def build(self) -> Report:
        """A report as of now; the next one's rates and increases start from here."""
        src = self.sources
        now, mono = self._clock.time(), self._clock.monotonic()
        period = mono - self._before_at
        counters = self._counters()
        before = self._before
        stale = src.store.stale_paths(now)
        report: Report = {
            "version": self._version,
            "uptime_s": round(mono - self._started, 1),
            "period_s": round(period, 3),
            "buses": {bus: self._bus(bus, counters, before, period) for bus in src.buses},
            "decode_errors": _increase(counters, before, "decode."),
            "stale_signals": {"count": len(stale), "paths": stale[:STALE_PATHS_SHOWN]},
            "alerts": [{"key": a.key, "severity": a.severity.value} for a in src.alerts()],
            "transmit_blocked": _increase(counters, before, "tx.blocked."),
            "mqtt": None if src.mqtt_connected is None else {"connected": src.mqtt_connected()},
            "outbox": self._outbox(now),
            "gnss": self._gnss(now),
            "loop_lag_s": {"latest": round(src.lag.latest, 4),
                           "max": round(src.lag.take_max(), 4)},
        }
        self._before, self._before_at = counters, mono
        self.latest = report
        return report

    @staticmethod
    def _bus(bus: str, counters: Mapping[str, int], before: Mapping[str, int],
             period: float) -> dict[str, Any]:
        frames = counters.get(f"can.{bus}.frames", 0)
        recent = frames - before.get(f"can.{bus}.frames", 0)
        errors = sum(v for k, v in counters.items() if k.startswith(f"decode.{bus}."))
        return {"frames": frames,
                "frames_per_s": round(recent / period, 1) if period > 0 else 0.0,
                "dropped": counters.get(f"queue.can.{bus}.dropped", 0),
                "decode_errors": errors}

    def _outbox(self, now: float) -> dict[str, Any] | None:
        src = self.sources
        if src.outbox_stats is None:
            return None
        stats = dict(src.outbox_stats())
        out: dict[str, Any] = {
            "depth": stats.pop("rows", 0), "bytes": stats.pop("bytes", 0),
            "pending": 0 if src.outbox_pending is None else src.outbox_pending(),
            "by_kind": stats}
        if src.outbox_oldest is not None:
            oldest = src.outbox_oldest()
            out["oldest_age_s"] = None if oldest is None else round(max(0.0, now - oldest), 1)
        return out

    def _gnss(self, now: float) -> dict[str, Any] | None:
        gnss = self.sources.gnss
        if gnss is None:
            return None
        fix = gnss.last_fix
        return {"connected": gnss.connected,
                "fix": None if fix is None else fix.fix_type,
                "satellites": None if fix is None else fix.satellites,
                "hdop": None if fix is None else fix.hdop,
                "fix_age_s": None if fix is None else round(max(0.0, now - fix.received), 1)}
