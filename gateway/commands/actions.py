"""The commands a vehicle profile can carry out, built and checked against its DBCs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.commands.outcome import Action, Confirmations, Outcome, bad_arguments, rejected
from gateway.commands.pulse import Pulse
from gateway.commands.setpoint import Setpoint, SpeedProfile
from gateway.config.commands import PulseSpec, SetpointSpec
from gateway.config.errors import ConfigError
from gateway.config.profile import Profile
from gateway.safety import SafetyMonitor, SpeedCap, TransmitGuard
from gateway.state import StateStore


class ResetLatches:
    """``reset-latches``: release latched safety alerts whose condition is gone."""

    def __init__(self, monitor: SafetyMonitor) -> None:
        self._monitor = monitor

    def check(self, args: dict[str, Any]) -> Outcome | None:
        """Refuse anything but an optional alert key."""
        refusal = bad_arguments(args, {"key": "alert key, default all"})
        if refusal is None and not isinstance(args.get("key", ""), str):
            return rejected("bad_arguments", error="key must be a string")
        return refusal

    async def run(self, args: dict[str, Any], interlock: Any) -> Outcome:
        """Reset; the detail lists what was released (a fault still present stays)."""
        del interlock  # releasing a latch sends nothing to the car
        released = self._monitor.reset(args.get("key"))
        return Outcome("succeeded", None, {"released": released})


def build_actions(profile: Profile, guard: TransmitGuard, store: StateStore, clock: Clock,
                  confirmations: Confirmations, monitor: SafetyMonitor,
                  speed_cap: SpeedCap | None, state_dir: Path | None
                  ) -> tuple[dict[str, Action], list[Setpoint]]:
    """Every command ``profile`` supports, and the setpoints to keep on the bus.

    A name the DBCs or the mappings lack, or a message that is not
    allow-listed, is a ConfigError at start-up, not a failed command later.
    """
    spec = profile.commands
    actions: dict[str, Action] = {"reset-latches": ResetLatches(monitor)}
    setpoints: list[Setpoint] = []
    locks: dict[str, asyncio.Lock] = {}
    default_bus = profile.buses[0].name
    buses = {b.name for b in profile.buses}
    placed: list[tuple[str, PulseSpec | SetpointSpec]] = [*spec.pulses.items(),
                                                          *spec.setpoints.items()]
    for name, cmd in placed:
        if cmd.bus is not None and cmd.bus not in buses:
            raise ConfigError(str(profile.file), f"no bus named {cmd.bus!r}; buses: "
                              f"{', '.join(sorted(buses))}", line=cmd.line,
                              key=f"commands.{name}.bus")
    for name, pulse in spec.pulses.items():
        bus = pulse.bus or default_bus
        lock = locks.setdefault(f"{bus}/{pulse.message}", asyncio.Lock())
        actions[name] = _built(profile, name, pulse.line, lambda p=pulse, b=bus, lk=lock: Pulse(
            p, guard, b, store, clock, confirmations, lk))
    for name, sp in spec.setpoints.items():
        state_file = state_dir / f"{name.replace('-', '_')}.json" if state_dir else None
        setpoint = _built(profile, name, sp.line, lambda s=sp, f=state_file: Setpoint(
            s, guard, s.bus or default_bus, store, clock, confirmations, f))
        actions[name] = setpoint
        setpoints.append(setpoint)
    if speed_cap is not None:
        actions["speed-profile"] = _built(
            profile, "speed-profile", None,
            lambda: SpeedProfile(speed_cap, store, confirmations, spec.speed_profile_timeout_s))
    return actions, setpoints


def _built(profile: Profile, name: str, line: int | None, make: Any) -> Any:
    try:
        return make()
    except KeyError as exc:
        raise ConfigError(str(profile.file), f"add a [[transmit]] entry: {exc.args[0]}",
                          line=line, key=f"commands.{name}.message") from None
    except ValueError as exc:
        raise ConfigError(str(profile.file), str(exc), line=line,
                          key=f"commands.{name}") from None
