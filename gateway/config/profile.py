"""Vehicle profiles.

A profile says which DBC files describe which CAN bus, and how DBC signals
map onto the gateway's canonical (VSS-style) signals. A new vehicle needs a
DBC and a profile, no code. This module parses and validates the TOML; the
decode stage resolves names against the DBCs and reports mismatches with the
same file:line precision, using the ``line`` each mapping carries.

See docs/profiles.md for the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can

from gateway import checksum
from gateway.config.commands import CommandsSpec, parse_commands
from gateway.config.safety import SafetySpec, TransmitSpec, parse_safety, parse_transmit
from gateway.config.toml_table import SourceMap, Table, read_toml

EnumMap = dict[int, "str | bool | int | float"]

_TRANSFORM_KEYS = (
    "scale", "offset", "source_unit", "unit", "kind", "enum", "special", "sna", "bus",
)
_KINDS = ("number", "bool", "string")
_BUS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class BusSpec:
    """One CAN bus of the vehicle and the DBC files that describe it."""

    name: str
    interface: str
    channel: str
    dbc: tuple[Path, ...]
    bitrate: int | None = None
    fd: bool = False
    data_bitrate: int | None = None
    dbc_encoding: str | None = None
    strict: bool = True
    line: int | None = None


@dataclass(frozen=True)
class MessageSpec:
    """Per-message settings that the DBC does not carry or gets wrong."""

    name: str
    cycle_ms: int | None = None
    stale_cycles: int | None = None
    bus: str | None = None
    line: int | None = None
    counter: str | None = None
    """Signal holding the rolling counter (receive check, and filled in on transmit)."""
    checksum: str | None = None
    """Signal holding the checksum byte."""
    checksum_algorithm: str = "crc8_j1850"
    counter_tolerance: int = 5
    """Leaky bucket: wrong counters push it up by one, right ones drain it by one; the
    message fails while it is full."""
    dlc: int | None = None
    """Expected length in bytes; the DBC's when not set."""


@dataclass(frozen=True)
class SignalMapping:
    """How to turn one DBC signal (or a pattern of them) into canonical signals.

    ``pattern`` is set for a signal group: a regular expression over the
    message's signal names whose first group fills ``{n}`` in ``path``.
    """

    path: str
    message: str
    signal: str | None
    pattern: str | None
    bus: str | None
    scale: float
    offset: float
    source_unit: str | None
    unit: str | None
    kind: str | None
    enum: EnumMap | None
    enum_from_dbc: bool
    special: EnumMap | None
    sna: frozenset[int]
    index_offset: int
    line: int | None
    key_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def line_of(self, key: str) -> int | None:
        """Line of ``key`` in this mapping's table (the table header if the key is absent)."""
        return self.key_lines.get(key, self.line)


@dataclass(frozen=True)
class BatterySpec:
    """The traction pack's rating ([vehicle] capacity_ah and nominal_voltage)."""

    capacity_ah: float
    nominal_voltage: float

    @property
    def energy_wh(self) -> float:
        """Nominal energy in Wh."""
        return self.capacity_ah * self.nominal_voltage


