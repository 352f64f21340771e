"""The simulated car in real time on a CAN bus, with a scenario's actions applied to it.

:class:`LiveVehicle` runs the model and its ECUs on a python-can bus (and, with a
pseudo-terminal, the GNSS receiver), and carries out timeline steps: mode changes,
signal overrides and ramps, pack faults, silenced nodes, frozen counters, bad
checksums, floods of unknown identifiers, controllers that ignore the gateway, and
receiver faults. Remote commands are not the car's business: the rig sends those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tty
from collections.abc import Awaitable, Callable
from typing import Any

import can

from gateway.clock import Clock, SystemClock
from gateway.config.errors import ConfigError
from hil.scenario.spec import Scenario, Step
from hil.sim import faults
from hil.sim.ecus import VehicleEcus
from hil.sim.gnss import NmeaSimulator, run_receiver
from hil.sim.model import CELLS, VehicleModel
from hil.sim.runner import Stall, close_quietly, open_sim_bus, run_vehicle

log = logging.getLogger("hil.scenario")

RAMP_EVERY_S = 0.1
FLOOD_TICK_S = 0.01
ALL_BAD = 10**9
"""Sentences to corrupt for a receiver that sends only garbage: more than any run lasts."""


class LiveVehicle:
    """The reference car on ``bus``, its receiver on the pty master ``gnss_fd`` if given."""

    def __init__(self, bus: can.BusABC, model: VehicleModel, clock: Clock,
                 gnss_fd: int | None = None) -> None:
        self.bus = bus
        self.model = model
        self.clock = clock
        self.ecus = VehicleEcus(model)
        self.nmea = NmeaSimulator(model) if gnss_fd is not None else None
        self._gnss_fd = gnss_fd
        self.flooded = 0
        """Frames of unknown identifiers sent by ``flood`` steps."""
        self.stalls: list[Stall] = []
        """Times the car itself fell behind its schedule (a busy host), monotonic."""
        self._tasks: list[asyncio.Task[Any]] = []

    def check(self, scenario: Scenario) -> None:
        """Fail with the step's line when it names a message, signal or cell the car lacks."""
        for step in scenario.steps:
            self._check_step(scenario, step)

    def _check_step(self, scenario: Scenario, step: Step) -> None:
        def fail(message: str) -> None:
            raise ConfigError(str(scenario.file), message, line=step.line, key="step")

        name = step.args.get("message")
        if name is not None:
            try:
                msg = self.ecus.db.get_message_by_name(name)
            except KeyError:
                fail(f"the simulated car sends no message {name!r}")
            else:
                signal = step.args.get("signal")
                if signal is not None and signal not in (s.name for s in msg.signals):
                    fail(f"{name} has no signal {signal!r}")
        if step.do == "cell_fault" and not 1 <= step.args["cell"] <= CELLS:
            fail(f"cell must be 1 to {CELLS}")
        if step.do == "gnss" and self.nmea is None:
            fail("a gnss step needs gnss = true in [scenario]")
        if step.do == "flood":
            known = {m.frame_id for m in self.ecus.db.messages}
            clash = [i for i in step.args["ids"] if i in known]
            if clash:
                fail(f"flood ids {', '.join(hex(i) for i in clash)} belong to the car's DBC; "
                     "a flood is of unknown identifiers")

    async def run(self, stop: asyncio.Event) -> int:
        """Send the car's traffic until ``stop``; returns the frames sent (floods excluded)."""
        receiver = None
        if self.nmea is not None and self._gnss_fd is not None:
            receiver = asyncio.create_task(
                run_receiver(self._gnss_fd, self.nmea, self.clock, stop), name="hil-gnss")
        try:
            return await run_vehicle(self.bus, self.ecus, self.clock, stop,
                                     stalls=self.stalls)
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if receiver is not None:
                await receiver

    def apply(self, step: Step) -> None:
        """Carry out ``step`` now (``command`` steps are the rig's, not the car's)."""
        a, ecus, model = step.args, self.ecus, self.model
        actions: dict[str, Callable[[], object]] = {
            "mode": lambda: setattr(model, "mode", a["mode"]),
            "set_signal": lambda: faults.set_signal(a["message"], a["signal"], a["value"])(ecus),
            "clear_signals": lambda: faults.clear_overrides(a["message"])(ecus),
            "ramp_signal": lambda: self._spawn(self._ramp(a)),
            "cell_fault": lambda: model.cell_fault_v.__setitem__(int(a["cell"]), a["volts"]),
            "pack_heating": lambda: setattr(model, "heat_c_per_s", float(a["c_per_s"])),
            "silence": lambda: faults.silence(a["node"], a["on"])(ecus),
            "freeze_counter": lambda: faults.freeze_counter(a["message"], a["on"])(ecus),
            "bad_checksum": lambda: faults.corrupt_checksum(a["message"], a["on"])(ecus),
            "flood": lambda: self._spawn(self._flood(a["ids"], a["rate_hz"], a["duration_s"])),
            "ignore_speed_cap": lambda: setattr(ecus, "ignore_speed_cap", a["on"]),
            "ignore_body_commands": lambda: setattr(ecus, "ignore_body_commands", a["on"]),
            "gnss": lambda: self._gnss(a["state"]),
        }
        actions[step.do]()

    def _spawn(self, work: Awaitable[None]) -> None:
        self._tasks.append(asyncio.ensure_future(work))

    async def _ramp(self, a: dict[str, Any]) -> None:
        # The offline simulator's ramp, played in real time from now.
        start = self.clock.monotonic()
        for event in faults.ramp(a["message"], a["signal"], 0.0, float(a["over_s"]),
                                 float(a["from"]), float(a["to"]), RAMP_EVERY_S):
            await self.clock.sleep(start + event.at - self.clock.monotonic())
            event.action(self.ecus)

    async def _flood(self, ids: list[int], rate_hz: float, duration_s: float) -> None:
        # Exactly rate x duration frames, paced in small batches: the point is a bus busy
        # with foreign traffic at a stated rate, and a count the gateway must match.
        total = round(rate_hz * duration_s)
        start = self.clock.monotonic()
        n = 0
        while n < total:
            due = min(total, int((self.clock.monotonic() - start) * rate_hz) + 1)
            while n < due:
                ident = ids[n % len(ids)]
                frame = can.Message(arbitration_id=ident, is_extended_id=ident > 0x7FF,
                                    data=n.to_bytes(8, "little"))
                try:
                    self.bus.send(frame)
                except can.CanError as exc:
                    # A full transmit queue: a CAN controller retries, so try it again on
                    # the next tick rather than drop it.
                    log.debug("flood frame deferred: %s", exc)
                    break
                self.flooded += 1
                n += 1
            await self.clock.sleep(FLOOD_TICK_S)

    def _gnss(self, state: str) -> None:
        nmea = self.nmea
        if nmea is None:  # pragma: no cover - check() refuses gnss steps without a receiver
            return
        self.model.gnss_fix = state != "no_fix"
        nmea.silent = state == "silent"
        nmea.corrupt_checksums = ALL_BAD if state == "noise" else 0


