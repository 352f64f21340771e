"""The fleet broker of deploy/broker/ for tests: its scripts, its config, and MQTT 5 peers.

:class:`Pki` runs the real CA scripts into a test directory. :class:`FleetBroker`
runs mosquitto with the shipped ``mosquitto.conf`` and ``acl``; only paths,
the port and logging are rewritten (each rewrite must find its text, so the
tests notice when the shipped config changes shape). :class:`Peer` is a
paho MQTT 5 client that keeps the broker's reason codes, which aiomqtt
drops for PUBACKs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hil.broker import find_mosquitto, free_port

ROOT = Path(__file__).resolve().parents[1]
BROKER_DIR = ROOT / "deploy" / "broker"
WAIT_S = 10.0
"""Deadline for anything awaited here; generous, since CI machines stall."""
NOT_AUTHORIZED = 0x87


def ok(code: int) -> bool:
    """Whether an MQTT 5 reason code is a success (0x10, no matching subscribers, is one)."""
    return code < 0x80


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait without blocking the event loop until ``predicate()`` holds (WAIT_S at most)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
        await asyncio.sleep(0.02)


def script(name: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one of deploy/broker's scripts; never raises on a non-zero exit."""
    return subprocess.run(["bash", str(BROKER_DIR / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


@dataclass(frozen=True)
class Identity:
    """What one client holds: the fleet CA certificate and its own certificate and key."""

    name: str
    ca: Path
    cert: Path
    key: Path


class Pki:
    """A fleet CA made by make-ca.sh, with a broker certificate for 127.0.0.1."""

    def __init__(self, root: Path, name: str = "ev-gateway fleet CA") -> None:
        self.root = root
        self.ca_dir = root / "ca"
        root.mkdir(parents=True, exist_ok=True)
        self.run("make-ca.sh", "--ca", self.ca_dir, "--name", name,
                 "--server-ip", "127.0.0.1", "--server-dns", "localhost")

    def run(self, name: str, *args: str | Path) -> str:
        """Run a script that must succeed; returns its output."""
        done = script(name, *args, cwd=self.root)
        assert done.returncode == 0, f"{name} failed: {done.stderr}"
        return done.stdout

    def vehicle(self, vehicle_id: str, *args: str, out: Path | None = None) -> Identity:
        """Issue a vehicle certificate with issue-vehicle-cert.sh (into ``out``)."""
        out = out or self.root / "vehicles" / vehicle_id
        self.run("issue-vehicle-cert.sh", vehicle_id, "--ca", self.ca_dir, "--out", out, *args)
        return Identity(vehicle_id, out / "ca.crt", out / "client.crt", out / "client.key")

    def operator(self, name: str) -> Identity:
        """Issue an operator certificate with issue-operator-cert.sh."""
        out = self.root / "operators" / name
        self.run("issue-operator-cert.sh", name, "--ca", self.ca_dir, "--out", out)
        return Identity(name, out / "ca.crt", out / "client.crt", out / "client.key")


def _uncomment_password_listener(text: str) -> str:
    """The shipped config with its optional password listener switched on."""
    head, marker, tail = text.partition("optional: apps with a password")
    assert marker, "the optional password listener is gone from mosquitto.conf"
    tail = "\n".join(line[1:] if line[:2].strip("#").isalpha() else line
                     for line in tail.splitlines())
    head = head.replace("#password_file ", "password_file ")
    return head + marker + tail + "\n"


class FleetBroker:
    """mosquitto with deploy/broker's config and ACL, on free loopback ports."""

    def __init__(self, workdir: Path, pki: Pki, *, passwords: Path | None = None) -> None:
        binary = find_mosquitto()
        assert binary is not None, "mosquitto is not installed: run `bash deploy/dev.sh test`"
        self.binary = binary
        self.workdir = workdir
        self.pki = pki
        self.passwords = passwords
        self.etc = workdir / "etc"
        self.state = workdir / "state"
        self.log = workdir / "mosquitto.log"
        self.port = free_port()
        self.password_port = free_port() if passwords is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        """Copy the CA's files to the broker, as docs/fleet-broker.md says to."""
        self.etc.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        ca = self.pki.ca_dir
        for source in (ca / "ca.crt", ca / "crl.pem", ca / "broker" / "server.crt",
                       ca / "broker" / "server.key", BROKER_DIR / "acl"):
            shutil.copy(source, self.etc / source.name)
        if self.passwords is not None:
            shutil.copy(self.passwords, self.etc / "passwd")

    def config(self) -> str:
        """The shipped mosquitto.conf, pointed at this test's files and ports."""
        text = (BROKER_DIR / "mosquitto.conf").read_text()
        if self.password_port is not None:
            text = _uncomment_password_listener(text)
        rewrites = {"/etc/mosquitto/fleet/": f"{self.etc}/",
                    "/var/lib/mosquitto/": f"{self.state}/",
                    "listener 8883\n": f"listener {self.port} 127.0.0.1\n",
                    "log_dest stderr\n": f"log_dest file {self.log}\n"}
        if self.password_port is not None:
            rewrites["listener 8884\n"] = f"listener {self.password_port} 127.0.0.1\n"
        for old, new in rewrites.items():
            assert old in text, f"mosquitto.conf no longer has {old!r}"
            text = text.replace(old, new)
        # As root, mosquitto would drop to its own user, which cannot read pytest's
        # private directories; debug logging records every ACL denial.
        return text + "user root\nlog_type debug\n"

    def start(self) -> None:
        """Install the files, start mosquitto and wait until every listener accepts."""
        self.install()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config())
        self.process = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + WAIT_S
        ports = [p for p in (self.port, self.password_port) if p is not None]
        while ports:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise AssertionError(f"mosquitto exited at start: {err} {self.log_text()}")
            assert time.monotonic() < deadline, f"mosquitto did not listen on {ports}"
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", ports[0]), 0.2):
                ports.pop(0)
                continue
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, and wait (persistence is written)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()

    def reload(self) -> None:
        """Re-install the CA's files and SIGHUP mosquitto; returns once it reloaded."""
        assert self.process is not None
        self.install()
        before = self.log_text().count("Reloading config.")
        os.kill(self.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        # The reload runs in mosquitto's only loop: connections accepted after the log
        # line are handled with the reloaded files.
        while self.log_text().count("Reloading config.") == before:
            assert time.monotonic() < deadline, "mosquitto did not reload"
            time.sleep(0.02)

    def restart(self) -> None:
        """Stop, re-install the CA's files (e.g. a new CRL) and start again."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Everything mosquitto logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> FleetBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Message:
    """One message a peer received."""

    topic: str
    payload: bytes
    retain: bool


class Peer:
    """A paho MQTT 5 client over TLS to a fleet broker, recording reason codes and messages."""

    def __init__(self, port: int, ca: Path, identity: Identity | None = None, *,
                 client_id: str = "", username: str | None = None,
                 password: str | None = None,
                 max_tls: ssl.TLSVersion | None = None) -> None:
        self.port = port
        ctx = ssl.create_default_context(cafile=str(ca))
        if identity is not None:
            ctx.load_cert_chain(str(identity.cert), str(identity.key))
        if max_tls is not None:
            ctx.maximum_version = max_tls
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=MQTTProtocolVersion.MQTTv5)
        self._client.tls_set_context(ctx)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._cond = threading.Condition()
        self._acks: dict[int, list[int]] = {}
        self.connack: int | None = None
        self.disconnects = 0
        self.messages: list[Message] = []
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message

    def _note(self, update: Callable[[], None]) -> None:
        with self._cond:
            update()
            self._cond.notify_all()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._note(lambda: setattr(self, "connack", rc.value))

    def _on_disconnect(self, *_args: Any) -> None:
        self._note(lambda: setattr(self, "disconnects", self.disconnects + 1))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode],
                      _p: Any) -> None:
        self._note(lambda: self._acks.__setitem__(mid, [c.value for c in codes]))

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._note(lambda: self._acks.__setitem__(mid, [rc.value]))

    def _on_message(self, _c: Any, _u: Any, m: mqtt.MQTTMessage) -> None:
        self._note(lambda: self.messages.append(Message(m.topic, bytes(m.payload), bool(m.retain))))

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Block until ``predicate()`` holds; AssertionError naming ``what`` after WAIT_S.
        Re-checked at least every 50 ms, so it may also look at other peers."""
        deadline = time.monotonic() + WAIT_S
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what}: not within {WAIT_S} s")
                self._cond.wait(min(left, 0.05))

    def connect(self) -> bool:
        """True once the broker accepted the connection; False when TLS or MQTT refused it
        (with TLS 1.3 a missing certificate is only noticed after the handshake)."""
        try:
            self._client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            return False
        self._client.loop_start()
        self.wait_for(lambda: self.connack is not None or self.disconnects > 0,
                      "CONNACK or disconnect")
        return self.connack == 0 and self.disconnects == 0

    def _await_ack(self, mid: int, what: str) -> list[int]:
        self.wait_for(lambda: mid in self._acks, what)
        return self._acks[mid]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK's reason code (1 = granted QoS 1)."""
        _, mid = self._client.subscribe(topic, qos=1)
        assert mid is not None
        [code] = self._await_ack(mid, f"SUBACK for {topic}")
        return code

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                response_topic: str | None = None) -> int:
        """Publish at QoS 1 (with an MQTT 5 response topic, if given); the PUBACK's reason
        code (see :func:`ok`)."""
        props = None
        if response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        [code] = self._await_ack(info.mid, f"PUBACK for {topic}")
        return code

    def received(self, topic: str) -> list[bytes]:
        """Payloads received on ``topic`` so far."""
        with self._cond:
            return [m.payload for m in self.messages if m.topic == topic]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()


def connects(port: int, ca: Path, identity: Identity | None = None, **kwargs: Any) -> bool:
    """Whether a fresh :class:`Peer` gets connected; it is closed again either way."""
    peer = Peer(port, ca, identity, **kwargs)
    try:
        return peer.connect()
    finally:
        peer.close()
