"""The receive side: buses -> frame queues -> decoders -> state, and its listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import can

from gateway.alerts import AlertBook
from gateway.can import BusOptions, LiveSource, ReplaySource, open_bus
from gateway.clock import Clock
from gateway.config import Profile
from gateway.decode import BusPlan, Decoder, build_plans
from gateway.health import Counters, RateLimitedLog
from gateway.queues import BatchQueue, Overflow
from gateway.safety import RxCheck, attach_checks
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
