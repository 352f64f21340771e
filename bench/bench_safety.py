"""Cost of the safety stage, each figure beside its baseline in the same process.

Usage: ``python bench/bench_safety.py [--quick] [--rounds N] [--seconds S] [--crc-calls N]``

Traffic is the reference vehicle driving (HIL simulator, ``mode="drive"``) at
its DBC cycle times. Every measurement runs once per round, in an order that
reverses every round so that machine noise hits all of them alike; medians
over rounds are reported, ratios as the median of the per-round ratios.

- **crc**: CRC-8 SAE J1850 over 7 bytes, ``gateway.checksum.crc8_j1850_bytes``
  against crccheck's ``Crc8SaeJ1850.calc`` (what the simulator uses). A third
  row times the registry form the decoder calls, ``crc8_j1850(data, 7, id)``
  on the 8-byte payload, which also cuts the checksum byte out. The payloads
  are the traffic's own; each time includes the same Python loop.
- **receive checks**: ``Decoder.process`` over the traffic in 512-frame
  batches, with the profile's counter and checksum checks and with every
  ``plan.check`` removed after ``Pipeline.build`` (the same as a profile
  without those ``[messages.*]`` keys: the checks are all they set here).
- **evaluate**: ``SafetyMonitor.evaluate()`` with its watchers (transmit
  guard, speed cap) at the most the gateway makes per simulated second (the
  profile's tick rate plus one event-driven evaluation per ``MIN_GAP``)
  while the traffic is fed in; only the evaluate calls are timed, in thread
  CPU time (the per-call wall times, whose tail is mostly preemption on a
  busy machine, are summarised too). The CPU share is given at that rate and
  at the 60/s the stage was planned for (10 Hz tick + every 20 ms).
- **end to end**: the traffic in 5 ms windows (LiveSource's poll interval),
  each batch decoded, then the monitor's ``on_batch`` listener, plus the
  10 Hz tick, on a manual clock that follows the source time; against the
  same windows decoded without a monitor. It makes fewer evaluations than
  the budget: after a tick, ``on_batch`` waits a full ``MIN_GAP`` again.

This is a benchmark, not a test: nothing is asserted about speed. It exits
non-zero only when the run itself is invalid (CRCs disagree, the checks
rejected or never saw a frame, the monitor had no good data).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import can
from crccheck.crc import Crc8SaeJ1850

from gateway.app import Pipeline, Safety
from gateway.checksum import crc8_j1850, crc8_j1850_bytes
from gateway.clock import ManualClock
from gateway.config import Profile, load_profile
from gateway.safety import Motion, SafetyMonitor
from gateway.safety.monitor import MIN_GAP
from hil.sim.ecus import generate
from hil.sim.model import VehicleModel

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "dbc" / "profiles" / "microev-ref.toml"
BUS = "vehicle"
BATCH = 512
"""Receive-check batches: the most LiveSource hands over at once."""
POLL_S = 0.005
"""End-to-end batches: LiveSource's default poll interval, in source time."""
DESIGN_RATE = 60
"""Evaluations/s the stage was planned for: a 10 Hz tick + event-driven every 20 ms."""
REJECTS = ("bad_checksum", "bad_counter", "wrong_dlc")
KINDS = ("crc_gateway", "crc_crccheck", "crc_registry", "rx_checked", "rx_unchecked",
         "evaluate", "e2e", "e2e_decode")

Window = tuple[float, list[can.Message]]


def windows(frames: Sequence[can.Message], width: float) -> list[Window]:
    """Consecutive source-time windows ``(end, frames)`` of time-ordered ``frames``,
    empty ones included."""
    out: list[Window] = []
    i, k, n = 0, 1, len(frames)
    while i < n:
        end = k * width
        j = i
        while j < n and frames[j].timestamp <= end:
            j += 1
        out.append((end, list(frames[i:j])))
        i, k = j, k + 1
    return out


def time_bytes_form(fn: Callable[[bytes], object], payloads: Sequence[bytes]) -> float:
    """Nanoseconds per ``fn(payload)`` call, loop included."""
    gc.collect()
    start = time.perf_counter_ns()
    for data in payloads:
        fn(data)
    return (time.perf_counter_ns() - start) / len(payloads)


def time_registry_form(payloads: Sequence[bytes]) -> float:
    """Nanoseconds per ``crc8_j1850(payload, 7, id)`` call, loop included."""
    gc.collect()
    start = time.perf_counter_ns()
    for data in payloads:
        crc8_j1850(data, 7, 0x100)
    return (time.perf_counter_ns() - start) / len(payloads)


def run_rx(profile: Profile, frames: Sequence[can.Message], checked: bool
           ) -> tuple[float, Pipeline]:
    """Frames/s of Decoder.process with or without receive checks, and the pipeline."""
    pipeline = Pipeline.build(profile, ManualClock(start=0.0))
    if not checked:
        for bus in pipeline.plans.values():
            for plan in bus.mapped.values():
                plan.check = None
    decoder = pipeline.decoders[BUS]
    batches = [frames[i:i + BATCH] for i in range(0, len(frames), BATCH)]
    gc.collect()
    start = time.perf_counter()
    for batch in batches:
        decoder.process(batch)
    return len(frames) / (time.perf_counter() - start), pipeline