async def play_scenario(scenario: Scenario, interface: str, channel: str,
                        duration_s: float | None = None, clock: Clock | None = None) -> int:
    """The car and timeline of ``scenario`` on a bus, for a gateway run by hand (a Pi on
    can0, a laptop on vcan0). Commands are printed, not sent: they need the rig's key."""
    clock = clock or SystemClock()
    master = slave = None
    if scenario.gnss:
        master, slave = os.openpty()
        tty.setraw(slave)
        print(f"hil sim: GNSS receiver on {os.ttyname(slave)} "
              f"(ev-gateway run --gnss {os.ttyname(slave)}@115200)", file=sys.stderr)
    bus = open_sim_bus(interface, channel)
    car = LiveVehicle(bus, VehicleModel(mode=scenario.mode, soc=scenario.soc,
                                        ambient_c=scenario.ambient_c), clock, master)
    stop = asyncio.Event()
    end = duration_s if duration_s is not None else scenario.duration_s
    task: asyncio.Task[int] | None = None
    try:
        car.check(scenario)
        task = asyncio.create_task(car.run(stop))
        start = clock.monotonic()
        for step in scenario.steps:
            if step.at > end:
                break
            await clock.sleep(max(0.0, start + step.at - clock.monotonic()))
            if step.do == "command":
                print(f"hil sim: {step.at:g} s: send it yourself: ev-gateway command "
                      f"{step.args['cmd']} ...", file=sys.stderr)
                continue
            car.apply(step)
            print(f"hil sim: {step.at:g} s: {step.do} {step.args}", file=sys.stderr)
        await clock.sleep(max(0.0, start + end - clock.monotonic()))
    finally:
        stop.set()
        if task is not None:
            await task
        close_quietly(bus)
        for fd in (master, slave):
            if fd is not None:
                os.close(fd)
    return 0
