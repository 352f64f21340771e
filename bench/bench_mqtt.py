"""MQTT figures beside a bare aiomqtt baseline: alert latency, outbox replay rate, peak RSS.

Usage: ``python bench/bench_mqtt.py [--quick] [--rounds N] [--seconds S] [--messages N]
[--rss-seconds S]``. Each part has a private mosquitto; subscribers run in a child
process, so arrival times are taken outside the gateway's event loop and GIL.

1. Alert latency: a gateway (Pipeline + Publishing) here reads a python-can
   ``virtual`` bus (poll mode: up to 5 ms to the next poll) fed by a sender
   thread at 2,000 and 10,000 frames/s (the simulated vehicle plus filler),
   each frame stamped with time.time() when sent. Every 50 ms a BMS_Faults
   frame flips a fault bit; a bench-only pipeline listener raises or clears an
   alert with that frame's timestamp as ``source_ts`` (durable path: outbox,
   SQLite commit, drain) and publishes the same payload with a bare aiomqtt
   client at QoS 1 (the baseline). Latency = arrival - source_ts. Telemetry
   (default 1 s drive interval): arrival - the newest source ts a message carries.
2. Replay: N events committed to the outbox while the broker is down; time
   from reconnection until the subscriber holds all N. Baseline: a bare
   aiomqtt client publishing the same payloads at QoS 1 in the link's batches.
3. Peak RSS: ``python -m gateway.cli run`` on udp_multicast at 10,000 f/s.

A benchmark, not a test: targets are printed, never asserted. It exits
non-zero only when a run was invalid (frames dropped or unprocessed, alerts lost).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import can
import mqtt_rig as rig
from mqtt_rig import BUS, FAULT_PATH, SubscriberProcess, median, percentile, until

from gateway.alerts import Severity
from gateway.app import Pipeline, Publishing
from gateway.clock import SystemClock
from gateway.config import Profile, load_profile
from gateway.mqtt import payloads
from gateway.mqtt.topics import Topics
from gateway.state.store import Value
from hil.broker import Mosquitto
from hil.sim.runner import open_sim_bus

RATES = (2_000, 10_000)
TARGET_P99_MS, TARGET_AT = 20.0, 2_000
TARGET_REPLAY = 2_000.0
TARGET_RSS_MB = 100.0
RSS_RATE = 10_000
DRAIN_BATCH = 200
"""The link's drain batch: the bare replay gathers publishes in batches of this size."""
WARMUP = 0.3
V5 = aiomqtt.ProtocolVersion.V5
VERDICT = {True: "met", False: "NOT met"}
# Without it mosquitto holds small packets to the subscriber for Nagle's algorithm
# (tens of ms behind a delayed ACK), a delay of the rig that would mask the gateway's own.
BROKER_CONFIG = "set_tcp_nodelay true"
LABEL = 31


@dataclass
class LatencyRun:
    """One run at one rate; latencies in ms."""

    gateway: list[float]
    bare: list[float]
    telemetry: list[float]
    sent: int
    rate: float
    processed: int
    dropped: int
    alerts: tuple[int, int, int]  # issued, received via the gateway, received via bare

    @property
    def valid(self) -> bool:
        """Every frame processed, none dropped, every alert delivered both ways."""
        issued, gateway, bare = self.alerts
        return self.dropped == 0 and self.processed == self.sent and issued == gateway == bare


