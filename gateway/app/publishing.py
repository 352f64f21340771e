"""The MQTT side: outbox, durable path, link, telemetry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from gateway import __version__
from gateway.alerts import AlertBook
from gateway.app.pipeline import Pipeline, cancel_all
from gateway.clock import Clock
from gateway.config import ConfigError
from gateway.config.settings import Settings
from gateway.config.toml_table import SourceMap
from gateway.mqtt import discovery
from gateway.mqtt.durable import DurablePublisher
from gateway.mqtt.link import Link
from gateway.mqtt.payloads import Envelope, new_boot_id
from gateway.mqtt.telemetry import Telemetry
from gateway.mqtt.topics import Topics
from gateway.outbox import Limits, Outbox, OutboxError
from gateway.state import StateStore


def _table_line(file: str | None, table: str) -> int | None:
    if file is None:
        return None
    try:
        return SourceMap(Path(file).read_text(encoding="utf-8")).header_line(table)
    except OSError:
        return None


EXPIRE_EVERY = 60.0
"""How often old backfill is expired from the outbox."""


@dataclass
class Publishing:
    """The MQTT side: outbox, durable path, link, telemetry and the alert book."""

    settings: Settings
    store: StateStore
    clock: Clock
    profile: str
    topics: Topics
    envelope: Envelope
    outbox: Outbox
    durable: DurablePublisher
    alerts: AlertBook
    link: Link
    telemetry: Telemetry
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @classmethod
    def build(cls, pipeline: Pipeline, settings: Settings,
              link_clock: Clock | None = None) -> Publishing:
        """Wire the MQTT side for ``pipeline``; opens nothing and starts no task.

        ``link_clock`` paces reconnects; tests that drive telemetry on a manual
        clock still want real backoff against a real broker. A bad TLS file
        raises ConfigError here, before anything is open.
        """
        clock, counters, rlog = pipeline.clock, pipeline.counters, pipeline.rlog
        topics = Topics(settings.vehicle_id)
        envelope = Envelope(settings.vehicle_id, new_boot_id())
        limits = Limits(max_bytes=settings.outbox.max_bytes,
                        max_backfill_age=settings.outbox.max_backfill_age)
        outbox = Outbox(settings.outbox_path, limits, clock, counters, rlog)
        profile = pipeline.profile.name
        try:
            link = Link(settings.mqtt, topics, envelope, outbox, link_clock or clock, counters,
                        rlog, version=__version__, profile=profile)
        except ConfigError as exc:  # name the settings file and line, not only the key
            raise ConfigError(settings.file or "<settings>", exc.detail, key="mqtt.tls",
                              line=_table_line(settings.file, "mqtt.tls")) from None
        durable = DurablePublisher(topics, envelope, outbox, clock, counters, rlog)
        alerts = pipeline.alerts
        alerts.sink = durable
        telemetry = Telemetry(pipeline.store, settings.telemetry, link, durable, topics, envelope,
                              clock, counters)
        pub = cls(settings, pipeline.store, clock, profile, topics, envelope, outbox, durable,
                  alerts, link, telemetry)
        link.on_connect = pub._on_connect
        return pub

    @classmethod
    async def start(cls, pipeline: Pipeline, settings: Settings,
                    link_clock: Clock | None = None) -> Publishing:
        """Build, open the outbox and start publishing ``pipeline``'s state."""
        pub = cls.build(pipeline, settings, link_clock)
        await pub.launch()
        return pub

    async def launch(self) -> None:
        """Open the outbox and start the tasks (after wiring anything into the link)."""
        await self.outbox.open()
        self.durable.event("gateway_started", {"version": __version__, "profile": self.profile})
        for name, coro in (("outbox-writer", self.durable.run()), ("mqtt-link", self.link.run()),
                           ("telemetry", self.telemetry.run()),
                           ("outbox-expiry", self._expire())):
            self.tasks[name] = asyncio.create_task(coro, name=name)

    def _on_connect(self) -> None:
        """Retained messages the broker may have lost go out again on every connection."""
        self.telemetry.force_state()
        self.alerts.republish()
        ha = self.settings.homeassistant
        if ha.enabled:
            mapped = {slot.path for slot in self.store}
            for msg in discovery.discovery_messages(self.topics, ha.prefix, ha.name,
                                                    self.profile, __version__, mapped):
                self.durable.retained(msg.topic, msg.payload)

    async def _expire(self) -> None:
        while True:
            try:
                await self.outbox.expire()
            except OutboxError as exc:  # the next round tries again; the writer reports too
                self.durable.report_failure(exc)
            await self.clock.sleep(EXPIRE_EVERY)

    async def stop(self) -> None:
        """Say goodbye on the broker, commit what is queued, close the outbox."""
        await self.link.close(self.tasks.pop("mqtt-link", None))
        await cancel_all([t for name in ("telemetry", "outbox-expiry")
                          if (t := self.tasks.pop(name, None)) is not None])
        self.durable.close()
        writer = self.tasks.pop("outbox-writer", None)
        if writer is not None:
            await writer
        await self.outbox.close()
