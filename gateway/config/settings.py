"""Site settings: how one installed gateway runs.

A vehicle profile describes a car model; this file describes one gateway in
one car: its vehicle id and profile, where state is kept, the MQTT broker,
telemetry policy, outbox bounds and Home Assistant discovery. It is validated
the same way as a profile, so every problem is one ``file:line: key: what``
line, and unknown keys are errors. See docs/configuration.md for the format.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from gateway.config.errors import ConfigError
from gateway.config.health import HealthSettings, parse_health
from gateway.config.location import (
    LocationSettings,
    parse_geofences,
    parse_gnss,
    parse_insights,
)
from gateway.config.toml_table import SourceMap, Table, read_toml
from gateway.config.units import normalise
from gateway.mqtt.topics import valid_topic_prefix, valid_vehicle_id

MqttProtocol = Literal["auto", "5", "3.1.1"]
_PROTOCOLS: dict[str, MqttProtocol] = {"auto": "auto", "5": "5", "3.1.1": "3.1.1"}
_SECTIONS = ("gateway", "mqtt", "telemetry", "outbox", "homeassistant", "commands", "gnss",
             "insights", "health", "can")
_ARRAYS = ("geofence",)
_MODE_INTERVALS = {"drive": 1.0, "charge": 10.0, "park": 60.0}
_VEHICLE_ID_RULE = "expected 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
DEFAULT_STATE_DIR = Path("/var/lib/ev-gateway")

# Deadbands exist because most gateways pay per byte on a cellular link: the
# last bit of an ADC reading flickers constantly, and without a threshold every
# flicker would be a "change" worth sending. The defaults are roughly the
# resolution a person reading the value cares about, per catalog unit; units
# not listed get 0, i.e. every change is sent.
DEFAULT_DEADBANDS: Mapping[str, float] = MappingProxyType({
    "V": 0.1, "A": 0.5, "W": 50.0, "degC": 0.5, "%": 0.1, "km/h": 0.5, "rpm": 10.0,
    "Nm": 1.0, "kWh": 0.01, "km": 0.1, "m": 100.0, "s": 10.0, "kOhm": 10.0,
})
# Cells sit within millivolts of each other, and balancing is judged on that scale.
CELL_VOLTAGE_PATTERN = "*.Cell.*.Voltage"
CELL_VOLTAGE_DEADBAND = 0.005


@dataclass(frozen=True)
class TlsSettings:
    """TLS to the broker; None paths mean system CAs / no client certificate."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    insecure: bool


@dataclass(frozen=True)
class MqttSettings:
    """The broker connection."""

    enabled: bool
    host: str
    port: int
    protocol: MqttProtocol
    client_id: str
    username: str | None
    password: str | None = field(repr=False)
    keepalive: int
    will_delay: int
    backoff_min: float
    backoff_max: float
    tls: TlsSettings | None


@dataclass(frozen=True)
class TelemetrySettings:
    """Telemetry batching periods per vehicle mode, and per-signal deadbands."""

    intervals: Mapping[str, float]
    offline_interval: float
    state_interval: float
    deadbands: tuple[tuple[str, float], ...]
    _cache: dict[tuple[str, str], float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def interval(self, mode: str) -> float:
        """Live telemetry batching period in ``mode`` (drive, charge or park)."""
        if mode not in self.intervals:
            raise ValueError(f"unknown vehicle mode {mode!r}; expected one of "
                             f"{', '.join(self.intervals)}")
        return self.intervals[mode]

    def deadband(self, path: str, unit: str) -> float:
        """The smallest change of ``path`` worth publishing.

        An exact configured path wins over any glob, a longer glob over a
        shorter one; otherwise the default for cell voltages or for ``unit``.
        """
        key = (path, unit)
        value = self._cache.get(key)
        if value is None:
            # Bounded by the number of distinct signals, so the cache cannot grow without limit.
            value = self._cache[key] = self._resolve(path, unit)
        return value

    def _resolve(self, path: str, unit: str) -> float:
        best: tuple[int, float] | None = None
        for pattern, value in self.deadbands:
            if pattern == path:
                return value
            if fnmatch.fnmatchcase(path, pattern) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), value)
        if best is not None:
            return best[1]
        canonical_unit = normalise(unit)
        if canonical_unit == "V" and fnmatch.fnmatchcase(path, CELL_VOLTAGE_PATTERN):
            return CELL_VOLTAGE_DEADBAND
        return DEFAULT_DEADBANDS.get(canonical_unit, 0.0)


