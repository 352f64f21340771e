"""Fault injection over simulated time.

:class:`Simulation` steps a :class:`VehicleModel` and its :class:`VehicleEcus`
exactly as :func:`hil.sim.ecus.generate` does, but in pieces: a caller can
take the frames of the next few milliseconds, hand the ECUs what the gateway
sent in reply, and go on (a closed loop without a bus or real time). Faults
are :class:`Event` s: an action on the ECUs at a simulated time, applied
before the frames of that step are built, so every frame stamped at or after
the event's time carries the fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import can

from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel

Action = Callable[[VehicleEcus], None]


@dataclass(frozen=True)
class Event:
    """``action`` applied to the ECUs once the simulation reaches ``at`` seconds."""

    at: float
    action: Action


class Simulation:
    """A model and its ECUs advanced on demand, with scheduled fault events."""

    def __init__(self, model: VehicleModel, events: Iterable[Event] = (), *,
                 step: float = 0.005, start: float = 0.0,
                 ecus: VehicleEcus | None = None) -> None:
        self.model = model
        self.ecus = ecus if ecus is not None else VehicleEcus(model)
        self.step = step
        self.start = start
        self.t = 0.0
        """Simulated seconds since the start (frame timestamps are ``start + t``)."""
        self._events = sorted(events, key=lambda e: e.at)

    def schedule(self, event: Event) -> None:
        """Add ``event``; one whose time has passed applies at the next step."""
        self._events.append(event)
        self._events.sort(key=lambda e: e.at)

    def advance_to(self, t_end: float) -> list[can.Message]:
        """Step until ``t`` reaches ``t_end``; the frames that fell due, stamped."""
        frames: list[can.Message] = []
        while self.t < t_end:
            self.model.step(self.step)
            self.t += self.step
            while self._events and self._events[0].at <= self.t:
                self._events.pop(0).action(self.ecus)
            for f in self.ecus.due_frames(self.t):
                f.timestamp += self.start
                frames.append(f)
        return frames

    def advance(self, seconds: float) -> list[can.Message]:
        """The frames of the next ``seconds``."""
        return self.advance_to(self.t + seconds)


def run(model: VehicleModel, seconds: float, events: Iterable[Event] = (), *,
        step: float = 0.005, start: float = 0.0) -> list[can.Message]:
    """Like :func:`hil.sim.ecus.generate`, with ``events`` applied on the way."""
    return Simulation(model, events, step=step, start=start).advance_to(seconds)


# ---- actions --------------------------------------------------------------------------


def set_signal(message: str, signal: str, value: float) -> Action:
    """Override one signal of ``message`` (other overrides of the message stay)."""
    def act(ecus: VehicleEcus) -> None:
        ecus.overrides.setdefault(message, {})[signal] = value
    return act


def clear_overrides(message: str) -> Action:
    """Let ``message`` carry the model's values again."""
    def act(ecus: VehicleEcus) -> None:
        ecus.overrides.pop(message, None)
    return act


def silence(node: str, on: bool = True) -> Action:
    """Stop (or restart) every message ``node`` sends."""
    def act(ecus: VehicleEcus) -> None:
        if on:
            ecus.silenced.add(node)
        else:
            ecus.silenced.discard(node)
    return act


def freeze_counter(message: str, on: bool = True) -> Action:
    """Stop (or restart) the rolling counter of ``message``."""
    def act(ecus: VehicleEcus) -> None:
        if on:
            ecus.frozen_counter.add(message)
        else:
            ecus.frozen_counter.discard(message)
    return act


def corrupt_checksum(message: str, on: bool = True) -> Action:
    """Send (or stop sending) ``message`` with a wrong checksum byte."""
    def act(ecus: VehicleEcus) -> None:
        if on:
            ecus.bad_checksum.add(message)
        else:
            ecus.bad_checksum.discard(message)
    return act


def ramp(message: str, signal: str, t0: float, t1: float, v0: float, v1: float,
         every: float = 0.1) -> list[Event]:
    """Override ``signal`` with a straight line from ``v0`` at ``t0`` to ``v1`` at ``t1``,
    updated every ``every`` seconds; it holds ``v1`` afterwards."""
    if t1 <= t0 or every <= 0:
        raise ValueError("a ramp needs t1 > t0 and every > 0")
    steps = max(1, round((t1 - t0) / every))
    return [Event(t0 + (t1 - t0) * k / steps,
                  set_signal(message, signal, v0 + (v1 - v0) * k / steps))
            for k in range(steps + 1)]
