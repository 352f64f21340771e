"""The ``[commands.*]`` tables of a vehicle profile: how each remote command reaches the car.

Two kinds, fixed by the command's name:

- **pulse** (``lock``, ``unlock``, ``locate``): one event frame with fixed
  signal values (``signals``, or one set per ``modes`` entry), an optional
  sequence signal the controller echoes on ``ack``, and state the command
  must reach (``confirm``);
- **setpoint** (``charge-limit``): a value the gateway keeps sending at the
  message's cycle, confirmed by the controller's ``report``.

``speed-profile`` uses ``[safety.speed_cap]``; ``[commands.speed-profile]``
may only set its ``timeout_s``. Names of messages, signals and state paths
are checked against the DBCs and the mappings when the commands stage is
built. See docs/commands.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.errors import ConfigError
from gateway.config.toml_table import Table

PULSES = ("lock", "unlock", "locate")
SETPOINTS = ("charge-limit",)
CONFIGURABLE = (*PULSES, *SETPOINTS, "speed-profile")
Scalar = bool | float | str


@dataclass(frozen=True)
class PulseSpec:
    """An event command: one frame, acknowledged and confirmed by the controller's status."""

    name: str
    message: str
    signals: dict[str, float]
    modes: dict[str, dict[str, float]]
    """For commands with a ``mode`` argument: the signal values of each mode."""
    default_mode: str | None
    sequence: str | None
    ack: str | None
    confirm: dict[str, Scalar]
    timeout_s: float
    bus: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class SetpointSpec:
    """A value kept on the bus by a cyclic frame, confirmed by a reported value."""

    name: str
    message: str
    signal: str
    fixed: dict[str, float]
    report: str
    minimum: float
    maximum: float
    timeout_s: float
    bus: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class CommandsSpec:
    """Every command the profile can carry out."""

    pulses: dict[str, PulseSpec]
    setpoints: dict[str, SetpointSpec]
    speed_profile_timeout_s: float = 2.0


def parse_commands(top: Table) -> CommandsSpec:
    """The ``[commands]`` table (absent: the car takes no remote commands but reset-latches)."""
    t = top.sub("commands", "commands", "commands")
    if t is None:
        return CommandsSpec({}, {})
    for name in t.data:
        if name not in CONFIGURABLE:
            # Written as [commands.NAME] without a [commands] header: point at that header.
            line = t.source.header_line(f"commands.{name}")
            problem = f"unknown key; expected one of: {', '.join(sorted(CONFIGURABLE))}"
            if line is None:
                t.fail(name, problem)
            raise ConfigError(t.file, problem, line=line, key=f"commands.{name}")
    pulses: dict[str, PulseSpec] = {}
    setpoints: dict[str, SetpointSpec] = {}
    timeout = 2.0
    for name in t.data:
        sub = t.sub(name, f"commands.{name}", f"commands.{name}")
        assert sub is not None
        if name in PULSES:
            pulses[name] = _pulse(name, sub)
        elif name in SETPOINTS:
            setpoints[name] = _setpoint(name, sub)
        else:
            sub.check_keys(["timeout_s"])
            timeout = _timeout(sub, 2.0)
    return CommandsSpec(pulses, setpoints, timeout)


def _pulse(name: str, t: Table) -> PulseSpec:
    t.check_keys(["message", "bus", "signals", "modes", "default_mode", "sequence", "ack",
                  "confirm", "timeout_s"])
    modes: dict[str, dict[str, float]] = {}
    modes_t = t.sub("modes", f"{t.table}.modes", f"{t.label}.modes")
    if modes_t is not None:
        for mode in modes_t.data:
            sub = modes_t.sub(mode, f"{t.table}.modes.{mode}", f"{t.label}.modes.{mode}")
            assert sub is not None
            modes[mode] = _numbers(sub)
    signals = _numbers(t.sub("signals", f"{t.table}.signals", f"{t.label}.signals"))
    if not signals and not modes:
        t.fail("signals", "expected the signal values the command sends (or modes)")
    default_mode = t.opt_str("default_mode")
    if default_mode is not None and default_mode not in modes:
        t.fail("default_mode", f"no mode {default_mode!r}; modes: {', '.join(modes) or 'none'}")
    sequence, ack = t.opt_str("sequence"), t.opt_str("ack")
    if (sequence is None) != (ack is None):
        t.fail("ack" if ack is None else "sequence",
               "sequence and ack go together: the controller echoes the sequence on ack")
    confirm: dict[str, Scalar] = {}
    confirm_t = t.sub("confirm", f"{t.table}.confirm", f"{t.label}.confirm")
    if confirm_t is not None:
        for path, value in confirm_t.data.items():
            if not isinstance(value, bool | int | float | str):
                confirm_t.fail(path, f"expected a state value, got {value!r}")
            confirm[path] = value
    if ack is None and not confirm:
        t.fail("confirm", "without sequence/ack the command needs state to confirm it")
    return PulseSpec(name, t.req_str("message"), signals, modes, default_mode, sequence, ack,
                     confirm, _timeout(t, 0.5), t.opt_str("bus"), t.line)


def _setpoint(name: str, t: Table) -> SetpointSpec:
    t.check_keys(["message", "bus", "signal", "fixed", "report", "min", "max", "timeout_s"])
    minimum = t.opt_float("min", None)
    maximum = t.opt_float("max", None)
    if minimum is None or maximum is None or minimum > maximum:
        t.fail("max" if minimum is not None else "min",
               "expected min and max of the accepted value, min <= max")
    return SetpointSpec(name, t.req_str("message"), t.req_str("signal"),
                        _numbers(t.sub("fixed", f"{t.table}.fixed", f"{t.label}.fixed")),
                        t.req_str("report"), minimum, maximum, _timeout(t, 3.0),
                        t.opt_str("bus"), t.line)


def _numbers(t: Table | None) -> dict[str, float]:
    if t is None:
        return {}
    out = {}
    for key in t.data:
        value = t.opt_float(key, None)
        assert value is not None
        out[key] = value
    return out


def _timeout(t: Table, default: float) -> float:
    value = t.opt_float("timeout_s", default)
    if value is None or not 0 < value <= 60:
        t.fail("timeout_s", f"expected seconds in (0, 60], got {value}")
    return value
