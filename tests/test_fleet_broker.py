"""The fleet broker of deploy/broker/: its scripts, TLS and ACL, against a real mosquitto.

Certificates come from the shipped CA scripts and the broker runs the shipped
mosquitto.conf and acl (tests/fleet_broker_helpers.py). mosquitto 2.0 grants
every SUBSCRIBE and filters at delivery, so "cannot read" is shown by
non-delivery: a fence message the same client is allowed to get is sent
after the forbidden one and arrives while the forbidden one never does
(mosquitto keeps one publisher's order towards one subscriber). A refused
PUBLISH is answered with reason code 0x87 (not authorized).
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.mqtt.discovery import removal_messages
from gateway.mqtt.topics import Topics
from tests.fleet_broker_helpers import (
    NOT_AUTHORIZED,
    FleetBroker,
    Identity,
    Peer,
    Pki,
    connects,
    ok,
    script,
)

PASSWD = Path("/usr/bin/mosquitto_passwd")
A, B = "car-A", "car-B"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One fleet CA with two vehicles and the operator names deploy/broker/acl grants."""
    p = Pki(tmp_path_factory.mktemp("fleet"))
    for vehicle in (A, B):
        p.vehicle(vehicle)
    for name in ("console@operator", "ingest-1@ingest", "ingest-2@ingest", "hass@homeassistant"):
        p.operator(name)
    return p


def ident(pki: Pki, name: str) -> Identity:
    """An identity issued by the ``pki`` fixture."""
    kind = "operators" if "@" in name else "vehicles"
    out = pki.root / kind / name
    return Identity(name, out / "ca.crt", out / "client.crt", out / "client.key")


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[FleetBroker]:
    """The shipped config on free ports, for this test only."""
    with FleetBroker(tmp_path / "broker", pki) as b:
        yield b


@pytest.fixture
def peers(broker: FleetBroker, pki: Pki) -> Iterator[dict[str, Peer]]:
    """Connected MQTT 5 clients: both vehicles and the console operator."""
    out = {name: Peer(broker.port, pki.ca_dir / "ca.crt", ident(pki, name))
           for name in (A, B, "console@operator")}
    try:
        for name, peer in out.items():
            assert peer.connect(), f"{name} could not connect"
        yield out
    finally:
        for peer in out.values():
            peer.close()


def gateway_topics(vehicle: str) -> list[str]:
    """Every topic the gateway publishes, from the gateway's own code."""
    t = Topics(vehicle)
    return [*t.owned_retained(), t.telemetry, t.backfill, t.location, t.alerts, t.events,
            f"{t.base}/health", t.command_result("c-1"), t.command_request,
            *(m.topic for m in removal_messages(t, "homeassistant"))]


def test_a_vehicle_may_publish_every_gateway_topic_and_read_its_own(
        peers: dict[str, Peer]) -> None:
    car = peers[A]
    owned = [*Topics(A).owned_retained(), Topics(A).command_request]
    for topic in owned:
        assert car.subscribe(topic) == 1
    for topic in gateway_topics(A):
        assert ok(car.publish(topic, b"x", retain=topic in owned)), topic
    # What it subscribed to (the gateway's start-up subscriptions) comes back to it.
    car.wait_for(lambda: all(car.received(t) for t in owned), "its own retained topics")


def test_a_vehicle_reads_its_commands_and_an_operator_its_telemetry(
        peers: dict[str, Peer]) -> None:
    car, console = peers[A], peers["console@operator"]
    assert car.subscribe(Topics(A).command_request) == 1
    assert console.subscribe("evgw/v1/+/telemetry") == 1
    assert ok(console.publish(Topics(A).command_request, b"cmd"))
    assert ok(car.publish(Topics(A).telemetry, b"tele"))
    car.wait_for(lambda: car.received(Topics(A).command_request) == [b"cmd"], "the command")
    console.wait_for(lambda: console.received(Topics(A).telemetry) == [b"tele"], "telemetry")


