"""The systemd watchdog against a real notify socket and a real, live pipeline.

The test binds an AF_UNIX datagram socket and names it in NOTIFY_SOCKET, as
systemd does, with WATCHDOG_USEC = 0.2 s (a ping every 0.1 s). The gateway
reads a simulated car on a python-can virtual bus in real time. Every
assertion is about the order of what arrives on the socket, never about how
long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.app import Pipeline
from gateway.app.health import Health
from gateway.clock import SystemClock
from gateway.config import Profile
from gateway.config.health import HealthSettings
from gateway.health import Counters
from gateway.health.lag import LoopLag
from gateway.health.watchdog import Notifier, PipelineHealth, Watchdog, watchdog_interval
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle

WAIT_S = 15.0
LIMITS = HealthSettings(max_loop_lag_s=0.5, stall_after_s=0.5)
GATEWAY = ("READY=", "WATCHDOG=", "STATUS=", "STOPPING=")


@dataclass
class Listener:
    """The systemd side: every datagram that arrived, in order."""

    sock: socket.socket
    path: str
    messages: list[str] = field(default_factory=list)

    async def collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self.messages.append(data.decode())

    def mark(self, text: str) -> None:
        """Put a marker of the test's own into the stream (a datagram from another socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(f"TEST={text}".encode(), self.path)

    def after(self, marker: str) -> list[str]:
        """Gateway messages after the test's ``marker`` (none before it arrived)."""
        if f"TEST={marker}" not in self.messages:
            return []
        index = self.messages.index(f"TEST={marker}")
        return [m for m in self.messages[index + 1:] if m.startswith(GATEWAY)]

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {WAIT_S} s; got {self.messages[-8:]}")
            await asyncio.sleep(0.01)


def pings(messages: list[str]) -> int:
    return sum(1 for m in messages if m == "WATCHDOG=1")


def statuses(messages: list[str], text: str) -> list[str]:
    return [m for m in messages if m.startswith("STATUS=") and text in m]


@pytest.fixture
async def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Listener]:
    path = str(tmp_path / "notify")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    lst = Listener(sock, path)
    task = asyncio.create_task(lst.collect())
    try:
        yield lst
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


@contextlib.asynccontextmanager
async def running(profile: Profile, mode: str | None) -> AsyncIterator[tuple[Health, Pipeline,
                                                                              asyncio.Event]]:
    """A live pipeline on its own virtual bus (with a car in ``mode`` on it, unless None) and
    the health stage; yields the stage, the pipeline and the event that silences the car."""
    clock = SystemClock()
    channel = f"wd-{uuid.uuid4().hex[:12]}"
    pipeline = Pipeline.build(profile, clock)
    pipeline.start_live(pipeline.bus_options({"vehicle": f"virtual:{channel}"}))
    health = Health.build(pipeline, None, None, LIMITS, clock)
    sim_bus = open_sim_bus("virtual", channel)
    silence = asyncio.Event()
    car = None
    if mode is not None:
        car = asyncio.create_task(run_vehicle(sim_bus, VehicleEcus(VehicleModel(mode=mode)),
                                              clock, silence))
    await health.start()
    try:
        yield health, pipeline, silence
    finally:
        silence.set()
        if car is not None:
            await car
        await health.stop()
        await pipeline.stop()
        close_quietly(sim_bus)


async def test_ready_then_pings_while_healthy_and_stopping_at_the_end(listener, ref_profile):
    async with running(ref_profile, "drive") as (health, pipeline, _):
        await listener.wait_for(lambda: pings(listener.messages) >= 5, "five pings")
        assert pipeline.counters.get("can.vehicle.frames") > 0
        assert health.watchdog.healthy
    assert listener.messages[0] == "READY=1\nSTATUS=running"
    assert listener.messages[-1] == "STOPPING=1\nSTATUS=stopping"
    assert not statuses(listener.messages, "unhealthy")


async def test_a_stalled_loop_stops_the_pings_until_it_recovers(listener, ref_profile):
    async with running(ref_profile, "drive") as (health, _, _):
        await listener.wait_for(lambda: pings(listener.messages) >= 3, "pings before the stall")
        listener.mark("stall")
        time.sleep(1.0)  # blocks the event loop: no task runs, no ping can be sent
        listener.mark("recovered")
        await listener.wait_for(lambda: pings(listener.after("recovered")) >= 3,
                                "pings after the stall")
        # Nothing could be sent while the loop was blocked: a stall longer than WatchdogSec
        # gets the service killed by systemd. One late check afterwards is forgiven.
        got = listener.messages
        assert got.index("TEST=recovered") == got.index("TEST=stall") + 1
        assert health.watchdog.healthy


async def test_frames_that_are_not_decoded_stop_the_pings(listener, ref_profile):
    async with running(ref_profile, "drive") as (health, pipeline, _):
        await listener.wait_for(lambda: pings(listener.messages) >= 3, "pings while decoding")
        decode = next(t for t in pipeline.tasks if t.get_name() == "decode-vehicle")
        decode.cancel()
        listener.mark("decoder gone")
        before = pipeline.counters.get("queue.can.vehicle.in")
        await listener.wait_for(lambda: len(statuses(listener.after("decoder gone"),
                                                     "frames waiting")) >= 4,
                                "the stall reported")
        after = listener.after("decoder gone")
        first = after.index(statuses(after, "frames waiting")[0])
        # From the first report on, no ping, while frames kept arriving.
        assert "WATCHDOG=1" not in after[first:]
        assert pipeline.counters.get("queue.can.vehicle.in") > before
        assert "bus vehicle" in health.watchdog.reason
        assert not health.watchdog.healthy


