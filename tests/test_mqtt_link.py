"""The MQTT link against a real mosquitto: birth, will, reconnects, ownership of retained topics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.app import Pipeline, Publishing
from gateway.clock import SystemClock
from gateway.config import Profile
from gateway.config.settings import Settings, default_settings, with_overrides
from gateway.mqtt.link import refused_protocol
from hil.broker import Mosquitto
from tests.conftest import REF_PROFILE, ROOT
from tests.contract import validate
from tests.mqtt_helpers import Subscriber, retained

VEHICLE = "car-7"


def settings_for(tmp_path: Path, broker: Mosquitto, **mqtt: Any) -> Settings:
    """Default settings aimed at ``broker``, with quick reconnects."""
    base = with_overrides(default_settings(VEHICLE, REF_PROFILE, tmp_path / "state"),
                          host=broker.host, port=broker.port)
    fields: dict[str, Any] = {"backoff_min": 0.2, "backoff_max": 0.5, **mqtt}
    return dataclasses.replace(base, mqtt=dataclasses.replace(base.mqtt, **fields))


async def start(ref_profile: Profile, settings: Settings) -> tuple[Pipeline, Publishing]:
    """A pipeline on the real clock, publishing."""
    pipeline = Pipeline.build(ref_profile, SystemClock())
    return pipeline, await Publishing.start(pipeline, settings)


async def test_birth_is_retained_valid_and_connection_number_only_grows(
        tmp_path: Path, broker: Mosquitto, ref_profile: Profile) -> None:
    settings = settings_for(tmp_path, broker)
    async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
        _, pub = await start(ref_profile, settings)
        await sub.wait_for(lambda: len(sub.on("status")) >= 1)
        first = validate(sub.on("status")[0].topic, sub.on("status")[0].payload)
        assert first["state"] == "online"
        assert first["boot"] == pub.envelope.boot_id
        assert first["profile"] == "microev-ref"
        # The broker goes away and comes back: a new birth with a higher connection number.
        broker.stop()
        await sub.wait_for(lambda: not pub.link.connected)
        broker.start()
        await sub.wait_for(lambda: len([m for m in sub.on("status")
                                        if m.json()["state"] == "online"]) >= 2)
        second = sub.on("status")[-1].json()
        assert second["boot"] == first["boot"]
        assert second["connection"] > first["connection"]
        await pub.stop()
        # A restarted gateway (same state dir) keeps counting up, with a new boot id.
        _, pub2 = await start(ref_profile, settings)
        await sub.wait_for(lambda: sub.on("status")[-1].json().get("boot") == pub2.envelope.boot_id
                           and sub.on("status")[-1].json()["state"] == "online")
        third = sub.on("status")[-1].json()
        assert third["connection"] > second["connection"]
        await pub2.stop()
    stored = await retained(broker.host, broker.port, f"evgw/v1/{VEHICLE}/status")
    goodbye = validate(f"evgw/v1/{VEHICLE}/status", stored[f"evgw/v1/{VEHICLE}/status"])
    assert goodbye["state"] == "offline"
    assert goodbye["reason"] == "shutdown"


async def test_state_groups_are_retained_and_follow_the_contract(
        tmp_path: Path, broker: Mosquitto, ref_profile: Profile) -> None:
    _, pub = await start(ref_profile, settings_for(tmp_path, broker))
    try:
        async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
            await sub.wait_for(lambda: {m.topic.rsplit("/", 1)[1] for m in sub.messages
                                        if "/state/" in m.topic} >= {"battery", "motion", "body",
                                                                     "charging", "health"})
            await sub.wait_for(lambda: len(sub.on("events")) >= 1)
        for m in sub.messages:
            validate(m.topic, m.payload)
        started = [m.json() for m in sub.on("events")]
        assert started[0]["type"] == "gateway_started"
        battery = next(m.json() for m in sub.messages if m.topic.endswith("/state/battery"))
        soc = battery["signals"]["Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"]
        # Nothing was received yet: the state says so instead of inventing a value.
        assert soc == {"value": None, "unit": "%", "ts": None, "valid": False, "stale": True}
    finally:
        await pub.stop()


def _gateway_process(config: Path) -> subprocess.Popen[bytes]:
    """``ev-gateway run --config`` as a separate process, on an idle virtual bus."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
         "--bus", "vehicle=virtual:will-test"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _write_config(tmp_path: Path, broker: Mosquitto, will_delay: int, keepalive: int) -> Path:
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nvehicle_id = "{VEHICLE}"\nprofile = "{REF_PROFILE}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f"will_delay = {will_delay}\nkeepalive = {keepalive}\nbackoff_min = 0.2\n"
        "backoff_max = 0.5\n")
    return config


def _states(sub: Subscriber) -> list[tuple[str, str]]:
    return [(m.json()["state"], m.json()["boot"]) for m in sub.on("status") if m.payload]


async def _birth_then_kill_9(sub: Subscriber, config: Path) -> str:
    """Run the gateway process until its birth is seen, then SIGKILL it; returns its boot id."""
    proc = _gateway_process(config)
    try:
        await sub.wait_for(lambda: ("online" in [s for s, _ in _states(sub)]), 30)
        return _states(sub)[-1][1]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def test_a_dead_gateway_goes_offline_within_will_delay_plus_keepalive(
        tmp_path: Path, broker: Mosquitto) -> None:
    will_delay, keepalive = 2, 5
    config = _write_config(tmp_path, broker, will_delay, keepalive)
    async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
        boot = await _birth_then_kill_9(sub, config)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        await sub.wait_for(lambda: _states(sub)[-1][0] == "offline", will_delay + keepalive + 2)
        waited = loop.time() - killed
    will = sub.on("status")[-1]
    payload = validate(will.topic, will.payload)
    assert payload["boot"] == boot
    assert payload["reason"] == "lost"
    # The will was held back for the will delay, not sent at once.
    assert waited >= will_delay - 0.5


