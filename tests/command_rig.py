"""A whole car for end-to-end tests of remote commands, in one async context manager.

:class:`CommandRig` runs on the real clock: the simulated vehicle on a
python-can ``virtual`` bus (a channel of its own per rig), the gateway
in-process against a real mosquitto, a second listener on that bus that
keeps every frame the gateway sends, and an MQTT 5 client that signs
commands with one key per role and collects the gateway's answers: on
cmd/res/{id}, and on its response topic (every publication asks for one,
with correlation data of its own, unless a test says otherwise). Every
result must name the digest (``req``) of bytes the rig itself sent.
Nothing is mocked: a frame counted here is a frame the car could act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiomqtt
import can
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import app
from gateway.clock import SystemClock
from gateway.commands import envelope as env
from gateway.commands.keys import (
    ROLES,
    generate_private_key,
    key_entry,
    parse_public_key,
    public_path,
)
from gateway.config import Profile, load_profile
from gateway.config.settings import Settings, default_settings, with_overrides
from gateway.mqtt.topics import Topics
from gateway.safety.verdicts import Motion
from gateway.state import SignalState
from hil.broker import Mosquitto
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle
from tests.conftest import REF_PROFILE

BODY_COMMAND, CHARGE_CONTROL, SPEED_LIMIT = 0x310, 0x120, 0x210
GATEWAY_FRAMES = frozenset({BODY_COMMAND, CHARGE_CONTROL, SPEED_LIMIT})
VEHICLE = "car-1"
LIFETIME_MS = 30_000
WAIT_S = 10.0
"""Deadline for anything the rig waits on: generous, since CI machines stall."""
SPEED = "Vehicle.Speed"
LOCK_PATHS = ("Vehicle.Cabin.Door.Row1.DriverSide.IsLocked",
              "Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked")
# What the commands read back; fresh before the rig hands the car over.
REPORTS = (SPEED, "Vehicle.Body.CommandAckSeq", *LOCK_PATHS,
           "Vehicle.Powertrain.TractionBattery.Charging.ChargeLimit")
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Wait until ``predicate()`` holds; an AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Reply:
    """One message the rig's client received (correlation data as MQTT 5 delivered it)."""

    topic: str
    payload: bytes
    correlation: bytes | None


@dataclass(frozen=True)
class Sent:
    """A command as signed: its id (None for raw bytes) and the exact payload."""

    id: str | None
    payload: bytes

    @property
    def req(self) -> str:
        """The digest every answer to this payload must name."""
        return env.request_digest(self.payload)


@dataclass(frozen=True)
class Published:
    """One publication of a command, with what the rig asked answers to carry and how
    many body commands were on the bus just before it."""

    sent: Sent
    response_topic: str | None
    correlation: bytes | None
    body_frames: int


UNVERIFIED = frozenset({"retained", "malformed", "unknown_key", "bad_signature"})
"""Refusals of messages whose signature never verified: answered only on the response
topic, since anyone can copy a command id off cmd/req."""


class Gateway(app.Gateway):
    """One in-process gateway run, wired as ``ev-gateway run`` wires it, with lookups."""

    @classmethod
    async def open(cls, profile: Profile, settings: Settings, channel: str) -> Gateway:
        """Build every stage, connect to the broker, read the virtual bus ``channel``."""
        gateway = cls.build(profile, SystemClock(), settings, settings.state_dir)
        await gateway.start(gateway.pipeline.bus_options({"vehicle": f"virtual:{channel}"}))
        return gateway

    def slot(self, path: str) -> SignalState:
        """The state store's slot of ``path``."""
        return self.pipeline.store.slot(path)

    def counter(self, name: str) -> int:
        """A health counter of this run."""
        return self.pipeline.counters.get(name)


