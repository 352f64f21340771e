"""``ev-gateway check``: the settings file and the profile it names, validated offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.commands.keys import generate_private_key, key_entry
from tests import test_mqtt_tls
from tests.conftest import AMI_PROFILE, REF_PROFILE, ROOT
from tests.test_mqtt_tls import Pki

PASSWORD = "Check-Pa55-7f3c91e0"
VEHICLE = "car-check"
# The TLS tests' fixture: a CA, and client certificates signed by it.
pki = test_mqtt_tls.pki


def write_config(tmp_path: Path, certs: Pki, profile: Path = REF_PROFILE) -> Path:
    """Settings using every file kind: TLS with a client key, a password file, an
    authorized-keys file; GNSS and two geofences. The state directory does not exist."""
    (tmp_path / "mqtt-password").write_text(PASSWORD + "\n")
    operator = generate_private_key(tmp_path / "operator.key")
    (tmp_path / "keys.toml").write_text(key_entry("operator", "owner", operator.public_key()))
    config = tmp_path / "gateway.toml"
    config.write_text(f"""\
[gateway]
vehicle_id = "{VEHICLE}"
profile = "{profile}"
state_dir = "state"

[mqtt]
host = "broker.example"
username = "gw"
password_file = "mqtt-password"

[mqtt.tls]
ca = "{certs.ca}"
cert = "{certs.client_cert}"
key = "{certs.client_key}"

[commands]
keys = "keys.toml"

[gnss]
device = "/dev/ttyUSB0"
baud = 115200

[[geofence]]
name = "depot"
circle = {{ lat = 48.8583, lon = 2.2945, radius_m = 150 }}

