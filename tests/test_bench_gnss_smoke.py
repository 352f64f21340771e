"""The GNSS/insights benchmark runs end to end and prints its figures (speed is not checked)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

BENCH = ROOT / "bench" / "bench_gnss.py"
RATES = {
    "gateway": r"gateway NmeaParser \(pynmeagps \+ checks \+ epochs\):\s+([\d,.]+) lines/s",
    "pynmeagps": r"bare pynmeagps parse \(checksum validated\):\s+([\d,.]+) lines/s",
    "pynmea2": r"bare pynmea2 parse \(checksum checked\):\s+([\d,.]+) lines/s",
    "bare decode": r"decode\+state only:\s+([\d,.]+) frames/s",
    "with insights": r"decode\+state with insights:\s+([\d,.]+) frames/s",
    "ratio": r"ratio with/without insights: ([\d.]+)x",
    "energy": r"pack energy integrated ([\d.]+) Wh",
}


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in output:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_quick_benchmark_prints_summary() -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for label, pattern in RATES.items():
        assert _number(pattern, out) > 0, label
    assert re.search(r"ratio gateway/pynmeagps: [\d.]+x", out)
    assert re.search(r"target >= 0.90x of bare decode:\s+(met|NOT met)", out)