@dataclass(frozen=True)
class OutboxSettings:
    """Bounds of the durable outbox."""

    max_bytes: int
    max_backfill_age: float


@dataclass(frozen=True)
class HomeAssistantSettings:
    """Home Assistant MQTT discovery."""

    enabled: bool
    prefix: str
    name: str


@dataclass(frozen=True)
class CommandSettings:
    """Remote commands (docs/commands.md); off while ``keys`` is None."""

    keys: Path | None
    gateway_key: Path | None
    """None: ``gateway.key`` in the state directory, created on first start."""
    clock_skew_s: float = 10.0
    max_lifetime_s: float = 120.0
    rate_per_minute: float = 20.0
    burst: int = 5
    retention_h: float = 24.0


@dataclass(frozen=True)
class Settings:
    """A validated settings file (``file`` is None when built from defaults)."""

    vehicle_id: str
    profile: Path
    state_dir: Path
    mqtt: MqttSettings
    telemetry: TelemetrySettings
    outbox: OutboxSettings
    homeassistant: HomeAssistantSettings
    file: str | None
    commands: CommandSettings = field(default_factory=lambda: CommandSettings(None, None))
    location: LocationSettings = field(default_factory=LocationSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    can: Mapping[str, str] = field(default_factory=dict)
    """``[can]``: bus name -> ``INTERFACE:CHANNEL``, overriding the profile's channel (the
    profile says what the car's bus carries, this file where this head unit reaches it)."""

    def bus_overrides(self, profile_buses: Iterable[str]) -> dict[str, str]:
        """``[can]`` checked against the profile's bus names; ConfigError naming the key."""
        known = set(profile_buses)
        for name in self.can:
            if name not in known:
                raise ConfigError(self.file or "<settings>",
                                  f"the profile has no bus {name!r}; its buses: "
                                  f"{', '.join(sorted(known))}", key=f"can.{name}")
        return dict(self.can)

    @property
    def outbox_path(self) -> Path:
        """The SQLite file of the outbox."""
        return self.state_dir / "outbox.sqlite"

    @property
    def gateway_key_path(self) -> Path:
        """The gateway's result-signing key."""
        return self.commands.gateway_key or self.state_dir / "gateway.key"


def load_settings(path: str | Path) -> Settings:
    """Read and validate a settings file; raise ConfigError naming file, line and key."""
    file = Path(path)
    data, source = read_toml(file, "settings")
    if "gateway" not in data:
        raise ConfigError(str(file), "missing [gateway] table (vehicle_id and profile)",
                          key="gateway")
    sections = _sections(str(file), data, source)
    fences = _fence_tables(str(file), data, source)
    gw = sections["gateway"]
    gw.check_keys(["vehicle_id", "profile", "state_dir"])
    vehicle_id = gw.req_str("vehicle_id")
    if not valid_vehicle_id(vehicle_id):
        gw.fail("vehicle_id", f"{_VEHICLE_ID_RULE}, got {vehicle_id!r}")
    gw.req_str("profile")
    profile = _path(gw, "profile", file.parent, must_exist=True)
    if profile is None:
        gw.fail("profile", "missing; expected a string")
    state_dir = _path(gw, "state_dir", file.parent) or DEFAULT_STATE_DIR
    if state_dir.exists() and not state_dir.is_dir():
        gw.fail("state_dir", f"not a directory: {state_dir}")
    settings = _assemble(vehicle_id, profile, state_dir, sections, file.parent, str(file))
    gnss = parse_gnss(sections["gnss"], present="gnss" in data)
    return replace(settings, location=replace(settings.location, gnss=gnss,
                                              geofences=parse_geofences(fences)))


def default_settings(vehicle_id: str, profile: Path, state_dir: Path) -> Settings:
    """Settings with every default, for running without a settings file."""
    _check_vehicle_id(vehicle_id)
    sections = _sections("<defaults>", {}, SourceMap(""))
    return _assemble(vehicle_id, Path(profile), Path(state_dir), sections, Path(), None)


def with_overrides(
    settings: Settings, *, host: str | None = None, port: int | None = None,
    vehicle_id: str | None = None, state_dir: Path | None = None, enabled: bool | None = None,
    keys: Path | None = None,
) -> Settings:
    """``settings`` with command-line overrides applied; ValueError for a bad value.

    A client id or device name that was derived from the old vehicle id
    follows the new one; explicitly configured ones are kept.
    """
    mqtt, ha = settings.mqtt, settings.homeassistant
    if vehicle_id is not None:
        _check_vehicle_id(vehicle_id)
        old = settings.vehicle_id
        if mqtt.client_id == _client_id(old):
            mqtt = replace(mqtt, client_id=_client_id(vehicle_id))
        if ha.name == _device_name(old):
            ha = replace(ha, name=_device_name(vehicle_id))
    if host is not None:
        if not host.strip():
            raise ValueError("MQTT host: expected a host name or address, got an empty string")
        mqtt = replace(mqtt, host=host)
    if port is not None:
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"MQTT port: expected an integer from 1 to 65535, got {port!r}")
        mqtt = replace(mqtt, port=port)
    if enabled is not None:
        mqtt = replace(mqtt, enabled=enabled)
    commands = settings.commands
    if keys is not None:
        if not Path(keys).is_file():
            raise ValueError(f"authorized keys: file not found: {keys}")
        commands = replace(commands, keys=Path(keys).resolve())
    return replace(
        settings, vehicle_id=vehicle_id or settings.vehicle_id, mqtt=mqtt, homeassistant=ha,
        commands=commands,
        state_dir=settings.state_dir if state_dir is None else Path(state_dir),
    )