class AlertProbe:
    """The bench's alert rule, a pipeline listener: fault bit set raises, cleared clears."""

    def __init__(self, pipeline: Pipeline, publishing: Publishing, bare: aiomqtt.Client,
                 bare_topic: str) -> None:
        self._store = pipeline.store
        self._pub = publishing
        self._bare = bare
        self.bare_topic = bare_topic
        self._bare_env = payloads.Envelope(publishing.settings.vehicle_id, payloads.new_boot_id())
        self._last: Value | None = None
        # Exact source timestamps by envelope seq: the payloads carry them rounded to 1 ms.
        self.gateway_ts: dict[int, float] = {}
        self.bare_ts: dict[int, float] = {}
        self.pending: set[asyncio.Task[None]] = set()

    def on_batch(self, _bus: str) -> None:
        """Called after each batch reached the state store."""
        ts = self._store.slot(FAULT_PATH).timestamp
        value = self._store.good_value(FAULT_PATH, time.time())
        if ts is None or value is None or value == self._last:
            return
        self._last = value
        if value:
            alert = self._pub.alerts.raise_("bench.fault", Severity.WARNING, "bench fault bit",
                                            signal=FAULT_PATH, value=True, source_ts=ts)
        else:
            alert = self._pub.alerts.clear("bench.fault", value=False, source_ts=ts)
        if alert is None:
            return
        self.gateway_ts[self._pub.envelope.last_seq(self._pub.topics.alerts)] = ts
        body = payloads.alert_body("raised" if value else "cleared", alert.as_dict())
        payload = payloads.encode(self._bare_env.stamp(self.bare_topic, time.time(), body))
        self.bare_ts[self._bare_env.last_seq(self.bare_topic)] = ts
        task = asyncio.create_task(self._bare.publish(self.bare_topic, payload, qos=1))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)


async def latency_run(profile: Profile, rate: int, seconds: float, broker: Mosquitto,
                      state_dir: Path) -> LatencyRun:
    """One gateway, one bare client, one subscriber, ``seconds`` of traffic at ``rate``."""
    vid, host, port = state_dir.name, broker.host, broker.port
    pipeline = Pipeline.build(profile, SystemClock())
    publishing = await Publishing.start(pipeline, rig.bench_settings(vid, state_dir, host, port))
    topics, counters = publishing.topics, pipeline.counters
    bare_topic = f"bench/bare/{vid}/alerts"
    sub = SubscriberProcess(host, port, [topics.alerts, topics.telemetry, bare_topic])

    def dropped() -> int:
        return sum(v for k, v in counters.snapshot("queue.").items() if k.endswith(".dropped"))

    try:
        await asyncio.to_thread(sub.start)
        await asyncio.wait_for(publishing.link.connected_event.wait(), 15)
        async with aiomqtt.Client(host, port, protocol=V5, identifier=f"{vid}-bare") as bare:
            probe = AlertProbe(pipeline, publishing, bare, bare_topic)
            pipeline.listeners.append(probe.on_batch)
            (options,) = pipeline.bus_options({BUS: f"virtual:bench-mqtt-{vid}"})
            (source,) = pipeline.start_live([options])
            await asyncio.wait_for(source.connected.wait(), 10)
            tx = can.Bus(interface="virtual", channel=options.channel, preserve_timestamps=True)
            sender = rig.Sender(tx, rig.Traffic(rate), seconds)
            sender.start()
            while sender.is_alive():
                await asyncio.sleep(0.05)
            tx.shutdown()
            sent = sender.traffic.sent - sender.failed
            await until(lambda: counters.get(f"can.{BUS}.frames") + dropped() >= sent, 30)
            await sub.wait_count(topics.alerts, len(probe.gateway_ts), 30)
            await sub.wait_count(bare_topic, len(probe.bare_ts), 30)
            await asyncio.gather(*probe.pending)
        records = await asyncio.to_thread(sub.dump)
    finally:
        sub.close()
        await pipeline.stop()
        await publishing.stop()
    arrivals = {(t, s): a for t, s, a, _ in records}
    warm = sender.started_at + WARMUP

    def ms(topic: str, stamps: dict[int, float]) -> list[float]:
        return [(arrivals[(topic, s)] - ts) * 1000 for s, ts in stamps.items()
                if ts >= warm and (topic, s) in arrivals]

    telemetry = [(a - n) * 1000 for t, _, a, n in records
                 if t == topics.telemetry and n is not None and n >= warm]
    return LatencyRun(
        ms(topics.alerts, probe.gateway_ts), ms(bare_topic, probe.bare_ts), telemetry,
        sent, sender.rate, counters.get(f"can.{BUS}.frames"), dropped(),
        (len(probe.gateway_ts), sum((topics.alerts, s) in arrivals for s in probe.gateway_ts),
         sum((bare_topic, s) in arrivals for s in probe.bare_ts)))


