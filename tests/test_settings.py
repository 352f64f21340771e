"""Site settings: values, defaults, and errors that name file, line and dotted key."""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import ConfigError
from gateway.config.settings import (
    DEFAULT_DEADBANDS,
    Settings,
    default_settings,
    load_settings,
    with_overrides,
)
from tests.conftest import REF_PROFILE, ROOT

EXAMPLE = ROOT / "deploy" / "gateway.example.toml"
DOCS = ROOT / "docs" / "configuration.md"
CELL = "Vehicle.Powertrain.TractionBattery.Cell.{}.Voltage"

FULL = """\
[gateway]
vehicle_id = "van-7"
profile = "../profiles/car.toml"
state_dir = "state"

[mqtt]
host = "broker.example"
protocol = "3.1.1"
username = "van7"
password_file = "secret"
keepalive = 45
will_delay = 120
backoff_min = 0.5
backoff_max = 30

[mqtt.tls]
ca = "ca.crt"
cert = "client.crt"
key = "client.key"
insecure = true

[telemetry]
offline_interval = 15
state_interval = 0

[telemetry.interval]
drive = 2.5
park = 300

[telemetry.deadband]
"Vehicle.Speed" = 1
"Vehicle.Powertrain.TractionBattery.Cell.*.Voltage" = 0.01

[outbox]
max_mb = 1.5
max_backfill_age_h = 24

[homeassistant]
enabled = true
prefix = "ha/discovery"
name = "Delivery van"
"""

MINIMAL = f"""\
[gateway]
vehicle_id = "car1"
profile = "{REF_PROFILE}"
"""


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A settings directory with the files FULL refers to; the profile lives beside it."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "profiles").mkdir()
    shutil.copy(REF_PROFILE, tmp_path / "profiles" / "car.toml")
    for name in ("ca.crt", "client.crt", "client.key"):
        (etc / name).write_text("not checked by the loader\n")
    (etc / "secret").write_text("s3cret pass\nsecond line is ignored\n")
    return etc


