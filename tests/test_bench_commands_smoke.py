"""The command round-trip benchmark runs end to end and prints its figures (speed unchecked)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hil.broker import find_mosquitto
from tests.conftest import ROOT

BENCH = ROOT / "bench" / "bench_commands.py"
N = 5
NUM = r"(\d+(?:\.\d+)?)"


def _numbers(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text, flags=re.MULTILINE)
    assert m is not None, f"{pattern!r} not in output:\n{text}"
    return [float(g) for g in m.groups()]


@pytest.fixture(scope="module")
def report() -> str:
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests through `bash deploy/dev.sh test`")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--n", str(N), "--micro-rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_command_succeeded_and_every_echo_came_back(report: str) -> None:
    assert f"results: {N} commands, succeeded {N}, not succeeded 0; echoes lost 0" in report


@pytest.mark.parametrize("label", ["gateway: accepted", "gateway: succeeded", "bare MQTT echo"])
def test_table_row_has_ordered_percentiles_over_every_round(report: str, label: str) -> None:
    p50, p90, p99, top, n = _numbers(rf"^{label}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+(\d+)$",
                                     report)
    assert n == N
    assert 0 < p50 <= p90 <= p99 <= top


def test_final_result_comes_after_accepted(report: str) -> None:
    accepted = _numbers(rf"^gateway: accepted\s+{NUM}", report)[0]
    succeeded = _numbers(rf"^gateway: succeeded\s+{NUM}", report)[0]
    assert succeeded > accepted


@pytest.mark.parametrize("label", ["accepted", "succeeded"])
def test_ratios_are_gateway_over_echo(report: str, label: str) -> None:
    r50, r99 = _numbers(rf"ratio gateway/echo, {label}:\s+p50 {NUM}x\s+p99 {NUM}x", report)
    g50, g99 = _numbers(rf"^gateway: {label}\s+{NUM}\s+{NUM}\s+{NUM}", report)[::2]
    e50, e99 = _numbers(rf"^bare MQTT echo\s+{NUM}\s+{NUM}\s+{NUM}", report)[::2]
    # Printed rounded: the ratio of the printed figures only roughly matches.
    assert abs(r50 - g50 / e50) <= 0.1 * g50 / e50 + 0.1
    assert abs(r99 - g99 / e99) <= 0.1 * g99 / e99 + 0.1


def test_micro_figures_are_printed(report: str) -> None:
    verify_us = _numbers(rf"Ed25519 verify of one envelope \(unwrap\+parse\+verify\): {NUM} us "
                         r"\(median of 2\)", report)[0]
    record_ms = _numbers(rf"replay-cache record\(\) on \S+ \(.+\): {NUM} ms \(median of 2\)",
                         report)[0]
    assert verify_us > 0
    assert record_ms > 0
    assert not re.search(r"replay-cache record\(\) on tmpfs", report)


def test_target_verdict_is_printed(report: str) -> None:
    assert re.search(r"^target p99 < 50 ms: (met|NOT met) \(publish -> succeeded p99 "
                     rf"{NUM} ms\)$", report, flags=re.MULTILINE)