async def replay_gateway(profile: Profile, n: int, broker: Mosquitto, sub: SubscriberProcess,
                         state_dir: Path) -> float:
    """Messages/s from the gateway's reconnection until the subscriber has all ``n``."""
    settings = rig.bench_settings("bench-replay", state_dir, broker.host, broker.port,
                                  backoff=0.5)
    pipeline = Pipeline.build(profile, SystemClock())
    publishing = await Publishing.start(pipeline, settings)
    link, outbox, topic = publishing.link, publishing.outbox, publishing.topics.events
    try:
        await asyncio.wait_for(link.connected_event.wait(), 15)
        broker.stop()
        await until(lambda: not link.connected, 15)
        first, base = publishing.envelope.last_seq(topic) + 1, outbox.depth
        for i in range(n):
            publishing.durable.event("bench_replay", {"i": i})
        if not await until(lambda: outbox.depth >= base + n, 120):
            raise RuntimeError(f"outbox holds {outbox.depth - base} of {n} after 120 s")
        broker.start()
        await asyncio.wait_for(link.connected_event.wait(), 30)
        start = time.time()
        got, last = await sub.wait_count(topic, n, 120, first)
    finally:
        await publishing.stop()
    if got < n:
        raise RuntimeError(f"replay incomplete: the subscriber got {got} of {n}")
    return n / (last - start)


async def replay_bare(n: int, broker: Mosquitto, sub: SubscriberProcess, topic: str) -> float:
    """Messages/s for a bare aiomqtt client publishing the same payloads at QoS 1."""
    env = payloads.Envelope("bench-replay", payloads.new_boot_id())
    event = payloads.event_body
    bodies = [payloads.encode(env.stamp(topic, time.time(), event("bench_replay", {"i": i})))
              for i in range(n)]
    async with aiomqtt.Client(broker.host, broker.port, protocol=V5,
                              max_inflight_messages=DRAIN_BATCH) as client:
        client.pending_calls_threshold = DRAIN_BATCH + 50
        start = time.time()
        for i in range(0, n, DRAIN_BATCH):
            await asyncio.gather(*(client.publish(topic, body, qos=1)
                                   for body in bodies[i:i + DRAIN_BATCH]))
        got, last = await sub.wait_count(topic, n, 120)
    if got < n:
        raise RuntimeError(f"bare replay incomplete: the subscriber got {got} of {n}")
    return n / (last - start)


async def replay_run(profile: Profile, n: int, workdir: Path, bare_first: bool
                     ) -> tuple[float, float]:
    """(gateway, bare) messages/s on one broker; the order alternates between rounds."""
    broker = Mosquitto(workdir / "broker", extra_config=BROKER_CONFIG)
    broker.start()
    bare_topic = "bench/bare/replay/events"
    # A persistent session keeps what arrives while the subscriber reconnects.
    sub = SubscriberProcess(broker.host, broker.port, [Topics("bench-replay").events, bare_topic],
                            client_id=f"bench-sub-{workdir.name}")
    try:
        await asyncio.to_thread(sub.start)
        bare = await replay_bare(n, broker, sub, bare_topic) if bare_first else 0.0
        gateway = await replay_gateway(profile, n, broker, sub, workdir / "state")
        if not bare_first:
            bare = await replay_bare(n, broker, sub, bare_topic)
    finally:
        sub.close()
        broker.stop()
    return gateway, bare