def _write(directory: Path, text: str, name: str = "gw.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _line(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if needle in line)


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value


def test_a_complete_file_parses(etc):
    path = _write(etc, FULL)
    s = load_settings(path)
    assert s.file == str(path)
    assert s.vehicle_id == "van-7"
    assert s.profile == (etc.parent / "profiles" / "car.toml").resolve()
    assert s.state_dir == (etc / "state").resolve()
    assert s.outbox_path == (etc / "state" / "outbox.sqlite").resolve()
    m = s.mqtt
    assert (m.enabled, m.host, m.port, m.protocol) == (True, "broker.example", 8883, "3.1.1")
    assert (m.client_id, m.username, m.password) == ("evgw-van-7", "van7", "s3cret pass")
    assert (m.keepalive, m.will_delay, m.backoff_min, m.backoff_max) == (45, 120, 0.5, 30.0)
    assert m.tls is not None
    assert (m.tls.ca, m.tls.cert, m.tls.key) == (etc / "ca.crt", etc / "client.crt",
                                                 etc / "client.key")
    assert m.tls.insecure is True
    assert "s3cret" not in repr(s), "the password must not end up in logs"
    t = s.telemetry
    assert dict(t.intervals) == {"drive": 2.5, "charge": 10.0, "park": 300.0}
    assert (t.interval("drive"), t.interval("park")) == (2.5, 300.0)
    assert (t.offline_interval, t.state_interval) == (15.0, 0.0)
    assert t.deadbands == (("Vehicle.Speed", 1.0), (CELL.format("*"), 0.01))
    assert s.outbox.max_bytes == 1024 * 1024 * 3 // 2
    assert s.outbox.max_backfill_age == 24 * 3600.0
    ha = s.homeassistant
    assert (ha.enabled, ha.prefix, ha.name) == (True, "ha/discovery", "Delivery van")


def test_missing_sections_take_defaults(tmp_path):
    s = load_settings(_write(tmp_path, MINIMAL))
    assert s.profile == REF_PROFILE and s.state_dir == Path("/var/lib/ev-gateway")
    m = s.mqtt
    assert (m.enabled, m.host, m.port, m.protocol, m.client_id) == (
        True, "localhost", 1883, "auto", "evgw-car1")
    assert (m.username, m.password, m.tls) == (None, None, None)
    assert (m.keepalive, m.will_delay, m.backoff_min, m.backoff_max) == (30, 30, 1.0, 60.0)
    assert dict(s.telemetry.intervals) == {"drive": 1.0, "charge": 10.0, "park": 60.0}
    assert (s.telemetry.offline_interval, s.telemetry.state_interval) == (30.0, 30.0)
    assert s.telemetry.deadbands == ()
    assert (s.outbox.max_bytes, s.outbox.max_backfill_age) == (64 * 1024 * 1024, 168 * 3600.0)
    ha = s.homeassistant
    assert (ha.enabled, ha.prefix, ha.name) == (False, "homeassistant", "EV car1")
    # Running without a file gives exactly what a file with only [gateway] gives.
    assert default_settings("car1", REF_PROFILE, Path("/var/lib/ev-gateway")) == replace(
        s, file=None)


def test_port_defaults_to_8883_only_with_tls(tmp_path):
    tls = load_settings(_write(tmp_path, MINIMAL + "[mqtt.tls]\n", "tls.toml"))
    assert tls.mqtt.tls is not None and tls.mqtt.tls.ca is None and tls.mqtt.port == 8883
    pinned = load_settings(_write(tmp_path, MINIMAL + "[mqtt]\nport = 9000\n[mqtt.tls]\n"))
    assert pinned.mqtt.port == 9000


@pytest.mark.parametrize(
    ("old", "new", "needle", "key", "words"),
    [
        ("keepalive = 45", "keepalive = 45\nkeepalvie = 10", "keepalvie", "mqtt.keepalvie",
         "unknown key"),
        ("[outbox]", "[outbx]", "[outbx]", "outbx", "unknown section"),
        ("drive = 2.5", "drive = 2.5\nsport = 1", "sport", "telemetry.interval.sport",
         "unknown key"),
        ('host = "broker.example"', "host = 5", "host = 5", "mqtt.host",
         "expected a string, got 5"),
        ("keepalive = 45", "keepalive = true", "keepalive", "mqtt.keepalive",
         "expected an integer, got True"),
        ("drive = 2.5", "drive = true", "drive", "telemetry.interval.drive",
         "expected a number, got True"),
        ("enabled = true", 'enabled = "yes"', "enabled", "homeassistant.enabled",
         "expected true or false"),
        ('host = "broker.example"', 'host = "b"\nport = 0', "port", "mqtt.port",
         "expected an integer >= 1, got 0"),
        ('host = "broker.example"', 'host = "b"\nport = 65536', "port", "mqtt.port",
         "expected an integer <= 65535, got 65536"),
        ("keepalive = 45", "keepalive = 4", "keepalive", "mqtt.keepalive", ">= 5"),
        ('protocol = "3.1.1"', 'protocol = "4"', "protocol", "mqtt.protocol",
         "expected \"auto\", \"5\" or \"3.1.1\""),
        ('protocol = "3.1.1"', "protocol = 5", "protocol", "mqtt.protocol", "(a string)"),
        ('vehicle_id = "van-7"', 'vehicle_id = "van 7"', "vehicle_id", "gateway.vehicle_id",
         "letters, digits"),
        ('vehicle_id = "van-7"', 'vehicle_id = "-van"', "vehicle_id", "gateway.vehicle_id",
         "starting with a letter or digit"),
        ('vehicle_id = "van-7"', f'vehicle_id = "{"v" * 65}"', "vehicle_id",
         "gateway.vehicle_id", "1-64"),
        ('profile = "../profiles/car.toml"', 'profile = "../profiles/nope.toml"', "profile",
         "gateway.profile", "file not found: ../profiles/nope.toml"),
        ('key = "client.key"\n', "", 'cert = "client.crt"', "mqtt.tls.cert",
         "cert and key must be given together; key is missing"),
        ('cert = "client.crt"\n', "", 'key = "client.key"', "mqtt.tls.key",
         "cert and key must be given together; cert is missing"),
        ('ca = "ca.crt"', 'ca = "nope.crt"', "ca =", "mqtt.tls.ca", "file not found"),
        ('password_file = "secret"', 'password_file = "nope"', "password_file",
         "mqtt.password_file", "cannot read"),
        ('username = "van7"\n', "", "password_file", "mqtt.password_file", "username"),
        ("backoff_max = 30", "backoff_max = 0.25", "backoff_max", "mqtt.backoff_max",
         ">= backoff_min (0.5), got 0.25"),
        ("drive = 2.5", "drive = 0", "drive", "telemetry.interval.drive", "> 0, got 0"),
        ("offline_interval = 15", "offline_interval = inf", "offline_interval",
         "telemetry.offline_interval", "> 0, got inf"),
        ("state_interval = 0", "state_interval = -1", "state_interval",
         "telemetry.state_interval", ">= 0, got -1"),
        ('"Vehicle.Speed" = 1', '"Vehicle.Speed" = -1', '"Vehicle.Speed"',
         'telemetry.deadband."Vehicle.Speed"', ">= 0, got -1"),
        ('"Vehicle.Speed" = 1', '"Vehicle.Speed" = "big"', '"Vehicle.Speed"',
         'telemetry.deadband."Vehicle.Speed"', "expected a number"),
        ('"Vehicle.Speed" = 1', "Vehicle.Speed = 1", "[telemetry.deadband]",
         'telemetry.deadband."Vehicle"', "must be quoted"),
        ("max_mb = 1.5", "max_mb = 0", "max_mb", "outbox.max_mb", "> 0, got 0"),
        ('prefix = "ha/discovery"', 'prefix = "ha/#"', "prefix", "homeassistant.prefix",
         "'+', '#'"),
        ('prefix = "ha/discovery"', 'prefix = "ha/"', "prefix", "homeassistant.prefix",
         "empty levels"),
    ],
    ids=["unknown-key", "unknown-section", "unknown-mode", "wrong-type", "bool-for-int",
         "bool-for-float", "string-for-bool", "port-zero", "port-too-big", "keepalive-range",
         "bad-protocol", "protocol-not-string", "vehicle-id-space", "vehicle-id-dash",
         "vehicle-id-long", "missing-profile", "cert-without-key", "key-without-cert",
         "missing-ca", "missing-password-file", "password-without-username", "backoff-order",
         "zero-interval", "infinite", "negative", "deadband-negative", "deadband-type",
         "deadband-unquoted", "outbox-zero", "ha-wildcard", "ha-empty-level"],
)
def test_errors_name_file_line_and_key(etc, old, new, needle, key, words):
    assert old in FULL
    text = FULL.replace(old, new, 1)
    path = _write(etc, text)
    message = str(_error(path))
    assert message.startswith(f"{path}:{_line(text, needle)}: {key}: "), message
    assert words in message, message
    assert "\n" not in message, "one line"


def test_toml_syntax_error_names_the_line(etc):
    text = FULL.replace("keepalive = 45", "keepalive = 45 45")
    path = _write(etc, text)
    err = _error(path)
    assert err.line == _line(text, "keepalive")
    assert str(err).startswith(f"{path}:{err.line}: invalid TOML")


def test_gateway_section_and_its_required_keys(tmp_path):
    err = _error(_write(tmp_path, "[mqtt]\nhost = 'b'\n"))
    assert err.key == "gateway" and "missing [gateway]" in str(err)
    err = _error(_write(tmp_path, MINIMAL.replace('vehicle_id = "car1"\n', "")))
    assert str(err).startswith(f"{tmp_path / 'gw.toml'}:1: gateway.vehicle_id: missing")
    err = _error(_write(tmp_path, "gateway = 3\n"))
    assert str(err) == f"{tmp_path / 'gw.toml'}:1: gateway: expected a table ([gateway])"


def test_unreadable_file_is_a_config_error(tmp_path):
    missing = tmp_path / "absent.toml"
    assert str(_error(missing)).startswith(f"{missing}: cannot read settings")


@pytest.mark.parametrize(("content", "expected"), [
    ("pw\n", "pw"), ("pw\r\n", "pw"), ("pw", "pw"), (" spaced pw \nnext\n", " spaced pw "),
])
def test_password_is_the_first_line_of_password_file(etc, content, expected):
    (etc / "secret").write_text(content, newline="")
    assert load_settings(_write(etc, FULL)).mqtt.password == expected


def test_password_file_edge_cases(etc):
    (etc / "secret").write_text("\nsecond\n")
    text = FULL
    assert "the password, is empty" in str(_error(_write(etc, text)))
    (etc / "secret").write_text("pw\n")
    # MQTT 5 may send a password without a username; 3.1.1 may not.
    text = FULL.replace('username = "van7"\n', "").replace('"3.1.1"', '"5"')
    s = load_settings(_write(etc, text))
    assert (s.mqtt.username, s.mqtt.password) == (None, "pw")


def test_deadband_precedence(tmp_path):
    text = MINIMAL + """
[telemetry.deadband]
"Vehicle.*" = 7
"Vehicle.Spe?d" = 4
"Vehicle.Speed" = 0.5
"Vehicle.Powertrain.*" = 3
"Vehicle.Body.*" = 1
"Vehicle.*.Horn" = 2
"Vehicle.Powertrain.TractionBattery.Cell.*.Voltage" = 0.02
"""
    t = load_settings(_write(tmp_path, text)).telemetry
    # Exact beats every glob, even longer ones listed before it.
    assert t.deadband("Vehicle.Speed", "km/h") == 0.5
    # Among globs the longest pattern wins, whatever the order.
    assert t.deadband("Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V") == 3.0
    assert t.deadband(CELL.format(4), "V") == 0.02
    assert t.deadband("Vehicle.TraveledDistance", "km") == 7.0
    # Equally long globs: the first in the file wins.
    assert t.deadband("Vehicle.Body.Horn", "") == 1.0
    # Globs are case-sensitive, like signal paths; unmatched paths fall back to unit defaults.
    assert t.deadband("vehicle.speed", "km/h") == DEFAULT_DEADBANDS["km/h"]
    assert t.deadband("Vehicle.Speed", "km/h") == 0.5, "cached answer stays the same"


def test_deadband_defaults_by_unit(tmp_path):
    t = load_settings(_write(tmp_path, MINIMAL)).telemetry
    assert t.deadband(CELL.format(12), "V") == 0.005
    assert t.deadband("Vehicle.Powertrain.TractionBattery.CurrentVoltage", "V") == 0.1
    assert t.deadband("Vehicle.Powertrain.TractionBattery.CurrentCurrent", "A") == 0.5
    assert t.deadband("Vehicle.Speed", "km/h") == 0.5
    assert t.deadband("Vehicle.Powertrain.Range", "m") == 100.0
    assert t.deadband("Vehicle.Cabin.Temperature", "°C") == 0.5, "unit spellings normalised"
    assert t.deadband("Vehicle.Private.Light", "lux") == 0.0
    assert t.deadband("Vehicle.Body.Lights.IsOn", "") == 0.0
    with pytest.raises(ValueError, match="unknown vehicle mode 'fly'"):
        t.interval("fly")


def test_with_overrides(tmp_path):
    base = load_settings(_write(tmp_path, MINIMAL))
    moved = with_overrides(base, host="broker.lan", port=1884, vehicle_id="car2",
                           state_dir=tmp_path / "st", enabled=False)
    assert (moved.vehicle_id, moved.state_dir) == ("car2", tmp_path / "st")
    assert moved.outbox_path == tmp_path / "st" / "outbox.sqlite"
    assert (moved.mqtt.host, moved.mqtt.port, moved.mqtt.enabled) == ("broker.lan", 1884, False)
    # Names derived from the vehicle id follow it; configured ones do not.
    assert (moved.mqtt.client_id, moved.homeassistant.name) == ("evgw-car2", "EV car2")
    named = load_settings(_write(tmp_path, MINIMAL + '[mqtt]\nclient_id = "fixed"\n'
                                 '[homeassistant]\nname = "Mine"\n', "named.toml"))
    renamed = with_overrides(named, vehicle_id="car3")
    assert (renamed.mqtt.client_id, renamed.homeassistant.name) == ("fixed", "Mine")
    assert base.vehicle_id == "car1" and base.mqtt.port == 1883, "the original is unchanged"
    assert with_overrides(base) == base
    with pytest.raises(ValueError, match="vehicle id: expected 1-64"):
        with_overrides(base, vehicle_id="car 2")
    for port in (0, 70000):
        with pytest.raises(ValueError, match=f"MQTT port: .* got {port}"):
            with_overrides(base, port=port)
    with pytest.raises(ValueError, match="MQTT host: expected a host name"):
        with_overrides(base, host=" ")
    with pytest.raises(ValueError, match="vehicle id: expected 1-64"):
        default_settings("a/b", REF_PROFILE, tmp_path)


def test_the_shipped_example_loads():
    s = load_settings(EXAMPLE)
    assert isinstance(s, Settings)
    assert s.profile == REF_PROFILE.resolve() and s.vehicle_id == "demo-001"
    assert s.telemetry.deadband(CELL.format(1), "V") == 0.005


def _uncommented_example(directory: Path) -> Path:
    """The example with its commented-out keys enabled, beside the files they name."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        m = re.match(r"^# (\[\[?[a-z.]+\]\]?|[a-z_]+ = .*)$", line)
        lines.append(m.group(1) if m else line)
    text = "\n".join(lines).replace("../dbc/profiles/microev-ref.toml", str(REF_PROFILE))
    for name in ("ca.crt", "client.crt", "client.key"):
        (directory / name).write_text("x\n")
    (directory / "mqtt-password").write_text("pw\n")
    (directory / "keys.toml").write_text("# no keys yet\n")
    return _write(directory, text.replace('username = ""', 'username = "u"'), "example.toml")


def test_commented_keys_in_the_example_are_valid_and_documented(tmp_path):
    path = _uncommented_example(tmp_path)
    s = load_settings(path)
    assert s.mqtt.tls is not None and s.mqtt.tls.key == tmp_path / "client.key"
    assert s.mqtt.password == "pw"
    data = tomllib.loads(path.read_text())
    docs = DOCS.read_text()
    tables: list[tuple[str, dict[str, object]]] = [("", data)]
    keys: set[str] = set()
    while tables:
        prefix, table = tables.pop()
        for key, value in table.items():
            name = f"{prefix}.{key}".lstrip(".")
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                assert f"`[[{name}]]`" in docs, f"[[{name}]] is not documented"
                tables.extend((name, v) for v in value)
            elif isinstance(value, dict):
                assert f"`[{name}]`" in docs, f"[{name}] is not documented"
                if name != "telemetry.deadband":  # its keys are signal paths
                    tables.append((name, value))
            else:
                keys.add(name)
                assert f"| `{key}` |" in docs, f"{name} is not documented"
    assert s.commands.keys == tmp_path / "keys.toml"
    assert s.location.gnss.enabled and len(s.location.geofences) == 2
    assert s.location.insights.energy_price_per_kwh is not None
    assert len(keys) == 63, "every key the loader accepts is in the example"


@pytest.mark.parametrize(("extra", "enabled"), [
    ("", False),
    ("[gnss]\n", True),
    ('[gnss]\ndevice = "/dev/serial0"\n', True),
    ("[gnss]\nenabled = false\n", False),
])
def test_a_gnss_table_enables_the_receiver_even_when_empty(tmp_path: Path, extra: str,
                                                          enabled: bool) -> None:
    settings = load_settings(_write(tmp_path, MINIMAL + extra))
    assert settings.location.gnss.enabled is enabled


def test_can_channels_override_the_profile_per_installation(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, MINIMAL + '[can]\nvehicle = "socketcan:can1"\n'))
    assert settings.bus_overrides(["vehicle"]) == {"vehicle": "socketcan:can1"}
    with pytest.raises(ConfigError, match=r"gw.toml: can.body: the profile has no bus 'body'"):
        replace(settings, can={"body": "socketcan:can2"}).bus_overrides(["vehicle"])
    with pytest.raises(ConfigError, match=r"gw.toml:\d+: can.vehicle: expected \"INTERFACE"):
        load_settings(_write(tmp_path, MINIMAL + '[can]\nvehicle = "can0"\n'))