class CommandRig:
    """Broker (given), simulated car, gateway, CAN recorder and a signing MQTT client."""

    def __init__(self, broker: Mosquitto, tmp_path: Path, mode: str = "park",
                 profile: Profile | None = None) -> None:
        self.broker = broker
        self.model = VehicleModel(mode=mode, soc=70.0)
        self.ecus = VehicleEcus(self.model)
        self.profile = profile or load_profile(REF_PROFILE)
        self.channel = f"cmdrig-{uuid.uuid4().hex[:12]}"
        self.topics = Topics(VEHICLE)
        self.response_topic = f"app/{uuid.uuid4().hex[:8]}/res"
        key_dir = tmp_path / "keys"
        self.keys = {role: generate_private_key(key_dir / f"{role}.key") for role in ROLES}
        self.stranger = generate_private_key(key_dir / "stranger.key")
        """A well-formed key the gateway has never heard of."""
        self.keys_file = key_dir / "authorized_keys.toml"
        self.keys_file.write_text("".join(key_entry(r, r, k.public_key())
                                          for r, k in self.keys.items()))
        (tmp_path / "state").mkdir()
        self.settings = with_overrides(default_settings(VEHICLE, REF_PROFILE, tmp_path / "state"),
                                       host=broker.host, port=broker.port, keys=self.keys_file)
        self.replies: list[Reply] = []
        self.published: list[Published] = []
        self.frames: list[can.Message] = []
        self._stack = contextlib.AsyncExitStack()
        self._gateway: Gateway | None = None
        self._client: aiomqtt.Client | None = None
        self._recorder: Any = None
        self._gateway_key: Ed25519PublicKey | None = None

    # ---- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> CommandRig:
        try:
            await self._open(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        self._client = await stack.enter_async_context(aiomqtt.Client(
            self.broker.host, self.broker.port, protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=NODELAY))
        for topic in (f"{self.topics.base}/cmd/res/#", self.response_topic, self.topics.events):
            await self._client.subscribe(topic, qos=1)
        self._background(self._listen())
        self._recorder = can.Bus(interface="virtual", channel=self.channel)
        stack.callback(close_quietly, self._recorder)
        self._background(self._record())
        sim_bus = open_sim_bus("virtual", self.channel)
        stack.callback(close_quietly, sim_bus)
        stop = asyncio.Event()
        sim = asyncio.create_task(run_vehicle(sim_bus, self.ecus, SystemClock(), stop))

        async def stop_sim() -> None:
            stop.set()
            await sim
        stack.push_async_callback(stop_sim)
        stack.push_async_callback(self.stop_gateway)
        await self.start_gateway()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stack.push_async_callback(cancel)

    async def start_gateway(self) -> None:
        """Start a gateway on the rig's state directory; return once it hears commands
        and holds fresh vehicle state."""
        assert self._gateway is None
        gateway = self._gateway = await Gateway.open(self.profile, self.settings, self.channel)
        # As a phone would hold it: the .pub written beside the key the gateway created.
        self._gateway_key = parse_public_key(
            public_path(self.settings.gateway_key_path).read_text())
        assert gateway.publishing is not None  # the rig always gives settings
        boot = gateway.publishing.envelope.boot_id
        # The start event leaves through the outbox, which drains only after the link
        # subscribed to cmd/req: once it is here, a command will be heard.
        await eventually(lambda: any(e["boot"] == boot for e in self.events("gateway_started")),
                         "the gateway's start event")
        await eventually(lambda: all(self._fresh(p) for p in REPORTS), "fresh vehicle state")

    async def stop_gateway(self) -> None:
        """Stop the running gateway, if any; the broker, car and client keep running."""
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            await gateway.stop()

    async def restart(self) -> None:
        """A new gateway run on the same state directory."""
        await self.stop_gateway()
        await self.start_gateway()

    @property
    def gateway(self) -> Gateway:
        """The gateway now running."""
        assert self._gateway is not None
        return self._gateway

    @property
    def gateway_key(self) -> Ed25519PublicKey:
        """The gateway's public key, read at its start: every result is verified with it."""
        assert self._gateway_key is not None
        return self._gateway_key

    # ---- the car and the bus --------------------------------------------------------

    def _fresh(self, path: str) -> bool:
        slot = self.gateway.slot(path)
        return slot.reading()[1] and not slot.is_stale(time.time())

    async def until_motion(self, motion: Motion = Motion.STATIONARY, reason: str | None = None
                           ) -> None:
        """Wait until the safety stage's motion verdict is ``motion`` (for ``reason``)."""
        monitor = self.gateway.safety.monitor
        await eventually(lambda: monitor.verdicts.motion is motion and (
            reason is None or reason in monitor.verdicts.motion_reasons),
            f"motion {motion.value} {reason or ''}")

    async def until_stale(self, path: str) -> None:
        """Wait until the gateway holds ``path`` as stale."""
        slot = self.gateway.slot(path)
        await eventually(lambda: slot.is_stale(time.time()), f"{path} stale")

    async def _record(self) -> None:
        while True:  # keeps the virtual bus queue short; sent() drains on demand too
            self.drain()
            await asyncio.sleep(0.02)

    def drain(self) -> None:
        """Move what the recorder's bus has queued into :attr:`frames` (gateway frames)."""
        while (msg := self._recorder.recv(timeout=0)) is not None:
            if msg.arbitration_id in GATEWAY_FRAMES:
                self.frames.append(msg)

    def sent(self, arbitration_id: int) -> list[can.Message]:
        """Every frame with ``arbitration_id`` the gateway has put on the bus so far."""
        self.drain()
        return [f for f in self.frames if f.arbitration_id == arbitration_id]

    def decode(self, frame: can.Message) -> dict[str, Any]:
        """The signals of a gateway frame, decoded through the reference DBC."""
        msg = self.ecus.db.get_message_by_frame_id(frame.arbitration_id)
        return cast("dict[str, Any]", msg.decode(bytes(frame.data), decode_choices=False))

    # ---- commands and answers -------------------------------------------------------

    def sign(self, cmd: str, args: dict[str, Any] | None = None, *, key: str = "owner",
             signer: Ed25519PrivateKey | None = None, vehicle: str = VEHICLE,
             command_id: str | None = None, issued_at_ms: int | None = None,
             expires_at_ms: int | None = None, kid: str | None = None) -> Sent:
        """A command signed by role ``key`` (or ``signer``); any field can be overridden."""
        private = signer or self.keys[key]
        issued = int(time.time() * 1000) if issued_at_ms is None else issued_at_ms
        command = env.Command(
            vehicle, command_id or env.new_command_id(), cmd, dict(args or {}), issued,
            issued + LIFETIME_MS if expires_at_ms is None else expires_at_ms,
            kid or env.key_id(private.public_key()))
        return Sent(command.id, env.sign_command(command, private))

    async def publish(self, sent: Sent | bytes, *, retain: bool = False,
                      response_topic: str | bool = True, correlation: bytes | None = None
                      ) -> Sent:
        """Publish a command (or raw bytes) on cmd/req with QoS 1. Answers are asked for on
        the rig's response topic (another topic if given, none for False), with
        ``correlation`` or else correlation data unique to this publication."""
        sent = Sent(None, sent) if isinstance(sent, bytes) else sent
        topic = self.response_topic if response_topic is True else response_topic or None
        if topic is not None and correlation is None:
            correlation = f"rig-{len(self.published)}".encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if topic is not None:
            props.ResponseTopic = topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.published.append(Published(sent, topic, correlation, len(self.sent(BODY_COMMAND))))
        assert self._client is not None
        await self._client.publish(self.topics.command_request, sent.payload, qos=1,
                                   retain=retain, properties=props)
        return sent

    async def send(self, cmd: str, args: dict[str, Any] | None = None, *, key: str = "owner",
                   retain: bool = False, response_topic: str | bool = True,
                   correlation: bytes | None = None, **fields: Any) -> Sent:
        """:meth:`sign` (``fields`` are its overrides), then :meth:`publish`."""
        return await self.publish(self.sign(cmd, args, key=key, **fields), retain=retain,
                                  response_topic=response_topic, correlation=correlation)

    async def subscribe(self, topic: str) -> None:
        """Also collect messages on ``topic``."""
        assert self._client is not None
        await self._client.subscribe(topic, qos=1)

    def on(self, topic: str) -> list[Reply]:
        """Messages received on ``topic``, in arrival order."""
        return [r for r in self.replies if r.topic == topic]

    def answers(self, sent: Sent) -> list[Reply]:
        """The raw messages on ``sent``'s cmd/res/{id} topic."""
        assert sent.id is not None
        return self.on(self.topics.command_result(sent.id))

    def responses(self, sent: Sent, topic: str | None = None) -> list[Reply]:
        """The raw messages on a response topic (the rig's unless given) that carry the
        correlation data of a publication of ``sent``'s exact bytes."""
        topic = topic or self.response_topic
        ours = {p.correlation for p in self.published
                if p.sent.payload == sent.payload and p.response_topic == topic}
        return [r for r in self.on(topic) if r.correlation in ours]

    def verified(self, payload: bytes) -> env.Result:
        """A result opened with the gateway's public key (Malformed if not its signature)."""
        return env.open_result(payload, self.gateway_key)

    async def results(self, sent: Sent, final: bool = True, count: int = 1,
                      topic: str | None = None) -> list[env.Result]:
        """Every verified result on ``sent``'s cmd/res/{id} (or its answers on the response
        ``topic``), once ``count`` of them (final ones unless ``final`` is False) arrived.

        Each must answer bytes the rig published: on a response topic exactly ``sent``'s,
        on cmd/res/{id} any payload the rig sent with that id (a reuse of the id is
        answered there too)."""
        def replies() -> list[Reply]:
            return self.answers(sent) if topic is None else self.responses(sent, topic)

        def opened() -> list[env.Result]:
            return [self.verified(r.payload) for r in replies()]
        where = topic or f"cmd/res/{sent.id}"
        await eventually(lambda: sum(1 for r in opened() if r.final or not final) >= count,
                         f"{count} result(s) for {sent.id} on {where}")
        mine = {sent.req} if topic is not None else {
            p.sent.req for p in self.published if p.sent.id == sent.id}
        found = opened()
        for result in found:
            assert result.id == sent.id, result
            assert result.req in mine, f"{result} answers bytes the rig never sent"
        return found

    async def final(self, sent: Sent, topic: str | None = None) -> env.Result:
        """The one final result of ``sent`` (on cmd/res/{id} or the response ``topic``); it
        must answer ``sent``'s own bytes."""
        [result] = [r for r in await self.results(sent, topic=topic) if r.final]
        assert result.req == sent.req, result
        return result

    async def refused(self, sent: Sent, reason: str, status: str = "rejected") -> env.Result:
        """The answer to a command that must be refused: a single result, ``status`` with
        ``reason`` (no ``accepted`` before it), and no body command on the bus since it
        was published. A refusal before the signature verified comes only on the response
        topic the last publication of ``sent`` asked for, never on cmd/res/{id}."""
        [last] = [p for p in self.published if p.sent.payload == sent.payload][-1:]
        topic = None
        if reason in UNVERIFIED:
            assert last.response_topic is not None, "the rig would never see this answer"
            topic = last.response_topic
        results = await self.results(sent, topic=topic)
        assert [(r.status, r.reason) for r in results] == [(status, reason)], results
        assert results[0].req == sent.req
        if topic is not None and sent.id is not None:
            assert self.answers(sent) == []
        assert len(self.sent(BODY_COMMAND)) == last.body_frames
        return results[0]

    def events(self, kind: str) -> list[dict[str, Any]]:
        """Envelopes of type ``kind`` received on the vehicle's events topic."""
        found = (json.loads(r.payload) for r in self.on(self.topics.events))
        return [e for e in found if e.get("type") == kind]

    async def _listen(self) -> None:
        assert self._client is not None
        async for m in self._client.messages:
            correlation = getattr(m.properties, "CorrelationData", None)
            self.replies.append(Reply(
                str(m.topic), m.payload if isinstance(m.payload, bytes) else b"",
                bytes(correlation) if correlation is not None else None))
