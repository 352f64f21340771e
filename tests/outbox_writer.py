"""Writes to an outbox until killed; the kill -9 tests in test_outbox.py and
test_outbox_powercut.py run it.

Usage: ``outbox_writer.py DB stream``, ``outbox_writer.py DB fill N`` or
``outbox_writer.py DB durable``.

First prints ``ready <run>`` (a persisted counter, new for every run). In
``stream`` mode it then appends batches of 1-20 entries forever and prints the
last id of each batch once it is committed. In ``fill N`` mode it appends N
alerts in batches, prints ``done`` and sleeps until killed. Every payload
carries the sha256 of its body and its place in its batch, so a reader can
tell a torn row or a partial batch from an intact one.

``durable`` mode writes as the daemon does, through the DurablePublisher and
the asyncio Outbox: alert transitions (with the retained active set), events,
retained state and backfill of a simulated car, in random batches. It prints
``ready <boot id>``, then, each time a commit completes, one JSON line
``{"committed": N, "seq": {topic: last seq}}``: every entry queued up to that
point is committed, so the outbox must hold each topic's messages of this
boot up to that sequence number.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import sys
import time
from collections import deque
from pathlib import Path

from gateway.alerts import Severity
from gateway.app import Pipeline
from gateway.clock import SystemClock
from gateway.config import load_profile
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt.durable import DurablePublisher
from gateway.mqtt.payloads import Envelope, new_boot_id
from gateway.mqtt.topics import Topics
from gateway.outbox import Entry, Kind, Limits, Outbox, OutboxStore
from hil.sim import VehicleModel
from hil.sim.ecus import generate

# No bound may drop anything the test expects to find.
LIMITS = Limits(max_bytes=1 << 40, max_backfill_age=1e12)
STREAM_KINDS = (Kind.ALERT, Kind.EVENT, Kind.BACKFILL)
FILL_BATCH = 500
PROFILE = Path(__file__).resolve().parents[1] / "dbc" / "profiles" / "microev-ref.toml"
VEHICLE = "powercut"
MAX_PENDING = 250
"""Far below DurablePublisher's bound: the queue must never drop, or seqs would have gaps.
Small, so commits are many and a kill finds one in progress as often as not."""


def payload(run: int, batch: int, index: int, size: int, body: str) -> bytes:
    """A self-checking JSON payload."""
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"run": run, "batch": batch, "i": index, "n": size, "body": body,
                       "sha": digest}).encode()


def stream(store: OutboxStore, run: int) -> None:
    """Append random batches forever."""
    rng = random.Random()
    batch = 0
    while True:
        size = rng.randint(1, 20)
        entries = [
            Entry(rng.choice(STREAM_KINDS), f"test/{run}/{batch}",
                  payload(run, batch, i, size, rng.randbytes(rng.randint(0, 150)).hex()),
                  time.time())
            for i in range(size)
        ]
        ids, _ = store.append(entries)
        print(ids[-1], flush=True)
        batch += 1


def fill(store: OutboxStore, run: int, count: int) -> None:
    """Append ``count`` alerts (the batch number is the sequence number), then idle."""
    for start in range(0, count, FILL_BATCH):
        store.append([
            Entry(Kind.ALERT, "test/fill", payload(run, seq, 0, 1, f"alert {seq}"), time.time())
            for seq in range(start, min(count, start + FILL_BATCH))
        ])
    print("done", flush=True)
    while True:
        time.sleep(3600)


class Producer:
    """Feeds the durable path with what a driving car produces, in random proportions."""

    def __init__(self, pipeline: Pipeline, durable: DurablePublisher, rng: random.Random) -> None:
        self.pipeline = pipeline
        self.durable = durable
        self.rng = rng
        self.groups = sorted({slot.group for slot in pipeline.store})
        topics = durable.topics
        self.topics = [topics.alerts, topics.alerts_active, topics.events, topics.backfill,
                       *(topics.state(g) for g in self.groups)]
        self._window = generate(VehicleModel(mode="drive"), 1.0)
        latest = max(f.timestamp for f in self._window)
        self._offsets = [f.timestamp - latest for f in self._window]
        self._fresh_until = 0.0
        self._events = 0

    def refresh(self, now: float) -> None:
        """Decode a second of the simulated car again, stamped now, twice a second."""
        if now < self._fresh_until:
            return
        self._fresh_until = now + 0.5
        for frame, offset in zip(self._window, self._offsets, strict=True):
            frame.timestamp = now + offset
        self.pipeline.decoders["vehicle"].process(self._window)

    def batch(self, now: float, size: int) -> None:
        """``size`` operations, each adding one or two entries to the queue."""
        views = self.pipeline.store.snapshot(now)
        alerts = self.pipeline.alerts
        for _ in range(size):
            pick = self.rng.random()
            if pick < 0.3:
                key = f"powercut.{self.rng.randrange(6)}"
                if self.rng.random() < 0.5:
                    alerts.raise_(key, self.rng.choice(list(Severity)), "power-cut test",
                                  value=self._events, limit=0)
                else:
                    alerts.clear(key, value=self._events)
            elif pick < 0.55:
                self._events += 1
                self.durable.event("powercut_test", {"n": self._events,
                                                     "pad": self.rng.randbytes(64).hex()})
            elif pick < 0.75:
                group = self.rng.choice(self.groups)
                self.durable.state(group, [v for v in views if v.group == group])
            else:
                self.durable.backfill("drive", [v for v in views if v.good])

    def seqs(self) -> dict[str, int]:
        """The last sequence number of every topic so far."""
        return {t: n for t in self.topics if (n := self.durable.envelope.last_seq(t))}


async def durable(db: Path) -> None:
    """Write through DurablePublisher and Outbox forever, reporting each commit."""
    clock, counters = SystemClock(), Counters()
    rlog = RateLimitedLog(logging.getLogger("outbox_writer"), clock)
    pipeline = Pipeline.build(load_profile(PROFILE), clock)
    envelope = Envelope(VEHICLE, new_boot_id())
    outbox = Outbox(db, LIMITS, clock, counters, rlog)
    await outbox.open()
    publisher = DurablePublisher(Topics(VEHICLE), envelope, outbox, clock, counters, rlog)
    pipeline.alerts.sink = publisher
    writer = asyncio.create_task(publisher.run())
    producer = Producer(pipeline, publisher, random.Random())
    print(f"ready {envelope.boot_id}", flush=True)
    marks: deque[tuple[int, dict[str, int]]] = deque()

    def report() -> None:
        committed = sum(counters.snapshot("outbox.in.").values())
        done = None
        while marks and marks[0][0] <= committed:
            done = marks.popleft()
        if done is not None:
            print(json.dumps({"committed": done[0], "seq": done[1]}), flush=True)

    while not writer.done():
        now = clock.time()
        producer.refresh(now)
        producer.batch(now, producer.rng.randint(1, 40))
        marks.append((counters.get("queue.outbox.pending.in"), producer.seqs()))
        await asyncio.sleep(0)  # the writer task takes the batch; its commit runs on a thread
        report()
        while publisher.pending > MAX_PENDING:
            await asyncio.sleep(0.001)
            report()
        if counters.get("queue.outbox.pending.dropped"):
            raise SystemExit("the durable queue dropped entries; the test cannot hold")
    await writer  # only a failed writer gets here: show why


def main(argv: list[str]) -> None:
    """Entry point; see the module docstring."""
    if argv[2] == "durable":
        asyncio.run(durable(Path(argv[1])))
        return
    store = OutboxStore(Path(argv[1]), LIMITS)
    store.open()
    run = store.next_counter("writer.run")
    print(f"ready {run}", flush=True)
    if argv[2] == "stream":
        stream(store, run)
    elif argv[2] == "fill":
        fill(store, run, int(argv[3]))
    else:
        raise SystemExit(f"unknown mode {argv[2]!r}")


if __name__ == "__main__":
    main(sys.argv)