def budget(profile: Profile) -> float:
    """Most evaluations per second the gateway makes: tick plus rate-limited on_batch."""
    return profile.safety.tick_hz + 1.0 / MIN_GAP


def run_evaluate(profile: Profile, frames: Sequence[can.Message]
                 ) -> tuple[list[float], list[float], SafetyMonitor]:
    """CPU and wall seconds of each evaluate(), made at the budget rate while the traffic
    is fed in."""
    clock = ManualClock(start=0.0)
    pipeline = Pipeline.build(profile, clock)
    monitor = Safety.build(pipeline).monitor
    decoder = pipeline.decoders[BUS]
    cpu: list[float] = []
    wall: list[float] = []
    gc.collect()
    for end, batch in windows(frames, 1.0 / budget(profile)):
        clock.advance(max(0.0, end - clock.time()))
        if batch:
            decoder.process(batch)
        # CPU time as well: on a loaded machine a preempted call's wall time is not its cost.
        start, start_cpu = time.perf_counter(), time.thread_time_ns()
        monitor.evaluate()
        cpu.append((time.thread_time_ns() - start_cpu) / 1e9)
        wall.append(time.perf_counter() - start)
    return cpu, wall, monitor


def run_e2e(profile: Profile, frames: Sequence[can.Message], with_monitor: bool
            ) -> tuple[float, int]:
    """Frames/s through decode (+ on_batch and the tick), and the evaluations made."""
    clock = ManualClock(start=0.0)
    pipeline = Pipeline.build(profile, clock)
    made: list[float] = []  # a watcher that records each evaluation's time
    monitor = Safety.build(pipeline).monitor if with_monitor else None
    tick = monitor.tick_s if monitor is not None else 0.0
    if monitor is not None:
        monitor.watchers.append(made.append)
    decoder, listeners = pipeline.decoders[BUS], pipeline.listeners
    plan = windows(frames, POLL_S)
    next_tick = 0.0
    gc.collect()
    start = time.perf_counter()
    for end, batch in plan:
        clock.advance(max(0.0, end - clock.time()))
        if batch:
            decoder.process(batch)
            for listener in listeners:
                listener(BUS)
        if monitor is not None and end >= next_tick:
            monitor.evaluate()
            next_tick += tick
    return len(frames) / (time.perf_counter() - start), len(made)


def _ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def print_summary(fig: dict[str, list[float]], per_call: list[float], bus_rate: float,
                  rate: float) -> None:
    """One line per figure: medians over rounds and the median ratio; ``rate`` is the
    evaluation budget per second."""
    med = {k: statistics.median(v) for k, v in fig.items()}
    of = f"(median of {len(fig['evaluate'])})"
    wall_median = statistics.median(per_call) * 1e6
    p99 = statistics.quantiles(per_call, n=100)[98] * 1e6 if len(per_call) > 1 else 0.0
    share = med["evaluate"] / 1e6 * 100.0
    decode_share = bus_rate / med["rx_checked"] * 100.0
    rx_ratio = _ratio(fig["rx_checked"], fig["rx_unchecked"])
    print()
    print(f"crc8 j1850 over 7 bytes:  gateway {med['crc_gateway']:,.0f} ns/call, crccheck "
          f"{med['crc_crccheck']:,.0f} ns/call, speed-up "
          f"{_ratio(fig['crc_crccheck'], fig['crc_gateway']):.1f}x {of}")
    print(f"  as the decoder calls it, crc8_j1850(data, 7, id) on 8 bytes: "
          f"{med['crc_registry']:,.0f} ns/call")
    print(f"receive checks:           checked {med['rx_checked']:,.0f} frames/s, unchecked "
          f"{med['rx_unchecked']:,.0f} frames/s, ratio {rx_ratio:.2f}x {of}, "
          f"checks cost {(1.0 / rx_ratio - 1.0) * 100.0:.0f}% more time")
    print(f"safety evaluate:          {med['evaluate']:,.1f} us/evaluation CPU (wall median "
          f"{wall_median:,.1f} us, p99 {p99:,.1f} us), "
          f"{share * rate:.2f}% of one core at {rate:g}/s {of}, "
          f"{share * DESIGN_RATE:.2f}% at {DESIGN_RATE}/s")
    print(f"  for scale: decoding the bus's {bus_rate:,.0f} frames/s with checks takes "
          f"{decode_share:.2f}% of one core")
    print(f"end to end:               with monitor {med['e2e']:,.0f} frames/s, decode+state only "
          f"{med['e2e_decode']:,.0f} frames/s, ratio "
          f"{_ratio(fig['e2e'], fig['e2e_decode']):.2f}x {of}, "
          f"{bus_rate / med['e2e'] * 100.0:.2f}% of one core at the bus's rate")


