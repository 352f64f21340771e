"""Telemetry: modes, deadbands, intervals and source timestamps, published to a real broker."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import can
import pytest

from gateway.app import Pipeline, Publishing
from gateway.clock import ManualClock, SystemClock
from gateway.config import Profile
from gateway.config.settings import TelemetrySettings, default_settings
from gateway.mqtt.link import Link
from gateway.mqtt.telemetry import ChangeFilter, Telemetry
from gateway.outbox import Outbox
from gateway.state import SignalView
from gateway.state.mode import ModeTracker, current_mode
from hil.broker import Mosquitto
from hil.sim import VehicleModel
from hil.sim.ecus import generate
from tests.conftest import REF_PROFILE
from tests.contract import validate
from tests.mqtt_helpers import Subscriber
from tests.test_mqtt_link import VEHICLE, settings_for

SPEED = "Vehicle.Speed"


def telemetry_settings() -> TelemetrySettings:
    """The defaults: 1 s driving, 10 s charging, 60 s parked; Vehicle.Speed deadband 0.5."""
    return default_settings("x", REF_PROFILE, Path("/tmp")).telemetry


def view(value: object, *, valid: bool = True, stale: bool = False,
         ts: float | None = 1.0, path: str = SPEED) -> SignalView:
    return SignalView(path, value, "km/h", ts, valid, stale, "motion")  # type: ignore[arg-type]


def test_deadband_quality_and_never_received() -> None:
    f = ChangeFilter(telemetry_settings())
    assert not f.changed(view(None, valid=False, ts=None))  # nothing to say yet
    assert f.changed(view(10.0))
    f.commit([view(10.0)])
    assert not f.changed(view(10.4))  # inside the 0.5 km/h deadband
    assert f.changed(view(10.6))
    assert f.changed(view(10.0, stale=True))  # quality changes always count
    f.commit([view(10.0, stale=True)])
    assert not f.changed(view(99.0, stale=True))  # a stale value is not news
    assert f.changed(view(None, valid=False))
    flag = ChangeFilter(telemetry_settings())
    flag.commit([view(False, path="Vehicle.Powertrain.IsReady")])
    assert flag.changed(view(True, path="Vehicle.Powertrain.IsReady"))


def frames_of(mode: str, seconds: float = 2.0) -> list[can.Message]:
    return generate(VehicleModel(mode=mode), seconds)


def feed(pipeline: Pipeline, frames: list[can.Message], now: float) -> None:
    """Decode ``frames`` as if they had just arrived (latest stamped ``now``)."""
    latest = max(f.timestamp for f in frames)
    for f in frames:
        f.timestamp = now - (latest - f.timestamp)
    pipeline.decoders["vehicle"].process(frames)


@pytest.mark.parametrize(("mode", "expected"), [("drive", "drive"), ("park", "park"),
                                               ("charge", "charge")])
def test_mode_follows_the_vehicle(ref_profile: Profile, mode: str, expected: str) -> None:
    clock = ManualClock()
    pipeline = Pipeline.build(ref_profile, clock)
    feed(pipeline, frames_of(mode), clock.time())
    assert current_mode(pipeline.store, clock.time()) == expected


def test_unknown_speed_counts_as_driving(ref_profile: Profile) -> None:
    clock = ManualClock()
    pipeline = Pipeline.build(ref_profile, clock)
    assert current_mode(pipeline.store, clock.time()) == "drive"  # nothing received
    feed(pipeline, frames_of("park"), clock.time())
    assert current_mode(pipeline.store, clock.time()) == "park"
    clock.advance(30.0)  # the motor controller went quiet: its speed is stale
    assert current_mode(pipeline.store, clock.time()) == "drive"


def test_mode_changes_are_debounced(ref_profile: Profile) -> None:
    clock = ManualClock()
    pipeline = Pipeline.build(ref_profile, clock)
    tracker = ModeTracker(pipeline.store, hold=3.0)
    feed(pipeline, frames_of("park"), clock.time())
    assert tracker.update(clock.time()) == ("park", None)
    drive = frames_of("drive")
    for _ in range(6):  # driving seen from 0.5 s to 3.0 s: 2.5 s, not yet
        clock.advance(0.5)
        feed(pipeline, drive, clock.time())
        assert tracker.update(clock.time()) is None
    clock.advance(0.6)  # 3.1 s of driving
    feed(pipeline, drive, clock.time())
    assert tracker.update(clock.time()) == ("drive", "park")


@dataclass
class Rig:
    clock: ManualClock
    pipeline: Pipeline
    telemetry: Telemetry
    sub: Subscriber
    outbox: Outbox


@pytest.fixture
async def rig(tmp_path: Path, broker: Mosquitto, ref_profile: Profile) -> AsyncIterator[Rig]:
    """Telemetry on a manual clock, published through a real link to a real broker."""
    clock = ManualClock()
    pipeline = Pipeline.build(ref_profile, clock)
    pub = Publishing.build(pipeline, settings_for(tmp_path, broker), link_clock=SystemClock())
    outbox, durable, link, telemetry = pub.outbox, pub.durable, pub.link, pub.telemetry
    await outbox.open()
    async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
        tasks = [asyncio.create_task(durable.run()), asyncio.create_task(link.run())]
        await asyncio.wait_for(link.connected_event.wait(), 10)
        yield Rig(clock, pipeline, telemetry, sub, outbox)
        await link.close(tasks[1])
        durable.close()
        await tasks[0]
    await outbox.close()


async def run_for(rig: Rig, seconds: float, frames: list[can.Message] | None = None,
                  tick: float = 0.25) -> None:
    """Tick telemetry through ``seconds`` of manual time, feeding ``frames`` each tick."""
    for _ in range(round(seconds / tick)):
        rig.clock.advance(tick)
        if frames is not None:
            feed(rig.pipeline, frames, rig.clock.time())
        await rig.telemetry.step()
    await asyncio.sleep(0.3)  # let the broker deliver


async def test_values_carry_source_timestamps_and_unchanged_values_are_not_resent(
        rig: Rig) -> None:
    frames = frames_of("drive")
    await run_for(rig, 5.0, frames)
    msgs = [validate(m.topic, m.payload) for m in rig.sub.on("telemetry")]
    assert msgs, "no telemetry"
    first = msgs[0]
    assert first["mode"] == "drive"
    speed = first["signals"][SPEED]
    slot = rig.pipeline.store.slot(SPEED)
    # The source timestamp is the frame's, not the time of publication.
    assert speed["ts"] < first["ts"]
    assert speed["ts"] <= round(slot.timestamp or 0, 3)
    # The same frames again: only timestamps move, so nothing more is worth sending.
    assert len(msgs) == 1
    assert [m["seq"] for m in msgs] == [1]


async def test_a_change_beyond_the_deadband_is_sent_alone(rig: Rig) -> None:
    frames = frames_of("drive")
    await run_for(rig, 2.0, frames)
    before = len(rig.sub.on("telemetry"))
    # Drop the motor controller's frames: its signals go stale, and say so.
    others = [f for f in frames if not 0x200 <= f.arbitration_id <= 0x203]
    await run_for(rig, 2.0, others)
    later = [m.json() for m in rig.sub.on("telemetry")[before:]]
    assert later, "staleness was not reported"
    changed = set().union(*(m["signals"] for m in later))
    assert SPEED in changed
    assert all(s.startswith("Vehicle.Powertrain.TractionMotor") or s == SPEED
               or s.startswith("Vehicle.Powertrain.") for s in changed)
    speed = next(m["signals"][SPEED] for m in later if SPEED in m["signals"])
    assert speed["quality"] == "stale"
    assert "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current" not in changed


async def test_the_interval_follows_the_mode(rig: Rig) -> None:
    drive = frames_of("drive", 20.0)
    # Feed a moving car second by second: values change, one message per second.
    seconds = sorted({int(f.timestamp) for f in drive})
    for second in seconds[:10]:
        chunk = [f for f in drive if int(f.timestamp) == second]
        await run_for(rig, 1.0, chunk, tick=0.25)
    driving = len(rig.sub.on("telemetry"))
    assert 8 <= driving <= 11
    # Parked: the mode changes (after its hold time), then at most one message a minute.
    park = frames_of("park")
    await run_for(rig, 5.0, park)
    mark = len(rig.sub.on("telemetry"))
    await run_for(rig, 120.0, park, tick=1.0)
    assert len(rig.sub.on("telemetry")) - mark <= 2
    events = [m.json() for m in rig.sub.on("events")]
    assert {"from": "drive", "to": "park"} in [e["data"] for e in events
                                              if e["type"] == "mode_changed"]


async def test_offline_records_backfill_at_the_reduced_rate(rig: Rig) -> None:
    link = rig.telemetry._link
    assert isinstance(link, Link)
    link.connected_event.clear()  # as if the broker were unreachable
    before = rig.pipeline.counters.get("telemetry.backfill_recorded")
    await run_for(rig, 95.0, frames_of("drive"), tick=1.0)
    recorded = rig.pipeline.counters.get("telemetry.backfill_recorded") - before
    assert recorded == 4  # at 0, 30, 60 and 90 s with the default 30 s
    # The socket is in fact still up, so the durable path delivers them straight away.
    await rig.sub.wait_for(lambda: len(rig.sub.on("backfill")) == 4)
    stamps = [validate(m.topic, m.payload)["ts"] for m in rig.sub.on("backfill")]
    assert [b - a for a, b in itertools.pairwise(stamps)] == [30.0, 30.0, 30.0]
