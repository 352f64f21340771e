"""The broker connection, kept up by one supervisor task.

Each attempt builds a fresh aiomqtt client with a will (offline, this boot
id), connects, publishes the birth, subscribes to the topics the gateway owns,
runs the connect hook (which queues retained state) and then drains the
outbox until the connection breaks. Then it waits with exponential backoff
and jitter, and tries again. Nothing here is awaited by CAN processing:
producers only ever touch the outbox queue, and live telemetry is dropped,
not queued, while offline.

MQTT 5 is preferred because of the will delay: with a session that outlives
the connection, a reconnect within the delay cancels the will, so a flaky
cellular link does not make the car flap offline. Brokers that refuse MQTT 5
get 3.1.1 (no delay: the will fires at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Callable

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt import client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.clock import Clock
from gateway.config import ConfigError
from gateway.config.settings import MqttSettings
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt import payloads
from gateway.mqtt.ownership import Ownership
from gateway.mqtt.topics import Topics
from gateway.outbox import Outbox, OutboxError

log = logging.getLogger("gateway.mqtt")

CommandHandler = Callable[[bytes, bool, str | None, bytes | None], None]

PUBACK_TIMEOUT = 15.0
"""A QoS 1 publish not acknowledged by then means the link is dead (half-open TCP)."""
CONNECT_TIMEOUT = 10.0
"""Also covers a TLS handshake the broker rejects after the fact (TLS 1.3 client-cert
alerts arrive while the client already waits for CONNACK)."""
STABLE_AFTER = 10.0
"""A connection that lasted this long resets the backoff."""
LIVE_QUEUE = 1000
"""Bound on messages paho may hold unsent; more live telemetry is dropped and counted."""
MAX_INBOUND_PACKET = 1024 * 1024
"""Largest MQTT 5 packet the gateway accepts: its own retained state echoes are far
smaller, and commands are at most 4 KiB."""
RESULT_EXPIRY = 300
"""Seconds a command result may wait in an offline requester's session (MQTT 5)."""
_UNSUPPORTED_PROTOCOL = (1, 132)  # 3.1.1 CONNACK code / MQTT 5 reason code


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context the settings ask for, or None for plain TCP."""
    tls = settings.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    if tls.cert is not None and tls.key is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.insecure:
        ctx.check_hostname = False
    return ctx


def refused_protocol(exc: BaseException) -> bool:
    """True when a broker rejected the MQTT protocol version we offered."""
    if not isinstance(exc, MqttConnectError):
        return False
    rc = exc.rc
    value = rc if isinstance(rc, int) else getattr(rc, "value", None)
    return value in _UNSUPPORTED_PROTOCOL


class Link:
    """One MQTT connection with its supervisor; see the module docstring."""

    def __init__(
        self, settings: MqttSettings, topics: Topics, envelope: payloads.Envelope,
        outbox: Outbox, clock: Clock, counters: Counters, rlog: RateLimitedLog, *,
        version: str, profile: str, on_connect: Callable[[], None] | None = None,
        rng: random.Random | None = None, drain_batch: int = 200,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.envelope = envelope
        self._outbox = outbox
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._version = version
        self._profile = profile
        self.on_connect = on_connect
        self.on_command: CommandHandler | None = None
        """Called with (payload, retain, response topic, correlation data) per command."""
        self._rng = rng or random.Random()
        self._drain_batch = drain_batch
        self._protocol = (aiomqtt.ProtocolVersion.V311 if settings.protocol == "3.1.1"
                          else aiomqtt.ProtocolVersion.V5)
        try:
            # Bad certificates are a start-up error, not something to retry forever.
            self._tls = tls_context(settings)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("mqtt.tls", f"cannot load TLS files: {exc}") from None
        self._client: aiomqtt.Client | None = None
        self._connection = 0
        self._stopping = False
        self.ownership = Ownership(topics, counters, rlog)
        self.connected_event = asyncio.Event()

    @property
    def connected(self) -> bool:
        """True while a connection is up and its birth was published."""
        return self.connected_event.is_set()

    @property
    def protocol(self) -> str:
        """The protocol in use or to be tried next: "5" or "3.1.1"."""
        return "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"

    def _status(self, online: bool, reason: str | None = None) -> bytes:
        body = payloads.status_body(online, self._connection, self._version, self._profile, reason)
        return payloads.encode(self.envelope.stamp(self.topics.status, self._clock.time(), body))

    def _make_client(self) -> aiomqtt.Client:
        """A client for one attempt, its will stamped now."""
        s = self.settings
        v5 = self._protocol is aiomqtt.ProtocolVersion.V5
        will_props = None
        connect_props = None
        if v5:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # The broker drops larger messages for us instead of sending them.
            connect_props.MaximumPacketSize = MAX_INBOUND_PACKET
        if v5 and s.will_delay > 0:
            will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            will_props.WillDelayInterval = s.will_delay
            assert connect_props is not None
            # The session must outlive the will delay, or the will fires when it ends.
            connect_props.SessionExpiryInterval = s.will_delay + 2 * s.keepalive
        will = aiomqtt.Will(self.topics.status, self._status(False, "lost"), qos=1, retain=True,
                            properties=will_props)
        client = aiomqtt.Client(
            s.host, s.port, username=s.username, password=s.password,
            identifier=s.client_id, protocol=self._protocol, will=will,
            keepalive=s.keepalive, timeout=CONNECT_TIMEOUT,
            # A clean start would end the old session and fire its pending will.
            clean_start=(not s.will_delay) if v5 else paho_client.MQTT_CLEAN_START_FIRST_ONLY,
            clean_session=None if v5 else True,
            properties=connect_props,
            max_queued_outgoing_messages=LIVE_QUEUE,
            # Inbound traffic (commands, echoes of owned topics) is bounded too; beyond
            # this paho drops messages rather than grow.
            max_queued_incoming_messages=LIVE_QUEUE,
            max_inflight_messages=self._drain_batch,
            tls_context=self._tls,
            tls_insecure=s.tls.insecure if s.tls else None,
            logger=logging.getLogger("gateway.mqtt.paho"),
            # paho leaves Nagle on: an alert and its alerts/active update would then
            # sit in the socket for tens of milliseconds behind each other.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        client.pending_calls_threshold = self._drain_batch + 50
        return client

    async def run(self) -> None:
        """Keep the connection up until :meth:`close`."""
        attempt = 0
        while not self._stopping:
            self._connection = await self._outbox.next_counter("mqtt.connection")
            # The birth is stamped before the will so that, on the status topic, a
            # will that fires later carries the higher sequence number.
            birth = self._status(True)
            started = self._clock.monotonic()
            try:
                client = self._make_client()
                async with client:
                    await self._session(client, birth)
            except (aiomqtt.MqttError, OSError, ssl.SSLError, OutboxError) as exc:
                if self._stopping:
                    break
                if refused_protocol(exc) and self.settings.protocol == "auto" \
                        and self._protocol is aiomqtt.ProtocolVersion.V5:
                    log.warning("mqtt: broker refused MQTT 5; using 3.1.1 (no will delay)")
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                self._counters.inc("mqtt.disconnects" if self.connected else
                                   "mqtt.connect_failures")
                self._rlog.warning("mqtt.down", f"mqtt: {self.settings.host}:{self.settings.port}"
                                   f" unavailable: {exc or type(exc).__name__}")
            finally:
                self._client = None
                self.connected_event.clear()
            if self._clock.monotonic() - started >= STABLE_AFTER:
                attempt = 0
            delay = min(self.settings.backoff_max, self.settings.backoff_min * 2 ** attempt)
            attempt = min(attempt + 1, 30)
            # Equal jitter: a fleet that lost its broker together does not return together.
            await self._clock.sleep(delay * (0.5 + 0.5 * self._rng.random()))

    async def _session(self, client: aiomqtt.Client, birth: bytes) -> None:
        """One connection's life: birth, subscriptions, hook, then drain and listen."""
        if self.on_command is not None:
            # Before the birth: once the car shows online, a command sent to it is heard.
            # retainAsPublished: a command published with the retain flag must arrive with
            # it, so it can be refused (MQTT 3.1.1 only flags stored retained messages).
            if self._protocol is aiomqtt.ProtocolVersion.V5:
                await client.subscribe(self.topics.command_request, options=SubscribeOptions(
                    qos=1, noLocal=True, retainAsPublished=True))
            else:
                await client.subscribe(self.topics.command_request, qos=1)
        await client.publish(self.topics.status, birth, qos=1, retain=True,
                             timeout=PUBACK_TIMEOUT)
        self.ownership.sent(self.topics.status, birth)
        self._client = client
        self.connected_event.set()
        self._counters.inc("mqtt.connects")
        log.info("mqtt: connected to %s:%s (MQTT %s, connection %d)", self.settings.host,
                 self.settings.port, self.protocol, self._connection)
        options = SubscribeOptions(qos=1, noLocal=True)
        if self._protocol is aiomqtt.ProtocolVersion.V5:
            await client.subscribe([(t, options) for t in self.topics.owned_retained()])
        else:
            await client.subscribe([(t, 1) for t in self.topics.owned_retained()])
        if self.on_connect is not None:
            self.on_connect()
        tasks = [asyncio.create_task(self._drain(client), name="mqtt-drain"),
                 asyncio.create_task(self._listen(client), name="mqtt-listen")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises what ended the session
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish outbox rows in order; delete each only after its PUBACK."""
        while True:
            await self._outbox.wait_for_rows()
            rows = await self._outbox.fetch(self._drain_batch)
            if not rows:
                await self._clock.sleep(0.05)
                continue
            # Tasks start in creation order, so paho assigns message ids and writes
            # the packets in outbox order; the broker forwards them in that order.
            results = await asyncio.gather(
                *(client.publish(r.topic, r.payload, qos=1, retain=r.retain,
                                 timeout=PUBACK_TIMEOUT) for r in rows),
                return_exceptions=True)
            acked = []
            failure: BaseException | None = None
            for row, result in zip(rows, results, strict=True):
                if result is None:
                    acked.append(row.id)
                    if row.retain:
                        self.ownership.sent(row.topic, row.payload)
                elif failure is None:
                    failure = result
            if acked:
                await self._outbox.delete(acked)
            if failure is not None:
                raise failure

    async def _listen(self, client: aiomqtt.Client) -> None:
        """Hand commands over; watch the owned topics and put back what a stranger overwrote."""
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if str(message.topic) == self.topics.command_request:
                await self._command(client, message, payload)
                continue
            fix = self.ownership.check(str(message.topic), payload, self._clock.monotonic())
            if fix is not None:
                await client.publish(fix.topic, fix.payload, qos=1, retain=True)

    async def _command(self, client: aiomqtt.Client, message: aiomqtt.Message,
                       payload: bytes) -> None:
        if message.retain and payload:
            # Nobody may keep a command on the broker: it would run on every reconnect.
            await client.publish(self.topics.command_request, b"", qos=1, retain=True)
        if self.on_command is None:
            return
        props = message.properties
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        self.on_command(payload, bool(message.retain), response,
                        bytes(correlation) if correlation is not None else None)

    async def publish_result(self, topics: list[str], payload: bytes,
                             correlation: bytes | None) -> bool:
        """Publish a command result (QoS 1, not retained) to each of ``topics``; False if
        not connected or the broker did not take it. MQTT 5 adds the correlation data
        and lets the result expire from offline sessions after RESULT_EXPIRY seconds."""
        client = self._client
        if client is None or not self.connected:
            return False
        props = None
        if self._protocol is aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = RESULT_EXPIRY
            if correlation is not None:
                props.CorrelationData = correlation
        try:
            await asyncio.gather(*(client.publish(t, payload, qos=1, properties=props,
                                                  timeout=PUBACK_TIMEOUT) for t in topics))
        except aiomqtt.MqttError:
            return False
        return True

    async def publish_live(self, topic: str, payload: bytes) -> bool:
        """Publish QoS 0 now if connected; False (counted) when it could not be sent."""
        client = self._client
        if client is None or not self.connected:
            self._counters.inc("mqtt.live.offline")
            return False
        try:
            await client.publish(topic, payload, qos=0)
        except aiomqtt.MqttError:
            self._counters.inc("mqtt.live.dropped")
            return False
        self._counters.inc("mqtt.live.sent")
        return True

    async def close(self, task: asyncio.Task[None] | None = None) -> None:
        """Say goodbye (offline, reason shutdown) if connected, then stop ``task`` (run)."""
        self._stopping = True
        client = self._client
        if client is not None and self.connected:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(client.publish(
                    self.topics.status, self._status(False, "shutdown"), qos=1, retain=True), 3.0)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
