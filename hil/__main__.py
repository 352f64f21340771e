"""``python -m hil``: the simulated vehicle, the HIL scenarios, and the all-in-one demo.

- ``python -m hil sim --bus virtual:NAME|udp_multicast:GROUP|socketcan:vcan0``
  runs the reference vehicle on a bus until Ctrl-C; ``--scenario FILE`` plays a
  scenario's timeline on it (for a gateway you run yourself).
- ``python -m hil run [FILE|DIR ...] --bus socketcan:vcan0`` runs scenarios against the
  real daemon and a private mosquitto on the given bus, and checks what comes out.
- ``python -m hil suite`` is the HIL suite: the can-utils checks and every scenario on
  a real SocketCAN vcan0, inside User-Mode Linux where the kernel has no CAN.
- ``python -m hil uml -- CMD ...`` runs any command inside User-Mode Linux with vcan0.
- ``python -m hil demo`` runs the vehicle, the gateway and a private mosquitto
  in one process: vehicle -> python-can virtual bus -> gateway -> broker ->
  a live view that reads only MQTT, as a fleet operator would. The car's GNSS
  receiver talks NMEA over a real pseudo-terminal, and the car drives a loop
  around a geofence, parks, and drives again, so trips come out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import tty
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.app import Gateway, run_until, stop_event
from gateway.cli.watch import watch
from gateway.clock import SystemClock
from gateway.commands.keys import generate_private_key, key_entry
from gateway.config import ConfigError, load_profile
from gateway.config.location import GeofenceSpec, GnssSettings, InsightSettings, LocationSettings
from gateway.config.settings import default_settings, with_overrides
from hil.broker import INSTALL_HINT, Mosquitto, find_mosquitto
from hil.scenario.live import play_scenario
from hil.scenario.spec import load_scenario
from hil.scenario.suite import run_files, run_suite, scenario_files
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.gnss import NmeaSimulator, run_receiver
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle

DEMO_VEHICLE = "demo-001"
REFERENCE_PROFILE = Path(__file__).resolve().parents[1] / "dbc" / "profiles" / "microev-ref.toml"


async def _sim(args: argparse.Namespace) -> int:
    interface, _, channel = args.bus.partition(":")
    if args.scenario:
        return await play_scenario(load_scenario(Path(args.scenario)), interface, channel,
                                   args.duration)
    bus = open_sim_bus(interface, channel)
    stop = stop_event(args.duration)
    ecus = VehicleEcus(VehicleModel(mode=args.mode, soc=args.soc))
    try:
        sent = await run_vehicle(bus, ecus, SystemClock(), stop)
    finally:
        close_quietly(bus)
    print(f"hil sim: sent {sent} frames", file=sys.stderr)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    """Vehicle -> virtual CAN -> gateway -> private mosquitto -> MQTT live view."""
    if find_mosquitto() is None:
        print(f"hil demo: {INSTALL_HINT}", file=sys.stderr)
        return 1
    clock = SystemClock()
    profile = load_profile(args.profile)
    channel = "ev-gateway-demo"
    stop = stop_event(args.duration)
    with tempfile.TemporaryDirectory(prefix="ev-gateway-demo-") as tmp, \
            Mosquitto(Path(tmp) / "broker", nodelay=True) as broker, \
            contextlib.ExitStack() as stack:
        keys = _demo_keys(Path(tmp))
        settings = with_overrides(
            default_settings(DEMO_VEHICLE, Path(args.profile), Path(tmp) / "state"),
            host=broker.host, port=broker.port, keys=keys)
        settings.state_dir.mkdir()
        gnss_master, gnss_slave = os.openpty()
        stack.callback(os.close, gnss_master)
        stack.callback(os.close, gnss_slave)
        tty.setraw(gnss_slave)  # no echo back to the simulated receiver before the gateway opens it
        ecus = VehicleEcus(VehicleModel(mode=args.mode, soc=args.soc))
        settings = replace(settings, location=demo_location(os.ttyname(gnss_slave), ecus.model))
        gateway = Gateway.build(profile, clock, settings, settings.state_dir)
        if args.speed_cap and gateway.safety.speed_cap is not None:
            gateway.safety.speed_cap.select(args.speed_cap)
        cli = Path(sys.executable).parent / "ev-gateway"
        print(f"hil demo: send a signed command from another terminal:\n  {cli} command "
              f"lock --vehicle {DEMO_VEHICLE} --key {Path(tmp) / 'owner.key'} --broker "
              f"{broker.host}:{broker.port} --gateway-key {settings.gateway_key_path}.pub",
              file=sys.stderr)
        sim_bus = open_sim_bus("virtual", channel)
        sim = asyncio.create_task(run_vehicle(sim_bus, ecus, clock, stop))
        receiver = asyncio.create_task(
            run_receiver(gnss_master, NmeaSimulator(ecus.model), clock, stop))
        script = asyncio.create_task(drive_and_park(ecus.model, stop)) \
            if args.mode == "drive" else None
        await gateway.start(gateway.pipeline.bus_options(
            {profile.buses[0].name: f"virtual:{channel}"}))
        viewer = asyncio.create_task(watch(broker.host, broker.port, DEMO_VEHICLE, stop))
        try:
            await run_until(stop, gateway)
        finally:
            stop.set()
            await viewer
            await sim
            await receiver
            if script is not None:
                await script
            close_quietly(sim_bus)
    return 0


DEMO_DRIVE_S = 75.0
DEMO_PARK_S = 35.0


def demo_location(device: str, model: VehicleModel) -> LocationSettings:
    """GNSS on ``device``, a geofence around where the car starts, and a trip that ends
    after 20 s parked (a real car would use minutes), so the demo shows trips quickly."""
    home = GeofenceSpec("home", "circle", center=(model.lat, model.lon), radius_m=150.0)
    return LocationSettings(
        gnss=GnssSettings(enabled=True, device=device, baud=115200),
        geofences=(home,),
        insights=InsightSettings(trip_end_park_s=20.0, energy_price_per_kwh=0.30,
                                 currency="EUR"))


async def drive_and_park(model: VehicleModel, stop: asyncio.Event) -> None:
    """Drive for a while, park long enough to end the trip, and again, until ``stop``."""
    while not stop.is_set():
        for mode, seconds in (("drive", DEMO_DRIVE_S), ("park", DEMO_PARK_S)):
            model.mode = mode
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            if stop.is_set():
                return


def _demo_keys(workdir: Path) -> Path:
    """An owner key for the demo and the authorized-keys file that lists it."""
    owner = generate_private_key(workdir / "owner.key")
    keys = workdir / "keys.toml"
    keys.write_text(key_entry("demo owner", "owner", owner.public_key()))
    return keys


def _scenario_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="run scenarios on the given bus and check the MQTT output")
    run.add_argument("files", nargs="*", metavar="FILE|DIR",
                     help="scenario files or directories (default: hil/scenarios)")
    run.add_argument("--bus", required=True, help="INTERFACE:CHANNEL, e.g. socketcan:vcan0")
    run.add_argument("--gateway-bus", help="where the gateway listens, if not --bus "
                                          "(e.g. socketcan:can0 wired to the car's can1)")
    run.add_argument("--workdir", type=Path, help="keep settings and gateway logs here")
    suite = sub.add_parser("suite", help="the HIL suite on real SocketCAN vcan0 "
                                         "(User-Mode Linux when the kernel has no CAN)")
    suite.add_argument("files", nargs="*", metavar="FILE|DIR")
    suite.add_argument("--rig", choices=["auto", "host", "uml"], default="auto",
                       help="host: this kernel's vcan0; uml: User-Mode Linux; auto: host "
                            "when vcan0 exists here")
    suite.add_argument("--no-tools", action="store_true", help="skip the can-utils checks")
    uml = sub.add_parser("uml", help="run a command inside User-Mode Linux with vcan0")
    uml.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")


def _run_scenarios(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run_files(scenario_files(args.files), args.bus, args.gateway_bus,
                         workdir=args.workdir)
    if args.command == "suite":
        return run_suite(scenario_files(args.files), args.rig, with_tools=not args.no_tools)
    from hil.uml import main_uml

    return main_uml(args.argv)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m hil")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("sim", "run the simulated vehicle on a CAN bus"),
                       ("demo", "simulated vehicle + gateway + broker + MQTT live view")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--mode", choices=["drive", "charge", "park"], default="drive")
        p.add_argument("--soc", type=float, default=80.0, help="initial state of charge, %%")
        p.add_argument("--duration", type=float, help="stop after this many seconds")
        if name == "sim":
            p.add_argument("--bus", default="virtual:ev-gateway-demo",
                           help="INTERFACE:CHANNEL, e.g. socketcan:vcan0")
            p.add_argument("--scenario", metavar="FILE",
                           help="play this scenario's car and timeline (its commands and "
                                "checks are skipped: they need the rig)")
        else:
            p.add_argument("--profile", default=str(REFERENCE_PROFILE))
            p.add_argument("--speed-cap", metavar="PROFILE",
                           help="ask the motor controller for this cap, e.g. valet or eu_l6e")
    _scenario_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("can").setLevel(logging.WARNING)  # "Created a socket" per bus opened
    if args.command in ("run", "suite", "uml"):
        # A CI timeout or a closed terminal: unwind, so the daemon, mosquitto and the VM
        # are stopped by the same clean-up as a normal end.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _exit_on_signal)
        return _run_scenarios(args)
    try:
        return asyncio.run(_sim(args) if args.command == "sim" else _demo(args))
    except ConfigError as exc:
        print(f"hil: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
