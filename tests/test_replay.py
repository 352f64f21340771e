"""Reading recorded logs (read_log) and pacing them (ReplaySource) on a ManualClock.

Every log here is written by python-can's own writers into tmp_path, so the tests
check the gateway against the formats as python-can produces them.
"""

from __future__ import annotations

import re
from pathlib import Path

import can
import pytest

from gateway.can import ReplaySource, read_log
from gateway.clock import ManualClock
from tests.conftest import frame

LOG_START = 1_600_000_000.0
"""Epoch of the recorded logs; differs from ManualClock's start so rebasing is visible."""

FORMATS = [".log", ".asc", ".blf", ".trc", ".csv"]


def sample_frames() -> list[can.Message]:
    return [
        frame(0x123, [1, 2, 3, 4, 5, 6, 7, 8], LOG_START),
        frame(0x18FF50E5, [0xDE, 0xAD, 0xBE], LOG_START + 0.0105, extended=True),
        frame(0x7FF, [], LOG_START + 0.25),
        frame(0x001, [0xFF] * 8, LOG_START + 1.5),
        frame(0x1ABCDEF0, [0, 1], LOG_START + 60.001, extended=True),
    ]


def write_log(path: Path, frames: list[can.Message]) -> Path:
    with can.Logger(path) as logger:
        for msg in frames:
            logger.on_message_received(msg)
    return path


def log_at(tmp_path: Path, offsets: list[float], suffix: str = ".log") -> Path:
    """A log with one frame at each offset (seconds) after LOG_START."""
    frames = [frame(0x200 + i, [i], LOG_START + t) for i, t in enumerate(offsets)]
    return write_log(tmp_path / f"paced{suffix}", frames)


async def replay(source: ReplaySource, clock: ManualClock,
                 ) -> list[tuple[float, list[can.Message]]]:
    """Every batch with the clock's monotonic reading at the moment it was yielded."""
    return [(clock.monotonic(), batch) async for batch in source.batches()]


# --------------------------------------------------------------------------- read_log


@pytest.mark.parametrize("suffix", FORMATS)
def test_read_log_returns_the_written_frames(tmp_path: Path, suffix: str) -> None:
    written = sample_frames()
    path = write_log(tmp_path / f"trace{suffix}", written)

    read = list(read_log(path))

    assert [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in read] == [
        (m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in written
    ]


@pytest.mark.parametrize("suffix", [
    ".log",
    ".asc",
    ".blf",
    ".trc",
    ".csv",
])
def test_read_log_keeps_the_recorded_timestamps(tmp_path: Path, suffix: str) -> None:
    written = sample_frames()
    path = write_log(tmp_path / f"trace{suffix}", written)

    read = list(read_log(path))

    assert len(read) == len(written)
    for got, want in zip(read, written, strict=True):
        assert got.timestamp == pytest.approx(want.timestamp, abs=1e-3)


@pytest.mark.parametrize("suffix", [".xyz", ".txt", ".mf4"])
def test_read_log_rejects_an_unreadable_extension_naming_the_path(
    tmp_path: Path, suffix: str,
) -> None:
    """.txt is write-only in python-can (Printer); .mf4 needs asammdf, which is not installed
    with the gateway. Both must fail like any unknown format: ValueError naming the file."""
    path = write_log(tmp_path / "trace.txt", sample_frames()).rename(tmp_path / f"t{suffix}")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_log(path)


def test_read_log_rejects_a_missing_file_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.log"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_log(path)


# --------------------------------------------------------------------------- ReplaySource errors


@pytest.mark.parametrize("speed", [0.0, -1.0])
def test_replay_rejects_non_positive_speed(tmp_path: Path, clock: ManualClock,
                                           speed: float) -> None:
    path = log_at(tmp_path, [0.0])
    with pytest.raises(ValueError, match="speed"):
        ReplaySource(path, clock, speed=speed)


@pytest.mark.parametrize("name", ["missing.log", "trace.xyz"])
async def test_replay_of_unreadable_path_raises_value_error_naming_it(
    tmp_path: Path, clock: ManualClock, name: str,
) -> None:
    path = tmp_path / name
    if name.endswith(".xyz"):
        path.write_text("not a log\n")
    source = ReplaySource(path, clock)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        await anext(source.batches())


# --------------------------------------------------------------------------- pacing

PACED = [0.0, 0.1, 0.1, 0.5, 2.0]


async def test_replay_groups_frames_by_due_time_and_sleeps_the_gaps(
    tmp_path: Path, clock: ManualClock,
) -> None:
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=1.0)

    out = await replay(source, clock)

    groups = [[round(m.timestamp - LOG_START, 6) for m in batch] for _, batch in out]
    assert groups == [[0.0], [0.1, 0.1], [0.5], [2.0]]
    assert [t for t, _ in out] == pytest.approx([0.0, 0.1, 0.5, 2.0], abs=1e-6)
    assert clock.slept == pytest.approx([0.1, 0.4, 1.5], abs=1e-6)
    assert sum(clock.slept) == pytest.approx(2.0, abs=1e-6)
    assert source.frames == 5


