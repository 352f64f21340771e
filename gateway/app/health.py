"""The health stage: loop-lag sampling, the health report, metrics and the systemd watchdog.

Start it last and stop it first: ``READY=1`` then tells systemd that every
other stage is up, and ``STOPPING=1`` goes out before anything is torn down,
so a slow shutdown is not mistaken for a hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.app.location import Location
from gateway.app.pipeline import Pipeline, cancel_all
from gateway.app.publishing import Publishing
from gateway.clock import Clock
from gateway.config.health import HealthSettings
from gateway.health import Counters, RateLimitedLog
from gateway.health.lag import LoopLag
from gateway.health.prometheus import MetricsServer, render
from gateway.health.report import HealthReporter, Report, Sources
from gateway.health.watchdog import (
    Notifier,
    PipelineHealth,
    Watchdog,
    last_seen_mode,
    watchdog_interval,
)
from gateway.mqtt.payloads import encode, health_body

log = logging.getLogger("gateway.health")


@dataclass
class Health:
    """Reports on the other stages and keeps the systemd watchdog fed while they work."""

    settings: HealthSettings
    clock: Clock
    counters: Counters
    rlog: RateLimitedLog
    lag: LoopLag
    reporter: HealthReporter
    watchdog: Watchdog
    publishing: Publishing | None = None
    metrics: MetricsServer | None = None
    text: str = field(default_factory=lambda: render(None))
    """The Prometheus text of the last report, served as is to every scrape."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, pipeline: Pipeline, publishing: Publishing | None, location: Location | None,
              settings: HealthSettings, clock: Clock,
              environ: Mapping[str, str] | None = None) -> Health:
        """Wire the report and the watchdog to the other stages; opens nothing.
        ``environ`` (default ``os.environ``) holds systemd's NOTIFY_SOCKET and WATCHDOG_USEC."""
        lag = LoopLag()
        buses = [bus.name for bus in pipeline.profile.buses]
        sources = Sources(pipeline.counters, buses, pipeline.store, pipeline.alerts.active, lag,
                          gnss=location.reader if location is not None else None)
        if publishing is not None:
            link, outbox, durable = publishing.link, publishing.outbox, publishing.durable
            sources.mqtt_connected = lambda: link.connected
            sources.outbox_stats = outbox.stats
            sources.outbox_pending = lambda: durable.pending
            sources.outbox_oldest = outbox.oldest_created
        store = pipeline.store
        check = PipelineHealth(pipeline.counters, buses, lag, lambda: last_seen_mode(store), clock,
                               settings.max_loop_lag_s, settings.stall_after_s)
        watchdog = Watchdog(Notifier.from_env(environ), clock, check, watchdog_interval(environ))
        return cls(settings, clock, pipeline.counters, pipeline.rlog, lag,
                   HealthReporter(sources, clock),
                   watchdog, publishing)

    async def start(self) -> None:
        """Start sampling, reporting, serving metrics and pinging; then tell systemd READY=1."""
        self.tasks.append(asyncio.create_task(self.lag.run(), name="loop-lag"))
        self.tasks.append(asyncio.create_task(self._report(), name="health-report"))
        port = self.settings.prometheus_port
        if port is not None:
            metrics = MetricsServer(self.settings.prometheus_host, port, lambda: self.text)
            try:
                await metrics.start()
                self.metrics = metrics
            except OSError as exc:  # a taken port costs the metrics, not the gateway
                self.counters.inc("health.metrics_failed")
                log.error("health: cannot serve metrics on %s:%d: %s; continuing without",
                          self.settings.prometheus_host, port, exc)
        interval = self.watchdog.interval
        if interval is not None:
            self.tasks.append(asyncio.create_task(self.watchdog.run(), name="watchdog"))
            log.info("health: systemd watchdog, checking every %.1f s", interval)
        self.watchdog.notifier.ready()

    def report_now(self) -> Report:
        """Build a report and refresh the metrics text from it."""
        report = self.reporter.build()
        self.text = render(report)
        self.counters.inc("health.reports")
        return report

    async def publish(self, report: Report) -> bool:
        """Send ``report`` on the health topic (QoS 0) if connected; True when sent."""
        pub = self.publishing
        if pub is None or not pub.link.connected:
            return False
        topic = pub.topics.health
        payload = encode(pub.envelope.stamp(topic, self.clock.time(), health_body(report)))
        sent = await pub.link.publish_live(topic, payload)
        if sent:
            self.counters.inc("health.published")
        return sent

    async def _report(self) -> None:
        while True:
            await self.clock.sleep(self.settings.interval_s)
            try:
                await self.publish(self.report_now())
            except Exception as exc:  # the report must not take the shutdown down with it
                self.counters.inc("health.report_failed")
                self.rlog.error("health.report", f"health: the report failed: {exc!r}")

    async def stop(self) -> None:
        """Tell systemd STOPPING=1, then stop every task and the metrics server."""
        self.watchdog.notifier.stopping()
        await cancel_all(self.tasks)
        self.tasks.clear()
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        self.watchdog.notifier.close()
