"""Driving the real gateway pipeline and safety stage with simulated traffic, in process.

:class:`Harness` builds the reference profile's pipeline and safety stage on a
:class:`ManualClock` and feeds it frames the way the live decode task does:
small batches, the pipeline's listeners after each, and the safety tick every
0.1 s of frame time. The clock follows the frame timestamps, so every
debounce runs on simulated time, far faster than real time.

:class:`CapLoop` closes the loop for the speed cap: what the gateway sends
goes out on a real python-can virtual bus and comes back into the simulated
motor controller.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import can
from cantools.database.can import Database

from gateway.alerts import Alert, Severity
from gateway.app import Pipeline, Safety
from gateway.checksum import crc8_j1850
from gateway.clock import ManualClock
from gateway.config import load_profile
from gateway.decode.dbc import load_dbc
from hil.sim import faults
from hil.sim.ecus import DBC_FILES, REFERENCE_DBC
from hil.sim.faults import Event, Simulation
from hil.sim.model import VehicleModel
from tests.conftest import REF_PROFILE

BUS = "vehicle"
TICK_S = 0.1
BATCH_S = 0.01
"""Frames within this much of a batch's first frame go in one batch."""
START = ManualClock().time()
"""Where a fresh ManualClock starts: simulated frames are stamped from here."""


@dataclass(frozen=True)
class Transition:
    """One alert transition and the gateway clock time it happened at."""

    kind: str
    alert: Alert
    at: float


class Recorder:
    """An alert sink that keeps every transition with its time."""

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock
        self.transitions: list[Transition] = []
        self.active: list[Alert] = []

    def alert(self, transition: str, alert: Alert) -> None:
        """Record one transition."""
        self.transitions.append(Transition(transition, alert, self._clock.time()))

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        """Keep the latest active set."""
        self.active = list(alerts)

    def raised_keys(self) -> set[str]:
        """Every key that was raised at least once."""
        return {t.alert.key for t in self.transitions if t.kind == "raised"}

    def active_keys(self) -> set[str]:
        """Keys active now."""
        return {a.key for a in self.active}

    def first(self, key: str, severity: Severity) -> Transition | None:
        """The first transition that put ``key`` at ``severity`` (raised or updated)."""
        for t in self.transitions:
            if t.alert.key == key and t.alert.severity is severity and t.kind != "cleared":
                return t
        return None

    def history(self, key: str) -> list[tuple[str, Severity]]:
        """(transition, severity) of every transition of ``key``, in order."""
        return [(t.kind, t.alert.severity) for t in self.transitions if t.alert.key == key]

    def describe(self) -> str:
        """Every transition, one per line (for assertion messages)."""
        return "\n".join(f"{t.at - START:9.3f} {t.kind:8} {t.alert.key} "
                         f"{t.alert.severity.value}: {t.alert.message}" for t in self.transitions)


class Harness:
    """Pipeline + safety stage of the reference vehicle, fed frame by frame."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock()
        self.pipeline = Pipeline.build(load_profile(REF_PROFILE), self.clock)
        self.safety = Safety.build(self.pipeline)
        self.recorder = Recorder(self.clock)
        assert self.pipeline.alerts is not None
        self.pipeline.alerts.sink = self.recorder
        self._decoder = self.pipeline.decoders[BUS]
        # Ticks sit on a fixed grid from the start: no drift from summing 0.1 s steps.
        self._origin = self.clock.time()
        self._ticks = 1
        self.on_tick: list[Callable[[], None]] = []
        """Called after each tick's evaluation (the speed cap's sender, probes)."""

    @property
    def next_tick(self) -> float:
        """Clock time of the next tick."""
        return self._origin + self._ticks * TICK_S

    def feed(self, frames: Iterable[can.Message]) -> None:
        """Process ``frames`` (in timestamp order), ticking as frame time passes."""
        batch: list[can.Message] = []
        for f in frames:
            if f.timestamp > self.next_tick:
                self._flush(batch)
                self.tick_until(f.timestamp)
            elif batch and f.timestamp - batch[0].timestamp >= BATCH_S:
                self._flush(batch)
            batch.append(f)
        self._flush(batch)

    def tick_until(self, t: float) -> None:
        """Run every tick due at or before clock time ``t``."""
        while self.next_tick <= t:
            self._advance_to(self.next_tick)
            self.safety.monitor.evaluate()
            for hook in self.on_tick:
                hook()
            self._ticks += 1

    def _flush(self, batch: list[can.Message]) -> None:
        if not batch:
            return
        self._advance_to(batch[-1].timestamp)
        self._decoder.process(batch)
        for listener in self.pipeline.listeners:
            listener(BUS)
        batch.clear()

    def _advance_to(self, t: float) -> None:
        ahead = t - self.clock.time()
        if ahead > 0:
            self.clock.advance(ahead)


def replay(frames: Sequence[can.Message], linger: float = 0.0) -> Harness:
    """A fresh harness that processed ``frames`` and ticked ``linger`` s past the last."""
    h = Harness()
    h.feed(frames)
    h.tick_until(frames[-1].timestamp + linger)
    return h


class CapLoop:
    """Closed loop: the gateway's speed-cap frames reach the simulated MCU over a virtual bus.

    Every tick the gateway sends its request through the transmit guard onto
    one end of a python-can virtual bus; after each tick the simulator reads the
    other end and hands the frames to its ECUs.
    """

    def __init__(self, harness: Harness, sim: Simulation, channel: str) -> None:
        self.harness = harness
        self.sim = sim
        self.gateway_bus = can.Bus(interface="virtual", channel=channel)
        self.vehicle_bus = can.Bus(interface="virtual", channel=channel)
        safety = harness.safety
        assert safety.speed_cap is not None
        self.speed_cap = safety.speed_cap
        safety.guard.attach(BUS, lambda: self.gateway_bus)
        harness.on_tick.append(self._send)
        self.frames: list[can.Message] = []
        self.sent = 0

    def _send(self) -> None:
        self.sent += self.speed_cap.send()

    def run(self, seconds: float) -> None:
        """Advance vehicle and gateway together by ``seconds``, one tick at a time."""
        first = round(self.sim.t / TICK_S) + 1
        for k in range(first, first + round(seconds / TICK_S)):
            frames = self.sim.advance_to(k * TICK_S)
            self.frames += frames
            self.harness.feed(frames)
            self.harness.tick_until(self.sim.start + self.sim.t)
            inbound = list(iter(lambda: self.vehicle_bus.recv(timeout=0), None))
            self.sim.ecus.receive(inbound)

    def close(self) -> None:
        """Shut both ends of the virtual bus."""
        self.gateway_bus.shutdown()
        self.vehicle_bus.shutdown()


# ---- ground truth from the frames -----------------------------------------------------


@functools.cache
def reference_db() -> Database:
    """The reference vehicle's DBCs in one cantools database."""
    db = Database()
    for name in DBC_FILES:
        db.messages.extend(load_dbc(REFERENCE_DBC / name).messages)
    db.refresh()
    return db


