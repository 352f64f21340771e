"""``ev-gateway watch``: a live terminal view of one vehicle, read from the broker.

It sees only what a fleet operator sees: the vehicle's MQTT topics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import time
from typing import Any

import aiomqtt

from gateway.app import stop_event
from gateway.cli import view
from gateway.cli.fleet import FleetView
from gateway.mqtt.topics import PREFIX

RETRY = 2.0


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("watch", help="live view of a vehicle, subscribed over MQTT")
    p.add_argument("--broker", default="localhost:1883", help="HOST:PORT of the broker")
    p.add_argument("--vehicle", required=True, help="vehicle id")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(handler=run)


def split_broker(text: str) -> tuple[str, int]:
    """``host[:port]`` -> (host, port); port 1883 by default."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"ev-gateway: --broker {text!r}: expected HOST:PORT")
    return host or "localhost", int(port)


def status_line(fleet: FleetView) -> str:
    """Connection, stream and alert summary for the top of the screen."""
    st = fleet.status or {}
    state = st.get("state", "unknown").upper()
    since = st.get("ts")
    when = "?"
    if isinstance(since, int | float):
        when = time.strftime("%H:%M:%S", time.localtime(since))
    tel = fleet.stats("telemetry")
    alerts = ", ".join(f"{a.get('severity')}:{a.get('key')}" for a in fleet.active_alerts)
    return (f"{state} since {when}  boot {st.get('boot', '?')}  connection "
            f"{st.get('connection', '?')}  telemetry {tel.messages} msgs ({tel.gaps} lost)  "
            f"active alerts: {alerts or 'none'}")


def screen(fleet: FleetView, broker: str, width: int) -> str:
    """The whole screen."""
    title = f"ev-gateway watch | {fleet.vehicle_id} @ {broker} | {view.clock_line(time.time())}"
    text = view.render(title, fleet.signals.values(), status_line(fleet), width)
    text += "".join(f"{line}\n" for line in insight_lines(fleet))
    recent = [f"  {e.get('type')}: {e.get('data')}" for e in list(fleet.events)[-4:]]
    recent += [f"  alert {a.get('transition')}: {a.get('alert', {}).get('key')}"
               for a in list(fleet.alerts)[-4:]]
    if recent:
        text += "\nRECENT\n" + "\n".join(recent) + "\n"
    return text


def _num(value: Any, fmt: str, unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if isinstance(value, int | float) else "?"


def _minutes(seconds: Any) -> float | None:
    return seconds / 60 if isinstance(seconds, int | float) else None


def insight_lines(fleet: FleetView) -> list[str]:
    """Position, last trip and last charge, when the vehicle has published them."""
    lines = []
    pos = fleet.position
    if pos is not None:
        where = ("no fix" if pos.get("lat") is None else
                 f"{_num(pos.get('lat'), '.6f')}, {_num(pos.get('lon'), '.6f')}")
        lines.append(f"POSITION  {where}  {pos.get('fix')}  {_num(pos.get('speed'), '.0f')} "
                     f"km/h  heading {_num(pos.get('heading'), '.0f')}  sats "
                     f"{pos.get('satellites')}  hdop {_num(pos.get('hdop'), '.1f')}")
    trip = fleet.last_trip
    if trip is not None:
        lines.append(
            f"LAST TRIP {_num(trip.get('distance_km'), '.2f', ' km')} "
            f"({trip.get('distance_source')}) in {_num(_minutes(trip.get('duration_s')), '.1f')}"
            f" min, {_num(trip.get('energy_wh'), '.0f', ' Wh')} "
            f"({_num(trip.get('wh_per_km'), '.0f', ' Wh/km')}), regen "
            f"{_num(trip.get('regen_wh'), '.0f', ' Wh')}, SoC used "
            f"{_num(trip.get('soc_used'), '.1f', ' %')}, max "
            f"{_num(trip.get('max_speed_kmh'), '.0f', ' km/h')}")
    charge = fleet.last_charge
    if charge is not None:
        lines.append(
            f"LAST CHARGE {_num(charge.get('soc_start'), '.0f')} -> "
            f"{_num(charge.get('soc_end'), '.0f', ' %')}, "
            f"{_num(charge.get('energy_wh'), '.0f', ' Wh')} in "
            f"{_num(_minutes(charge.get('duration_s')), '.1f')} min, max "
            f"{_num(charge.get('max_power_w'), '.0f', ' W')}, "
            f"{charge.get('interruptions')} interruptions ({charge.get('end_reason')})")
    return lines


async def watch(host: str, port: int, vehicle: str, stop: asyncio.Event,
                username: str | None = None, fleet: FleetView | None = None) -> FleetView:
    """Follow ``vehicle`` until ``stop``, redrawing the screen; reconnects on its own."""
    fleet = fleet or FleetView(vehicle)
    tty = sys.stdout.isatty()
    broker = f"{host}:{port}"

    def draw_once() -> None:
        width = shutil.get_terminal_size((120, 40)).columns
        text = screen(fleet, broker, width)
        sys.stdout.write(("\x1b[H\x1b[2J" + text) if tty else text + "\n")
        sys.stdout.flush()

    async def draw() -> None:
        while not stop.is_set():
            draw_once()
            await asyncio.sleep(0.5 if tty else 5.0)

    async def follow() -> None:
        while not stop.is_set():
            try:
                async with aiomqtt.Client(host, port, username=username) as client:
                    await client.subscribe(f"{PREFIX}/{vehicle}/#", qos=1)
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes):
                            fleet.handle(str(message.topic), payload)
            except aiomqtt.MqttError:
                fleet.status = {"state": "broker unreachable"}
                await asyncio.sleep(RETRY)

    tasks = [asyncio.create_task(draw()), asyncio.create_task(follow())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    draw_once()
    return fleet


def run(args: argparse.Namespace) -> int:
    """Entry point of the sub-command."""
    host, port = split_broker(args.broker)

    async def main() -> None:
        await watch(host, port, args.vehicle, stop_event(args.duration), args.username)

    asyncio.run(main())
    return 0
