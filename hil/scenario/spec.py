"""Scenario files: what the simulated car does, and what must come out over MQTT.

A scenario is a TOML file (format in docs/hil.md):

- ``[scenario]``: ``name``, ``description``, ``duration_s`` (the longest it may run),
  ``gnss`` (drive the gateway's serial receiver from the simulator), ``allow_alerts``
  (alert keys that may come out besides the expected ones);
- ``[vehicle]``: the car at the start (``mode``, ``soc``, ``ambient_c``);
- ``[settings]``: gateway settings merged over the rig's own (same tables as
  ``gateway.toml``), e.g. a short ``[settings.health] interval_s``;
- ``[[step]]``: at ``at`` seconds, ``do`` one action (see :data:`ACTIONS`);
- ``[[expect]]`` / ``[[forbid]]``: a message that must (must not) come out between
  ``not_before`` and ``by`` seconds: an ``alert`` key, an ``event`` type, a ``command``
  result, or any ``topic`` with ``where`` conditions on its payload.

Times count from the moment the gateway is online and publishing. Every problem is one
:class:`ConfigError` naming the file, line and key, like the gateway's own settings.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.client import topic_matches_sub

from gateway.commands.keys import COMMANDS
from gateway.config.errors import ConfigError
from gateway.config.toml_table import Table, read_toml

MODES = ("drive", "charge", "park")
NODES = ("BMS", "MCU", "BCM", "OBC")
GNSS_STATES = ("ok", "no_fix", "silent", "noise")
ALERT_TRANSITIONS = ("raised", "updated", "cleared")
OPERATORS = ("==", "!=", ">=", "<=", ">", "<", "match", "present")

# Per action: required keys, optional keys with their defaults.
ACTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "mode": (("mode",), {}),
    "set_signal": (("message", "signal", "value"), {}),
    "clear_signals": (("message",), {}),
    "ramp_signal": (("message", "signal", "from", "to", "over_s"), {}),
    "cell_fault": (("cell", "volts"), {}),
    "pack_heating": (("c_per_s",), {}),
    "silence": (("node",), {"on": True}),
    "freeze_counter": (("message",), {"on": True}),
    "bad_checksum": (("message",), {"on": True}),
    "flood": (("rate_hz", "duration_s"), {"ids": [0x7A0, 0x7A1, 0x7A2, 0x7A3]}),
    "ignore_speed_cap": ((), {"on": True}),
    "ignore_body_commands": ((), {"on": True}),
    "gnss": (("state",), {}),
    "command": (("cmd",), {"args": {}}),
}
SETTLE_MARGIN = 5.0
"""A run may end this long before its duration once everything else is settled."""
MAX_FLOOD_HZ = 4000.0
"""A 500 kbit/s bus carries at most about 4,000 frames per second."""


@dataclass(frozen=True)
class Step:
    """One action of the timeline."""

    at: float
    do: str
    args: dict[str, Any]
    line: int | None


@dataclass(frozen=True)
class Condition:
    """``path`` in a payload compared with ``op`` against ``value``."""

    path: str
    op: str
    value: Any

    def holds(self, payload: dict[str, Any]) -> bool:
        """True when the payload satisfies this condition."""
        found, actual = lookup(payload, self.path)
        if self.op == "present":
            return found == bool(self.value)
        if not found:
            return False
        return compare(self.op, actual, self.value)

    def __str__(self) -> str:
        return f"{self.path} {self.op} {self.value!r}"


@dataclass(frozen=True)
class Expectation:
    """A message that must (or, in ``[[forbid]]``, must not) come out."""

    text: str
    """How the report names it, e.g. ``alert battery.cell_overvoltage raised critical``."""
    topic: str
    """Topic below ``evgw/v1/{vehicle}/``; ``+`` matches one level."""
    where: tuple[Condition, ...]
    not_before: float | None
    by: float | None
    line: int | None
    subject: int = 0
    """How many of the leading conditions name what is expected (the alert key and
    transition, the event type, the command); the rest are its ``where`` details."""

    def matches(self, topic: str, payload: dict[str, Any]) -> bool:
        """True when a message on ``topic`` with ``payload`` is the one described."""
        return topic_matches(self.topic, topic) and all(c.holds(payload) for c in self.where)

    def in_window(self, t: float) -> bool:
        """True when scenario time ``t`` falls between ``not_before`` and ``by``."""
        return (self.not_before is None or t >= self.not_before) and \
            (self.by is None or t <= self.by)


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario file."""

    name: str
    file: Path
    description: str
    duration_s: float
    mode: str
    soc: float
    ambient_c: float
    gnss: bool
    settings: dict[str, Any]
    steps: tuple[Step, ...]
    expect: tuple[Expectation, ...]
    forbid: tuple[Expectation, ...]
    allow_alerts: tuple[str, ...] = field(default=())

    @property
    def vehicle_id(self) -> str:
        """The simulated car's id: one per scenario, so retained messages never mix."""
        return f"hil-{self.name}"

    @property
    def quiet_until(self) -> float:
        """Before this, a run may not end early: its timeline is not over, or a
        ``[[forbid]]`` window is still open (a forbid without ``by`` runs to the end)."""
        ends = [self.last_step_end]
        ends += [self.duration_s - SETTLE_MARGIN if f.by is None else f.by for f in self.forbid]
        return max(ends)

    @property
    def last_step_end(self) -> float:
        """When the timeline's last action is over (a flood lasts its duration)."""
        ends = [s.at + float(s.args.get("duration_s", 0.0)) for s in self.steps]
        return max(ends, default=0.0)


