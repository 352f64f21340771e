"""Power cut: kill -9 during heavy writes through the daemon's durable path.

A writer process (tests/outbox_writer.py, ``durable`` mode) queues alerts,
events, retained state and backfill through DurablePublisher and Outbox into
one SQLite file, and reports after each commit the last sequence number of
every topic whose messages are all committed. It is killed at random moments,
five times over the same file; after each kill the outbox must be intact,
hold everything reported, and keep each topic's sequence whole. At the end
it is drained and written to again.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gateway.outbox import Kind, Limits, OutboxStore, Row
from tests.conftest import ROOT
from tests.contract import validate
from tests.outbox_writer import VEHICLE

WRITER = Path(__file__).resolve().parent / "outbox_writer.py"
BASE = f"evgw/v1/{VEHICLE}/"
EVERYTHING = Limits(max_bytes=1 << 40, max_backfill_age=1e12)


@dataclass
class Boot:
    """One writer run: its boot id and the sequence numbers it reported as committed."""

    boot: str
    seqs: dict[str, int]


def kind_of(topic: str) -> Kind:
    """The outbox kind the gateway gives ``topic``."""
    sub = topic.removeprefix(BASE)
    kinds = {"alerts": Kind.ALERT, "events": Kind.EVENT, "backfill": Kind.BACKFILL}
    return kinds.get(sub, Kind.RETAINED)


def write_until_killed(db: Path, out: Path, delay: float) -> Boot:
    """Start the writer, let it commit at least once, kill -9 it ``delay`` s later."""
    with out.open("wb") as stdout, (out.with_suffix(".err")).open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(WRITER), str(db), "durable"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while len(out.read_bytes().splitlines()) < 2:  # "ready", then a first commit
            assert proc.poll() is None, f"the writer died: {out.with_suffix('.err').read_text()}"
            assert time.monotonic() < deadline, "the writer committed nothing within 60 s"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, f"the writer died: {out.with_suffix('.err').read_text()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    # The kill may have cut the last line short: only whole lines count.
    lines = out.read_bytes().split(b"\n")[:-1]
    ready, *reports = [line.decode() for line in lines]
    assert ready.startswith("ready ") and reports
    seqs: dict[str, int] = {}
    for line in reports:
        for topic, seq in json.loads(line)["seq"].items():
            assert seq >= seqs.get(topic, 0), "a report went backwards"
            seqs[topic] = seq
    return Boot(ready.split()[1], seqs)


def check_outbox(db: Path, boots: list[Boot]) -> list[Row]:
    """Everything the Done-when asks of the file after a kill; returns the rows by id."""
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = OutboxStore(db, EVERYTHING)
    assert store.open() is None, "the outbox was found corrupt and moved aside"
    try:
        rows = sorted(store.fetch(10_000_000), key=lambda r: r.id)
    finally:
        store.close()
    order = {b.boot: i for i, b in enumerate(boots)}
    sequences: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
    retained: dict[str, tuple[int, int]] = {}
    for row in rows:
        doc = json.loads(row.payload)  # a torn row would not parse
        assert doc["vehicle"] == VEHICLE and doc["boot"] in order, doc
        assert row.kind is kind_of(row.topic) and row.retain == (row.kind is Kind.RETAINED)
        if row.kind is Kind.RETAINED:
            # A retained topic keeps only its newest value, so one row per topic.
            assert row.topic not in retained, f"two pending rows for {row.topic}"
            retained[row.topic] = (order[doc["boot"]], doc["seq"])
        else:
            sequences[doc["boot"], row.topic].append(doc["seq"])
    # Per topic and boot, in commit order: 1, 2, 3... without a gap or a duplicate.
    for (boot_id, topic), seqs in sequences.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{topic} in boot {boot_id}: {seqs[:20]}"
    for index, boot in enumerate(boots):
        for topic, last in boot.seqs.items():
            if kind_of(topic) is Kind.RETAINED:
                # Later boots may have replaced it, never an older value.
                later = [b.seqs.get(topic, 0) for b in boots[index + 1:]]
                if any(later):
                    continue
                assert topic in retained, f"{topic} of boot {boot.boot} is gone"
                assert retained[topic] >= (index, last), f"{topic}: older than reported"
            else:
                got = len(sequences.get((boot.boot, topic), []))
                assert got >= last, f"{topic} of boot {boot.boot}: {got} rows, {last} reported"
    for row in rows[:: max(1, len(rows) // 30)]:  # the contract, on a sample
        validate(row.topic, row.payload)
    return rows


def test_kill_9_during_heavy_durable_writes_leaves_the_outbox_consistent(
        tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    rng = random.Random(8)
    boots: list[Boot] = []
    for round_ in range(5):
        boots.append(write_until_killed(db, tmp_path / f"round{round_}.out",
                                        rng.uniform(0.0, 1.0)))
        rows = check_outbox(db, boots)
    assert len({b.boot for b in boots}) == len(boots)
    assert {kind_of(t) for b in boots for t in b.seqs} == set(Kind), "a kind was never written"
    assert len(rows) > 1000, "too little was written to call it heavy"

    # Drained as the link drains it, the same file takes new writes; ids keep growing.
    store = OutboxStore(db, EVERYTHING)
    assert store.open() is None
    try:
        while batch := store.fetch(1000):
            assert store.delete([row.id for row in batch]) == len(batch)
        assert store.stats()["rows"] == 0
    finally:
        store.close()
    again = write_until_killed(db, tmp_path / "again.out", rng.uniform(0.0, 1.0))
    fresh = check_outbox(db, [again])
    assert fresh and min(row.id for row in fresh) > max(row.id for row in rows)
