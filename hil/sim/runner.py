"""Running the simulated vehicle against a real python-can bus, in real time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    (at most :data:`MAX_STALLS`), so a rig can tell a gateway's fault from its own.
    Returns the number of frames sent.
    """
    model: VehicleModel = ecus.model
    start = clock.monotonic()
    sim_t = 0.0
    sent = 0
    while not stop.is_set():
        now = clock.monotonic()
        target = now - start
        # sim_t is where the last pass left off: one step ago if the car ran on time.
        late = target - sim_t - step
        if stalls is not None and late >= STALL_S and len(stalls) < MAX_STALLS:
            stalls.append(Stall(now, late + step))
        while sim_t < target:
            model.step(step)
            sim_t += step
            # Per step, so that after a stall (a loaded machine) the catch-up burst goes out
            # in the order the ECUs would have sent it: one message's backlog first, then the
            # next, would look to the gateway like a node that fell silent.
            for frame in ecus.due_frames(sim_t):
                frame.timestamp = clock.time()
                try:
                    bus.send(frame)
                    sent += 1
                except can.CanError as exc:  # a full TX queue on vcan: drop, as an ECU would
                    log.debug("send failed: %s", exc)
        inbound = []
        while (msg := bus.recv(timeout=0)) is not None:
            inbound.append(msg)
        ecus.receive(inbound)
        await clock.sleep(step)
    return sent


def open_sim_bus(interface: str, channel: str) -> can.BusABC:
    """The simulator's side of the bus, opened as the gateway opens its own."""
    return open_bus(BusOptions("sim", interface, channel))


def close_quietly(bus: can.BusABC) -> None:
    """Shut a bus down, ignoring errors from a bus that is already gone."""
    with contextlib.suppress(Exception):
        bus.shutdown()
