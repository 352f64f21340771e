"""Replaying recorded CAN logs.

python-can reads the formats (candump ``-L`` .log, .asc, .blf, .trc, .csv,
.mf4); this module paces them. File reading happens in a worker thread, a
chunk at a time, so a large log never blocks the event loop. Pacing uses the
injected clock, so tests can check it in virtual time.

``speed=None`` replays as fast as the consumer takes frames. With
``rebase=True`` frame timestamps are moved to "now" (as canplayer does when
it puts frames on a live bus), so staleness logic sees current data;
without it the log's own timestamps are kept, which is what decoding tools
want.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import can

from gateway.clock import Clock

# .mf4 would need asammdf, which the gateway does not install.
LOG_SUFFIXES = (".log", ".asc", ".blf", ".trc", ".csv")


def read_log(path: Path) -> Iterator[can.Message]:
    """Iterate over the frames of a log file; ValueError for formats python-can cannot read."""
    if not path.is_file():
        raise ValueError(f"{path}: no such log file")
    if path.suffix.lower() not in LOG_SUFFIXES:
        raise ValueError(
            f"{path}: unknown log format {path.suffix!r}; expected one of {', '.join(LOG_SUFFIXES)}"
        )
    # python-can's ASC reader defaults to times relative to the file start;
    # every other format gives absolute epoch times. Make ASC agree.
    options = {"relative_timestamp": False} if path.suffix.lower() == ".asc" else {}
    reader = can.LogReader(str(path), **options)
    return iter(reader)


class ReplaySource:
    """Frames of a log file as batches, optionally paced in (scaled) real time."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        speed: float | None = 1.0,
        rebase: bool = False,
        chunk: int = 512,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (or None for as fast as possible)")
        self.path = path
        self._clock = clock
        self._speed = speed
        self._rebase = rebase
        self._chunk = chunk
        self.frames = 0

    async def batches(self) -> AsyncIterator[list[can.Message]]:
        """Yield batches of frames; a paced replay yields each batch when it falls due."""
        frames = read_log(self.path)
        first_ts: float | None = None
        start_mono = self._clock.monotonic()
        start_wall = self._clock.time()
        speed = self._speed
        while True:
            chunk = await asyncio.to_thread(lambda: list(itertools.islice(frames, self._chunk)))
            if not chunk:
                return
            if first_ts is None:
                first_ts = chunk[0].timestamp
            self.frames += len(chunk)
            if speed is None:
                if self._rebase:
                    for msg in chunk:
                        msg.timestamp = start_wall + (msg.timestamp - first_ts)
                yield chunk
                continue
            pending: list[can.Message] = []
            for msg in chunk:
                offset = (msg.timestamp - first_ts) / speed
                due = start_mono + offset
                if due > self._clock.monotonic():
                    if pending:
                        yield pending
                        pending = []
                    # Measured after the yield: time the consumer spent counts as waited.
                    delay = due - self._clock.monotonic()
                    if delay > 0:
                        await self._clock.sleep(delay)
                if self._rebase:
                    msg.timestamp = start_wall + offset
                pending.append(msg)
            if pending:
                yield pending
