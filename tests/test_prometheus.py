"""Prometheus metrics over a real TCP connection, parsed as a scraper would."""

from __future__ import annotations

import asyncio
import re
import socket
from dataclasses import dataclass, field

import pytest

from gateway.app import Pipeline
from gateway.app.health import Health
from gateway.clock import SystemClock
from gateway.config.health import HealthSettings
from gateway.health.prometheus import MetricsServer, escape_label, render
from tests.test_health import decode_some, stocked

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')
NASTY = 'v1 "quoted" back\\slash\nnewline'


@dataclass
class Family:
    kind: str
    help: str
    samples: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> dict[str, Family]:
    """The exposition text by family; fails on any line a scraper would reject."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    pending_help: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in pending_help and name not in families, f"second HELP: {line}"
            pending_help[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge"), line
            assert name not in families, f"second TYPE: {line}"
            families[name] = Family(kind, pending_help.pop(name))
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels_text, value = m.groups()
            assert name in families, f"sample before its TYPE: {line}"
            labels: list[tuple[str, str]] = []
            rest = labels_text or ""
            while rest:
                lm = LABEL.match(rest)
                assert lm, f"bad labels in {line!r}"
                labels.append((lm.group(1), unescape(lm.group(2))))
                rest = rest[lm.end():]
            key = tuple(labels)
            assert key not in families[name].samples, f"duplicate sample: {line}"
            families[name].samples[key] = float(value)
    assert not pending_help, f"HELP without TYPE: {pending_help}"
    return families


async def request(port: int, raw: bytes, host: str = "127.0.0.1") -> tuple[str, bytes, bytes]:
    """(status line, header block, body) of one HTTP exchange."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, _, headers = head.partition(b"\r\n")
    return status.decode(), headers, body


GET = b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"


async def test_a_scrape_parses_with_every_figure_and_escaped_labels(ref_pipeline, clock,
                                                                    tmp_path):
    async with stocked(ref_pipeline, clock, tmp_path, version=NASTY) as (reporter, _):
        clock.advance(10.0)
        decode_some(ref_pipeline, clock.time(), good=100, unknown=3, short=2)
        report = reporter.build()
    text = render(report)
    server = MetricsServer("127.0.0.1", 0, lambda: text)
    await server.start()
    try:
        status, headers, body = await request(server.port, GET)
    finally:
        await server.stop()
    assert status == "HTTP/1.0 200 OK"
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in headers
    assert f"Content-Length: {len(body)}".encode() in headers
    fam = parse(body.decode())

    assert fam["evgw_up"].samples == {(): 1.0}
    assert fam["evgw_build_info"].samples == {(("version", NASTY),): 1.0}
    assert fam["evgw_frames_per_second"].samples == {(("bus", "vehicle"),): 10.5}
    assert fam["evgw_frames_total"].samples == {(("bus", "vehicle"),): 105.0}
    assert fam["evgw_frames_total"].kind == "counter"
    assert fam["evgw_decode_errors_total"].samples == {(("reason", "unknown_id"),): 3.0,
                                                       (("reason", "wrong_dlc"),): 2.0}
    assert fam["evgw_transmit_blocked_total"].samples == {(("reason", "not_allowed"),): 1.0}
    assert fam["evgw_active_alerts"].samples == {(("severity", "info"),): 0.0,
                                                 (("severity", "warning"),): 1.0,
                                                 (("severity", "critical"),): 1.0}
    assert fam["evgw_stale_signals"].samples == {(): float(report["stale_signals"]["count"])}
    assert fam["evgw_mqtt_connected"].samples == {(): 1.0}
    assert fam["evgw_outbox_depth"].samples == {(): 1.0}
    assert fam["evgw_outbox_messages"].samples[(("kind", "event"),)] == 1.0
    assert fam["evgw_outbox_oldest_age_seconds"].samples == {(): 42.0}
    assert fam["evgw_gnss_fix"].samples == {(): 3.0}
    assert fam["evgw_gnss_satellites"].samples == {(): 9.0}
    assert fam["evgw_gnss_hdop"].samples == {(): 0.8}
    assert fam["evgw_loop_lag_seconds"].samples == {(): 0.0}
    assert all(name.startswith("evgw_") for name in fam)