def test_a_vehicle_cannot_read_another_vehicles_commands(peers: dict[str, Peer]) -> None:
    a, b, console = peers[A], peers[B], peers["console@operator"]
    for pattern in (Topics(B).command_request, "evgw/v1/+/cmd/req", "#"):
        # mosquitto 2.0 grants the subscription (a broker may refuse it: 0x87).
        assert a.subscribe(pattern) in (1, NOT_AUTHORIZED)
    assert b.subscribe(Topics(B).command_request) == 1
    assert ok(console.publish(Topics(B).command_request, b"for B"))
    assert ok(console.publish(Topics(A).command_request, b"fence"))
    b.wait_for(lambda: b.received(Topics(B).command_request) == [b"for B"], "B's command")
    a.wait_for(lambda: a.received(Topics(A).command_request) != [], "the fence")
    assert [m.topic for m in a.messages if not m.topic.startswith(f"{Topics(A).base}/")] == []


@pytest.mark.parametrize("topic", [
    *gateway_topics(B), "app/console/res", "evgw/v1/car-A", "$SYS/broker/x"])
def test_a_vehicle_cannot_write_outside_its_own_topics(
        peers: dict[str, Peer], topic: str) -> None:
    a, b, console = peers[A], peers[B], peers["console@operator"]
    assert console.subscribe("evgw/v1/#") == 1
    assert b.subscribe(Topics(B).command_request) == 1
    assert a.publish(topic, b"forged", retain=True) == NOT_AUTHORIZED
    assert ok(a.publish(Topics(A).telemetry, b"fence"))
    console.wait_for(lambda: console.received(Topics(A).telemetry) != [], "the fence")
    assert [m for m in console.messages if m.payload == b"forged"] == []
    assert b.received(Topics(B).command_request) == []


def test_operators_have_only_their_roles_rights(pki: Pki, peers: dict[str, Peer],
                                                broker: FleetBroker) -> None:
    console = peers["console@operator"]
    assert console.publish(Topics(A).telemetry, b"forged") == NOT_AUTHORIZED
    assert console.publish(Topics(A).status, b"forged", retain=True) == NOT_AUTHORIZED
    ingest = [Peer(broker.port, pki.ca_dir / "ca.crt", ident(pki, f"ingest-{i}@ingest"))
              for i in (1, 2)]
    try:
        for consumer in ingest:
            assert consumer.connect()
            assert consumer.subscribe("$share/ingest/evgw/v1/+/telemetry") == 1
            assert consumer.publish(Topics(A).command_request, b"cmd") == NOT_AUTHORIZED
        sent = [f"t{i}".encode() for i in range(20)]
        for payload in sent:
            assert ok(peers[A].publish(Topics(A).telemetry, payload))
        # A shared subscription: each message goes to exactly one consumer of the group.
        def got() -> list[bytes]:
            return [p for c in ingest for p in c.received(Topics(A).telemetry)]
        ingest[0].wait_for(lambda: len(got()) >= len(sent), "every telemetry message")
        assert sorted(got()) == sorted(sent)
        # Ingestion reads what vehicles publish, never the commands sent to them.
        reader = ingest[0]
        assert reader.subscribe("evgw/v1/#") == 1
        assert ok(console.publish(Topics(A).command_request, b"cmd"))
        assert ok(peers[A].publish(Topics(A).status, b"fence"))
        reader.wait_for(lambda: reader.received(Topics(A).status) != [], "the fence")
        assert [m for m in reader.messages if "/cmd/" in m.topic] == []
    finally:
        for consumer in ingest:
            consumer.close()


def test_a_client_id_cannot_kick_another_vehicle(pki: Pki, broker: FleetBroker,
                                                 peers: dict[str, Peer]) -> None:
    b, console = peers[B], peers["console@operator"]
    assert b.subscribe(Topics(B).command_request) == 1
    imposter = Peer(broker.port, pki.ca_dir / "ca.crt", ident(pki, A), client_id=B)
    try:
        assert imposter.connect()
        assert ok(console.publish(Topics(B).command_request, b"still there"))
        b.wait_for(lambda: b.received(Topics(B).command_request) != [], "B's command")
        assert b.disconnects == 0
        assert f"as {A} (p5" in broker.log_text()  # the broker renamed the client
    finally:
        imposter.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_clients_connect(pki: Pki, broker: FleetBroker,
                                         version: ssl.TLSVersion) -> None:
    assert connects(broker.port, pki.ca_dir / "ca.crt", ident(pki, A), max_tls=version)


