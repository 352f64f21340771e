"""Position and insights: the GNSS reader, and what the gateway learns from the state.

``Location`` owns the serial receiver and the location slots of the state
store; every fix also goes to its listeners (the receiver-lost watch,
geofences, the moved-while-parked alert, trip distance, the MQTT location
topic). ``Insights`` integrates the pack meter after each decoded batch and
runs the trip, charging and battery estimators once a second; what they
produce goes out as durable events and retained summaries, and into the local
SQLite log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.app.pipeline import Pipeline, cancel_all
from gateway.app.publishing import Publishing
from gateway.clock import Clock
from gateway.config.location import GnssSettings, LocationSettings
from gateway.gnss.fix import Fix
from gateway.gnss.policy import PublishPolicy
from gateway.gnss.reader import GnssReader
from gateway.gnss.slots import LocationSlots
from gateway.gnss.watch import ReceiverWatch
from gateway.health import Counters, RateLimitedLog
from gateway.insights.battery import BatteryHealth
from gateway.insights.charging import ChargeRecorder
from gateway.insights.energy import PackMeter
from gateway.insights.geofence import EventSink, Geofences
from gateway.insights.log import InsightLog
from gateway.insights.parked import MovedWhileParked
from gateway.insights.sessions import ChargeSession, Trip
from gateway.insights.trips import TripRecorder
from gateway.mqtt.location import LocationPublisher

log = logging.getLogger("gateway.insights")

TICK_S = 1.0
SAVE_EVERY_S = 60.0
"""How often open trips, sessions and battery totals are written to the state directory:
a power cut loses at most this much of them."""


@dataclass
class Location:
    """The GNSS receiver, its slots in the state store, the fix listeners and the watch
    that raises ``gnss.receiver_lost`` when epochs stop coming."""

    settings: GnssSettings
    slots: LocationSlots
    counters: Counters
    rlog: RateLimitedLog
    reader: GnssReader | None = None
    publisher: LocationPublisher | None = None
    watch: ReceiverWatch | None = None
    listeners: list[Callable[[Fix], None]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, pipeline: Pipeline, settings: GnssSettings) -> Location:
        """Register the location slots (before the safety and MQTT stages read the store)."""
        slots = LocationSlots.register(pipeline.store, settings.stale_after)
        loc = cls(settings, slots, pipeline.counters, pipeline.rlog)
        reader = loc.reader = GnssReader(settings, pipeline.clock, pipeline.counters,
                                         pipeline.rlog, loc.dispatch)
        loc.watch = ReceiverWatch(pipeline.alerts, settings.device, settings.lost_alert_s,
                                  pipeline.clock, connected=lambda: reader.connected)
        loc.listeners.append(loc.watch.on_fix)
        return loc

    def dispatch(self, fix: Fix) -> None:
        """Record ``fix`` in the state and hand it to every listener."""
        self.slots.record(fix)
        for listener in self.listeners:
            try:
                listener(fix)
            except Exception as exc:  # one consumer's bug must not starve the others
                self.counters.inc("gnss.listener_errors")
                self.rlog.error("gnss.listener", f"gnss: a position consumer failed: {exc!r}")

    def publish(self, publishing: Publishing) -> LocationPublisher:
        """Publish selected fixes on the ``location`` topic."""
        telemetry = publishing.telemetry
        publisher = LocationPublisher(
            PublishPolicy(self.settings), publishing.link, publishing.topics,
            publishing.envelope, publishing.clock, self.counters,
            parked=lambda: telemetry.modes.mode == "park")
        self.listeners.append(publisher.on_fix)
        self.publisher = publisher
        return publisher

    def start(self) -> None:
        """Open the receiver (reconnecting on its own), watch it, and start publishing."""
        if self.reader is not None:
            self.tasks.append(asyncio.create_task(self.reader.run(), name="gnss"))
        if self.watch is not None:
            self.tasks.append(asyncio.create_task(self.watch.run(), name="gnss-watch"))
        if self.publisher is not None:
            self.tasks.append(asyncio.create_task(self.publisher.run(), name="location"))

    async def stop(self) -> None:
        """Close the receiver and stop watching it."""
        await cancel_all(self.tasks)
        self.tasks.clear()


def _log_only(kind: str, data: Mapping[str, Any]) -> None:
    log.info("%s: %s", kind, dict(data))


class Outputs:
    """Where insights go: durable events, retained summaries, the local log, and battery
    health (which learns from finished trips and sessions)."""

    def __init__(self, journal: InsightLog | None) -> None:
        self.journal = journal
        self.events: EventSink = _log_only
        self.publishing: Publishing | None = None
        self.battery: BatteryHealth | None = None
        self.writes: set[asyncio.Task[bool]] = set()

    def attach(self, publishing: Publishing) -> None:
        """Send events and summaries through the durable MQTT path."""
        self.publishing = publishing
        self.events = publishing.durable.event

    def event(self, kind: str, data: Mapping[str, Any]) -> None:
        """An event (geofences)."""
        self.events(kind, data)

    def trip(self, trip: Trip) -> None:
        """A finished trip: published and logged first, then battery health learns from it."""
        self._finished("trip", trip)
        if self.battery is not None:
            self.battery.on_trip(trip)

    def charge(self, session: ChargeSession) -> None:
        """A finished charging session, likewise."""
        self._finished("charge_session", session)
        if self.battery is not None:
            self.battery.on_charge(session)

    def _finished(self, kind: str, record: Trip | ChargeSession) -> None:
        data = record.as_dict()
        self.events(kind, data)
        if self.publishing is not None:
            topics = self.publishing.topics
            topic, key = ((topics.last_trip, "trip") if kind == "trip"
                          else (topics.last_charge, "session"))
            self.publishing.durable.record(topic, key, data)
        if self.journal is not None:
            task = asyncio.create_task(self.journal.add(record), name=f"journal-{kind}")
            self.writes.add(task)
            task.add_done_callback(self.writes.discard)


@dataclass
class Insights:
    """Trips, charging sessions, battery health, geofences, moved-while-parked."""

    clock: Clock
    counters: Counters
    rlog: RateLimitedLog
    outputs: Outputs
    meter: PackMeter
    trips: TripRecorder
    charges: ChargeRecorder
    battery: BatteryHealth
    geofences: Geofences | None = None
    parked: MovedWhileParked | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, pipeline: Pipeline, location: Location | None, settings: LocationSettings,
              state_dir: Path | None) -> Insights:
        """Every estimator for ``pipeline``'s state; registers the battery slots, so call it
        before the MQTT stage is built."""
        store, clock, counters, rlog = (pipeline.store, pipeline.clock, pipeline.counters,
                                        pipeline.rlog)

        def file(name: str) -> Path | None:
            return None if state_dir is None else state_dir / name

        out = Outputs(None if state_dir is None
                      else InsightLog(state_dir / "insights.sqlite", counters, rlog))
        meter = PackMeter(store, counters)
        battery = out.battery = BatteryHealth(store, meter, pipeline.profile.battery, clock,
                                              counters, rlog, file("battery.json"))
        cfg = settings.insights
        ins = cls(clock, counters, rlog, out, meter,
                  TripRecorder(store, meter, clock, cfg, out.trip, file("trip.json"),
                               max_hdop=settings.gnss.max_hdop, counters=counters),
                  ChargeRecorder(store, meter, clock, cfg, out.charge, file("charge.json"),
                                 counters=counters),
                  battery)
        pipeline.listeners.append(ins.guarded("meter", meter.on_batch))
        if location is None and settings.geofences:
            log.warning("insights: %d geofence(s) configured but GNSS is off ([gnss]); "
                        "they are not evaluated", len(settings.geofences))
        if location is not None:
            max_hdop = settings.gnss.max_hdop
            location.listeners.append(ins.trips.on_fix)
            if settings.geofences:
                ins.geofences = Geofences(settings.geofences, out.event, clock, counters, rlog,
                                          max_hdop, file("geofences.json"))
                location.listeners.append(ins.geofences.on_fix)
            ins.parked = MovedWhileParked(store, pipeline.alerts, clock,
                                          cfg.moved_while_parked_m, max_hdop, file("parked.json"),
                                          counters=counters, rlog=rlog)
            location.listeners.append(ins.parked.on_fix)
        return ins

    async def start(self) -> None:
        """Open the local log and start the once-a-second estimators."""
        if self.outputs.journal is not None:
            await self.outputs.journal.open()
        self.tasks.append(asyncio.create_task(self._run(), name="insights"))

    def guarded(self, name: str, step: Callable[..., object]) -> Callable[..., None]:
        """``step`` with its exceptions counted (``insights.errors.<name>``) and logged once:
        a bug in one estimator must cost its own figure, not the decode task or the others."""
        return lambda *args: self._call(name, step, *args)

    def _call(self, name: str, step: Callable[..., object], *args: Any) -> None:
        try:
            step(*args)
        except Exception as exc:
            self.counters.inc(f"insights.errors.{name}")
            self.rlog.error(f"insights.errors.{name}", f"insights: {name} failed: {exc!r}")

    async def _run(self) -> None:
        next_save = self.clock.monotonic() + SAVE_EVERY_S
        while True:
            self.tick(self.clock.time())
            if self.clock.monotonic() >= next_save:
                next_save = self.clock.monotonic() + SAVE_EVERY_S
                self.save()
            await self.clock.sleep(TICK_S)

    def tick(self, now: float) -> None:
        """One evaluation of every periodic estimator (public for tests on a manual clock)."""
        updates: list[tuple[str, Callable[[float], None]]] = [
            ("trips", self.trips.update), ("charges", self.charges.update),
            ("battery", self.battery.update)]
        if self.parked is not None:
            updates.append(("parked", self.parked.update))
        for name, update in updates:
            self._call(name, update, now)

    def save(self) -> None:
        """Write open trips, sessions and battery totals to the state directory."""
        saves: list[tuple[str, Callable[[], None]]] = [
            ("trips", self.trips.save), ("charges", self.charges.save),
            ("battery", self.battery.save)]
        saves += [(name, part.save) for name, part in (("geofences", self.geofences),
                                                         ("parked", self.parked))
                  if part is not None]
        for name, save in saves:
            self._call(name, save)

    async def stop(self) -> None:
        """Stop the estimators, save their state and close the local log."""
        await cancel_all(self.tasks)
        self.tasks.clear()
        self.save()
        # Throughput alone is held back between periodic saves; a clean stop keeps all of it.
        self._call("battery", functools.partial(self.battery.save, force=True))
        if self.outputs.writes:
            await asyncio.gather(*self.outputs.writes, return_exceptions=True)
        if self.outputs.journal is not None:
            await self.outputs.journal.close()
