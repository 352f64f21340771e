"""The health report as Prometheus metrics, on a loopback port.

:func:`render` turns a report (gateway.health.report) into the Prometheus
text exposition format (version 0.0.4); :class:`MetricsServer` answers
``GET /metrics`` with the last rendering. The server is a few lines of
HTTP/1.0 on ``asyncio.start_server``: a scrape reads a prepared string and
never walks live state or blocks the loop, requests are bounded in size and
time, and the socket is bound to a loopback address only, since metrics
carry no authentication. docs/health.md lists the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("gateway.health")

MAX_REQUEST = 8192
"""Bytes a request head may have; metrics requests are a few hundred."""
READ_TIMEOUT_S = 5.0
MAX_CLIENTS = 8
FIX_DIMENSION = {"NONE": 0, "TWO_D": 2, "THREE_D": 3}
SEVERITIES = ("info", "warning", "critical")
Labels = Mapping[str, str]


def escape_label(value: str) -> str:
    """A label value for inside double quotes: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)


class _Text:
    """Metric families in order: HELP and TYPE once, then the samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: list[tuple[Labels, float | None]]) -> None:
        """Append family ``name``; samples whose value is None are left out (and a family
        without any sample is left out entirely)."""
        present = [(labels, v) for labels, v in samples if v is not None]
        if not present:
            return
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {escaped}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in present:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}" if inner
                              else f"{name} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | None) -> None:
        """A family of one unlabelled sample."""
        self.family(name, kind, help_text, [({}, value)])


def render(report: Mapping[str, Any] | None) -> str:
    """The Prometheus text for ``report`` (only ``evgw_up`` before the first report)."""
    out = _Text()
    out.one("evgw_up", "gauge", "1 while the gateway process runs.", 1)
    if report is None:
        return "\n".join(out.lines) + "\n"
    out.family("evgw_build_info", "gauge", "Gateway software version (the value is 1).",
               [({"version": str(report["version"])}, 1)])
    out.one("evgw_uptime_seconds", "gauge", "Seconds since the health stage started.",
            report["uptime_s"])
    buses: Mapping[str, Mapping[str, Any]] = report["buses"]
    for name, key, kind, text in (
            ("evgw_frames_per_second", "frames_per_s", "gauge",
             "CAN frames decoded per second over the last report period."),
            ("evgw_frames_total", "frames", "counter", "CAN frames decoded since start."),
            ("evgw_frames_dropped_total", "dropped", "counter",
             "CAN frames dropped because decoding fell behind.")):
        out.family(name, kind, text, [({"bus": b}, v[key]) for b, v in buses.items()])
    for name, key, text in (
            ("evgw_decode_errors_total", "decode_errors", "Bad CAN frames by reason."),
            ("evgw_transmit_blocked_total", "transmit_blocked",
             "Frames the transmit guard refused, by reason.")):
        counts: Mapping[str, Mapping[str, int]] = report[key]
        out.family(name, "counter", text,
                   [({"reason": r}, c["total"]) for r, c in sorted(counts.items())])
    out.one("evgw_stale_signals", "gauge", "Signals without a fresh reading (never "
            "received included).", report["stale_signals"]["count"])
    alerts: list[Mapping[str, str]] = report["alerts"]
    out.family("evgw_active_alerts", "gauge", "Active alerts by severity.",
               [({"severity": s}, sum(1 for a in alerts if a["severity"] == s))
                for s in SEVERITIES])
    mqtt = report["mqtt"]
    if mqtt is not None:
        out.one("evgw_mqtt_connected", "gauge", "1 while connected to the broker.",
                int(mqtt["connected"]))
    _outbox(out, report["outbox"])
    _gnss(out, report["gnss"])
    lag = report["loop_lag_s"]
    out.one("evgw_loop_lag_seconds", "gauge", "How late the event loop ran a due timer "
            "(last sample).", lag["latest"])
    out.one("evgw_loop_lag_max_seconds", "gauge", "Worst event-loop lag over the last "
            "report period.", lag["max"])
    return "\n".join(out.lines) + "\n"


def _outbox(out: _Text, box: Mapping[str, Any] | None) -> None:
    if box is None:
        return
    out.one("evgw_outbox_depth", "gauge", "Messages waiting in the outbox file.", box["depth"])
    out.one("evgw_outbox_bytes", "gauge", "Bytes waiting in the outbox file.", box["bytes"])
    out.one("evgw_outbox_pending", "gauge", "Messages not yet committed to the outbox file.",
            box["pending"])
    out.family("evgw_outbox_messages", "gauge", "Messages waiting in the outbox, by kind.",
               [({"kind": k}, v) for k, v in sorted(box["by_kind"].items())])
    out.one("evgw_outbox_oldest_age_seconds", "gauge", "Age of the oldest unsent message.",
            box.get("oldest_age_s"))


def _gnss(out: _Text, gnss: Mapping[str, Any] | None) -> None:
    if gnss is None:
        return
    out.one("evgw_gnss_connected", "gauge", "1 while the GNSS receiver's port is open.",
            int(gnss["connected"]))
    fix = gnss["fix"]
    out.one("evgw_gnss_fix", "gauge", "Fix of the last epoch: 0 none, 2 2D, 3 3D.",
            None if fix is None else FIX_DIMENSION.get(fix, 0))
    out.one("evgw_gnss_satellites", "gauge", "Satellites used in the last fix.",
            gnss["satellites"])
    out.one("evgw_gnss_hdop", "gauge", "HDOP of the last fix.", gnss["hdop"])
    out.one("evgw_gnss_fix_age_seconds", "gauge", "Seconds since the last epoch.",
            gnss["fix_age_s"])


class MetricsServer:
    """``GET /metrics`` on a loopback address; ``text()`` gives the body to serve."""

    def __init__(self, host: str, port: int, text: Callable[[], str]) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"metrics must stay on this machine: {host} is not a loopback "
                             "address")
        self.host = host
        self.port = port
        self._text = text
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self) -> None:
        """Listen (OSError when the port is taken); ``port`` then holds the bound port."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health: Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and wait for open connections to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients <= MAX_CLIENTS:
                status, body = await self._answer(reader)
                head = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; "
                        f"charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n")
                writer.write(head.encode() + body)
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(READ_TIMEOUT_S):
                        await writer.drain()
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        # Real time on purpose: this bounds a socket read, not vehicle logic.
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await reader.readline()
                total = len(request)
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    total += len(line)
                    if total > MAX_REQUEST:
                        return "431 Request Header Fields Too Large", b"request too large\n"
        except (ValueError, asyncio.LimitOverrunError):  # one line beyond the stream limit
            return "431 Request Header Fields Too Large", b"request too large\n"
        except (TimeoutError, OSError):
            return "408 Request Timeout", b"request timeout\n"
        parts = request.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", b"only GET\n"
        if target != "/metrics":
            return "404 Not Found", b"not found; try /metrics\n"
        return "200 OK", self._text().encode("utf-8")