def test_no_certificate_or_another_cas_certificate_is_refused(
        tmp_path: Path, pki: Pki, broker: FleetBroker) -> None:
    # Same CA name, same vehicle id, different key: trust follows the key.
    rogue = Pki(tmp_path / "rogue").vehicle(A)
    ca = pki.ca_dir / "ca.crt"
    assert not connects(broker.port, ca)
    assert not connects(broker.port, ca, rogue)
    assert not connects(broker.port, ca, username=A, password="anything")
    assert "peer did not return a certificate" in broker.log_text()
    assert "certificate verify failed" in broker.log_text()
    assert connects(broker.port, ca, ident(pki, A))  # the broker itself is fine


def test_the_optional_password_listener(tmp_path: Path, pki: Pki) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run([str(PASSWD), "-b", "-c", str(passwords), "app@operator", "s3cret"],
                   check=True, capture_output=True)
    with FleetBroker(tmp_path / "broker", pki, passwords=passwords) as broker:
        assert broker.password_port is not None
        ca, port = pki.ca_dir / "ca.crt", broker.password_port
        assert not connects(port, ca, username="app@operator", password="wrong")
        assert not connects(port, ca, ident(pki, A))  # a certificate is no login here
        app = Peer(port, ca, username="app@operator", password="s3cret")
        try:
            assert app.connect()
            # No `user app@operator` section in the shipped ACL: no rights at all.
            assert app.publish(Topics(A).command_request, b"cmd") == NOT_AUTHORIZED
        finally:
            app.close()


def test_revoked_certificates_are_refused_after_a_reload(tmp_path: Path) -> None:
    own = Pki(tmp_path / "pki")
    # A rotation: the vehicle got a new key and certificate; the old one is revoked.
    old = own.vehicle(A, out=tmp_path / "old")
    new = own.vehicle(A, out=tmp_path / "new")
    ca = own.ca_dir / "ca.crt"
    with FleetBroker(tmp_path / "broker", own) as broker:
        held = Peer(broker.port, ca, old)
        assert held.connect()
        own.run("revoke-cert.sh", "--ca", own.ca_dir, "--reason", "superseded", old.cert)
        broker.reload()
        assert not connects(broker.port, ca, old)
        # A reload spares open connections; the restart docs/fleet-broker.md asks for cuts.
        assert held.disconnects == 0
        assert connects(broker.port, ca, new)  # (which also replaces the held connection)
        own.run("revoke-cert.sh", "--ca", own.ca_dir, "--name", A)  # the car was stolen
        broker.restart()
        assert not connects(broker.port, ca, old)
        assert not connects(broker.port, ca, new)
        held.close()
        assert "certificate verify failed" in broker.log_text()


def test_issue_script_refuses_bad_vehicle_ids(pki: Pki, tmp_path: Path) -> None:
    index = (pki.ca_dir / "index.txt").read_text()
    for bad in ["", "a/b", "a+b", "car#1", "-car", ".car", "_car", "car 1", "ops@x",
                "x" * 65, "car\n1", "wagen-ä"]:
        done = script("issue-vehicle-cert.sh", bad, "--ca", pki.ca_dir, "--out",
                      tmp_path / "out", cwd=tmp_path)
        assert done.returncode != 0, bad
        assert not (tmp_path / "out" / "client.crt").exists(), bad
    assert (pki.ca_dir / "index.txt").read_text() == index  # nothing was signed
    for name in ("no-at-sign", "a@b/c", "@ops"):
        assert script("issue-operator-cert.sh", name, "--ca", pki.ca_dir,
                      cwd=tmp_path).returncode != 0


@pytest.mark.parametrize("vehicle", ["x" * 64, "9.a_b-c"])
def test_issued_certificate_names_the_vehicle(pki: Pki, tmp_path: Path, vehicle: str) -> None:
    # A CSR made elsewhere asking for another name still gets the vehicle's.
    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-subj",
                    f"/CN={B}/O=evil", "-out", csr], check=True, capture_output=True)
    out = tmp_path / "out"
    pki.run("issue-vehicle-cert.sh", vehicle, "--ca", pki.ca_dir, "--out", out, "--csr", csr)
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={vehicle}"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == vehicle
    assert not (out / "client.key").exists()
