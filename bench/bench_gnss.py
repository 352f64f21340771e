"""GNSS parsing and insights cost, each side by side with its baseline.

Usage: ``python bench/bench_gnss.py [--quick] [--rounds N]``

1. **NMEA, lines/s.** The simulated receiver's sentences for a drive (RMC,
   VTG, GGA, GSA per constellation, GLL, GSV now and then), parsed three ways
   in alternating rounds:

   - the gateway's ``NmeaParser`` (pynmeagps, checksum validation, field
     checks, epoch assembly into one Fix);
   - bare ``pynmeagps.NMEAReader.parse`` with checksum validation;
   - bare ``pynmea2.parse`` with checksum checking, the other maintained-ish
     choice the issue names.

   The ratio gateway/pynmeagps is the cost of the checks and the epoch
   assembly; pynmeagps/pynmea2 is what the library choice costs.

2. **Insights, frames/s.** ``Decoder.process`` over the reference car's
   traffic in 512-frame batches, once bare and once with the insights
   attached as the gateway wires them (the pack meter after every batch, the
   trip, charging and battery estimators once per simulated second). The
   ratio is the share of decode throughput the insights leave.

Medians over the rounds; machines are shared and noisy. Targets are printed,
never asserted; the exit status is non-zero only for an invalid run.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import can
import pynmea2
from pynmeagps import VALCKSUM, NMEAReader

from gateway.app import Pipeline
from gateway.app.location import Insights
from gateway.clock import ManualClock
from gateway.config import load_profile
from gateway.config.location import LocationSettings
from gateway.gnss.nmea import NmeaParser
from gateway.health import Counters, RateLimitedLog
from hil.sim.ecus import generate
from hil.sim.gnss import NmeaSimulator
from hil.sim.model import VehicleModel

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "dbc" / "profiles" / "microev-ref.toml"
START = 1_700_000_000.0
BATCH = 512
LINES_PER_S_AT_10HZ = 80
"""A 10 Hz multi-constellation receiver sends about eight sentences per epoch."""
TARGET_INSIGHTS = 0.9
"""Insights should leave at least 90 % of the bare decode throughput."""


def nmea_lines(epochs: int) -> list[bytes]:
    """The simulated receiver's output over a drive, one epoch per simulated second."""
    model = VehicleModel(mode="drive")
    sim = NmeaSimulator(model)
    lines: list[bytes] = []
    for n in range(epochs):
        for _ in range(50):
            model.step(0.02)
        lines += [line for line in sim.epoch(START + n) if line.startswith(b"$")]
    return lines


def gateway_parse(lines: list[bytes]) -> int:
    """Fixes the gateway's parser assembles from ``lines``."""
    parser = NmeaParser(Counters(), RateLimitedLog(logging.getLogger("bench"), ManualClock()))
    fixes = sum(1 for n, line in enumerate(lines) if parser.feed(line, START + n) is not None)
    return fixes + (parser.flush(START + len(lines)) is not None)


def pynmeagps_parse(lines: list[bytes]) -> int:
    """Sentences bare pynmeagps parses with checksum validation."""
    return sum(1 for line in lines
               if NMEAReader.parse(line.decode("ascii"), validate=VALCKSUM) is not None)


def pynmea2_parse(lines: list[bytes]) -> int:
    """Sentences bare pynmea2 parses with checksum checking."""
    return sum(1 for line in lines if pynmea2.parse(line.decode("ascii").strip(), check=True))


def _timed(run: Callable[[], int]) -> tuple[float, int]:
    gc.collect()
    t0 = time.perf_counter()
    out = run()
    return time.perf_counter() - t0, out


def bench_nmea(epochs: int, rounds: int) -> bool:
    """Print part 1; False when a parser did not take every sentence."""
    lines = nmea_lines(epochs)
    kinds: dict[str, Callable[[list[bytes]], int]] = {
        "gateway": gateway_parse, "pynmeagps": pynmeagps_parse, "pynmea2": pynmea2_parse}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    valid = True
    for _ in range(rounds):
        for kind, parse in kinds.items():
            seconds, count = _timed(lambda p=parse: p(lines))  # type: ignore[misc]
            rates[kind].append(len(lines) / seconds)
            expected = epochs if kind == "gateway" else len(lines)
            if count < expected:
                print(f"INVALID: {kind} produced {count}, expected {expected}")
                valid = False
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"NMEA: {len(lines):,} sentences, {epochs:,} epochs (median of {rounds})")
    print(f"  gateway NmeaParser (pynmeagps + checks + epochs): {med['gateway']:>10,.0f} lines/s")
    print(f"  bare pynmeagps parse (checksum validated):        {med['pynmeagps']:>10,.0f} lines/s")
    print(f"  bare pynmea2 parse (checksum checked):            {med['pynmea2']:>10,.0f} lines/s")
    print(f"  ratio gateway/pynmeagps: {med['gateway'] / med['pynmeagps']:.2f}x   "
          f"ratio pynmeagps/pynmea2: {med['pynmeagps'] / med['pynmea2']:.2f}x")
    share = LINES_PER_S_AT_10HZ / med["gateway"] * 100
    print(f"  a 10 Hz receiver ({LINES_PER_S_AT_10HZ} lines/s) costs {share:.2f} % of one core")
    return valid


def _decode(frames: list[can.Message], with_insights: bool) -> tuple[float, float]:
    """Seconds to decode ``frames``, and the trip energy seen (to prove insights ran)."""
    clock = ManualClock(START)
    pipeline = Pipeline.build(load_profile(PROFILE), clock)
    insights = (Insights.build(pipeline, None, LocationSettings(), None)
                if with_insights else None)
    decoder = pipeline.decoders["vehicle"]
    listeners = pipeline.listeners
    next_tick = START + 1.0
    gc.collect()
    t0 = time.perf_counter()
    for i in range(0, len(frames), BATCH):
        batch = frames[i:i + BATCH]
        decoder.process(batch)
        for listener in listeners:
            listener("vehicle")
        if insights is not None and batch[-1].timestamp >= next_tick:
            clock.advance(batch[-1].timestamp - clock.time())
            insights.tick(clock.time())
            next_tick += 1.0
    seconds = time.perf_counter() - t0
    return seconds, (insights.meter.totals.wh_out if insights is not None else 0.0)


def bench_insights(sim_seconds: float, rounds: int) -> bool:
    """Print part 2; False when the insights saw no energy (the run measured nothing)."""
    frames = generate(VehicleModel(mode="drive"), sim_seconds, step=0.01, start=START)
    bare: list[float] = []
    full: list[float] = []
    energy = 0.0
    for _ in range(rounds):
        bare.append(len(frames) / _decode(frames, False)[0])
        seconds, energy = _decode(frames, True)
        full.append(len(frames) / seconds)
    b, f = statistics.median(bare), statistics.median(full)
    ratio = f / b
    print(f"Insights: {len(frames):,} frames, {sim_seconds:.0f} s of driving "
          f"(median of {rounds})")
    print(f"  decode+state only:            {b:>10,.0f} frames/s")
    print(f"  decode+state with insights:   {f:>10,.0f} frames/s")
    print(f"  ratio with/without insights: {ratio:.3f}x   (pack energy integrated "
          f"{energy:.1f} Wh)")
    verdict = "met" if ratio >= TARGET_INSIGHTS else "NOT met"
    print(f"  target >= {TARGET_INSIGHTS:.2f}x of bare decode: {verdict}")
    return energy > 0


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    ok = bench_nmea(200 if args.quick else 2000, rounds)
    ok = bench_insights(20.0 if args.quick else 120.0, rounds) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