def decoded(frames: Iterable[can.Message], message: str) -> list[tuple[float, dict[str, Any]]]:
    """(timestamp, signals) of every frame of ``message``, decoded with cantools."""
    msg = reference_db().get_message_by_name(message)
    return [(f.timestamp, cast("dict[str, Any]", msg.decode(bytes(f.data), decode_choices=False)))
            for f in frames if f.arbitration_id == msg.frame_id]


def first_ts(frames: Iterable[can.Message], message: str,
             predicate: Callable[[dict[str, Any]], bool]) -> float:
    """Timestamp of the first frame of ``message`` whose signals satisfy ``predicate``."""
    hits = (ts for ts, values in decoded(frames, message) if predicate(values))
    ts = next(hits, None)
    if ts is None:
        raise AssertionError(f"no {message} frame matches")
    return ts


def last_ts(frames: Iterable[can.Message], message: str) -> float:
    """Timestamp of the last frame of ``message``."""
    frame_id = reference_db().get_message_by_name(message).frame_id
    *_, last = itertools.chain([None], (f for f in frames if f.arbitration_id == frame_id))
    if last is None:
        raise AssertionError(f"no {message} frame")
    return float(last.timestamp)


def cycle_s(message: str) -> float:
    """The DBC cycle time of ``message`` in seconds."""
    return (reference_db().get_message_by_name(message).cycle_time or 0) / 1000.0


# ---- fault scenarios -----------------------------------------------------------------


def drive_with(events: list[Event], seconds: float) -> list[can.Message]:
    """Drive-cycle frames with ``events`` injected."""
    return faults.run(VehicleModel(mode="drive"), seconds, events, start=START)


def assert_raised_in_time(h: Harness, key: str, severity: Severity, fault_ts: float,
                          debounce: float, message: str) -> None:
    """``key`` reached ``severity`` no sooner than ``debounce`` after ``fault_ts`` and no
    later than one tick and one cycle of ``message`` beyond that."""
    t = h.recorder.first(key, severity)
    assert t is not None, h.recorder.describe()
    delay = t.at - fault_ts
    assert debounce - 1e-6 <= delay <= debounce + TICK_S + cycle_s(message) + 1e-6, \
        (key, delay)


def first_bad_crc(frames: list[can.Message], message: str) -> float:
    """Timestamp of the first frame of ``message`` with a wrong checksum."""
    frame_id = reference_db().get_message_by_name(message).frame_id
    return next(f.timestamp for f in frames if f.arbitration_id == frame_id
                and bytes(f.data)[7] != crc8_j1850(bytes(f.data), 7, frame_id))


def first_repeated_counter(frames: list[can.Message], message: str) -> float:
    """Timestamp of the first frame of ``message`` repeating its predecessor's counter."""
    values = decoded(frames, message)
    counter = f"{message}_Counter"
    return next(ts for (_, a), (ts, b) in itertools.pairwise(values)
                if a[counter] == b[counter])