def lookup(payload: Any, path: str) -> tuple[bool, Any]:
    """The value at a dotted ``path``; a key may itself contain dots (VSS names), so the
    longest key that matches wins at each level."""
    if path in ("", "."):
        return True, payload
    node = payload
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if not isinstance(node, dict):
            return False, None
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            return False, None
    return True, node


def compare(op: str, actual: Any, expected: Any) -> bool:
    """``actual op expected``; strings compare with shell-style wildcards under ``match``
    and ``==``, numbers numerically; a type mismatch is simply false."""
    if op in ("==", "!="):
        if isinstance(expected, str) and isinstance(actual, str):
            same = fnmatch.fnmatchcase(actual, expected)
        elif isinstance(expected, bool) or isinstance(actual, bool):
            same = actual is expected
        else:
            same = actual == expected
        return same if op == "==" else not same
    if op == "match":
        return isinstance(actual, str) and fnmatch.fnmatchcase(actual, str(expected))
    numbers = (int, float)
    if not isinstance(actual, numbers) or isinstance(actual, bool):
        return False
    result: bool = {">=": actual >= expected, "<=": actual <= expected,
                    ">": actual > expected, "<": actual < expected}[op]
    return result


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT subscription matching (``+`` one level, ``#`` the rest), as paho does it."""
    return topic_matches_sub(pattern, topic)


def load_scenario(path: Path) -> Scenario:
    """Parse and check a scenario file."""
    data, source = read_toml(path, "scenario")
    file = str(path)
    root = Table(data, file, source, "")
    root.check_keys(("scenario", "vehicle", "settings", "step", "expect", "forbid"))
    head = _table(root, "scenario")
    head.check_keys(("name", "description", "duration_s", "gnss", "allow_alerts"))
    name = head.req_str("name")
    if not all(c.isalnum() or c in "-_" for c in name):
        head.fail("name", "use letters, digits, '-' and '_' only (it becomes a vehicle id)")
    duration = _positive(head, "duration_s", None)
    vehicle = _table(root, "vehicle", required=False)
    vehicle.check_keys(("mode", "soc", "ambient_c"))
    mode = vehicle.opt_str("mode", "park") or "park"
    if mode not in MODES:
        vehicle.fail("mode", f"expected one of {', '.join(MODES)}")
    soc = vehicle.opt_float("soc", 80.0) or 0.0
    if not 0.0 <= soc <= 100.0:
        vehicle.fail("soc", "expected 0 to 100")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        root.fail("settings", "expected a table of gateway settings")
    steps = tuple(sorted((_step(Table(s, file, source, "step", i)) for i, s in
                          enumerate(_array(root, "step"))), key=lambda s: s.at))
    for s in steps:
        if s.at > duration:
            raise ConfigError(file, f"at {s.at:g} s is after duration_s", line=s.line,
                              key="step.at")
    expect = tuple(_expectation(Table(e, file, source, "expect", i), duration)
                   for i, e in enumerate(_array(root, "expect")))
    forbid = tuple(_expectation(Table(e, file, source, "forbid", i), duration)
                   for i, e in enumerate(_array(root, "forbid")))
    if not expect:
        root.fail(None, "a scenario needs at least one [[expect]]: what must come out")
    return Scenario(
        name=name, file=path, description=head.opt_str("description", "") or "",
        duration_s=duration, mode=mode, soc=soc,
        ambient_c=vehicle.opt_float("ambient_c", 22.0) or 0.0,
        gnss=head.opt_bool("gnss", False), settings=settings, steps=steps, expect=expect,
        forbid=forbid, allow_alerts=tuple(head.str_list("allow_alerts")))


def _table(root: Table, key: str, *, required: bool = True) -> Table:
    sub = root.sub(key, key, key)
    if sub is None:
        if required:
            root.fail(key, f"missing [{key}] table")
        return Table({}, root.file, root.source, key)
    return sub


def _array(root: Table, key: str) -> list[dict[str, Any]]:
    value = root.data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        root.fail(key, f"expected [[{key}]] tables")
    return value


def _positive(t: Table, key: str, default: float | None) -> float:
    value = t.opt_float(key, default)
    if value is None:
        t.fail(key, "missing; expected a number of seconds")
    if value <= 0:
        t.fail(key, f"expected a number > 0, got {value:g}")
    return value


def _step(t: Table) -> Step:
    do = t.req_str("do")
    if do not in ACTIONS:
        t.fail("do", f"unknown action; expected one of: {', '.join(sorted(ACTIONS))}")
    required, optional = ACTIONS[do]
    t.check_keys(("at", "do", *required, *optional))
    at = t.opt_float("at", None)
    if at is None or at < 0:
        t.fail("at", "expected the time of the action, seconds >= 0")
    for key in required:
        if key not in t.data:
            t.fail(key, f"missing; '{do}' needs {', '.join(required)}")
    args = {**optional, **{k: v for k, v in t.data.items() if k not in ("at", "do")}}
    _check_args(t, do, args)
    return Step(at, do, args, t.line)


def _check_args(t: Table, do: str, args: dict[str, Any]) -> None:
    choices = {"mode": ("mode", MODES), "silence": ("node", NODES),
               "gnss": ("state", GNSS_STATES), "command": ("cmd", COMMANDS)}
    if do in choices:
        key, allowed = choices[do]
        if args[key] not in allowed:
            t.fail(key, f"expected one of {', '.join(allowed)}")
    for key in ("value", "from", "to", "over_s", "volts", "c_per_s", "rate_hz",
                "duration_s", "cell"):
        if key in args and (isinstance(args[key], bool)
                            or not isinstance(args[key], int | float)):
            t.fail(key, f"expected a number, got {args[key]!r}")
    for key in ("over_s", "duration_s", "rate_hz", "cell"):
        if key in args and args[key] <= 0:
            t.fail(key, "expected a number > 0")
    if do == "flood" and args["rate_hz"] > MAX_FLOOD_HZ:
        t.fail("rate_hz", f"a CAN bus carries at most {MAX_FLOOD_HZ:g} frames/s")
    if "on" in args and not isinstance(args["on"], bool):
        t.fail("on", "expected true or false")
    if "args" in args and not isinstance(args["args"], dict):
        t.fail("args", "expected an inline table of command arguments")
    ids = args.get("ids", [0])
    if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 29 for i in ids):
        t.fail("ids", "expected a list of CAN identifiers")