def check_run(payloads: Sequence[bytes], checked: Pipeline, monitor: SafetyMonitor) -> bool:
    """Print and judge what makes the figures meaningful; True when all hold."""
    agree = all(crc8_j1850_bytes(d) == int(Crc8SaeJ1850.calc(d)) for d in payloads)
    exercised = sum(c.passing_since is not None for c in checked.checks.values())
    rejected = sum(checked.counters.get(f"decode.{r}") for r in REJECTS)
    v = monitor.verdicts
    good_data = v.motion is not Motion.UNKNOWN and v.pack_ok
    print(f"crc results agree:        {'ok' if agree else 'FAILED'}")
    print(f"receive checks exercised: {exercised} of {len(checked.checks)}, "
          f"frames rejected {rejected}")
    print(f"verdicts after the drive: motion {v.motion.value} {v.motion_reasons}, pack_ok "
          f"{v.pack_ok} {v.pack_reasons}, charging_allowed {v.charging_allowed}")
    print(f"monitor data check:       {'ok' if good_data else 'FAILED'}")
    return agree and exercised > 0 and rejected == 0 and good_data


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the summary; 1 if the run was invalid."""
    parser = argparse.ArgumentParser(description="cost of the safety stage")
    parser.add_argument("--quick", action="store_true", help="5 s of traffic, 2 rounds")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 7)")
    parser.add_argument("--seconds", type=float, help="simulated driving (default 120)")
    parser.add_argument("--crc-calls", type=int, help="CRC calls per round (default 50000)")
    args = parser.parse_args(argv)
    rounds: int = args.rounds if args.rounds is not None else 2 if args.quick else 7
    seconds: float = args.seconds if args.seconds is not None else 5.0 if args.quick else 120.0
    calls: int = args.crc_calls if args.crc_calls is not None else \
        2_000 if args.quick else 50_000
    if rounds < 1 or seconds <= 0 or calls < 1:
        parser.error("--rounds, --seconds and --crc-calls must be positive")

    began = time.perf_counter()
    # The simulator emits each step's frames message by message; a bus delivers them in
    # time order, which the source-time windows below rely on.
    frames = sorted(generate(VehicleModel(mode="drive"), seconds), key=lambda f: f.timestamp)
    profile = load_profile(PROFILE)
    full = [bytes(f.data) for f in frames if len(f.data) == 8]
    payloads8 = [full[i % len(full)] for i in range(calls)]
    payloads7 = [d[:7] for d in payloads8]
    bus_rate = len(frames) / seconds
    rate = budget(profile)
    print(f"traffic: {seconds:g} s of driving simulated in {time.perf_counter() - began:.1f} s, "
          f"frames {len(frames):,} ({bus_rate:,.0f}/s on the bus); crc calls {calls:,} per "
          f"round; python {sys.version.split()[0]}")
    print(f"evaluation budget: {rate:g}/s = {profile.safety.tick_hz:g} Hz tick + event-driven "
          f"at most every {MIN_GAP * 1000:g} ms (gateway.safety.monitor.MIN_GAP)")

    fig: dict[str, list[float]] = {k: [] for k in KINDS}
    per_call: list[float] = []
    checked: Pipeline | None = None
    monitor: SafetyMonitor | None = None
    evaluations = 0

    def measure(kind: str) -> float:
        nonlocal checked, monitor, evaluations
        if kind == "crc_gateway":
            return time_bytes_form(crc8_j1850_bytes, payloads7)
        if kind == "crc_crccheck":
            return time_bytes_form(Crc8SaeJ1850.calc, payloads7)
        if kind == "crc_registry":
            return time_registry_form(payloads8)
        if kind in ("rx_checked", "rx_unchecked"):
            fps, pipeline = run_rx(profile, frames, kind == "rx_checked")
            checked = pipeline if kind == "rx_checked" else checked
            return fps
        if kind == "evaluate":
            cpu, wall, monitor = run_evaluate(profile, frames)
            per_call.extend(wall)
            return statistics.fmean(cpu) * 1e6
        fps, made = run_e2e(profile, frames, kind == "e2e")
        evaluations = made if kind == "e2e" else evaluations
        return fps

    print(f"{'round':>5} {'crc gw ns':>10} {'crccheck ns':>12} {'rx chk/s':>10} "
          f"{'rx unchk/s':>11} {'eval cpu us':>12} {'e2e/s':>9} {'decode/s':>9}")
    for r in range(rounds):
        for kind in KINDS[:: 1 if r % 2 == 0 else -1]:
            fig[kind].append(measure(kind))
        row = {k: v[-1] for k, v in fig.items()}
        print(f"{r + 1:>5} {row['crc_gateway']:>10,.0f} {row['crc_crccheck']:>12,.0f} "
              f"{row['rx_checked']:>10,.0f} {row['rx_unchecked']:>11,.0f} "
              f"{row['evaluate']:>12,.1f} {row['e2e']:>9,.0f} {row['e2e_decode']:>9,.0f}")

    assert checked is not None and monitor is not None
    print(f"evaluations: {len(per_call) // rounds:,} per round in 'evaluate'; "
          f"end to end made {evaluations:,} ({evaluations / seconds:.0f} per simulated second)")
    print_summary(fig, per_call, bus_rate, rate)
    print()
    return 0 if check_run(payloads7, checked, monitor) else 1


if __name__ == "__main__":
    sys.exit(main())
