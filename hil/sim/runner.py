"""Running the simulated vehicle against a real python-can bus, in real time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

import can

from gateway.can import BusOptions, open_bus
from gateway.clock import Clock
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel

log = logging.getLogger("hil.sim")

STALL_S = 0.03
"""Waking this much later than due counts as a stall of the car: every message is late by
as much, and the fastest ones (20 ms cycle, 60 ms staleness window) come close to looking
silent to the gateway. A real ECU never stalls; a simulated one on a busy host can."""
MAX_STALLS = 1000
TX_QUEUE = 500
"""Frames the car holds while the bus refuses them (ENOBUFS when vcan's softirq falls
behind): about two seconds of its traffic. Beyond that the oldest is dropped and counted."""
MAX_CATCH_UP_S = 0.25
"""A longer stall is caught up only this far; for the rest the car freezes with the host
(no frames, no physics). Living through seconds it could not hear the gateway in would
let its controllers' timeouts fire (the MCU drops a speed cap after 0.5 s without
GW_SpeedLimit), and the car would speed past a cap that the gateway never stopped
sending. Kept below that timeout."""


@dataclass(frozen=True)
class Stall:
    """The simulated car sent nothing for ``length`` seconds, until ``end`` (monotonic)."""

    end: float
    length: float

    @property
    def start(self) -> float:
        """When the car last ran on time."""
        return self.end - self.length


async def run_vehicle(
    bus: can.BusABC,
    ecus: VehicleEcus,
    clock: Clock,
    stop: asyncio.Event,
    step: float = 0.005,
    stalls: list[Stall] | None = None,
) -> int:
    """Step the model, send due frames, apply what the gateway sends; until ``stop``.

    Frames are stamped with wall-clock time when sent, as a kernel would. With
    ``stalls``, each time the car woke :data:`STALL_S` or more late is appended to it
    (at most :data:`MAX_STALLS`), so a rig can tell a gateway's fault from its own. A
    stall is caught up (the missed frames sent in due order) for at most
    :data:`MAX_CATCH_UP_S`; beyond that the car froze with the host.
    Returns the number of frames sent.
    """
    model: VehicleModel = ecus.model
    start = clock.monotonic()
    sim_t = 0.0
    tx = _TxQueue(bus, clock, stalls)
    while not stop.is_set():
        now = clock.monotonic()
        target = now - start
        # sim_t is where the last pass left off: one step ago if the car ran on time.
        late = target - sim_t - step
        if stalls is not None and late >= STALL_S and len(stalls) < MAX_STALLS:
            stalls.append(Stall(now, late + step))
        if late > MAX_CATCH_UP_S:
            start += late - MAX_CATCH_UP_S
            target = now - start
        while sim_t < target:
            model.step(step)
            sim_t += step
            # Per step, so that after a stall (a loaded machine) the catch-up burst goes out
            # in the order the ECUs would have sent it: one message's backlog first, then the
            # next, would look to the gateway like a node that fell silent.
            tx.send(ecus.due_frames(sim_t))
        tx.retry()
        inbound = []
        while (msg := bus.recv(timeout=0)) is not None:
            inbound.append(msg)
        ecus.receive(inbound)
        await clock.sleep(step)
    return tx.sent


class _TxQueue:
    """The car's transmit queue: a frame the bus refuses waits and goes out in order on
    the next pass, as a CAN controller retries, instead of being lost. The time the queue
    stayed blocked is a stall of the car: its frames were late on the bus."""

    def __init__(self, bus: can.BusABC, clock: Clock, stalls: list[Stall] | None) -> None:
        self._bus = bus
        self._clock = clock
        self._stalls = stalls
        self._waiting: deque[can.Message] = deque()
        self._blocked_since: float | None = None
        self.sent = 0
        self.dropped = 0
        """Frames dropped (oldest first) because more than TX_QUEUE were waiting."""

    def send(self, frames: list[can.Message]) -> None:
        """Queue ``frames`` behind any waiting ones and send what the bus takes."""
        self._waiting.extend(frames)
        while len(self._waiting) > TX_QUEUE:
            self._waiting.popleft()
            self.dropped += 1
        self.retry()

    def retry(self) -> None:
        """Send waiting frames until the bus refuses one or none are left."""
        while self._waiting:
            frame = self._waiting[0]
            frame.timestamp = self._clock.time()
            try:
                self._bus.send(frame)
            except can.CanError as exc:
                if self._blocked_since is None:
                    self._blocked_since = self._clock.monotonic()
                    log.debug("bus refused a frame, holding it: %s", exc)
                return
            self._waiting.popleft()
            self.sent += 1
        if self._blocked_since is not None:
            now = self._clock.monotonic()
            blocked = now - self._blocked_since
            self._blocked_since = None
            if self._stalls is not None and blocked >= STALL_S and \
                    len(self._stalls) < MAX_STALLS:
                self._stalls.append(Stall(now, blocked))


def open_sim_bus(interface: str, channel: str) -> can.BusABC:
    """The simulator's side of the bus, opened as the gateway opens its own."""
    return open_bus(BusOptions("sim", interface, channel))


def close_quietly(bus: can.BusABC) -> None:
    """Shut a bus down, ignoring errors from a bus that is already gone."""
    with contextlib.suppress(Exception):
        bus.shutdown()
