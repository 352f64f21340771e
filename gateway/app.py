"""Wiring: profile -> decode tables -> sources -> decoders -> state -> MQTT.

This is the only module that knows every stage. Each stage gets exactly what
it needs (a queue, a clock, counters), so stages stay testable on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import can

from gateway import __version__
from gateway.alerts import AlertBook
from gateway.can import BusOptions, LiveSource, ReplaySource, open_bus
from gateway.clock import Clock
from gateway.commands.actions import build_actions
from gateway.commands.keys import KeyFile, gateway_key
from gateway.commands.outcome import Action, Confirmations
from gateway.commands.replay import ReplayCache, ReplayCacheError
from gateway.commands.service import CommandService, Incoming
from gateway.commands.service import Policy as CommandPolicy
from gateway.commands.setpoint import Setpoint
from gateway.config import ConfigError, Profile
from gateway.config.settings import Settings
from gateway.decode import BusPlan, Decoder, build_plans
from gateway.health import Counters, RateLimitedLog
from gateway.mqtt import discovery
from gateway.mqtt.durable import DurablePublisher
from gateway.mqtt.link import Link
from gateway.mqtt.payloads import Envelope, new_boot_id
from gateway.mqtt.telemetry import Telemetry
from gateway.mqtt.topics import Topics
from gateway.outbox import Limits, Outbox, OutboxError
from gateway.queues import BatchQueue, Overflow
from gateway.safety import RxCheck, SafetyMonitor, SpeedCap, TransmitGuard, attach_checks
from gateway.state import StateStore

log = logging.getLogger("gateway")

QUEUE_FRAMES = 20_000
"""Per-bus frame queue bound: several seconds of a fully loaded 500 kbit/s bus."""


async def cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has finished."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Pipeline:
    """The receive side of the gateway for one vehicle profile."""

    profile: Profile
    clock: Clock
    store: StateStore
    counters: Counters
    rlog: RateLimitedLog
    plans: dict[str, BusPlan]
    decoders: dict[str, Decoder]
    checks: dict[str, RxCheck]
    """Receive checks (counter, checksum) by message name."""
    alerts: AlertBook
    """Where every stage's alerts go; Publishing attaches the MQTT sink."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    listeners: list[Callable[[str], None]] = field(default_factory=list)
    """Called with the bus name after each batch reached the state: event-driven consumers
    (safety rules, alerts) react to a frame without waiting for a tick."""

    @classmethod
    def build(cls, profile: Profile, clock: Clock) -> Pipeline:
        """Resolve the profile against its DBCs (raises ConfigError) and make the decoders."""
        store = StateStore()
        counters = Counters()
        rlog = RateLimitedLog(log, clock)
        plans = build_plans(profile, store)
        checks = attach_checks(profile, plans)
        decoders = {name: Decoder(plan, counters, rlog) for name, plan in plans.items()}
        return cls(profile, clock, store, counters, rlog, plans, decoders, checks,
                   AlertBook(clock))

    def bus_options(self, overrides: dict[str, str] | None = None) -> list[BusOptions]:
        """Bus options from the profile with ``name -> interface:channel`` overrides applied."""
        overrides = dict(overrides or {})
        out = []
        for spec in self.profile.buses:
            opts = BusOptions.from_spec(spec)
            if spec.name in overrides:
                opts = opts.override(overrides.pop(spec.name))
            out.append(opts)
        if overrides:
            raise ValueError(f"no bus named {', '.join(overrides)} in profile {self.profile.name}")
        return out

    def start_live(
        self,
        options: Sequence[BusOptions],
        opener: Callable[[BusOptions], can.BusABC] = open_bus,
    ) -> list[LiveSource]:
        """Start one reader and one decode task per bus (``opener`` opens the buses)."""
        sources = []
        for opts in options:
            queue: BatchQueue[can.Message] = BatchQueue(
                f"can.{opts.name}", QUEUE_FRAMES, Overflow.DROP_OLDEST, self.counters
            )
            source = LiveSource(opts, queue, self.clock, self.counters, self.rlog, opener=opener)
            sources.append(source)
            self.tasks.append(asyncio.create_task(source.run(), name=f"rx-{opts.name}"))
            self.tasks.append(
                asyncio.create_task(self._consume(queue, opts.name),
                                    name=f"decode-{opts.name}")
            )
        return sources

    async def replay(self, path: Path, bus: str, speed: float | None) -> int:
        """Feed a log file into ``bus``'s decoder; returns the number of frames replayed."""
        decoder = self.decoders[bus]
        source = ReplaySource(path, self.clock, speed=speed, rebase=True)
        async for batch in source.batches():
            decoder.process(batch)
            self._notify(bus)
        return source.frames

    async def _consume(self, queue: BatchQueue[can.Message], bus: str) -> None:
        decoder = self.decoders[bus]
        while (batch := await queue.get()) is not None:
            decoder.process(batch)
            self._notify(bus)

    def _notify(self, bus: str) -> None:
        for listener in self.listeners:
            listener(bus)

    async def stop(self) -> None:
        """Cancel every task the pipeline started."""
        await cancel_all(self.tasks)
        self.tasks.clear()


