"""Position and insights end to end, as ``ev-gateway run`` wires them.

The simulated car drives on a python-can virtual bus in real time; its GNSS
receiver writes NMEA into a real pseudo-terminal, which the gateway opens as
its serial device; everything comes out through a real mosquitto. The car
leaves a small geofence, parks (a trip ends after 2 s parked), and is then
towed away with the ignition off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_profile
from gateway.config.location import GeofenceSpec, GnssSettings, InsightSettings, LocationSettings
from gateway.config.settings import Settings, default_settings, with_overrides
from hil.broker import Mosquitto
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.gnss import NmeaSimulator, run_receiver
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle
from tests.command_rig import Gateway
from tests.conftest import REF_PROFILE
from tests.contract import validate
from tests.mqtt_helpers import Received, Subscriber, retained

VEHICLE = "car-loc"
LOC = "Vehicle.CurrentLocation"
TRIP_END_S = 2.0


@dataclass
class Rig:
    """Car, receiver, gateway and a subscriber."""

    model: VehicleModel
    gnss: NmeaSimulator
    gateway: Gateway
    sub: Subscriber
    settings: Settings

    def events(self, kind: str) -> list[dict[str, Any]]:
        """Data of the ``kind`` events received so far."""
        return [m.json()["data"] for m in self.sub.on("events") if m.json()["type"] == kind]

    def alerts(self, key: str) -> list[dict[str, Any]]:
        """Alert transitions of ``key`` received so far."""
        return [m.json() for m in self.sub.on("alerts") if m.json()["alert"]["key"] == key]


@contextlib.asynccontextmanager
async def rig(broker: Mosquitto, tmp_path: Path, channel: str) -> AsyncIterator[Rig]:
    """Start everything; the car starts driving away from the middle of the fence."""
    model = VehicleModel(mode="drive", soc=70.0)
    home = GeofenceSpec("home", "circle", center=(model.lat, model.lon), radius_m=25.0,
                        hysteresis_m=5.0)
    master, slave = os.openpty()
    tty.setraw(slave)
    where = LocationSettings(
        gnss=GnssSettings(enabled=True, device=os.ttyname(slave), baud=115200, rate_hz=5.0,
                          min_distance_m=5.0),
        geofences=(home,),
        insights=InsightSettings(trip_end_park_s=TRIP_END_S, moved_while_parked_m=50.0,
                                 energy_price_per_kwh=0.25, currency="EUR"))
    settings = with_overrides(default_settings(VEHICLE, REF_PROFILE, tmp_path / "state"),
                              host=broker.host, port=broker.port)
    settings = replace(settings, location=where)
    settings.state_dir.mkdir()
    stop = asyncio.Event()
    sim_bus = open_sim_bus("virtual", channel)
    gnss = NmeaSimulator(model)
    tasks = []
    gateway = None
    try:
        async with Subscriber(broker.host, broker.port, VEHICLE) as sub:
            gateway = await Gateway.open(load_profile(REF_PROFILE), settings, channel)
            clock = gateway.pipeline.clock
            tasks = [asyncio.create_task(run_vehicle(sim_bus, VehicleEcus(model), clock, stop)),
                     asyncio.create_task(run_receiver(master, gnss, clock, stop, rate_hz=5.0))]
            yield Rig(model, gnss, gateway, sub, settings)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if gateway is not None:
            await gateway.stop()
        close_quietly(sim_bus)
        os.close(master)
        os.close(slave)


def _paths(message: Received) -> set[str]:
    return set(message.json()["signals"])


async def test_drive_geofence_trip_and_tow_away(broker: Mosquitto, tmp_path: Path) -> None:
    async with rig(broker, tmp_path, "loc-e2e") as r:
        sub = r.sub
        # The position arrives as one object, lat and lon together, and validates.
        await sub.wait_for(lambda: any(m.json()["position"]["lat"] is not None
                                       for m in sub.on("location")), timeout=15)
        for m in sub.on("location"):
            validate(m.topic, m.payload)
            pos = m.json()["position"]
            assert (pos["lat"] is None) == (pos["lon"] is None)
        start_truth = (r.model.energy_out_wh, r.model.energy_in_wh)

        # Driving out of the 25 m fence: one exit, durable on the events topic.
        await sub.wait_for(lambda: bool(r.events("geofence_exited")), timeout=20)
        exited = r.events("geofence_exited")
        assert [e["fence"] for e in exited] == ["home"]
        assert exited[0]["distance_m"] <= -5.0

        # Park: the trip ends once the car has stood for TRIP_END_S.
        r.model.mode = "park"
        end_truth = (r.model.energy_out_wh, r.model.energy_in_wh)
        await sub.wait_for(lambda: bool(r.events("trip")), timeout=15)
        trip = r.events("trip")[0]
        trip_msg = next(m for m in sub.on("events") if m.json()["type"] == "trip")
        validate(trip_msg.topic, trip_msg.payload)
        truth_net = (end_truth[0] - start_truth[0]) - (end_truth[1] - start_truth[1])
        # The trip began before the first fix was seen here, so it used at least as much.
        assert trip["energy_wh"] >= truth_net * 0.95
        assert trip["distance_km"] > 0 and trip["distance_source"] in ("odometer", "gnss")
        assert trip["max_speed_kmh"] > 10
        assert trip["cost"] == pytest.approx(trip["energy_wh"] / 1000 * 0.25, abs=0.01)
        await sub.wait_for(lambda: bool(sub.on("trips/last")), timeout=10)
        last = sub.on("trips/last")[-1]
        assert last.json()["trip"]["id"] == trip["id"]
        validate(last.topic, last.payload)

        # Towed away with the ignition off: the alert comes after two fixes far enough away.
        await asyncio.sleep(1.0)  # a few fixes at the parking spot become the anchor
        assert not r.alerts("location.moved_while_parked")
        r.model.lat += 0.002  # about 220 m north
        await sub.wait_for(lambda: bool(r.alerts("location.moved_while_parked")), timeout=10)
        raised = r.alerts("location.moved_while_parked")[0]
        assert raised["transition"] == "raised"
        assert raised["alert"]["severity"] == "critical"
        assert raised["alert"]["value"] > 150

        # Live telemetry never carries the location signals; the retained state does.
        for m in sub.on("telemetry"):
            assert not any(p.startswith(LOC) for p in _paths(m))
        state = await retained(broker.host, broker.port, f"evgw/v1/{VEHICLE}/state/location")
        signals = next(iter(state.values()))
        assert b"Latitude" in signals and b"Longitude" in signals
        assert r.gateway.counter("gnss.fixes") > 5
