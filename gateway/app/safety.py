"""The safety stage: rules and verdicts, the transmit guard, the speed cap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import can

from gateway.app.pipeline import Pipeline, cancel_all
from gateway.can import LiveSource
from gateway.config import ConfigError
from gateway.safety import SafetyMonitor, SpeedCap, TransmitGuard


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
