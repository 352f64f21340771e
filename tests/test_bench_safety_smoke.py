"""The safety benchmark runs end to end and prints its figures (speed is not checked)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

BENCH = ROOT / "bench" / "bench_safety.py"
FIGURES = {
    "crc gateway": r"crc8 j1850 over 7 bytes:\s+gateway ([\d,.]+) ns/call",
    "crc crccheck": r"crccheck ([\d,.]+) ns/call, speed-up",
    "crc speed-up": r"speed-up ([\d.]+)x \(median of 2\)",
    "crc registry": r"crc8_j1850\(data, 7, id\) on 8 bytes: ([\d,.]+) ns/call",
    "rx checked": r"receive checks:\s+checked ([\d,.]+) frames/s",
    "rx unchecked": r"unchecked ([\d,.]+) frames/s, ratio",
    "rx ratio": r"unchecked [\d,.]+ frames/s, ratio ([\d.]+)x \(median of 2\)",
    "evaluate": r"safety evaluate:\s+([\d,.]+) us/evaluation CPU",
    "evaluate wall": r"wall median ([\d,.]+) us, p99",
    "core share": r"us\), ([\d.]+)% of one core at [\d.]+/s \(median of 2\)",
    "core share at 60/s": r"([\d.]+)% at 60/s",
    "e2e": r"end to end:\s+with monitor ([\d,.]+) frames/s",
    "e2e decode": r"decode\+state only ([\d,.]+) frames/s",
    "e2e ratio": r"decode\+state only [\d,.]+ frames/s, ratio ([\d.]+)x \(median of 2\)",
}


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in output:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_tiny_benchmark_prints_every_figure() -> None:
    # Machines differ too much for a speed threshold; this checks the benchmark still
    # runs against the current safety stage, prints each figure, and that its run was valid.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "2", "--seconds", "3", "--crc-calls", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for label, pattern in FIGURES.items():
        assert _number(pattern, out) > 0, label
    assert _number(r"frames ([\d,]+) \(", out) > 0
    # Two rounds: one table row each, before the summary.
    assert len(re.findall(r"^\s+[12] +[\d,]+ ", out, flags=re.MULTILINE)) == 2
    assert _number(r"end to end made ([\d,]+) \(", out) > 0
    assert re.search(r"crc results agree:\s+ok", out)
    assert re.search(r"receive checks exercised: [1-9]\d* of \d+, frames rejected 0", out)
    assert re.search(r"monitor data check:\s+ok", out)