def _check_vehicle_id(vehicle_id: str) -> None:
    if not valid_vehicle_id(vehicle_id):
        raise ValueError(f"vehicle id: {_VEHICLE_ID_RULE}, got {vehicle_id!r}")


def _client_id(vehicle_id: str) -> str:
    return f"evgw-{vehicle_id}"


def _device_name(vehicle_id: str) -> str:
    return f"EV {vehicle_id}"


def _sections(file: str, data: dict[str, Any], source: SourceMap) -> dict[str, Table]:
    """Every known section as a Table (empty when absent); unknown sections are errors."""
    for name, value in data.items():
        if name in _ARRAYS:
            continue
        if name not in _SECTIONS or not isinstance(value, dict):
            problem = (f"unknown section; expected one of: {', '.join(_SECTIONS + _ARRAYS)}"
                       if name not in _SECTIONS else f"expected a table ([{name}])")
            line = source.header_line(name) or source.key_line("", 0, name)
            raise ConfigError(file, problem, line=line, key=name)
    return {name: Table(data.get(name, {}), file, source, name, 0, name) for name in _SECTIONS}


def _fence_tables(file: str, data: dict[str, Any], source: SourceMap) -> list[Table]:
    value = data.get("geofence", [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(file, "expected [[geofence]] tables", key="geofence",
                          line=source.key_line("", 0, "geofence"))
    return [Table(v, file, source, "geofence", i, f"geofence[{i}]")
            for i, v in enumerate(value)]


def _assemble(
    vehicle_id: str, profile: Path, state_dir: Path, sections: dict[str, Table], base: Path,
    file: str | None,
) -> Settings:
    return Settings(
        vehicle_id=vehicle_id,
        profile=profile,
        state_dir=state_dir,
        mqtt=_mqtt(sections["mqtt"], vehicle_id, base),
        telemetry=_telemetry(sections["telemetry"]),
        outbox=_outbox(sections["outbox"]),
        homeassistant=_homeassistant(sections["homeassistant"], vehicle_id),
        file=file,
        commands=_commands(sections["commands"], base),
        location=LocationSettings(gnss=parse_gnss(sections["gnss"]),
                                  insights=parse_insights(sections["insights"])),
        health=parse_health(sections["health"]),
        can=_can(sections["can"]),
    )


def _mqtt(t: Table, vehicle_id: str, base: Path) -> MqttSettings:
    t.check_keys(["enabled", "host", "port", "protocol", "client_id", "username",
                  "password_file", "keepalive", "will_delay", "backoff_min", "backoff_max",
                  "tls"])
    tls_table = t.sub("tls", "mqtt.tls", "mqtt.tls")
    tls = None if tls_table is None else _tls(tls_table, base)
    host = t.opt_str("host", "localhost") or ""
    if not host.strip():
        t.fail("host", "expected a host name or address, got an empty string")
    protocol = t.data.get("protocol", "auto")
    if not isinstance(protocol, str) or protocol not in _PROTOCOLS:
        t.fail("protocol", f'expected "auto", "5" or "3.1.1" (a string), got {protocol!r}')
    username = t.opt_str("username", "") or None
    password = _password(t, base)
    if password is not None and username is None and protocol != "5":
        t.fail("password_file", 'MQTT 3.1.1 sends no password without a username; set '
               'username, or protocol = "5"')
    backoff_min = _positive(t, "backoff_min", 1.0)
    backoff_max = _positive(t, "backoff_max", 60.0)
    if backoff_max < backoff_min:
        t.fail("backoff_max", f"expected a number >= backoff_min ({backoff_min:g}), "
               f"got {backoff_max:g}")
    return MqttSettings(
        enabled=t.opt_bool("enabled", True),
        host=host,
        port=_int_range(t, "port", 8883 if tls else 1883, 1, 65535),
        protocol=_PROTOCOLS[protocol],
        client_id=t.opt_str("client_id", "") or _client_id(vehicle_id),
        username=username,
        password=password,
        keepalive=_int_range(t, "keepalive", 30, 5, 3600),
        will_delay=_int_range(t, "will_delay", 30, 0, 86400),
        backoff_min=backoff_min,
        backoff_max=backoff_max,
        tls=tls,
    )


def _tls(t: Table, base: Path) -> TlsSettings:
    t.check_keys(["ca", "cert", "key", "insecure"])
    cert = _path(t, "cert", base, must_exist=True)
    key = _path(t, "key", base, must_exist=True)
    if (cert is None) != (key is None):
        given, missing = ("cert", "key") if key is None else ("key", "cert")
        t.fail(given, f"cert and key must be given together; {missing} is missing")
    return TlsSettings(ca=_path(t, "ca", base, must_exist=True), cert=cert, key=key,
                       insecure=t.opt_bool("insecure", False))


def _password(t: Table, base: Path) -> str | None:
    path = _path(t, "password_file", base)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        t.fail("password_file", f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        t.fail("password_file", f"{path} is not UTF-8 text")
    # read_text translates CRLF, so a file saved on Windows works too.
    password = text.split("\n", 1)[0]
    if not password:
        t.fail("password_file", f"{path}: the first line, the password, is empty")
    return password


def _telemetry(t: Table) -> TelemetrySettings:
    t.check_keys(["offline_interval", "state_interval", "interval", "deadband"])
    modes = _child(t, "interval")
    modes.check_keys(_MODE_INTERVALS)
    intervals = {mode: _positive(modes, mode, dflt) for mode, dflt in _MODE_INTERVALS.items()}
    return TelemetrySettings(
        intervals=MappingProxyType(intervals),
        offline_interval=_positive(t, "offline_interval", 30.0),
        state_interval=_positive(t, "state_interval", 30.0, allow_zero=True),
        deadbands=_deadbands(_child(t, "deadband")),
    )


def _deadbands(t: Table) -> tuple[tuple[str, float], ...]:
    out: list[tuple[str, float]] = []
    for pattern, value in t.data.items():
        if isinstance(value, dict):
            _fail_quoted(t, pattern, 'a path with dots must be quoted: "Vehicle.Speed" = 0.5')
        if not pattern or any(c.isspace() for c in pattern):
            _fail_quoted(t, pattern, "expected a VSS path or glob without spaces")
        number_ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not number_ok or not math.isfinite(value) or value < 0:
            _fail_quoted(t, pattern, f"expected a number >= 0, got {value!r}")
        out.append((pattern, float(value)))
    return tuple(out)


def _fail_quoted(t: Table, key: str, message: str) -> NoReturn:
    """Like Table.fail, for keys that are usually quoted (paths contain dots)."""
    line = t.line
    for spelling in (f'"{key}"', f"'{key}'", key):
        line = t.source.key_line(t.table, t.index, spelling)
        if line != t.line:
            break
    raise ConfigError(t.file, message, line=line, key=f'{t.label}."{key}"')


def _can(t: Table) -> dict[str, str]:
    out = {}
    for name, value in t.data.items():
        interface, sep, channel = value.partition(":") if isinstance(value, str) else ("", "", "")
        if not (sep and interface and channel):
            t.fail(name, f'expected "INTERFACE:CHANNEL" such as "socketcan:can0", got {value!r}')
        out[name] = value
    return out


def _outbox(t: Table) -> OutboxSettings:
    t.check_keys(["max_mb", "max_backfill_age_h"])
    return OutboxSettings(
        max_bytes=math.ceil(_positive(t, "max_mb", 64.0) * 1024 * 1024),
        max_backfill_age=_positive(t, "max_backfill_age_h", 168.0) * 3600.0,
    )


def _commands(t: Table, base: Path) -> CommandSettings:
    t.check_keys(["keys", "gateway_key", "clock_skew_s", "max_lifetime_s", "rate_per_minute",
                  "burst", "retention_h"])
    skew = _positive(t, "clock_skew_s", 10.0, allow_zero=True)
    if skew > 300:
        t.fail("clock_skew_s", f"expected at most 300 seconds, got {skew:g}")
    lifetime = _positive(t, "max_lifetime_s", 120.0)
    if lifetime > 3600:
        t.fail("max_lifetime_s", f"expected at most 3600 seconds, got {lifetime:g}")
    return CommandSettings(
        keys=_path(t, "keys", base, must_exist=True),
        gateway_key=_path(t, "gateway_key", base),
        clock_skew_s=skew,
        max_lifetime_s=lifetime,
        rate_per_minute=_positive(t, "rate_per_minute", 20.0),
        burst=_int_range(t, "burst", 5, 1, 1000),
        retention_h=_positive(t, "retention_h", 24.0),
    )


def _homeassistant(t: Table, vehicle_id: str) -> HomeAssistantSettings:
    t.check_keys(["enabled", "prefix", "name"])
    prefix = t.opt_str("prefix", "homeassistant") or ""
    if not valid_topic_prefix(prefix):
        t.fail("prefix", f"expected topic levels without '+', '#' or empty levels, got {prefix!r}")
    return HomeAssistantSettings(
        enabled=t.opt_bool("enabled", False),
        prefix=prefix,
        name=t.opt_str("name", "") or _device_name(vehicle_id),
    )


def _child(t: Table, key: str) -> Table:
    """Sub-table ``key`` of ``t``, empty when absent."""
    name = f"{t.table}.{key}"
    return t.sub(key, name, name) or Table({}, t.file, t.source, name, 0, name)


def _path(t: Table, key: str, base: Path, *, must_exist: bool = False) -> Path | None:
    """A path relative to the settings file; an empty string means not set."""
    text = t.opt_str(key, "")
    if not text:
        return None
    path = (base / text).resolve()
    if must_exist and not path.is_file():
        t.fail(key, f"file not found: {text} (looked for {path})")
    return path


def _int_range(t: Table, key: str, default: int, low: int, high: int) -> int:
    value = t.opt_int(key, default, minimum=low)
    if value is None or value > high:
        t.fail(key, f"expected an integer <= {high}, got {value}")
    return value


def _positive(t: Table, key: str, default: float, *, allow_zero: bool = False) -> float:
    value = t.opt_float(key, default)
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        t.fail(key, f"expected a number {'>=' if allow_zero else '>'} 0, got {value}")
    return value
