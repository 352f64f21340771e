"""Frames/s through receive + decode + state, side by side with a bare cantools loop.

Usage: ``python bench/bench_pipeline.py [--quick] [--rounds N] [--seconds S]``

Traffic is the reference vehicle's own, from the HIL simulator at its DBC
cycle times: mostly driving, with parked and charging stretches. Three
measurements run in one process, alternating round by round so that machine
noise hits all of them alike; medians are reported.

- **pipeline (receive+decode+state)**: frames are queued on a python-can
  ``virtual`` bus before the clock starts (in chunks no larger than the
  BatchQueue bound, see run_pipeline); then the gateway's own live path
  (``Pipeline.start_live``: LiveSource poller -> BatchQueue -> decode
  task -> Decoder.process -> state store) drains them. Timed from start_live
  until the decoder has counted every frame.
- **decode+state only**: ``Decoder.process`` called directly on 512-frame
  batches; no bus, poller or event loop. The gap to the line above is the
  cost of receiving.
- **bare cantools**: ``db.decode_message(id, data)`` over every frame, as a
  typical user would write it. It decodes but keeps no state.

Every round builds fresh Pipelines, so payload caches start cold. This is a
benchmark, not a test: targets are printed, never asserted. It exits non-zero
only when the run itself is invalid (frames dropped, state not filled in).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import can
import cantools

from gateway.app import QUEUE_FRAMES, Pipeline
from gateway.can.bus import BusOptions, open_bus
from gateway.clock import SystemClock
from gateway.config import Profile, load_profile
from hil.sim.ecus import generate
from hil.sim.model import VehicleModel

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "dbc" / "profiles" / "microev-ref.toml"
REFERENCE_DBCS = [ROOT / "dbc" / "reference" / f"microev_{n}.dbc" for n in ("bms", "mcu", "bcm")]
BUS = "vehicle"
FRAMES_KEY = f"can.{BUS}.frames"
DROPPED_KEY = f"queue.can.{BUS}.dropped"
BATCH = 512
"""Decode-only batch size: the most LiveSource hands over at once."""
MIX = (("drive", 0.35), ("park", 0.10), ("charge", 0.20), ("drive", 0.35))
"""Traffic segments as (model mode, share of the simulated time)."""
KINDS = ("pipeline", "decode", "bare")
TARGET_RATIO = 1.0
TARGET_RATE = 50_000.0
CHECK_SIGNALS = (
    "Vehicle.Speed",
    "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current",
    "Vehicle.Powertrain.TractionBattery.CurrentVoltage",
    "Vehicle.Powertrain.TractionBattery.Cell.1.Voltage",
    "Vehicle.TraveledDistance",
)


def make_traffic(seconds: float) -> list[can.Message]:
    """``seconds`` of simulated traffic over the MIX segments, timestamps continuous."""
    frames: list[can.Message] = []
    start = 0.0
    for seed, (mode, share) in enumerate(MIX, start=7):
        length = seconds * share
        frames += generate(VehicleModel(mode=mode, seed=seed), length, start=start)
        start += length
    return frames


def new_payload_share(frames: Sequence[can.Message]) -> float:
    """Share of frames whose (ID, payload) pair does not occur earlier in the stream."""
    return len({(f.arbitration_id, bytes(f.data)) for f in frames}) / len(frames)


def _opener_of(bus: can.BusABC) -> Callable[[BusOptions], can.BusABC]:
    return lambda _options: bus


async def _drain_live(pipeline: Pipeline, options: BusOptions,
                      chunks: Sequence[Sequence[can.Message]]) -> float:
    counters = pipeline.counters
    elapsed = 0.0
    total = 0
    for chunk in chunks:
        rx = open_bus(options)
        # preserve_timestamps keeps the simulated source times, which staleness needs.
        tx = can.Bus(interface="virtual", channel=options.channel, preserve_timestamps=True)
        for msg in chunk:
            tx.send(msg)  # deep-copies each frame: kept out of the timed part on purpose
        tx.shutdown()
        total += len(chunk)
        gc.collect()
        start = time.perf_counter()
        # A virtual bus only delivers to receivers open at send time, so the reader
        # must get the bus filled above.
        pipeline.start_live([options], opener=_opener_of(rx))
        deadline = time.monotonic() + 120.0
        while counters.get(FRAMES_KEY) + counters.get(DROPPED_KEY) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pipeline stalled at {counters.get(FRAMES_KEY)} of {total}")
            # Cheap: the decode task does not yield while batches are waiting.
            await asyncio.sleep(0.0005)
        elapsed += time.perf_counter() - start
        await pipeline.stop()  # also closes rx
    return elapsed


def run_pipeline(profile: Profile, frames: Sequence[can.Message], channel: str
                 ) -> tuple[float, Pipeline]:
    """Seconds for the live path to take every frame into state, and the pipeline used.

    Frames go in chunks no larger than the BatchQueue bound, so a backlog of
    one chunk can never make it drop frames, whatever the scheduling.
    """
    pipeline = Pipeline.build(profile, SystemClock())
    (options,) = pipeline.bus_options({BUS: f"virtual:{channel}"})
    count = -(-len(frames) // QUEUE_FRAMES)
    size = -(-len(frames) // count)
    chunks = [frames[i:i + size] for i in range(0, len(frames), size)]
    return asyncio.run(_drain_live(pipeline, options, chunks)), pipeline


def run_decode_only(profile: Profile, frames: Sequence[can.Message]) -> float:
    """Seconds for Decoder.process alone over every frame, in receive-sized batches."""
    decoder = Pipeline.build(profile, SystemClock()).decoders[BUS]
    batches = [frames[i:i + BATCH] for i in range(0, len(frames), BATCH)]
    gc.collect()
    start = time.perf_counter()
    for batch in batches:
        decoder.process(batch)
    return time.perf_counter() - start


def bare_database() -> cantools.database.Database:
    """The three reference DBCs in one cantools Database, loaded the usual way."""
    db = cantools.database.Database()
    for path in REFERENCE_DBCS:
        db.add_dbc_file(path)
    return db


def run_bare(db: cantools.database.Database, frames: Sequence[can.Message]) -> float:
    """Seconds for a plain cantools decode_message loop over every frame."""
    gc.collect()
    start = time.perf_counter()
    for msg in frames:
        # cantools is typed for bytes but takes python-can's bytearray as it is.
        db.decode_message(msg.arbitration_id, msg.data)  # type: ignore[arg-type]
    return time.perf_counter() - start


def check_state(pipeline: Pipeline, frames: Sequence[can.Message]) -> bool:
    """Print a few state values as of the last frame; True when all are good."""
    now = max(f.timestamp for f in frames)
    ok = True
    for path in CHECK_SIGNALS:
        value = pipeline.store.good_value(path, now)
        ok = ok and value is not None
        print(f"  {path:<56} {value!r}")
    return ok


def print_summary(rates: dict[str, list[float]], dropped: int, state_ok: bool) -> None:
    """The closing block: median rates, median ratios, targets, validity."""
    rounds = len(rates["bare"])
    rate, rate_only, rate_bare = (statistics.median(rates[k]) for k in KINDS)
    ratio, ratio_only = (
        statistics.median(x / b for x, b in zip(rates[k], rates["bare"], strict=True))
        for k in ("pipeline", "decode")
    )
    verdict = {True: "met", False: "NOT met"}
    print("note: bare cantools has no receive step and keeps no state; 'decode+state only' is")
    print("      the gateway's Decoder without bus, poller and event loop.")
    print()
    print(f"pipeline (receive+decode+state): {rate:,.0f} frames/s (median of {rounds})")
    print(f"decode+state only (no receive):  {rate_only:,.0f} frames/s (median of {rounds}), "
          f"{ratio_only:.2f}x bare")
    print(f"bare cantools decode_message:    {rate_bare:,.0f} frames/s (median of {rounds})")
    print(f"ratio pipeline/bare:             {ratio:.2f}x (target >= {TARGET_RATIO:.1f}x) "
          f"{verdict[ratio >= TARGET_RATIO]}")
    print(f"target >= {TARGET_RATE:,.0f} frames/s:       {verdict[rate >= TARGET_RATE]}")
    print(f"dropped frames (all rounds):     {dropped}")
    print(f"state check:                     {'ok' if state_ok else 'FAILED'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the summary; 1 if the run was invalid."""
    parser = argparse.ArgumentParser(description="receive + decode + state throughput")
    parser.add_argument("--quick", action="store_true", help="5 s of traffic, 2 rounds")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 7)")
    parser.add_argument("--seconds", type=float, help="simulated traffic (default 120)")
    args = parser.parse_args(argv)
    rounds: int = args.rounds if args.rounds is not None else 2 if args.quick else 7
    seconds: float = args.seconds if args.seconds is not None else 5.0 if args.quick else 120.0
    if rounds < 1 or seconds <= 0:
        parser.error("--rounds and --seconds must be positive")

    began = time.perf_counter()
    frames = make_traffic(seconds)
    n = len(frames)
    profile = load_profile(PROFILE)
    db = bare_database()
    print(f"traffic: {seconds:g} s simulated in {time.perf_counter() - began:.1f} s, segments "
          f"{', '.join(f'{mode} {share:.0%}' for mode, share in MIX)}")
    print(f"  frames {n:,} ({n / seconds:,.0f}/s on the bus), "
          f"IDs {len({f.arbitration_id for f in frames})}, "
          f"distinct (ID, payload) share {new_payload_share(frames):.1%}")
    print(f"  live path fed in chunks of <= {QUEUE_FRAMES:,} frames (the BatchQueue bound); "
          f"python {sys.version.split()[0]}, python-can {can.__version__}, "
          f"cantools {cantools.__version__}")

    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    dropped = 0
    last: Pipeline | None = None
    print(f"{'round':>5} {'pipeline/s':>12} {'decode-only/s':>14} {'bare/s':>12} {'ratio':>7}")
    for r in range(rounds):
        # Alternate the order so that no measurement always runs first or last.
        for kind in KINDS[:: 1 if r % 2 == 0 else -1]:
            if kind == "pipeline":
                elapsed, last = run_pipeline(profile, frames, f"bench-{os.getpid()}-{r}")
                dropped += last.counters.get(DROPPED_KEY)
            elif kind == "decode":
                elapsed = run_decode_only(profile, frames)
            else:
                elapsed = run_bare(db, frames)
            rates[kind].append(n / elapsed)
        pipe, only, bare = (rates[k][-1] for k in KINDS)
        print(f"{r + 1:>5} {pipe:>12,.0f} {only:>14,.0f} {bare:>12,.0f} {pipe / bare:>6.2f}x")

    assert last is not None
    counters = last.counters
    decoded = counters.get("decode.decoded")
    print(f"last pipeline round: {counters.get(FRAMES_KEY):,} frames, {decoded:,} cantools "
          f"decodes ({decoded / n:.1%}, the rest payload-cache hits), "
          f"{counters.get('decode.cache_resets'):,} cache resets, "
          f"{counters.get('decode.unmapped'):,} unmapped")
    print("state as of the last frame (store.good_value):")
    state_ok = check_state(last, frames)

    print_summary(rates, dropped, state_ok)
    return 0 if dropped == 0 and state_ok else 1


if __name__ == "__main__":
    sys.exit(main())
