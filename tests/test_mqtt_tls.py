"""The MQTT link over TLS (CA, client certificate) and with a password, against a real mosquitto.

Certificates are made fresh for this module with ``cryptography``. The broker
keeps its plain listener (where the test subscribes) and gets a TLS listener
next to it; mosquitto 2 only allows per-listener authentication when that is
switched on before any other security option, which the generated config
does not allow, so the password test makes authentication global and its
subscriber logs in too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.app import Pipeline, Publishing
from gateway.clock import SystemClock
from gateway.config import ConfigError, Profile
from gateway.config.settings import Settings, TlsSettings, default_settings, with_overrides
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt.link import CONNECT_TIMEOUT, Link
from gateway.mqtt.payloads import Envelope, new_boot_id
from gateway.mqtt.topics import Topics
from gateway.outbox import Limits, Outbox
from hil.broker import Mosquitto, find_mosquitto, free_port
from tests.conftest import REF_PROFILE
from tests.contract import validate
from tests.mqtt_helpers import Subscriber

VEHICLE = "car-tls"
STATUS = f"evgw/v1/{VEHICLE}/status"
USER, PASSWORD = "gateway", "correct horse"
PASSWD = Path("/usr/bin/mosquitto_passwd")
FAILING_FOR = 2.0
"""How long a gateway that must not connect is watched."""


@dataclass(frozen=True)
class Pki:
    """PEM files of one test's CA, broker and client, plus an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey,
                 issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
                 extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    """A certificate for ``key``, self-signed when ``issuer`` is None."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = _name(subject) if issuer is None else issuer[0].subject
    signing_key = key if issuer is None else issuer[1]
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signing_key.public_key()), critical=False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def _ca(subject: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    cert = _certificate(subject, key, None, [(x509.BasicConstraints(ca=True, path_length=0), True),
                                             (usage, True)])
    return cert, key


def _leaf(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
          usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None = None,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([usage]), False)]
    if san:
        extensions.append((x509.SubjectAlternativeName(san), False))
    return _certificate(subject, key, issuer, extensions), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a broker certificate for 127.0.0.1/localhost, a client certificate, a rogue CA."""
    d = tmp_path_factory.mktemp("pki")
    ca = _ca("ev-gateway test CA")
    server = _leaf("127.0.0.1", ca, ExtendedKeyUsageOID.SERVER_AUTH,
                   [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost")])
    client = _leaf(f"evgw-{VEHICLE}", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    # Same name as the real CA, different key: trust must follow the key, not the name.
    rogue = _ca("ev-gateway test CA")
    return Pki(ca=_write_cert(d / "ca.pem", ca[0]),
               server_cert=_write_cert(d / "server.pem", server[0]),
               server_key=_write_key(d / "server.key", server[1]),
               client_cert=_write_cert(d / "client.pem", client[0]),
               client_key=_write_key(d / "client.key", client[1]),
               rogue_ca=_write_cert(d / "rogue-ca.pem", rogue[0]))


def _tls_listener(port: int, pki: Pki, *, require_certificate: bool) -> str:
    return (f"listener {port} 127.0.0.1\n"
            f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
            f"require_certificate {'true' if require_certificate else 'false'}\n")


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    """Mosquitto.start only waits for the plain port; a refused TLS port would fake a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"TLS listener on port {port} never accepted connections")


@contextlib.contextmanager
def running_broker(workdir: Path, extra_config: str, tls_port: int) -> Iterator[Mosquitto]:
    """A mosquitto with ``extra_config``, stopped afterwards."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests through `bash deploy/dev.sh test`")
    # Started as root, mosquitto would drop to its own user, which cannot read the PEM
    # files in pytest's private temp directory; as any other user the line does nothing.
    broker = Mosquitto(workdir, extra_config="user root\n" + extra_config)
    broker.start()
    try:
        _wait_listening(tls_port)
        yield broker
    finally:
        broker.stop()


def settings_for(state: Path, port: int, tls: TlsSettings | None, **mqtt: Any) -> Settings:
    """Default settings aimed at ``port`` on 127.0.0.1, with quick reconnects."""
    base = with_overrides(default_settings(VEHICLE, REF_PROFILE, state),
                          host="127.0.0.1", port=port)
    fields: dict[str, Any] = {"backoff_min": 0.2, "backoff_max": 0.5, "tls": tls, **mqtt}
    return dataclasses.replace(base, mqtt=dataclasses.replace(base.mqtt, **fields))


@contextlib.asynccontextmanager
async def gateway(ref_profile: Profile, settings: Settings
                  ) -> AsyncIterator[tuple[Pipeline, Publishing]]:
    """A publishing gateway on the real clock, always stopped."""
    pipeline = Pipeline.build(ref_profile, SystemClock())
    pub = await Publishing.start(pipeline, settings)
    try:
        yield pipeline, pub
    finally:
        await pub.stop()


async def assert_never_connects(pipeline: Pipeline, pub: Publishing, *, failures: int = 2,
                                limit: float = 10.0) -> None:
    """Watch for at least FAILING_FOR seconds, and until ``failures`` connect failures were
    counted (at most ``limit`` seconds): never connected, and the link still retrying."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while (loop.time() - start < FAILING_FOR
           or pipeline.counters.get("mqtt.connect_failures") < failures):
        assert not pub.link.connected
        assert loop.time() - start < limit, "connect failures were not counted in time"
        await asyncio.sleep(0.05)
    assert pipeline.counters.get("mqtt.connects") == 0
    assert not pub.tasks["mqtt-link"].done()


def failure_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the link logged about being unable to connect."""
    return "\n".join(r.getMessage() for r in caplog.records if "unavailable" in r.getMessage())


async def test_client_certificate_over_tls_connects_and_publishes_the_birth(
        tmp_path: Path, pki: Pki, ref_profile: Profile) -> None:
    tls_port = free_port()
    listener = _tls_listener(tls_port, pki, require_certificate=True)
    tls = TlsSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, insecure=False)
    with running_broker(tmp_path / "broker", listener, tls_port) as broker:
        async with Subscriber(broker.host, broker.port, VEHICLE) as sub, \
                gateway(ref_profile, settings_for(tmp_path / "state", tls_port, tls)) as (_, pub):
            await asyncio.wait_for(pub.link.connected_event.wait(), 10)
            await sub.wait_for(lambda: len(sub.on("status")) >= 1)
            birth = validate(STATUS, sub.on("status")[0].payload)
            assert birth["state"] == "online"
            assert birth["boot"] == pub.envelope.boot_id
            assert pub.link.connected


async def test_without_a_client_certificate_the_broker_refuses_and_the_link_retries(
        tmp_path: Path, pki: Pki, ref_profile: Profile) -> None:
    tls_port = free_port()
    listener = _tls_listener(tls_port, pki, require_certificate=True)
    tls = TlsSettings(ca=pki.ca, cert=None, key=None, insecure=False)
    with running_broker(tmp_path / "broker", listener, tls_port):
        async with gateway(ref_profile, settings_for(tmp_path / "state", tls_port, tls)) \
                as (pipeline, pub):
            # With TLS 1.3 the client's handshake completes before the broker checks for a
            # certificate; the broker's alert arrives while the client waits for CONNACK, and
            # aiomqtt ignores a disconnect before CONNACK, so an attempt only fails when the
            # link's timeout runs out: one failure is all this bounded wait can see.
            await assert_never_connects(pipeline, pub, failures=1, limit=CONNECT_TIMEOUT + 5)


async def test_a_broker_certificate_from_another_ca_is_rejected(
        tmp_path: Path, pki: Pki, ref_profile: Profile, caplog: pytest.LogCaptureFixture) -> None:
    tls_port = free_port()
    listener = _tls_listener(tls_port, pki, require_certificate=True)
    tls = TlsSettings(ca=pki.rogue_ca, cert=pki.client_cert, key=pki.client_key, insecure=False)
    caplog.set_level(logging.WARNING, logger="gateway")
    with running_broker(tmp_path / "broker", listener, tls_port):
        async with gateway(ref_profile, settings_for(tmp_path / "state", tls_port, tls)) \
                as (pipeline, pub):
            await assert_never_connects(pipeline, pub)
    assert "certificate verify failed" in failure_log(caplog).lower()


async def _retained_status(port: int) -> dict[str, Any]:
    """The retained status as a logged-in client sees it."""
    async with aiomqtt.Client("127.0.0.1", port, username=USER, password=PASSWORD) as client:
        await client.subscribe(STATUS, qos=1)
        async with asyncio.timeout(10):
            async for m in client.messages:
                assert isinstance(m.payload, bytes)
                return validate(STATUS, m.payload)
    raise AssertionError("no retained status")


async def test_username_and_password_over_tls(
        tmp_path: Path, pki: Pki, ref_profile: Profile, caplog: pytest.LogCaptureFixture) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run([str(PASSWD), "-b", "-c", str(passwords), USER, PASSWORD], check=True,
                   capture_output=True)
    tls_port = free_port()
    # Global, not per listener: see the module docstring. The later line wins.
    config = (f"allow_anonymous false\npassword_file {passwords}\n"
              + _tls_listener(tls_port, pki, require_certificate=False))
    tls = TlsSettings(ca=pki.ca, cert=None, key=None, insecure=False)
    caplog.set_level(logging.WARNING, logger="gateway")
    with running_broker(tmp_path / "broker", config, tls_port) as broker:
        right = settings_for(tmp_path / "right", tls_port, tls, username=USER, password=PASSWORD)
        async with gateway(ref_profile, right) as (_, pub):
            await asyncio.wait_for(pub.link.connected_event.wait(), 10)
            birth = await _retained_status(broker.port)
            assert birth["state"] == "online"
            assert birth["boot"] == pub.envelope.boot_id
        wrong = settings_for(tmp_path / "wrong", tls_port, tls, username=USER,
                             password="wrong horse")
        async with gateway(ref_profile, wrong) as (pipeline, pub):
            await assert_never_connects(pipeline, pub)
        # The broker said no to the login, not to the TLS handshake.
        assert "not authori" in failure_log(caplog).lower()
        assert (await _retained_status(broker.port))["state"] == "offline"


def _link(tmp_path: Path, tls: TlsSettings) -> Link:
    """A link for ``tls``; construction does not touch the outbox, so it stays closed."""
    clock = SystemClock()
    counters = Counters()
    rlog = RateLimitedLog(logging.getLogger("gateway"), clock)
    outbox = Outbox(tmp_path / "outbox.sqlite", Limits(), clock, counters, rlog)
    settings = settings_for(tmp_path / "state", free_port(), tls)
    return Link(settings.mqtt, Topics(VEHICLE), Envelope(VEHICLE, new_boot_id()), outbox,
                clock, counters, rlog, version="test", profile="test")


def _bad_tls(tmp_path: Path, pki: Pki, broken: str) -> TlsSettings:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                       "-----END CERTIFICATE-----\n")
    tls = TlsSettings(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, insecure=False)
    if broken == "missing key":
        return dataclasses.replace(tls, key=tmp_path / "no-such.key")
    if broken == "garbage ca":
        return dataclasses.replace(tls, ca=garbage)
    return dataclasses.replace(tls, cert=garbage)


@pytest.mark.parametrize("broken", ["garbage cert", "garbage ca", "missing key"])
def test_unusable_tls_files_are_a_config_error_when_the_link_is_built(
        tmp_path: Path, pki: Pki, broken: str) -> None:
    with pytest.raises(ConfigError, match="cannot load TLS files") as info:
        _link(tmp_path, _bad_tls(tmp_path, pki, broken))
    assert info.value.file == "mqtt.tls"


async def test_publishing_refuses_to_start_with_a_garbage_certificate(
        tmp_path: Path, pki: Pki, ref_profile: Profile) -> None:
    pipeline = Pipeline.build(ref_profile, SystemClock())
    tls = _bad_tls(tmp_path, pki, "garbage cert")
    settings = settings_for(tmp_path / "state", free_port(), tls)
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        await Publishing.start(pipeline, settings)
    # One error at start-up, not a link that keeps retrying with files that cannot work.
    assert "mqtt-link" not in {t.get_name() for t in asyncio.all_tasks()}
    assert pipeline.counters.get("mqtt.connect_failures") == 0
