"""The pipeline benchmark runs end to end and prints its figures (speed is not checked)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

BENCH = ROOT / "bench" / "bench_pipeline.py"
RATES = {
    "pipeline": r"pipeline \(receive\+decode\+state\):\s+([\d,.]+) frames/s",
    "decode only": r"decode\+state only \(no receive\):\s+([\d,.]+) frames/s",
    "bare": r"bare cantools decode_message:\s+([\d,.]+) frames/s",
    "ratio": r"ratio pipeline/bare:\s+([\d.]+)x",
}


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in output:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_quick_benchmark_prints_summary() -> None:
    # Machines differ too much for a speed threshold; this checks the benchmark
    # still runs against the current pipeline and that its run was valid.
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for label, pattern in RATES.items():
        assert _number(pattern, out) > 0, label
    assert _number(r"frames ([\d,]+) \(", out) > 0
    assert _number(r"distinct \(ID, payload\) share ([\d.]+)%", out) > 0
    assert "(median of 2)" in out
    assert re.search(r"target >= 50,000 frames/s:\s+(met|NOT met)", out)
    assert _number(r"dropped frames \(all rounds\):\s+(\d+)", out) == 0
    assert re.search(r"state check:\s+ok", out)
    assert re.search(r"Vehicle\.Speed\s+-?\d", out)
