"""Secrets are never logged: the daemon at DEBUG level, against a real broker that checks
a password and a client certificate, prints neither the password nor a private key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.commands.envelope import b64url
from gateway.commands.keys import generate_private_key, key_entry
from gateway.config.settings import load_settings
from hil.broker import free_port
from tests import test_mqtt_tls
from tests.conftest import REF_PROFILE, ROOT
from tests.test_mqtt_tls import PASSWD, Pki, running_broker

USER = "gateway"
PASSWORD = "Secret-Pa55-e41b9d07"
WRONG = "Wrong-Pa55-5c2a8f16"
# The TLS tests' fixture: a CA, a broker certificate, and a client certificate and key.
pki = test_mqtt_tls.pki


def private_forms(path: Path) -> list[str]:
    """Ways a private key could show up in a log: its PEM lines, its secret number."""
    pem = path.read_bytes()
    forms = [line for line in pem.decode().splitlines()[1:-1] if len(line) >= 16]
    key = load_pem_private_key(pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes_raw()
        forms += [raw.hex(), b64url(raw)]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        number = key.private_numbers().private_value
        forms += [f"{number:x}", str(number)]
    assert forms, f"no secret forms found in {path}"
    return forms


def write_config(tmp_path: Path, certs: Pki, port: int, password: str) -> tuple[Path, Path]:
    """Settings with a password file, a client key and remote commands (so the gateway's
    own key is loaded); returns the settings file and the gateway key."""
    state = tmp_path / "state"
    gateway_key = state / "gateway.key"
    generate_private_key(gateway_key)
    operator = generate_private_key(tmp_path / "operator.key")
    (tmp_path / "keys.toml").write_text(key_entry("operator", "owner", operator.public_key()))
    (tmp_path / "password").write_text(password + "\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f"""\
[gateway]
vehicle_id = "car-secrets"
profile = "{REF_PROFILE}"
state_dir = "{state}"
[mqtt]
host = "127.0.0.1"
port = {port}
username = "{USER}"
password_file = "password"
backoff_min = 0.2
backoff_max = 0.5
[mqtt.tls]
ca = "{certs.ca}"
cert = "{certs.client_cert}"
key = "{certs.client_key}"
[commands]
keys = "keys.toml"
""")
    return config, gateway_key


def run_daemon(config: Path) -> str:
    """``ev-gateway run`` for 3 s at DEBUG level; everything it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--log-level", "DEBUG", "run", "--config",
         str(config), "--bus", "vehicle=virtual:secrets-test", "--duration", "3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_the_password_and_private_keys_never_reach_the_logs(tmp_path: Path, pki: Pki) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run([str(PASSWD), "-b", "-c", str(passwords), USER, PASSWORD], check=True,
                   capture_output=True)
    tls_port = free_port()
    # Global authentication (see test_mqtt_tls): the later allow_anonymous line wins.
    broker_config = (f"allow_anonymous false\npassword_file {passwords}\n"
                     + test_mqtt_tls._tls_listener(tls_port, pki, require_certificate=True))
    outputs: dict[str, str] = {}
    keys: list[Path] = [pki.client_key]
    with running_broker(tmp_path / "broker", broker_config, tls_port):
        for name, password in (("wrong", WRONG), ("right", PASSWORD)):
            config, gateway_key = write_config(tmp_path / name, pki, tls_port, password)
            keys.append(gateway_key)
            outputs[name] = run_daemon(config)
            settings = load_settings(config)
            assert settings.mqtt.password == password  # loaded, so the checks below can fail
            assert password not in repr(settings) and password not in str(settings.mqtt)
    # Both paths were taken: the broker refused the wrong password, took the right one.
    assert "not authori" in outputs["wrong"].lower()
    assert "mqtt: connected to" not in outputs["wrong"]
    assert f"mqtt: connected to 127.0.0.1:{tls_port}" in outputs["right"]
    # DEBUG really was on (paho's packet log), so a leak at that level would be seen.
    assert "Sending CONNECT" in outputs["right"]
    secrets = [PASSWORD, WRONG] + [form for key in keys for form in private_forms(key)]
    for name, text in outputs.items():
        leaked = [secret for secret in secrets if secret in text]
        assert not leaked, f"the {name} run printed secrets: {leaked}"