async def test_replay_at_double_speed_halves_the_sleeps(
    tmp_path: Path, clock: ManualClock,
) -> None:
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=2.0)

    out = await replay(source, clock)

    assert [len(batch) for _, batch in out] == [1, 2, 1, 1]
    assert [t for t, _ in out] == pytest.approx([0.0, 0.05, 0.25, 1.0], abs=1e-6)
    assert clock.slept == pytest.approx([0.05, 0.2, 0.75], abs=1e-6)
    assert sum(clock.slept) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 512])
async def test_replay_yields_each_frame_when_due_whatever_the_chunk_size(
    tmp_path: Path, clock: ManualClock, chunk: int,
) -> None:
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=1.0, chunk=chunk)

    out = await replay(source, clock)

    arrivals = [t for t, batch in out for _ in batch]
    assert arrivals == pytest.approx(PACED, abs=1e-6)
    assert sum(clock.slept) == pytest.approx(2.0, abs=1e-6)


async def test_replay_keeps_to_the_schedule_when_the_consumer_is_slow(
    tmp_path: Path, clock: ManualClock,
) -> None:
    """Pacing is against the log's timeline, not frame-to-frame gaps: time the consumer
    spends counts towards the next wait."""
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=1.0)
    arrivals: list[float] = []
    async for batch in source.batches():
        arrivals += [clock.monotonic()] * len(batch)
        if len(arrivals) == 1:
            clock.advance(0.3)  # the consumer is busy past the 0.1 s frames' due time

    assert arrivals == pytest.approx([0.0, 0.3, 0.3, 0.5, 2.0], abs=1e-6)
    assert clock.slept == pytest.approx([0.2, 1.5], abs=1e-6)


@pytest.mark.parametrize("chunk", [2, 512])
async def test_replay_without_speed_sleeps_nothing_and_yields_everything(
    tmp_path: Path, clock: ManualClock, chunk: int,
) -> None:
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=None, chunk=chunk)

    out = await replay(source, clock)

    frames = [m for _, batch in out for m in batch]
    assert [m.arbitration_id for m in frames] == [0x200, 0x201, 0x202, 0x203, 0x204]
    assert [len(batch) for _, batch in out] == ([2, 2, 1] if chunk == 2 else [5])
    assert clock.slept == []
    assert clock.monotonic() == 0.0


# --------------------------------------------------------------------------- rebase


@pytest.mark.parametrize("speed", [1.0, 2.0])
async def test_rebase_moves_timestamps_to_now_plus_scaled_offset(
    tmp_path: Path, clock: ManualClock, speed: float,
) -> None:
    start = clock.time()
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=speed, rebase=True)

    out = await replay(source, clock)

    stamps = [m.timestamp for _, batch in out for m in batch]
    assert stamps == pytest.approx([start + t / speed for t in PACED], abs=1e-6)
    # Paced and rebased, every frame is stamped with the wall time at which it is yielded.
    assert stamps[-1] == pytest.approx(clock.time(), abs=1e-6)


async def test_rebase_without_speed_keeps_the_spacing_from_now(
    tmp_path: Path, clock: ManualClock,
) -> None:
    start = clock.time()
    source = ReplaySource(log_at(tmp_path, PACED), clock, speed=None, rebase=True)

    out = await replay(source, clock)

    stamps = [m.timestamp for _, batch in out for m in batch]
    assert stamps == pytest.approx([start + t for t in PACED], abs=1e-6)


@pytest.mark.parametrize("speed", [1.0, None])
async def test_without_rebase_the_recorded_timestamps_are_kept(
    tmp_path: Path, clock: ManualClock, speed: float | None,
) -> None:
    path = log_at(tmp_path, PACED)
    recorded = [m.timestamp for m in read_log(path)]
    source = ReplaySource(path, clock, speed=speed, rebase=False)

    out = await replay(source, clock)

    assert [m.timestamp for _, batch in out for m in batch] == recorded
    assert recorded == pytest.approx([LOG_START + t for t in PACED], abs=1e-6)