def rss_run(seconds: float, workdir: Path) -> tuple[int, int, float, int]:
    """A gateway process under load: (kB before, peak kB, frames/s sent, telemetry seen)."""
    broker = Mosquitto(workdir / "broker", extra_config=BROKER_CONFIG)
    broker.start()
    topics = Topics("bench-rss")
    # The CLI cannot choose the UDP port (python-can's default), so runs differ by group.
    group = f"239.{random.randint(64, 127)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    gateway = rig.GatewayProcess(workdir, topics.vehicle_id, broker.host, broker.port,
                                 f"{BUS}=udp_multicast:{group}")
    sub = SubscriberProcess(broker.host, broker.port, [topics.status, topics.telemetry])
    try:
        sub.start()
        gateway.start(lambda: sub.count(topics.status)[0] > 0)
        time.sleep(0.5)  # the bus is opened right after the birth; let it settle
        before = gateway.status_kb("VmRSS")
        tx = open_sim_bus("udp_multicast", group)
        sender = rig.Sender(tx, rig.Traffic(RSS_RATE), seconds)
        sender.run()  # in this thread: nothing else here needs it
        tx.shutdown()
        time.sleep(0.5)
        peak = gateway.status_kb("VmHWM")
        telemetry = sub.count(topics.telemetry)[0]
    finally:
        gateway.stop()
        sub.close()
        broker.stop()
    return before, peak, sender.rate, telemetry


def row(label: str, text: str) -> None:
    """One summary line, labels aligned."""
    print(f"{label:<{LABEL}} {text}")


def print_latency(rate: int, runs: Sequence[LatencyRun]) -> None:
    """Summary for one rate: alert latency, baseline and ratios; telemetry; frames."""
    g50, g99, b50, b99, t50, t99 = (
        median([percentile(getattr(r, side), q) for r in runs])
        for side in ("gateway", "bare", "telemetry") for q in (50, 99))
    r50, r99 = (median([percentile(r.gateway, q) / percentile(r.bare, q) for r in runs])
                for q in (50, 99))
    met = g99 < TARGET_P99_MS
    target = (f"target p99 < {TARGET_P99_MS:g} ms: {VERDICT[met]}" if rate == TARGET_AT else
              f"target is for {TARGET_AT:,} f/s; p99 < {TARGET_P99_MS:g} ms here: "
              f"{'yes' if met else 'no'}")
    at = f"@ {rate:,} f/s"
    row(f"alert latency {at}", f"gateway p50 {g50:.1f} ms  p99 {g99:.1f} ms | bare aiomqtt "
        f"p50 {b50:.1f} ms  p99 {b99:.1f} ms | ratio p50 {r50:.1f}x p99 {r99:.1f}x  ({target})")
    row(f"telemetry latency {at}", f"p50 {t50:.1f} ms  p99 {t99:.1f} ms  (informational, "
        f"{sum(len(r.telemetry) for r in runs)} msgs: arrival - newest source ts carried; a "
        f"change may also wait up to the 1 s drive interval, by design)")
    sent, done, drop = (sum(getattr(r, k) for r in runs) for k in ("sent", "processed", "dropped"))
    issued, got_gw, got_bare = (sum(r.alerts[i] for r in runs) for i in range(3))
    row(f"frames {at}", f"sent {sent:,} ({median([r.rate for r in runs]):,.0f}/s), processed "
        f"{done:,}, dropped {drop:,}; alerts issued {issued}, received: gateway {got_gw}, "
        f"bare {got_bare}")


