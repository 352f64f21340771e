"""Wiring: profile -> decode tables -> sources -> decoders -> state.

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

import can

from gateway.can import BusOptions, LiveSource, ReplaySource, open_bus
from gateway.clock import Clock
from gateway.config import Profile
from gateway.decode import BusPlan, Decoder, build_plans
from gateway.health import Counters, RateLimitedLog
from gateway.queues import BatchQueue, Overflow
from gateway.state import StateStore

log = logging.getLogger("gateway")

QUEUE_FRAMES = 20_000
"""Per-bus frame queue bound: several seconds of a fully loaded 500 kbit/s bus."""


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
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, profile: Profile, clock: Clock) -> Pipeline:
        """Resolve the profile against its DBCs (raises ConfigError) and make the decoders."""
        store = StateStore()
        counters = Counters()
        rlog = RateLimitedLog(log, clock)
        plans = build_plans(profile, store)
        decoders = {name: Decoder(plan, counters, rlog) for name, plan in plans.items()}
        return cls(profile, clock, store, counters, rlog, plans, decoders)

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
                asyncio.create_task(self._consume(queue, self.decoders[opts.name]),
                                    name=f"decode-{opts.name}")
            )
        return sources

    async def replay(self, path: Path, bus: str, speed: float | None) -> int:
        """Feed a log file into ``bus``'s decoder; returns the number of frames replayed."""
        decoder = self.decoders[bus]
        source = ReplaySource(path, self.clock, speed=speed, rebase=True)
        async for batch in source.batches():
            decoder.process(batch)
        return source.frames

    @staticmethod
    async def _consume(queue: BatchQueue[can.Message], decoder: Decoder) -> None:
        while (batch := await queue.get()) is not None:
            decoder.process(batch)

    async def stop(self) -> None:
        """Cancel every task the pipeline started."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()


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


async def run_until(
    stop: asyncio.Event,
    pipeline: Pipeline,
    periodic: Callable[[], Awaitable[None]] | None = None,
    interval: float = 0.25,
) -> None:
    """Run ``periodic`` every ``interval`` seconds until ``stop`` is set, then stop the pipeline."""
    try:
        while not stop.is_set():
            if periodic is not None:
                await periodic()
            await pipeline.clock.sleep(interval)
    finally:
        await pipeline.stop()