[[geofence]]
name = "yard"
polygon = [[48.870, 2.300], [48.870, 2.360], [48.845, 2.360]]
""")
    return config


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def line_of(config: Path, text: str) -> int:
    return next(i for i, line in enumerate(config.read_text().splitlines(), 1) if text in line)


def test_a_valid_config_passes_prints_the_summary_and_creates_nothing(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, pki)
    before = tree(tmp_path)
    assert main(["check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    state = tmp_path / "state"
    expected = [
        f"settings {config}",
        f"  vehicle id: {VEHICLE}",
        f"  profile: {REF_PROFILE}",
        f"  state dir: {state} (not there yet; created at start)",
        "  mqtt: broker.example:8883, protocol auto, client id evgw-car-check, user gw, "
        "password set",
        f"  tls: on, ca {pki.ca}, client cert {pki.client_cert}, key {pki.client_key}",
        # The test PKI's client certificate is not named after this vehicle.
        "  WARNING: the client certificate is for evgw-car-tls, not vehicle car-check: a fleet "
        "broker (docs/fleet-broker.md) will refuse its publishes",
        "  can vehicle: socketcan:can0 500000 bit/s",
        "  gnss: /dev/ttyUSB0 at 115200 baud",
        "  geofences: 2 (depot, yard)",
        f"  commands: on, keys {tmp_path / 'keys.toml'}, gateway key {state / 'gateway.key'} "
        "(not there yet; created at first start)",
        "  home assistant: off",
        "profile microev-ref: Reference micro-EV, 30S LFP 96 V / 120 Ah, 20 kW PMSM, 100 km/h",
    ]
    assert out.splitlines()[:len(expected)] == expected
    assert "\nremote commands: reset-latches, lock, unlock" in out
    assert out.splitlines()[-1].startswith("ok: ")
    # Offline: no state directory, no gateway key, no outbox; nothing changed beside them.
    assert tree(tmp_path) == before
    assert PASSWORD not in out + err
    for secret in (pki.client_key, tmp_path / "operator.key"):
        body = secret.read_text().splitlines()[1:-1]
        assert body and not any(line in out + err for line in body)


def test_an_existing_gateway_key_is_read_and_left_as_it_is(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, pki)
    key = tmp_path / "state" / "gateway.key"
    generate_private_key(key)
    before = tree(tmp_path)
    assert main(["check", "--config", str(config)]) == 0
    assert f"gateway key {key}\n" in capsys.readouterr().out
    assert tree(tmp_path) == before
    # A key that is not a key is found by the check, not at the first command.
    key.write_text("not a key\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ev-gateway: {config}: commands.gateway_key: "), err


def test_bus_overrides_are_shown_next_to_the_profile_s_bus(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, pki)
    assert main(["check", "--config", str(config), "--bus", "vehicle=virtual:bench"]) == 0
    assert ("  can vehicle: virtual:bench 500000 bit/s ([can] or --bus; profile: socketcan:can0)\n"
            in capsys.readouterr().out)
    with pytest.raises(SystemExit, match="no bus named motor"):
        main(["check", "--config", str(config), "--bus", "motor=virtual:x"])


def test_a_profile_given_with_the_config_is_checked_instead(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, pki)
    assert main(["check", "--config", str(config), str(AMI_PROFILE)]) == 0
    out = capsys.readouterr().out
    assert f"  profile: {REF_PROFILE} (checked instead: {AMI_PROFILE})\n" in out
    assert "\nprofile citroen-ami" in out


@pytest.mark.parametrize(("good", "bad", "key", "where"), [
    ('host = "broker.example"', 'host = "broker.example"\nport = 0', "mqtt.port", "port = 0"),
    ("baud = 115200", "baud = 1234", "gnss.baud", "baud = 1234"),
    # An inline table has no lines of its own: the error points at its [[geofence]].
    ("radius_m = 150", "radius_m = -5", "geofence[0].circle.radius_m", "[[geofence]]"),
    ('username = "gw"', 'username = "gw"\nusername_typo = 1', "mqtt.username_typo",
     "username_typo"),
])
def test_a_broken_settings_file_exits_2_naming_file_line_and_key(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], good: str, bad: str,
        key: str, where: str) -> None:
    config = write_config(tmp_path, pki)
    text = config.read_text()
    assert good in text
    config.write_text(text.replace(good, bad))
    assert main(["check", "--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"ev-gateway: {config}:{line_of(config, where)}: {key}: "), err
    assert len(err.strip().splitlines()) == 1
    assert PASSWORD not in err


def test_a_broken_profile_named_by_the_settings_exits_2_naming_it(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "broken.toml"
    profile.write_text(REF_PROFILE.read_text()
                       .replace('signal = "BMS_SoH"', 'signal = "BMS_S0H"')
                       .replace('"../reference/', f'"{ROOT}/dbc/reference/'))
    config = write_config(tmp_path, pki, profile)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    line = line_of(profile, '"BMS_S0H"')
    assert err.startswith(f"ev-gateway: {profile}:{line}: signal.signal: "), err
    assert "BMS_S0H" in err


def test_an_unusable_tls_certificate_names_the_settings_file(
        tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    config = write_config(tmp_path, pki)
    config.write_text(config.read_text().replace(str(pki.client_cert), str(garbage)))
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    line = line_of(config, "[mqtt.tls]")
    assert err.startswith(f"ev-gateway: {config}:{line}: mqtt.tls: cannot load TLS files"), err


def test_a_profile_alone_is_still_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(REF_PROFILE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile microev-ref: ")
    assert "settings " not in out and "\nsafety: " in out
    with pytest.raises(SystemExit, match="PROFILE, or --config"):
        main(["check"])


def test_the_password_never_appears_even_at_debug_level(tmp_path: Path, pki: Pki) -> None:
    """The installed command in a process of its own, as an operator runs it."""
    config = write_config(tmp_path, pki)
    good = config.read_text()
    # 3.1.1 cannot send a password without a user: an error about the password file.
    config_bad = tmp_path / "bad.toml"
    config_bad.write_text(good.replace('username = "gw"\n', 'protocol = "3.1.1"\n'))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = []
    for path, status in ((config, 0), (config_bad, 2)):
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--log-level", "DEBUG", "check", "--config",
             str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
            check=False)
        assert done.returncode == status, done.stderr
        outputs.append(done.stdout + done.stderr)
    assert "password set" in outputs[0]
    assert "mqtt.password_file" in outputs[1]
    assert not any(PASSWORD in text for text in outputs)