@dataclass(frozen=True)
class Profile:
    """A validated vehicle profile."""

    file: Path
    name: str
    description: str
    chemistry: str | None
    stale_cycles: int
    buses: tuple[BusSpec, ...]
    messages: dict[str, MessageSpec]
    mappings: tuple[SignalMapping, ...]
    source: SourceMap = field(repr=False, compare=False)
    safety: SafetySpec = field(default_factory=SafetySpec)
    transmit: tuple[TransmitSpec, ...] = ()
    commands: CommandsSpec = field(default_factory=lambda: CommandsSpec({}, {}))
    battery: BatterySpec | None = None
    """The pack's rating, for cycle counting, state of health and range; None if unknown."""

    def bus(self, name: str) -> BusSpec:
        """The bus called ``name``."""
        for b in self.buses:
            if b.name == name:
                return b
        raise KeyError(name)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; raise ConfigError naming file, line and key."""
    file = Path(path)
    data, source = read_toml(file, "profile")
    return _parse(file, data, source)


def _parse(file: Path, data: dict[str, Any], source: SourceMap) -> Profile:
    name_ = str(file)
    top = Table(data, name_, source, "", 0, "profile")
    top.check_keys(["vehicle", "defaults", "bus", "messages", "signal", "signal_group",
                    "safety", "transmit", "commands"])

    vehicle = top.sub("vehicle", "vehicle", "vehicle")
    if vehicle is None:
        top.fail("vehicle", "missing [vehicle] table")
    vehicle.check_keys(["name", "description", "chemistry", "capacity_ah", "nominal_voltage"])
    chemistry = vehicle.opt_str("chemistry")
    if chemistry is not None and chemistry not in ("LFP", "NMC", "LTO"):
        vehicle.fail("chemistry", f"expected LFP, NMC or LTO, got {chemistry!r}")

    stale_cycles = 3
    defaults = top.sub("defaults", "defaults", "defaults")
    if defaults is not None:
        defaults.check_keys(["stale_cycles", "checksum_algorithm", "counter_tolerance"])
        stale_cycles = defaults.opt_int("stale_cycles", 3, minimum=1) or 3

    buses = _parse_buses(file, _array(top, "bus", required=True))
    bus_names = {b.name for b in buses}
    messages = _parse_messages(top, bus_names, defaults)
    mappings = [
        _parse_mapping(t, bus_names, group=False) for t in _array(top, "signal", required=False)
    ]
    mappings += [
        _parse_mapping(t, bus_names, group=True)
        for t in _array(top, "signal_group", required=False)
    ]
    if not mappings:
        top.fail("signal", "the profile maps no signals; add [[signal]] or [[signal_group]]")
    return Profile(
        file=file,
        name=vehicle.req_str("name"),
        description=vehicle.opt_str("description", "") or "",
        chemistry=chemistry,
        stale_cycles=stale_cycles,
        buses=tuple(buses),
        messages=messages,
        mappings=tuple(mappings),
        source=source,
        safety=parse_safety(top, chemistry),
        transmit=parse_transmit(_array(top, "transmit", required=False), bus_names),
        commands=parse_commands(top),
        battery=_battery(vehicle),
    )


def _battery(vehicle: Table) -> BatterySpec | None:
    capacity = vehicle.opt_float("capacity_ah", None)
    voltage = vehicle.opt_float("nominal_voltage", None)
    if capacity is None and voltage is None:
        return None
    for key, value in (("capacity_ah", capacity), ("nominal_voltage", voltage)):
        if value is None:
            vehicle.fail(key, "missing; capacity_ah and nominal_voltage go together")
        if not 0 < value < 100_000:
            vehicle.fail(key, f"expected a number > 0, got {value:g}")
    assert capacity is not None and voltage is not None
    return BatterySpec(capacity, voltage)


def _array(top: Table, key: str, required: bool) -> list[Table]:
    value = top.data.get(key)
    if value is None:
        if required:
            top.fail(key, f"missing; expected at least one [[{key}]] table")
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        top.fail(key, f"expected an array of tables ([[{key}]])")
    return [
        Table(v, top.file, top.source, key, i, f"{key}[{i}]") for i, v in enumerate(value)
    ]


def _parse_buses(file: Path, tables: list[Table]) -> list[BusSpec]:
    buses: list[BusSpec] = []
    for t in tables:
        t.check_keys(
            ["name", "interface", "channel", "bitrate", "fd", "data_bitrate", "dbc",
             "dbc_encoding", "strict"]
        )
        name = t.req_str("name")
        if not _BUS_NAME.match(name):
            t.fail("name", f"expected letters, digits, '-' or '_', got {name!r}")
        interface = t.req_str("interface")
        if interface not in can.interfaces.VALID_INTERFACES:
            t.fail("interface", f"python-can has no interface {interface!r}")
        if "data_bitrate" in t.data and not t.opt_bool("fd", False):
            t.fail("data_bitrate", "only applies with fd = true")
        if any(b.name == name for b in buses):
            t.fail("name", f"bus {name!r} is defined twice")
        dbc_files = []
        for rel in t.str_list("dbc", required=True):
            p = (file.parent / rel).resolve()
            if not p.is_file():
                t.fail("dbc", f"DBC file not found: {rel} (looked in {p.parent})")
            dbc_files.append(p)
        buses.append(
            BusSpec(
                name=name,
                interface=interface,
                channel=t.req_str("channel"),
                dbc=tuple(dbc_files),
                bitrate=t.opt_int("bitrate", None, minimum=1),
                fd=t.opt_bool("fd", False),
                data_bitrate=t.opt_int("data_bitrate", None, minimum=1),
                dbc_encoding=t.opt_str("dbc_encoding"),
                strict=t.opt_bool("strict", True),
                line=t.line,
            )
        )
    return buses


def _parse_messages(
    top: Table, bus_names: set[str], defaults: Table | None
) -> dict[str, MessageSpec]:
    algorithm = "crc8_j1850"
    tolerance = 5
    if defaults is not None:
        algorithm = _checksum_name(defaults, algorithm)
        tolerance = defaults.opt_int("counter_tolerance", 5, minimum=1) or 5
    raw = top.data.get("messages", {})
    if not isinstance(raw, dict):
        top.fail("messages", "expected a table of [messages.NAME] tables")
    specs: dict[str, MessageSpec] = {}
    for name, body in raw.items():
        t = Table(body if isinstance(body, dict) else {}, top.file, top.source,
                  f"messages.{name}", 0, f"messages.{name}")
        if not isinstance(body, dict):
            t.fail(None, "expected a table")
        t.check_keys(["cycle_ms", "stale_cycles", "bus", "counter", "checksum",
                      "checksum_algorithm", "counter_tolerance", "dlc"])
        bus = t.opt_str("bus")
        if bus is not None and bus not in bus_names:
            t.fail("bus", f"no bus named {bus!r}; buses: {', '.join(sorted(bus_names))}")
        specs[name] = MessageSpec(
            name=name,
            cycle_ms=t.opt_int("cycle_ms", None, minimum=0),
            stale_cycles=t.opt_int("stale_cycles", None, minimum=1),
            bus=bus,
            line=t.line,
            counter=t.opt_str("counter"),
            checksum=t.opt_str("checksum"),
            checksum_algorithm=_checksum_name(t, algorithm),
            counter_tolerance=t.opt_int("counter_tolerance", tolerance, minimum=1) or tolerance,
            dlc=t.opt_int("dlc", None, minimum=0),
        )
    return specs


def _checksum_name(t: Table, default: str) -> str:
    name = t.opt_str("checksum_algorithm", default) or default
    if name not in checksum.names():
        t.fail("checksum_algorithm",
               f"unknown algorithm {name!r}; known: {', '.join(checksum.names())}")
    return name


def _parse_mapping(t: Table, bus_names: set[str], group: bool) -> SignalMapping:
    extra = ("pattern", "index_offset") if group else ("signal",)
    t.check_keys(("path", "message", *extra, *_TRANSFORM_KEYS))
    path = t.req_str("path")
    if group and "{n}" not in path:
        t.fail("path", "a signal group's path must contain {n}")
    if not group and "{n}" in path:
        t.fail("path", "{n} is only for [[signal_group]] paths")
    pattern = t.req_str("pattern") if group else None
    if pattern is not None:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            t.fail("pattern", f"invalid regular expression: {exc}")
        if compiled.groups < 1:
            t.fail("pattern", "expected one capture group for {n}")
    bus = t.opt_str("bus")
    if bus is None and len(bus_names) > 1:
        t.fail("bus", "required when the profile has several buses "
               f"({', '.join(sorted(bus_names))})")
    if bus is not None and bus not in bus_names:
        t.fail("bus", f"no bus named {bus!r}; buses: {', '.join(sorted(bus_names))}")
    kind = t.opt_str("kind")
    if kind is not None and kind not in _KINDS:
        t.fail("kind", f"expected one of {', '.join(_KINDS)}, got {kind!r}")
    enum_map, enum_from_dbc = _parse_enum(t, "enum")
    special, _ = _parse_enum(t, "special")
    return SignalMapping(
        path=path,
        message=t.req_str("message"),
        signal=None if group else t.req_str("signal"),
        pattern=pattern,
        bus=bus,
        scale=_scale(t),
        offset=t.opt_float("offset", 0.0) or 0.0,
        source_unit=t.opt_str("source_unit"),
        unit=t.opt_str("unit"),
        kind=kind,
        enum=enum_map,
        enum_from_dbc=enum_from_dbc,
        special=special,
        sna=frozenset(t.int_list("sna")),
        index_offset=(t.opt_int("index_offset", 0) or 0) if group else 0,
        line=t.line,
        key_lines={k: ln for k in t.data if (ln := t.source.key_line(t.table, t.index, k))},
    )


def _scale(t: Table) -> float:
    scale = t.opt_float("scale", 1.0)
    if not scale:
        t.fail("scale", "expected a non-zero number")
    return scale


def _parse_enum(t: Table, key: str) -> tuple[EnumMap | None, bool]:
    raw = t.data.get(key)
    if raw is None:
        return None, False
    if raw == "dbc" and key == "enum":
        return None, True
    if not isinstance(raw, dict) or not raw:
        expected = '"dbc" or a table' if key == "enum" else "a table"
        t.fail(key, f"expected {expected} of raw value = canonical value")
    out: EnumMap = {}
    for k, v in raw.items():
        try:
            number = int(k, 0)
        except ValueError:
            t.fail(key, f"keys are raw integer values, got {k!r}")
        if not isinstance(v, str | bool | int | float):
            t.fail(key, f"value for {k} must be a string, boolean or number")
        out[number] = v
    return out, False
