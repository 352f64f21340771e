"""The MQTT benchmark runs end to end and prints its figures (speed is not checked)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hil.broker import find_mosquitto
from tests.conftest import ROOT

BENCH = ROOT / "bench" / "bench_mqtt.py"
NUM = r"([\d,]+(?:\.\d+)?)"


def _numbers(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in output:\n{text}"
    return [float(g.replace(",", "")) for g in m.groups()]


def _is_ratio(ratio: float, num: float, den: float) -> bool:
    # Figures are printed rounded, so the printed ratio only roughly matches them.
    return den > 0 and abs(ratio - num / den) <= 0.15 * num / den + 0.1


@pytest.fixture(scope="module")
def report() -> str:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests through `bash deploy/dev.sh test`")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--seconds", "1.5", "--messages", "300",
         "--rss-seconds", "1.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("rate", ["2,000", "10,000"])
def test_alert_latency_line_has_both_paths_and_their_ratios(report: str, rate: str) -> None:
    g50, g99, b50, b99, r50, r99 = _numbers(
        rf"alert latency @ {rate} f/s\s+gateway p50 {NUM} ms\s+p99 {NUM} ms \| bare aiomqtt "
        rf"p50 {NUM} ms\s+p99 {NUM} ms \| ratio p50 {NUM}x p99 {NUM}x", report)
    assert 0 < g50 <= g99
    assert 0 < b50 <= b99
    assert _is_ratio(r50, g50, b50)
    assert _is_ratio(r99, g99, b99)
    assert re.search(rf"telemetry latency @ {rate} f/s\s+p50 {NUM} ms\s+p99 {NUM} ms", report)


def test_only_the_2000_fps_line_carries_the_latency_target(report: str) -> None:
    assert re.search(r"alert latency @ 2,000 f/s .*\(target p99 < 20 ms: (met|NOT met)\)", report)
    assert re.search(r"alert latency @ 10,000 f/s .*\(target is for 2,000 f/s;", report)


@pytest.mark.parametrize("rate", ["2,000", "10,000"])
def test_gateway_kept_up_and_every_alert_arrived_both_ways(report: str, rate: str) -> None:
    sent, _, processed, dropped, issued, via_gateway, via_bare = _numbers(
        rf"frames @ {rate} f/s\s+sent {NUM} \({NUM}/s\), processed {NUM}, dropped {NUM}; "
        rf"alerts issued {NUM}, received: gateway {NUM}, bare {NUM}", report)
    assert sent > 0
    assert processed == sent
    assert dropped == 0
    assert issued > 0
    assert via_gateway == via_bare == issued


def test_replay_line_has_both_rates_their_ratio_and_the_target(report: str) -> None:
    n, gateway, bare, ratio = _numbers(
        rf"outbox replay \(N={NUM}\)\s+gateway {NUM} msg/s \| bare aiomqtt {NUM} msg/s "
        rf"\| ratio {NUM}x", report)
    assert n == 300
    assert gateway > 0
    assert bare > 0
    assert _is_ratio(ratio, gateway, bare)
    assert re.search(r"\(target >= 2,000 msg/s: (met|NOT met)\)", report)


def test_rss_line_has_peak_and_target(report: str) -> None:
    peak, before, rate = _numbers(
        rf"peak RSS \(gateway process\)\s+{NUM} MB VmHWM, {NUM} MB before load; "
        rf"{NUM} f/s over udp_multicast", report)
    assert peak >= before > 0
    assert rate > 0
    assert re.search(r"\(target < 100 MB: (met|NOT met)\)", report)
    assert "run check: ok" in report