async def test_a_quick_restart_within_the_will_delay_does_not_flap_offline(
        tmp_path: Path, broker: Mosquitto) -> None:
    config = _write_config(tmp_path, broker, will_delay=5, keepalive=5)
    async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
        boot1 = await _birth_then_kill_9(sub, config)
        second = _gateway_process(config)
        try:
            await sub.wait_for(lambda: _states(sub)[-1][1] != boot1, 30)
            await asyncio.sleep(6)  # past the first run's will delay
            states = _states(sub)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(20)
    assert ("offline", boot1) not in states
    assert states[-1][0] == "online"
    assert states[-1][1] != boot1


async def test_retained_garbage_from_a_stranger_is_replaced(
        tmp_path: Path, broker: Mosquitto, ref_profile: Profile) -> None:
    pipeline, pub = await start(ref_profile, settings_for(tmp_path, broker))
    base = f"evgw/v1/{VEHICLE}"
    try:
        await asyncio.wait_for(pub.link.connected_event.wait(), 10)
        await asyncio.sleep(0.5)
        impostor = json.dumps({"v": 1, "vehicle": VEHICLE, "boot": "0" * 16, "seq": 1,
                               "ts": 1.0, "state": "online", "connection": 99,
                               "version": "x", "profile": "x"})
        async with aiomqtt.Client(broker.host, broker.port) as stranger:
            for topic, payload in ((f"{base}/status", impostor),
                                   (f"{base}/state/battery", "garbage"),
                                   (f"{base}/alerts/active", '{"alerts": "none"}'),
                                   (f"{base}/state/location", "\xff\xfe")):
                await stranger.publish(topic, payload, qos=1, retain=True)
        await asyncio.sleep(1.0)
        assert pub.link.connected
        stored = await retained(broker.host, broker.port, f"{base}/#")
        assert pipeline.counters.get("mqtt.foreign_messages") >= 4
    finally:
        await pub.stop()
    status = validate(f"{base}/status", stored[f"{base}/status"])
    assert status["boot"] == pub.envelope.boot_id
    validate(f"{base}/state/battery", stored[f"{base}/state/battery"])
    validate(f"{base}/alerts/active", stored[f"{base}/alerts/active"])
    # A group this vehicle does not publish is cleared rather than left with garbage.
    assert f"{base}/state/location" not in stored


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_both_protocol_versions_connect(
        tmp_path: Path, broker: Mosquitto, ref_profile: Profile, protocol: str) -> None:
    _, pub = await start(ref_profile, settings_for(tmp_path, broker, protocol=protocol))
    try:
        await asyncio.wait_for(pub.link.connected_event.wait(), 10)
        assert pub.link.protocol == protocol
    finally:
        await pub.stop()


async def test_home_assistant_discovery_is_published_when_enabled(
        tmp_path: Path, broker: Mosquitto, ref_profile: Profile) -> None:
    settings = settings_for(tmp_path, broker)
    settings = dataclasses.replace(settings, homeassistant=dataclasses.replace(
        settings.homeassistant, enabled=True))
    _, pub = await start(ref_profile, settings)
    try:
        await asyncio.wait_for(pub.link.connected_event.wait(), 10)
        await asyncio.sleep(1.0)
        configs = await retained(broker.host, broker.port, "homeassistant/#")
    finally:
        await pub.stop()
    objects = {topic.split("/")[-2] for topic in configs}
    assert {"battery_level", "location", "lock", "speed", "charging"} <= objects
    # The reference car reports no range; an entity for it would stay unknown forever.
    assert "range" not in objects
    lock = json.loads(configs["homeassistant/lock/evgw_car-7/lock/config"])
    assert lock["state_topic"] == f"evgw/v1/{VEHICLE}/state/body"
    assert lock["availability_topic"] == f"evgw/v1/{VEHICLE}/status"


async def test_no_discovery_unless_enabled(
        tmp_path: Path, broker: Mosquitto, ref_profile: Profile) -> None:
    _, pub = await start(ref_profile, settings_for(tmp_path, broker))
    try:
        await asyncio.wait_for(pub.link.connected_event.wait(), 10)
        await asyncio.sleep(1.0)
        configs = await retained(broker.host, broker.port, "homeassistant/#")
    finally:
        await pub.stop()
    assert configs == {}


def test_protocol_refusal_is_recognised_and_nothing_else_is() -> None:
    assert refused_protocol(MqttConnectError(1))  # MQTT 3.1.1 CONNACK: bad protocol version
    v5 = ReasonCode(PacketTypes.CONNACK, "Unsupported protocol version")
    assert refused_protocol(MqttConnectError(v5))
    assert not refused_protocol(MqttConnectError(5))  # not authorised
    assert not refused_protocol(MqttConnectError(ReasonCode(PacketTypes.CONNACK,
                                                            "Bad user name or password")))
    assert not refused_protocol(OSError("connection refused"))