@dataclass
class Safety:
    """The safety stage: rules and verdicts, the transmit guard, the speed cap."""

    monitor: SafetyMonitor
    guard: TransmitGuard
    speed_cap: SpeedCap | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, pipeline: Pipeline, state_dir: Path | None = None) -> Safety:
        """Rules, guard and speed cap for ``pipeline``; call before Publishing.build so the
        verdicts are published with the state. Raises ConfigError for bad safety config."""
        alerts = pipeline.alerts
        monitor = SafetyMonitor(pipeline.profile, pipeline.plans, pipeline.store, alerts,
                                pipeline.clock, pipeline.checks)
        guard = TransmitGuard(pipeline.profile, pipeline.plans, pipeline.clock,
                              pipeline.counters, pipeline.rlog, alerts)
        monitor.watchers.append(guard.evaluate)
        cap_spec = pipeline.profile.safety.speed_cap
        speed_cap = None
        if cap_spec is not None:
            bus = cap_spec.bus or pipeline.profile.buses[0].name
            state_file = state_dir / "speed_cap.json" if state_dir is not None else None
            try:
                speed_cap = SpeedCap(cap_spec, guard, bus, pipeline.store, alerts,
                                     pipeline.clock, state_file)
            except KeyError as exc:
                raise ConfigError(str(pipeline.profile.file),
                                  f"add a [[transmit]] entry for {cap_spec.message}: {exc}",
                                  line=cap_spec.line, key="safety.speed_cap.message") from None
            except ValueError as exc:
                raise ConfigError(str(pipeline.profile.file), str(exc), line=cap_spec.line,
                                  key="safety.speed_cap") from None
            monitor.watchers.append(speed_cap.evaluate)
        pipeline.listeners.append(monitor.on_batch)
        return cls(monitor, guard, speed_cap)

    def start(self, sources: Sequence[LiveSource] = ()) -> None:
        """Attach the transmit side to the live buses and start the tick and the speed cap."""
        for source in sources:
            self.guard.attach(source.options.name, _bus_of(source))
        self.tasks.append(asyncio.create_task(self.monitor.run(), name="safety-tick"))
        if self.speed_cap is not None and sources:
            self.tasks.append(asyncio.create_task(self.speed_cap.run(), name="speed-cap"))

    async def stop(self) -> None:
        """Cancel the safety tasks."""
        await cancel_all(self.tasks)
        self.tasks.clear()


def _bus_of(source: LiveSource) -> Callable[[], can.BusABC | None]:
    # The source reopens its bus after failures; always send on the current one.
    return lambda: source.bus


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
        link = Link(settings.mqtt, topics, envelope, outbox, link_clock or clock, counters, rlog,
                    version=__version__, profile=profile)
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


