"""The durable path end to end, on a real mosquitto: nothing is lost, order is kept."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.alerts import Severity
from gateway.app import Pipeline, Publishing
from gateway.clock import ManualClock, SystemClock
from gateway.config import Profile
from hil.broker import Mosquitto, free_port
from hil.sim import VehicleModel
from hil.sim.ecus import generate
from tests.conftest import ROOT
from tests.contract import validate
from tests.mqtt_helpers import Subscriber, first_seqs
from tests.test_mqtt_link import (
    VEHICLE,
    _gateway_process,
    _write_config,
    settings_for,
    start,
)


async def test_alerts_survive_a_broker_crash_in_order_without_gaps(
        tmp_path: Path, ref_profile: Profile) -> None:
    # The broker saves its sessions after every change, so the fleet backend's subscription
    # and its queued messages outlive the crash. With a save only every second, mosquitto
    # could PUBACK an alert and lose it in the kill before the save: a gap the gateway
    # cannot see (it got its PUBACK), which made this test flaky.
    broker = Mosquitto(tmp_path / "broker",
                       extra_config="autosave_interval 1\nautosave_on_changes true")
    broker.start()
    try:
        _, pub = await start(ref_profile, settings_for(tmp_path, broker))
        total = 1200
        async with Subscriber(broker.host, broker.port, VEHICLE, client_id="fleet") as sub:
            await asyncio.sleep(2.5)  # past an autosave, even on a loaded machine

            async def stream() -> None:
                for i in range(total // 2):
                    pub.alerts.raise_("pack.hot", Severity.WARNING, "hot", value=i, limit=50)
                    pub.alerts.clear("pack.hot", value=i)
                    await asyncio.sleep(0.004)

            producer = asyncio.create_task(stream())
            await sub.wait_for(lambda: len(sub.on("alerts")) >= 200, 30)
            await asyncio.to_thread(broker.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(broker.start)
            await producer
            boot = pub.envelope.boot_id
            await sub.wait_for(lambda: len(first_seqs(sub.on("alerts"), boot)[0]) >= total, 60)
        await pub.stop()
    finally:
        broker.stop()
    order, _ = first_seqs(sub.on("alerts"), boot)
    assert order == list(range(1, total + 1))  # every alert, in order, no gap
    transitions = [validate(m.topic, m.payload)["transition"] for m in sub.on("alerts")]
    assert set(transitions) == {"raised", "cleared"}


async def test_ten_thousand_queued_alerts_survive_kill_9(tmp_path: Path, broker: Mosquitto
                                                         ) -> None:
    config = _write_config(tmp_path, broker, will_delay=1, keepalive=5)
    dead_broker = config.read_text().replace(f"port = {broker.port}", f"port = {free_port()}")
    offline = tmp_path / "offline.toml"
    offline.write_text(dead_broker)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    flood = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "gateway_flood.py"), str(offline), "10000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(flood.stdout.readline), 120)  # type: ignore[union-attr]
    finally:
        flood.kill()
        flood.wait()
    assert line.startswith("queued "), line
    boot = line.split()[1]
    async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
        gateway = _gateway_process(config)
        try:
            await sub.wait_for(lambda: len(first_seqs(sub.on("alerts"), boot)[0]) >= 10000, 120)
        finally:
            gateway.terminate()
            gateway.wait(30)
    order, _ = first_seqs(sub.on("alerts"), boot)
    assert order == list(range(1, 10001))
    for m in sub.on("alerts")[:: 500]:
        assert validate(m.topic, m.payload)["boot"] == boot


TICK = 5.0
HOUR = 3600.0


@pytest.mark.parametrize(("max_age", "expected"), [
    (7 * 24 * HOUR, 120),  # an hour at one snapshot per 30 s
    (1800.0, 60),          # the age bound keeps the last half hour
])
async def test_an_offline_hour_is_backfilled_oldest_first_within_bounds(
        tmp_path: Path, ref_profile: Profile, max_age: float, expected: int) -> None:
    clock = ManualClock()
    pipeline = Pipeline.build(ref_profile, clock)
    broker = Mosquitto(tmp_path / "broker", port=free_port())
    settings = settings_for(tmp_path, broker)
    settings = dataclasses.replace(
        settings, telemetry=dataclasses.replace(settings.telemetry, offline_interval=30.0),
        outbox=dataclasses.replace(settings.outbox, max_backfill_age=max_age))
    # Telemetry and the outbox run on the manual clock; only reconnects take real time.
    pub = Publishing.build(pipeline, settings, link_clock=SystemClock())
    outbox, durable, link, telemetry = pub.outbox, pub.durable, pub.link, pub.telemetry
    await outbox.open()
    writer = asyncio.create_task(durable.run())
    # Two seconds of the simulated car, replayed with fresh timestamps at every tick.
    window = generate(VehicleModel(mode="drive"), 2.0)
    offsets = [f.timestamp - max(f.timestamp for f in window) for f in window]
    decoder = pipeline.decoders["vehicle"]
    start_ts = clock.time()
    while clock.time() - start_ts < HOUR:
        clock.advance(TICK)
        now = clock.time()
        for f, offset in zip(window, offsets, strict=True):
            f.timestamp = now + offset
        decoder.process(window)
        await telemetry.step()
    durable.close()
    await writer
    await outbox.expire()
    groups = {slot.group for slot in pipeline.store}
    assert outbox.depth == expected + len(groups)  # the backfill, and one state row per group
    broker.start()
    try:
        async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
            link_task = asyncio.create_task(link.run())
            await sub.wait_for(lambda: len(sub.on("backfill")) >= expected, 30)
            await asyncio.sleep(0.3)
            await link.close(link_task)
    finally:
        broker.stop()
        await outbox.close()
    got = [validate(m.topic, m.payload) for m in sub.on("backfill")]
    assert len(got) == expected
    stamps = [g["ts"] for g in got]
    assert stamps == sorted(stamps)
    assert [b - a for a, b in itertools.pairwise(stamps)] == [30.0] * (expected - 1)
    assert stamps[-1] >= start_ts + HOUR - 30
    # Original source timestamps, from the hour offline, not the time of replay.
    speed = got[0]["signals"]["Vehicle.Speed"]
    assert stamps[0] - 2.1 <= speed["ts"] <= stamps[0]