def test_label_values_and_help_text_are_escaped():
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    fam = parse(render(None))
    assert list(fam) == ["evgw_up"]


async def test_other_paths_methods_and_oversized_requests_are_refused():
    server = MetricsServer("127.0.0.1", 0, lambda: "evgw_up 1\n")
    await server.start()
    try:
        port = server.port
        assert (await request(port, b"GET / HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 404 Not Found"
        assert (await request(port, b"GET /metrics/x HTTP/1.1\r\n\r\n"))[0] \
            == "HTTP/1.0 404 Not Found"
        assert (await request(port, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] \
            == "HTTP/1.0 405 Method Not Allowed"
        assert (await request(port, b"hello\r\n\r\n"))[0] == "HTTP/1.0 400 Bad Request"
        huge = b"GET /metrics HTTP/1.0\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
        assert (await request(port, huge))[0] == "HTTP/1.0 431 Request Header Fields Too Large"
        many = b"GET /metrics HTTP/1.0\r\n" + b"X-Pad: aaaaaaaaaa\r\n" * 1000 + b"\r\n"
        assert (await request(port, many))[0] == "HTTP/1.0 431 Request Header Fields Too Large"
        # A query string is fine, and the server still answers after all that.
        status, _, body = await request(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert (status, body) == ("HTTP/1.0 200 OK", b"evgw_up 1\n")
    finally:
        await server.stop()


def outward_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks a route
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def test_the_server_listens_on_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        MetricsServer("0.0.0.0", 0, lambda: "")
    server = MetricsServer("127.0.0.1", 0, lambda: "evgw_up 1\n")
    await server.start()
    try:
        assert server._server is not None
        assert [s.getsockname()[0] for s in server._server.sockets] == ["127.0.0.1"]
        other = outward_address()
        if other is not None:
            with pytest.raises(OSError):
                await request(server.port, GET, host=other)
        assert (await request(server.port, GET))[0] == "HTTP/1.0 200 OK"
    finally:
        await server.stop()


async def test_the_health_stage_serves_its_latest_report(ref_profile):
    # The real clock: the report task sleeps interval_s (30 s) before its first report.
    clock = SystemClock()
    pipeline = Pipeline.build(ref_profile, clock)
    health = Health.build(pipeline, None, None, HealthSettings(prometheus_port=0), clock,
                          environ={})
    await health.start()
    try:
        assert health.metrics is not None
        port = health.metrics.port
        before = parse((await request(port, GET))[2].decode())
        assert list(before) == ["evgw_up"]  # nothing reported yet
        decode_some(pipeline, clock.time(), good=8, unknown=0, short=0)
        health.report_now()
        after = parse((await request(port, GET))[2].decode())
        assert after["evgw_frames_total"].samples == {(("bus", "vehicle"),): 8.0}
        assert after["evgw_frames_per_second"].samples[(("bus", "vehicle"),)] > 0
        assert "evgw_mqtt_connected" not in after  # no MQTT in this gateway
        assert "evgw_gnss_fix" not in after
    finally:
        await health.stop()
    assert health.metrics is None


async def test_a_taken_port_costs_the_metrics_not_the_gateway(ref_profile):
    clock = SystemClock()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pipeline = Pipeline.build(ref_profile, clock)
        health = Health.build(pipeline, None, None, HealthSettings(prometheus_port=port), clock,
                              environ={})
        await health.start()
        try:
            assert health.metrics is None
            assert pipeline.counters.get("health.metrics_failed") == 1
            assert [t.get_name() for t in health.tasks] == ["loop-lag", "health-report"]
        finally:
            await health.stop()
