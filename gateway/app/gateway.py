"""One gateway: every stage, started and stopped in dependency order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import can

from gateway.app.commands import Commands
from gateway.app.health import Health
from gateway.app.location import Insights, Location
from gateway.app.pipeline import Pipeline
from gateway.app.publishing import Publishing
from gateway.app.safety import Safety
from gateway.can import BusOptions, open_bus
from gateway.clock import Clock
from gateway.config import Profile
from gateway.config.health import HealthSettings
from gateway.config.location import LocationSettings
from gateway.config.settings import Settings


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
    location: Location | None = None
    insights: Insights | None = None
    health: Health | None = None

    @classmethod
    def build(cls, profile: Profile, clock: Clock, settings: Settings | None,
              state_dir: Path | None, place: LocationSettings | None = None) -> Self:
        """Every stage for ``profile``; MQTT (and remote commands) only with ``settings``.
        ``place`` overrides the settings' GNSS, geofences and insights (or gives them
        when there are no settings). Opens nothing; raises ConfigError for bad
        configuration."""
        pipeline = Pipeline.build(profile, clock)
        where = place or (settings.location if settings is not None else LocationSettings())
        # Location and battery slots first: the safety rules and the MQTT state groups
        # are built from what the store holds.
        location = Location.build(pipeline, where.gnss) if where.gnss.enabled else None
        insights = Insights.build(pipeline, location, where, state_dir)
        safety = Safety.build(pipeline, state_dir)
        commands = Commands.build(pipeline, safety, state_dir)
        publishing = None
        if settings is not None:
            publishing = Publishing.build(pipeline, settings)
            commands.serve(pipeline, safety, publishing, settings)
            insights.outputs.attach(publishing)
            if location is not None:
                location.publish(publishing)
        health = Health.build(pipeline, publishing, location,
                              settings.health if settings is not None else HealthSettings(),
                              clock)
        return cls(pipeline, safety, commands, publishing, location, insights, health)

    async def start(self, options: Sequence[BusOptions] | None,
                    opener: Callable[[BusOptions], can.BusABC] = open_bus) -> None:
        """Publish, then read ``options``' buses (None: no live bus, e.g. a replay)."""
        if self.publishing is not None:
            await self.publishing.launch()
        sources = self.pipeline.start_live(options, opener) if options is not None else []
        self.safety.start(sources)
        if self.insights is not None:
            await self.insights.start()
        if self.location is not None:
            self.location.start()
        await self.commands.start(self.pipeline.clock, live=options is not None)
        if self.health is not None:
            await self.health.start()  # last: READY=1 tells systemd everything is up

    async def stop(self) -> None:
        """Stop every stage: health (STOPPING=1) and commands first, the pipeline last."""
        if self.health is not None:
            await self.health.stop()
        await self.commands.stop()
        if self.location is not None:
            await self.location.stop()
        if self.insights is not None:
            await self.insights.stop()
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
