"""Running the simulated vehicle against a real python-can bus, in real time."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import can

from gateway.can import BusOptions, open_bus
from gateway.clock import Clock
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel

log = logging.getLogger("hil.sim")


async def run_vehicle(
    bus: can.BusABC,
    ecus: VehicleEcus,
    clock: Clock,
    stop: asyncio.Event,
    step: float = 0.005,
) -> int:
    """Step the model, send due frames, apply what the gateway sends; until ``stop``.

    Frames are stamped with wall-clock time when sent, as a kernel would.
    Returns the number of frames sent.
    """
    model: VehicleModel = ecus.model
    start = clock.monotonic()
    sim_t = 0.0
    sent = 0
    while not stop.is_set():
        target = clock.monotonic() - start
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