def _expectation(t: Table, duration: float) -> Expectation:
    kinds = [k for k in ("alert", "event", "command", "topic") if k in t.data]
    if len(kinds) != 1:
        t.fail(None, "give exactly one of alert, event, command or topic")
    kind = kinds[0]
    extra = {"alert": ("transition", "severity"), "command": ("status", "reason"),
             "event": (), "topic": ()}[kind]
    t.check_keys((kind, *extra, "where", "not_before", "by"))
    subject = t.req_str(kind)
    where = _conditions(t)
    if kind == "alert":
        transition = t.opt_str("transition", "raised") or "raised"
        if transition not in ALERT_TRANSITIONS:
            t.fail("transition", f"expected one of {', '.join(ALERT_TRANSITIONS)}")
        conds = [Condition("transition", "==", transition),
                 Condition("alert.key", "==", subject)]
        severity = t.opt_str("severity")
        if severity is not None:
            conds.append(Condition("alert.severity", "==", severity))
        topic, text = "alerts", f"alert {subject} {transition}" + \
            (f" {severity}" if severity else "")
    elif kind == "event":
        conds, topic, text = [Condition("type", "==", subject)], "events", f"event {subject}"
    elif kind == "command":
        status = t.opt_str("status", "succeeded") or "succeeded"
        conds = [Condition("cmd", "==", subject), Condition("status", "==", status)]
        reason = t.opt_str("reason")
        if reason is not None:
            conds.append(Condition("reason", "==", reason))
        topic, text = "cmd/res/+", f"command {subject} {status}" + \
            (f" ({reason})" if reason else "")
    else:
        conds, topic, text = [], subject, f"{subject} message"
    if where:
        text += " where " + ", ".join(str(c) for c in where)
    not_before = t.opt_float("not_before", None)
    by = t.opt_float("by", None)
    if by is not None and by > duration:
        t.fail("by", f"after duration_s ({duration:g} s): it could never be checked")
    if not_before is not None and not_before > duration:
        t.fail("not_before", f"after duration_s ({duration:g} s): it could never be met")
    if not_before is not None and by is not None and by < not_before:
        t.fail("by", "earlier than not_before")
    leading = {"alert": 2, "event": 1, "command": 1, "topic": 0}[kind]
    return Expectation(text, topic, (*conds, *where), not_before, by, t.line, leading)


def _conditions(t: Table) -> tuple[Condition, ...]:
    where = t.data.get("where", {})
    if not isinstance(where, dict):
        t.fail("where", "expected an inline table of path = value or path = { op = value }")
    out = []
    for path, spec in where.items():
        if isinstance(spec, dict):
            for op, value in spec.items():
                if op not in OPERATORS:
                    t.fail("where", f"{path}: unknown operator {op!r}; expected one of "
                                    f"{', '.join(OPERATORS)}")
                if op in (">=", "<=", ">", "<") and (
                        isinstance(value, bool) or not isinstance(value, int | float)):
                    t.fail("where", f"{path}: {op} needs a number")
                out.append(Condition(path, op, value))
        else:
            out.append(Condition(path, "==", spec))
    return tuple(out)