@dataclass
class Commands:
    """Remote commands: the actions the profile supports, their setpoints, and (with
    an authorized-keys file) the service answering the command topic."""

    actions: dict[str, Action]
    setpoints: list[Setpoint]
    service: CommandService | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, pipeline: Pipeline, safety: Safety, state_dir: Path | None) -> Commands:
        """The profile's commands (ConfigError for names its DBCs lack); no service yet."""
        confirmations = Confirmations(pipeline.clock)
        actions, setpoints = build_actions(
            pipeline.profile, safety.guard, pipeline.store, pipeline.clock, confirmations,
            safety.monitor, safety.speed_cap, state_dir)
        pipeline.listeners.append(confirmations.on_batch)
        return cls(actions, setpoints)

    def serve(self, pipeline: Pipeline, safety: Safety, publishing: Publishing,
              settings: Settings) -> None:
        """Answer the command topic; call before ``publishing.launch()``. Does nothing
        without an authorized-keys file (commands are off by default)."""
        cfg = settings.commands
        if cfg.keys is None:
            log.info("commands: off (no authorized keys file configured)")
            return
        try:
            signer = gateway_key(settings.gateway_key_path)
        except (ValueError, OSError) as exc:
            raise ConfigError(settings.file or "<settings>", str(exc),
                              key="commands.gateway_key") from None
        policy = CommandPolicy(cfg.clock_skew_s, cfg.max_lifetime_s, cfg.rate_per_minute,
                               cfg.burst, cfg.retention_h * 3600.0)
        durable = publishing.durable
        service = CommandService(
            publishing.topics, KeyFile(cfg.keys), signer,
            ReplayCache(settings.state_dir / "commands.sqlite"), self.actions,
            safety.monitor.evaluate, publishing.link, pipeline.clock, pipeline.counters,
            pipeline.rlog, policy, audit=lambda data: durable.event("command", data))

        def submit(payload: bytes, retain: bool, response: str | None,
                   correlation: bytes | None) -> None:
            service.submit(Incoming(payload, retain, response, correlation))

        publishing.link.on_command = submit
        self.service = service

    async def start(self, clock: Clock, live: bool) -> None:
        """Open the replay cache and start answering; keep setpoints on live buses."""
        if self.service is not None:
            await self.service.cache.open(clock.time())
            self.tasks.append(asyncio.create_task(self.service.run(), name="commands"))
            self.tasks.append(asyncio.create_task(self._prune(self.service, clock),
                                                  name="commands-prune"))
        if live:
            self.tasks += [asyncio.create_task(sp.loop(), name=f"setpoint-{sp.spec.name}")
                           for sp in self.setpoints]

    @staticmethod
    async def _prune(service: CommandService, clock: Clock) -> None:
        while True:
            with contextlib.suppress(ReplayCacheError):  # the service reports cache errors
                await service.cache.prune(clock.time(), service.policy.retention_s,
                                          service.policy.skew_s)
            await clock.sleep(EXPIRE_EVERY)

    async def stop(self) -> None:
        """Stop answering, cancel running commands and close the replay cache."""
        await cancel_all(self.tasks)
        self.tasks.clear()
        if self.service is not None:
            await self.service.stop()
            await self.service.cache.close()


def stop_event(duration: float | None = None) -> asyncio.Event:
    """An event set by SIGINT/SIGTERM, or after ``duration`` seconds; call inside the loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # platforms without signal handlers
            loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    return stop


@dataclass
class Gateway:
    """Every stage of one gateway, started and stopped in the order they depend on.

    Build, adjust (select a speed cap, hook the link), then start: the command
    topic is wired before the link connects, and on the way down commands stop
    first, while the pipeline can still confirm what they sent.
    """

    pipeline: Pipeline
    safety: Safety
    commands: Commands
    publishing: Publishing | None

    @classmethod
    def build(cls, profile: Profile, clock: Clock, settings: Settings | None,
              state_dir: Path | None) -> Self:
        """Every stage for ``profile``; MQTT (and remote commands) only with ``settings``.
        Opens nothing; raises ConfigError for bad configuration."""
        pipeline = Pipeline.build(profile, clock)
        safety = Safety.build(pipeline, state_dir)
        commands = Commands.build(pipeline, safety, state_dir)
        publishing = None
        if settings is not None:
            publishing = Publishing.build(pipeline, settings)
            commands.serve(pipeline, safety, publishing, settings)
        return cls(pipeline, safety, commands, publishing)

    async def start(self, options: Sequence[BusOptions] | None,
                    opener: Callable[[BusOptions], can.BusABC] = open_bus) -> None:
        """Publish, then read ``options``' buses (None: no live bus, e.g. a replay)."""
        if self.publishing is not None:
            await self.publishing.launch()
        sources = self.pipeline.start_live(options, opener) if options is not None else []
        self.safety.start(sources)
        await self.commands.start(self.pipeline.clock, live=options is not None)

    async def stop(self) -> None:
        """Stop every stage: commands first, the pipeline last."""
        await self.commands.stop()
        await self.safety.stop()
        if self.publishing is not None:
            await self.publishing.stop()
        await self.pipeline.stop()


async def run_until(
    stop: asyncio.Event,
    gateway: Gateway,
    periodic: Callable[[], Awaitable[None]] | None = None,
    interval: float = 0.25,
) -> None:
    """Run ``periodic`` every ``interval`` seconds until ``stop`` is set, then stop
    ``gateway``."""
    try:
        while not stop.is_set():
            if periodic is not None:
                await periodic()
            await gateway.pipeline.clock.sleep(interval)
    finally:
        await gateway.stop()
