"""Command configuration: the profile's [commands.*] tables, their build against the DBCs,
and the settings' [commands] section."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import Commands, Pipeline, Safety
from gateway.clock import ManualClock
from gateway.config import ConfigError, load_profile
from gateway.config.commands import PulseSpec, SetpointSpec
from gateway.config.settings import CommandSettings, default_settings, load_settings, with_overrides
from tests.conftest import DBC, REF_PROFILE

REF_TEXT = REF_PROFILE.read_text()
_HEAD, _REST = REF_TEXT.split("[commands.lock]")
REF_COMMANDS = "[commands.lock]" + _REST[:_REST.index("[[bus]]")]
_TAIL = _REST[_REST.index("[[bus]]"):]
LOCK = """[commands.lock]
message = "GW_BodyCommand"
signals = { GW_LockRequest = 1 }
sequence = "GW_CommandSeq"
ack = "Vehicle.Body.CommandAckSeq"
"""
SETPOINT = """[commands.charge-limit]
message = "GW_ChargeControl"
signal = "GW_ChargeLimitSoc"
report = "Vehicle.Powertrain.TractionBattery.Charging.ChargeLimit"
"""
DOORS = ("Vehicle.Cabin.Door.Row1.DriverSide.IsLocked",
         "Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked")


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def write_profile(tmp_path: Path, commands: str) -> tuple[Path, str]:
    """The reference profile with its [commands] part replaced and absolute DBC paths."""
    text = (_HEAD + commands + "\n" + _TAIL).replace('"../reference/', f'"{DBC}/reference/')
    path = tmp_path / "car.toml"
    path.write_text(text)
    return path, text


def edited(old: str, new: str) -> str:
    assert old in REF_COMMANDS
    return REF_COMMANDS.replace(old, new, 1)


def build(path: Path, state_dir: Path) -> Commands:
    pipeline = Pipeline.build(load_profile(path), ManualClock())
    return Commands.build(pipeline, Safety.build(pipeline, None), state_dir)


def test_reference_profile_commands():
    spec = load_profile(REF_PROFILE).commands
    assert set(spec.pulses) == {"lock", "unlock", "locate"}
    assert spec.pulses["lock"] == PulseSpec(
        "lock", "GW_BodyCommand", {"GW_LockRequest": 1.0}, {}, None, "GW_CommandSeq",
        "Vehicle.Body.CommandAckSeq", dict.fromkeys(DOORS, True), 0.5, None,
        line_of(REF_TEXT, "[commands.lock]"))
    assert spec.pulses["unlock"].signals == {"GW_LockRequest": 2.0}
    assert spec.pulses["unlock"].confirm == dict.fromkeys(DOORS, False)
    assert spec.pulses["locate"] == PulseSpec(
        "locate", "GW_BodyCommand", {}, {"flash": {"GW_LocateRequest": 1.0},
                                         "horn": {"GW_LocateRequest": 2.0},
                                         "both": {"GW_LocateRequest": 3.0}},
        "flash", "GW_CommandSeq", "Vehicle.Body.CommandAckSeq", {}, 0.5, None,
        line_of(REF_TEXT, "[commands.locate]"))
    assert spec.setpoints == {"charge-limit": SetpointSpec(
        "charge-limit", "GW_ChargeControl", "GW_ChargeLimitSoc", {"GW_ChargeInhibit": 0.0},
        "Vehicle.Powertrain.TractionBattery.Charging.ChargeLimit", 50.0, 100.0, 3.0, None,
        line_of(REF_TEXT, "[commands.charge-limit]"))}
    assert spec.speed_profile_timeout_s == 2.0


def test_reference_profile_builds_every_command(tmp_path):
    commands = build(REF_PROFILE, tmp_path)
    assert set(commands.actions) == {"lock", "unlock", "locate", "charge-limit",
                                     "speed-profile", "reset-latches"}
    assert [sp.spec.name for sp in commands.setpoints] == ["charge-limit"]


def test_defaults_and_a_profile_without_commands(tmp_path):
    path, _ = write_profile(tmp_path, LOCK + SETPOINT + "min = 50\nmax = 100\n")
    spec = load_profile(path).commands
    assert spec.pulses["lock"].timeout_s == 0.5
    assert spec.pulses["lock"].confirm == {}
    assert spec.setpoints["charge-limit"].timeout_s == 3.0
    assert spec.speed_profile_timeout_s == 2.0
    bare, _ = write_profile(tmp_path, "")
    assert not load_profile(bare).commands.pulses
    assert set(build(bare, tmp_path).actions) == {"speed-profile", "reset-latches"}


@pytest.mark.parametrize(("commands", "needle", "key", "words"), [
    ("[commands]\nhonk = { }\n", "honk", "commands.honk", "unknown key"),
    ("[commands]\nlock = 3\n", "lock = 3", "commands.lock", "expected a table"),
    (LOCK + "colour = 1\n", "colour", "commands.lock.colour", "unknown key"),
    ("[commands.speed-profile]\nmessage = \"x\"\n", "message", "commands.speed-profile.message",
     "expected one of: timeout_s"),
    (SETPOINT + "min = 1\nmax = 2\nstep = 1\n", "step", "commands.charge-limit.step",
     "unknown key"),
    (LOCK.replace("signals = { GW_LockRequest = 1 }\n", ""), "[commands.lock]",
     "commands.lock.signals", "signal values"),
    (LOCK + 'default_mode = "x"\n', "default_mode", "commands.lock.default_mode",
     "no mode 'x'; modes: none"),
    (LOCK.replace("ack = \"Vehicle.Body.CommandAckSeq\"\n", ""), "[commands.lock]",
     "commands.lock.ack", "sequence and ack go together"),
    (LOCK.replace("sequence = \"GW_CommandSeq\"\n", ""), "[commands.lock]",
     "commands.lock.sequence", "sequence and ack go together"),
    (LOCK.replace("sequence = \"GW_CommandSeq\"\nack = \"Vehicle.Body.CommandAckSeq\"\n", ""),
     "[commands.lock]", "commands.lock.confirm", "needs state to confirm"),
    (LOCK + 'confirm = { "Vehicle.X" = [1] }\n', "confirm", "commands.lock.confirm.Vehicle.X",
     "expected a state value"),
    (LOCK + 'confirm = { "Vehicle.X" = { a = 1 } }\n', "confirm",
     "commands.lock.confirm.Vehicle.X", "expected a state value"),
    (LOCK + "confirm = { a = 1979-05-27 }\n", "confirm", "commands.lock.confirm.a",
     "expected a state value"),
    (LOCK + "confirm = 1\n", "confirm = 1", "commands.lock.confirm", "expected a table"),
    (LOCK.replace("= 1 }", "= true }"), "signals", "commands.lock.signals.GW_LockRequest",
     "expected a number"),
    (LOCK.replace("message = \"GW_BodyCommand\"\n", ""), "[commands.lock]",
     "commands.lock.message", "missing"),
    (SETPOINT + "min = 60\nmax = 50\n", "max = 50", "commands.charge-limit.max", "min <= max"),
    (SETPOINT + "max = 50\n", "[commands.charge-limit]", "commands.charge-limit.min",
     "min <= max"),
    (SETPOINT + "min = 50\n", "[commands.charge-limit]", "commands.charge-limit.max",
     "min <= max"),
    (SETPOINT + 'min = "50"\nmax = 60\n', "min =", "commands.charge-limit.min",
     "expected a number"),
    (SETPOINT.replace("signal = \"GW_ChargeLimitSoc\"\n", "") + "min = 5\nmax = 6\n",
     "[commands.charge-limit]", "commands.charge-limit.signal", "missing"),
])
def test_parse_errors_name_file_line_and_key(tmp_path, commands, needle, key, words):
    path, text = write_profile(tmp_path, commands)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    err = info.value
    line = line_of(text[len(_HEAD):], needle) + _HEAD.count("\n")
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert str(err).startswith(f"{path}:{line}: {key}: ")
    assert words in err.detail


@pytest.mark.parametrize("table", [LOCK, SETPOINT + "min = 50\nmax = 60\n",
                                   "[commands.speed-profile]\n"])
@pytest.mark.parametrize("value", ["0", "-1", "60.5", "61", "nan", "inf", "true", '"1"'])
def test_timeout_out_of_range(tmp_path, table, value):
    path, text = write_profile(tmp_path, table + f"timeout_s = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.key is not None and info.value.key.endswith(".timeout_s")
    assert info.value.line == line_of(text, f"timeout_s = {value}")


@pytest.mark.parametrize("value", ["0.001", "60"])
def test_timeout_bounds_accepted(tmp_path, value):
    path, _ = write_profile(tmp_path, "[commands.speed-profile]\n" + f"timeout_s = {value}\n")
    assert load_profile(path).commands.speed_profile_timeout_s == float(value)


def test_unknown_command_table_names_its_line(tmp_path):
    path, text = write_profile(tmp_path, LOCK + "\n[commands.reset-latches]\ntimeout_s = 1\n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.key == "commands.reset-latches"
    assert info.value.line == line_of(text, "[commands.reset-latches]")


@pytest.mark.parametrize(("old", "new", "header", "key", "words"), [
    ('[commands.lock]\nmessage = "GW_BodyCommand"', '[commands.lock]\nmessage = "BMS_Pack"',
     "[commands.lock]", "commands.lock.message", "BMS_Pack is not allow-listed"),
    ('[commands.lock]\nmessage = "GW_BodyCommand"', '[commands.lock]\nmessage = "GW_Nothing"',
     "[commands.lock]", "commands.lock.message", "GW_Nothing is not allow-listed"),
    ('message = "GW_ChargeControl"', 'message = "BMS_Pack"', "[commands.charge-limit]",
     "commands.charge-limit.message", "[[transmit]]"),
    ("signals = { GW_LockRequest = 1 }", "signals = { GW_LockRequest = 1, GW_Horn = 1 }",
     "[commands.lock]", "commands.lock", "GW_BodyCommand has no signal GW_Horn"),
    ("both = { GW_LocateRequest = 3 }", "both = { GW_Locate = 3 }", "[commands.locate]",
     "commands.locate", "has no signal GW_Locate"),
    ('[commands.unlock]\nmessage = "GW_BodyCommand"\nsignals = { GW_LockRequest = 2 }\n'
     'sequence = "GW_CommandSeq"', '[commands.unlock]\nmessage = "GW_BodyCommand"\n'
     'signals = { GW_LockRequest = 2 }\nsequence = "GW_Seq"', "[commands.unlock]",
     "commands.unlock", "has no signal GW_Seq"),
    ('ack = "Vehicle.Body.CommandAckSeq"\ndefault_mode', 'ack = "Vehicle.Body.Echo"\n'
     'default_mode', "[commands.locate]", "commands.locate",
     "Vehicle.Body.Echo is not mapped"),
    ('"Vehicle.Cabin.Door.Row1.DriverSide.IsLocked" = true', '"Vehicle.Cabin.Hatch" = true',
     "[commands.lock]", "commands.lock", "Vehicle.Cabin.Hatch is not mapped"),
    ('signal = "GW_ChargeLimitSoc"', 'signal = "GW_Soc"', "[commands.charge-limit]",
     "commands.charge-limit", "has no signal GW_Soc"),
    ("fixed = { GW_ChargeInhibit = 0 }", "fixed = { GW_Inhibit = 0 }",
     "[commands.charge-limit]", "commands.charge-limit", "has no signal GW_Inhibit"),
    ('report = "Vehicle.Powertrain.TractionBattery.Charging.ChargeLimit"',
     'report = "Vehicle.Charge.Limit"', "[commands.charge-limit]", "commands.charge-limit",
     "report Vehicle.Charge.Limit is not mapped"),
    ("min = 50\n", "min = 0\n", "[commands.charge-limit]", "commands.charge-limit",
     "cannot carry"),
])
def test_build_errors_are_config_errors(tmp_path, old, new, header, key, words):
    path, text = write_profile(tmp_path, edited(old, new))
    load_profile(path)  # the tables themselves are well formed
    with pytest.raises(ConfigError) as info:
        build(path, tmp_path)
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), line_of(text, header), key)
    assert words in err.detail


def write_settings(tmp_path: Path, commands: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\nvehicle_id = "car-1"\nprofile = "{REF_PROFILE}"\n'
                    f'state_dir = "state"\n\n{commands}')
    return path


def test_settings_commands_defaults(tmp_path):
    settings = load_settings(write_settings(tmp_path))
    assert settings.commands == CommandSettings(None, None, 10.0, 120.0, 20.0, 5, 24.0)
    assert settings.gateway_key_path == tmp_path / "state" / "gateway.key"
    assert default_settings("car-1", REF_PROFILE, tmp_path).commands.keys is None
    assert load_settings(write_settings(tmp_path, '[commands]\nkeys = ""\n')).commands.keys \
        is None


def test_settings_commands_values(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "keys.toml").write_text("")
    settings = load_settings(write_settings(tmp_path, (
        '[commands]\nkeys = "conf/keys.toml"\ngateway_key = "secret/gw.key"\n'
        "clock_skew_s = 0\nmax_lifetime_s = 3600\nrate_per_minute = 2.5\nburst = 1000\n"
        "retention_h = 0.5\n")))
    assert settings.commands == CommandSettings(
        tmp_path / "conf" / "keys.toml", tmp_path / "secret" / "gw.key", 0.0, 3600.0, 2.5,
        1000, 0.5)
    assert settings.gateway_key_path == tmp_path / "secret" / "gw.key"


@pytest.mark.parametrize(("setting", "words"), [
    ('keys = "absent.toml"', "file not found: absent.toml"),
    ('keys = "."', "file not found"),
    ("keys = 3", "expected a string"),
    ("clock_skew_s = -1", ">= 0"),
    ("clock_skew_s = 300.5", "at most 300"),
    ("clock_skew_s = nan", ">= 0"),
    ("max_lifetime_s = 0", "> 0"),
    ("max_lifetime_s = 3601", "at most 3600"),
    ("rate_per_minute = 0", "> 0"),
    ("retention_h = inf", "> 0"),
    ("burst = 0", ">= 1"),
    ("burst = 1001", "<= 1000"),
    ("burst = 2.5", "an integer"),
    ("burst = true", "an integer"),
    ("keyz = 1", "unknown key"),
])
def test_settings_commands_errors(tmp_path, setting, words):
    path = write_settings(tmp_path, f"[commands]\n{setting}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    err = info.value
    name = setting.split(" =")[0]
    assert (err.file, err.line, err.key) == (str(path), line_of(path.read_text(), setting),
                                             f"commands.{name}")
    assert words in err.detail


@pytest.mark.parametrize("setting", ["clock_skew_s = 300", "max_lifetime_s = 0.5",
                                     "burst = 1"])
def test_settings_commands_bounds_accepted(tmp_path, setting):
    name, value = setting.split(" = ")
    commands = load_settings(write_settings(tmp_path, f"[commands]\n{setting}\n")).commands
    assert getattr(commands, name) == float(value)


def test_with_overrides_keys(tmp_path, monkeypatch):
    settings = load_settings(write_settings(tmp_path))
    with pytest.raises(ValueError, match="file not found"):
        with_overrides(settings, keys=tmp_path / "absent.toml")
    with pytest.raises(ValueError, match="file not found"):
        with_overrides(settings, keys=tmp_path)
    (tmp_path / "keys.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    changed = with_overrides(settings, keys=Path("keys.toml"), state_dir=tmp_path / "other")
    keys = changed.commands.keys
    assert keys is not None and keys.is_absolute()
    assert keys == tmp_path / "keys.toml"
    assert changed.gateway_key_path == tmp_path / "other" / "gateway.key"
    assert changed.commands.clock_skew_s == settings.commands.clock_skew_s
    assert with_overrides(settings).commands == settings.commands