async def test_a_parked_car_whose_bus_sleeps_keeps_the_pings(listener, ref_profile):
    async with running(ref_profile, "park") as (health, pipeline, silence):
        await listener.wait_for(lambda: pings(listener.messages) >= 3, "pings while parked")
        silence.set()  # the car's ECUs go to sleep
        await asyncio.sleep(0.1)  # let frames already on the bus drain
        listener.mark("asleep")
        received = pipeline.counters.get("queue.can.vehicle.in")
        await asyncio.sleep(3 * LIMITS.stall_after_s)
        await listener.wait_for(lambda: pings(listener.after("asleep")) >= 10, "pings asleep")
        assert pipeline.counters.get("queue.can.vehicle.in") == received  # truly silent
        assert listener.after("asleep") == ["WATCHDOG=1"] * len(listener.after("asleep"))
        assert health.watchdog.healthy


async def test_a_driving_car_whose_bus_goes_silent_stops_the_pings(listener, ref_profile):
    async with running(ref_profile, "drive") as (health, pipeline, silence):
        await listener.wait_for(lambda: pings(listener.messages) >= 3, "pings while driving")
        assert pipeline.counters.get("can.vehicle.frames") > 0
        silence.set()  # the bus dies under a moving car
        listener.mark("silent")
        await listener.wait_for(lambda: len(statuses(listener.after("silent"),
                                                     "no frames")) >= 4, "silence reported")
        after = listener.after("silent")
        first = after.index(statuses(after, "no frames")[0])
        assert "WATCHDOG=1" not in after[first:]
        # It took at least one healthy check: silence only counts after stall_after_s.
        assert "WATCHDOG=1" in after[:first]
        assert "last seen in mode drive" in after[first]
        assert not health.watchdog.healthy


async def test_a_bus_that_never_delivered_is_not_held_against_the_gateway(listener, ref_profile):
    async with running(ref_profile, None) as (health, _, _):
        listener.mark("started")
        await asyncio.sleep(3 * LIMITS.stall_after_s)
        await listener.wait_for(lambda: pings(listener.after("started")) >= 10, "pings")
        assert set(listener.after("started")) == {"WATCHDOG=1"}
        assert health.watchdog.healthy


# --- the notify protocol and the check on their own -----------------------------------------

def test_the_watchdog_interval_is_a_quarter_of_watchdog_usec_for_this_process_only():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 7.5
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) \
        == 0.05
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_notifier_speaks_to_an_abstract_socket_and_is_silent_without_one():
    name = f"evgw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.status("two\nlines") and notifier.watchdog()
        assert sock.recv(100) == b"STATUS=two lines"
        assert sock.recv(100) == b"WATCHDOG=1"
        notifier.close()
    off = Notifier.from_env({})
    assert not off.enabled
    assert not off.ready()
    assert not Notifier("vsock:2:1234").enabled


async def test_a_failing_check_counts_as_unhealthy(tmp_path):
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)

        def broken() -> tuple[bool, str]:
            raise RuntimeError("bug")

        dog = Watchdog(Notifier(path), SystemClock(), broken, 0.1)
        assert dog.step()  # the first bad check is forgiven
        assert sock.recv(200) == b"WATCHDOG=1"
        assert not dog.step()
        assert sock.recv(200).startswith(b"STATUS=unhealthy, not pinging the watchdog: "
                                         b"health check failed: RuntimeError('bug')")
        dog.notifier.close()


def test_one_bad_check_is_forgiven_and_two_in_a_row_withhold_the_ping(tmp_path):
    path = str(tmp_path / "n")
    results = iter([(False, "lag"), (True, "ok"), (False, "lag"), (False, "lag"), (True, "ok")])
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(1.0)
        dog = Watchdog(Notifier(path), SystemClock(), lambda: next(results), 0.1)
        assert [dog.step() for _ in range(5)] == [True, True, True, False, True]
        sent = []
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sent.append(sock.recv(200).decode())
        assert sent[:3] == ["WATCHDOG=1"] * 3
        assert sent[3].startswith("STATUS=unhealthy") and "lag" in sent[3]
        assert sent[-1] == "WATCHDOG=1" and "STATUS=running" in sent[-2]
        dog.notifier.close()


def test_waiting_frames_count_only_when_no_decode_progress_spans_the_limit(clock):
    counters = Counters()
    check = PipelineHealth(counters, ["vehicle"], LoopLag(), lambda: "park", clock, 1.0, 5.0)
    counters.inc("queue.can.vehicle.in", 10)
    counters.inc("can.vehicle.frames", 10)
    assert check() == (True, "healthy")
    clock.advance(60)  # quiet for a minute; then a batch arrives just before the check
    counters.inc("queue.can.vehicle.in", 3)
    assert check()[0]  # the first sighting of a backlog is no stall yet
    clock.advance(4.9)
    assert check()[0]
    clock.advance(0.2)
    assert check() == (False, "bus vehicle: 3 frames waiting, none decoded for 5.1 s")
    counters.inc("can.vehicle.frames", 3)
    assert check()[0]