def print_summary(lat: dict[int, list[LatencyRun]], replay: Sequence[tuple[float, float]],
                  rss: Sequence[tuple[int, int, float, int]], n: int, rss_seconds: float) -> None:
    """The closing table: medians, ratios and target verdicts."""
    for rate in RATES:
        print_latency(rate, lat[rate])
    gw, bare = median([g for g, _ in replay]), median([b for _, b in replay])
    row(f"outbox replay (N={n:,})", f"gateway {gw:,.0f} msg/s | bare aiomqtt {bare:,.0f} msg/s"
        f" | ratio {median([g / b for g, b in replay]):.2f}x  "
        f"(target >= {TARGET_REPLAY:,.0f} msg/s: {VERDICT[gw >= TARGET_REPLAY]})")
    before, peak, fps = (median([x[i] for x in rss]) / (1024 if i < 2 else 1) for i in range(3))
    row("peak RSS (gateway process)", f"{peak:.1f} MB VmHWM, {before:.1f} MB before load; "
        f"{fps:,.0f} f/s over udp_multicast for {rss_seconds:g} s, "
        f"{min(x[3] for x in rss)} telemetry msgs received  "
        f"(target < {TARGET_RSS_MB:g} MB: {VERDICT[peak < TARGET_RSS_MB]})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three parts and print the summary; 1 if a run was invalid."""
    parser = argparse.ArgumentParser(description="MQTT alert latency, replay rate and RSS")
    parser.add_argument("--quick", action="store_true", help="1 round, short runs, small N")
    parser.add_argument("--rounds", type=int, help="rounds per part (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="traffic per latency run (default 10)")
    parser.add_argument("--messages", type=int, help="replayed messages N (default 10000)")
    parser.add_argument("--rss-seconds", type=float, help="load for the RSS run (default 10)")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    rounds: int = args.rounds if args.rounds is not None else 1 if quick else 3
    seconds: float = args.seconds if args.seconds is not None else 2.0 if quick else 10.0
    n: int = args.messages if args.messages is not None else 1_000 if quick else 10_000
    rss_seconds: float = args.rss_seconds if args.rss_seconds is not None else 3 if quick else 10
    if min(rounds, seconds, n, rss_seconds) <= 0:
        parser.error("--rounds, --seconds, --messages and --rss-seconds must be positive")
    # The replay part takes the broker down on purpose; the link's warnings would be noise.
    logging.getLogger("gateway").setLevel(logging.ERROR)
    profile = load_profile(rig.PROFILE)
    print(f"python {sys.version.split()[0]}, aiomqtt {aiomqtt.__version__}, python-can "
          f"{can.__version__}; {rounds} round(s) of {seconds:g} s per rate, replay N={n:,}, "
          f"RSS load {rss_seconds:g} s; medians of per-round figures; broker: {BROKER_CONFIG}")
    lat: dict[int, list[LatencyRun]] = {rate: [] for rate in RATES}
    replay: list[tuple[float, float]] = []
    rss: list[tuple[int, int, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker", extra_config=BROKER_CONFIG)
        broker.start()
        try:
            for r in range(rounds):
                for rate in RATES:
                    run = asyncio.run(latency_run(profile, rate, seconds, broker,
                                                  work / f"bench-{rate}-{r}"))
                    lat[rate].append(run)
                    print(f"  round {r + 1} @ {rate:,} f/s: alert p99 gateway "
                          f"{percentile(run.gateway, 99):.1f} ms, "
                          f"bare {percentile(run.bare, 99):.1f} ms")
        finally:
            broker.stop()
        for r in range(rounds):
            replay.append(asyncio.run(replay_run(profile, n, work / f"replay-{r}", r % 2 == 1)))
            print(f"  round {r + 1} replay: gateway {replay[-1][0]:,.0f} msg/s, "
                  f"bare {replay[-1][1]:,.0f} msg/s")
        for r in range(rounds):
            rss.append(rss_run(rss_seconds, work / f"rss-{r}"))
            print(f"  round {r + 1} RSS: peak {rss[-1][1] / 1024:.1f} MB")
    print()
    print_summary(lat, replay, rss, n, rss_seconds)
    valid = all(run.valid for runs in lat.values() for run in runs)
    print(f"run check: {'ok' if valid else 'INVALID (frames dropped/unprocessed or alerts lost)'}")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
