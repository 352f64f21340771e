"""A real subscriber for tests: collects what a vehicle publishes on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from gateway.mqtt.topics import PREFIX


@dataclass(frozen=True)
class Received:
    """One message as the subscriber got it."""

    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        """The payload parsed."""
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """Subscribes to ``evgw/v1/<vehicle>/#`` and keeps every message; reconnects on its own.

    ``retry`` is short so that after a broker restart the subscriber is back
    before the gateway, whose backoff starts higher.
    """

    host: str
    port: int
    vehicle: str
    retry: float = 0.05
    client_id: str | None = None
    """With a client id the session is persistent: the broker queues what arrives while
    the subscriber reconnects, as a fleet backend's would."""
    messages: list[Received] = field(default_factory=list)
    connects: int = 0
    _task: asyncio.Task[None] | None = None
    _subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                persistent = self.client_id is not None
                async with aiomqtt.Client(self.host, self.port, identifier=self.client_id,
                                          clean_session=not persistent) as client:
                    await client.subscribe(f"{PREFIX}/{self.vehicle}/#", qos=1)
                    self.connects += 1
                    self._subscribed.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        self.messages.append(Received(str(m.topic), payload, m.retain))
            except aiomqtt.MqttError:
                await asyncio.sleep(self.retry)

    def on(self, sub: str) -> list[Received]:
        """Messages on ``evgw/v1/<vehicle>/<sub>``."""
        topic = f"{PREFIX}/{self.vehicle}/{sub}"
        return [m for m in self.messages if m.topic == topic]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; fails the test after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"condition not met within {timeout} s; "
                                     f"got {len(self.messages)} messages")
            await asyncio.sleep(0.02)


async def retained(host: str, port: int, topic_filter: str, settle: float = 0.5
                   ) -> dict[str, bytes]:
    """The retained messages a brand-new subscriber gets for ``topic_filter``."""
    out: dict[str, bytes] = {}
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe(topic_filter, qos=1)
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(settle):
                async for m in client.messages:
                    if m.retain and isinstance(m.payload, bytes):
                        out[str(m.topic)] = m.payload
    return out


def first_seqs(messages: list[Received], boot: str) -> tuple[list[int], int]:
    """Sequence numbers of ``boot`` in arrival order with duplicates removed, and the
    number of duplicates, as a consumer deduplicating on (vehicle, boot, seq) sees them."""
    seen: set[int] = set()
    order = []
    for m in messages:
        data = m.json()
        if data["boot"] != boot:
            continue
        if data["seq"] in seen:
            continue
        seen.add(data["seq"])
        order.append(data["seq"])
    dups = sum(1 for m in messages if m.json()["boot"] == boot) - len(order)
    return order, dups
