"""Writes to an outbox until killed; the kill -9 tests in test_outbox.py run it.

Usage: ``outbox_writer.py DB stream`` or ``outbox_writer.py DB fill N``.

First prints ``ready <run>`` (a persisted counter, new for every run). In
``stream`` mode it then appends batches of 1-20 entries forever and prints the
last id of each batch once it is committed. In ``fill N`` mode it appends N
alerts in batches, prints ``done`` and sleeps until killed. Every payload
carries the sha256 of its body and its place in its batch, so a reader can
tell a torn row or a partial batch from an intact one.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path

from gateway.outbox import Entry, Kind, Limits, OutboxStore

# No bound may drop anything the test expects to find.
LIMITS = Limits(max_bytes=1 << 40, max_backfill_age=1e12)
STREAM_KINDS = (Kind.ALERT, Kind.EVENT, Kind.BACKFILL)
FILL_BATCH = 500


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


def main(argv: list[str]) -> None:
    """Entry point; see the module docstring."""
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
