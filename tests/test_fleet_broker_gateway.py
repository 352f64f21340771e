"""The real gateway against the fleet broker of deploy/broker/, with a vehicle certificate.

The gateway is configured the way an installer would: the TOML that
issue-vehicle-cert.sh prints, pasted into a gateway.toml beside the copied
certificate files, loaded by the real settings loader. A simulated car
drives on a virtual CAN bus so there is telemetry to publish. The broker
logs every refused PUBLISH at debug level; none may name the vehicle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.clock import SystemClock
from gateway.commands.envelope import open_result
from gateway.commands.keys import generate_private_key, key_entry, parse_public_key, public_path
from gateway.config import load_profile
from gateway.config.settings import Settings, load_settings
from gateway.mqtt.topics import Topics
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle
from tests.command_rig import Gateway
from tests.conftest import REF_PROFILE
from tests.fleet_broker_helpers import FleetBroker, Identity, Peer, Pki, ok, until

VEHICLE = "van-7"
T = Topics(VEHICLE)


def install_gateway_config(pki: Pki, broker: FleetBroker, etc: Path, state: Path) -> Settings:
    """Issue the vehicle's certificate and write /etc/ev-gateway as the script says to."""
    issued = etc.parent / "issued"
    printed = pki.run("issue-vehicle-cert.sh", VEHICLE, "--ca", pki.ca_dir, "--out", issued,
                      "--host", "127.0.0.1", "--port", str(broker.port))
    (etc / "tls").mkdir(parents=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        shutil.copy(issued / name, etc / "tls" / name)
    owner = generate_private_key(etc / "owner.key")
    (etc / "keys.toml").write_text(key_entry("owner", "owner", owner.public_key()))
    (etc / "gateway.toml").write_text(
        f'[gateway]\nvehicle_id = "{VEHICLE}"\nprofile = "{REF_PROFILE}"\n'
        f'state_dir = "{state}"\n\n'
        + printed[printed.index("[mqtt]\n"):]
        + '\n[commands]\nkeys = "keys.toml"\n\n[homeassistant]\nenabled = true\n')
    return load_settings(etc / "gateway.toml")


@contextlib.asynccontextmanager
async def driving_car(settings: Settings) -> AsyncIterator[Gateway]:
    """A simulated car on a virtual bus of its own, and a gateway reading it."""
    channel = f"fleet-{uuid.uuid4().hex[:12]}"
    sim_bus = open_sim_bus("virtual", channel)
    stop = asyncio.Event()
    sim = asyncio.create_task(run_vehicle(sim_bus, VehicleEcus(VehicleModel(mode="drive")),
                                          SystemClock(), stop))
    try:
        gateway = await Gateway.open(load_profile(REF_PROFILE), settings, channel)
        try:
            yield gateway
        finally:
            await gateway.stop()
    finally:
        stop.set()
        await sim
        close_quietly(sim_bus)


def peer(pki: Pki, broker: FleetBroker, name: str) -> Peer:
    """A connected operator client with a certificate from ``pki``."""
    out = pki.root / "operators" / name
    pki.run("issue-operator-cert.sh", name, "--ca", pki.ca_dir, "--out", out)
    p = Peer(broker.port, pki.ca_dir / "ca.crt",
             Identity(name, out / "ca.crt", out / "client.crt", out / "client.key"))
    assert p.connect()
    return p


async def test_the_gateway_runs_unchanged_with_its_vehicle_certificate(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    with FleetBroker(tmp_path / "broker", pki) as broker:
        settings = install_gateway_config(pki, broker, tmp_path / "etc", tmp_path / "state")
        console, hass = peer(pki, broker, "console@operator"), peer(pki, broker,
                                                                   "hass@homeassistant")
        try:
            assert console.subscribe(f"{T.base}/#") == 1
            assert hass.subscribe("homeassistant/#") == 1
            async with driving_car(settings) as gateway:
                await until(lambda: any(json.loads(p).get("state") == "online"
                                        for p in console.received(T.status)), "online status")
                await until(lambda: console.received(T.telemetry) != [], "telemetry")
                await until(lambda: any(f"/evgw_{VEHICLE}/" in m.topic
                                        for m in hass.messages), "discovery configs")
                # A retained "command" someone left on cmd/req: the gateway must be able to
                # read it, delete it, and answer on the response topic under its cmd/res/
                # (in that order: it refuses only once the broker acknowledged the delete).
                response = f"{T.base}/cmd/res/console"
                assert ok(await asyncio.to_thread(console.publish, T.command_request, b"junk",
                                                  retain=True, response_topic=response))
                await until(lambda: console.received(response) != [], "the refusal")
                key = parse_public_key(public_path(settings.gateway_key_path).read_text())
                assert open_result(console.received(response)[0], key).reason == "retained"
                seen = len(console.messages)
                # Re-subscribing sends what is retained: nothing on cmd/req, then the status.
                assert await asyncio.to_thread(console.subscribe, T.command_request) == 1
                assert await asyncio.to_thread(console.subscribe, T.status) == 1
                await until(lambda: any(m.topic == T.status and m.retain
                                        for m in console.messages[seen:]), "retained status")
                assert [m for m in console.messages[seen:]
                        if m.topic == T.command_request] == []
                assert gateway.counter("mqtt.connects") == 1
                assert gateway.counter("mqtt.disconnects") == 0
                assert gateway.counter("mqtt.connect_failures") == 0
                assert gateway.counter("mqtt.live.dropped") == 0
        finally:
            console.close()
            hass.close()
        log = broker.log_text()
        assert f"as {VEHICLE} (p5" in log  # MQTT 5, named by its certificate
        assert f"Denied PUBLISH from {VEHICLE}" not in log
