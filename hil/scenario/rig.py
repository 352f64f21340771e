"""One scenario end to end: simulated car -> CAN -> the real daemon -> mosquitto -> checks.

The gateway runs as its own process (``python -m gateway.cli run --config ...``),
exactly as systemd starts it, with settings the rig writes: the scenario's vehicle id,
its CAN bus, the broker, an authorized key for the rig's commands, and the simulated
receiver's pseudo-terminal. The rig listens to everything under the vehicle's topics,
like a fleet operator, and sends signed commands, like an app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.cli.command import build_command
from gateway.clock import Clock, SystemClock
from gateway.commands import envelope as env
from gateway.commands.keys import generate_private_key, key_entry
from gateway.config import load_profile
from gateway.mqtt.topics import PREFIX, Topics
from hil.broker import stop_process
from hil.scenario.check import Progress, Record, Verdict, evaluate
from hil.scenario.live import LiveVehicle
from hil.scenario.spec import Scenario, Step
from hil.scenario.stalls import CarStalls, in_scenario_time, receive_watches
from hil.sim.model import VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus

REFERENCE_PROFILE = Path(__file__).resolve().parents[2] / "dbc" / "profiles" / "microev-ref.toml"
SETTLE_S = 5.0
"""Once every expectation is met and the timeline is over, run this much longer so a
forbidden or unexpected message that follows has the chance to show up."""
POLL_S = 0.25
LOG_TAIL = 15
COMMAND_TTL_S = 30.0


@dataclass(frozen=True)
class RigOptions:
    """Where the car and the gateway meet, and where the rig keeps its files."""

    sim_bus: str
    """INTERFACE:CHANNEL the simulated car sends on, e.g. ``socketcan:vcan0``."""
    gateway_bus: str
    """INTERFACE:CHANNEL the gateway listens on (the same bus; differs with two CAN ports)."""
    workdir: Path
    broker: tuple[str, int]
    profile: Path = REFERENCE_PROFILE
    ready_timeout_s: float = 90.0
    """A cold start inside User-Mode Linux takes several seconds."""
    attempt: int = 1
    """A second attempt gets its own work directory, so the first one's log and state stay
    for a look, and its own vehicle id, so the first one's retained messages stay out."""

    def vehicle_id(self, scenario: Scenario) -> str:
        """The car's id in this attempt."""
        suffix = f"-{self.attempt}" if self.attempt > 1 else ""
        return f"{scenario.vehicle_id}{suffix}"


@dataclass
class _Run:
    scenario: Scenario
    clock: Clock
    vehicle_id: str
    records: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    t0: float | None = None
    problems: list[str] = field(default_factory=list)

    def scenario_records(self, start: int = 0) -> list[Record]:
        base = self.t0 if self.t0 is not None else self.clock.monotonic()
        return [Record(mono - base, topic, payload)
                for mono, topic, payload in self.records[start:]]

    def now(self) -> float:
        now = self.clock.monotonic()
        return now - (self.t0 if self.t0 is not None else now)


async def run_scenario(scenario: Scenario, options: RigOptions,
                       clock: Clock | None = None) -> Verdict:
    """Run ``scenario`` against a fresh gateway process and judge what came out."""
    clock = clock or SystemClock()
    vehicle_id = options.vehicle_id(scenario)
    workdir = options.workdir / vehicle_id.removeprefix("hil-")
    # A fresh gateway each run: a kept state directory would bring back latched alerts,
    # the outbox and the replay cache of the last one.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    interface, _, channel = options.sim_bus.partition(":")
    with contextlib.ExitStack() as stack:
        gnss_master = gnss_device = None
        if scenario.gnss:
            gnss_master, gnss_slave = os.openpty()
            stack.callback(os.close, gnss_master)
            stack.callback(os.close, gnss_slave)
            tty.setraw(gnss_slave)  # no echo back into the simulated receiver
            gnss_device = os.ttyname(gnss_slave)
        bus = open_sim_bus(interface, channel)
        stack.callback(close_quietly, bus)
        car = LiveVehicle(bus, VehicleModel(mode=scenario.mode, soc=scenario.soc,
                                            ambient_c=scenario.ambient_c), clock, gnss_master)
        car.check(scenario)
        key = generate_private_key(workdir / "rig.key")
        settings = write_settings(scenario, options, workdir,
                                  key_entry("hil rig", "service", key.public_key()), gnss_device)
        return await _run(_Run(scenario, clock, vehicle_id), options, car, settings, key)


async def _run(run: _Run, options: RigOptions, car: LiveVehicle, settings: Path,
               key: Any) -> Verdict:
    scenario, clock = run.scenario, run.clock
    stop = asyncio.Event()
    vehicle = asyncio.create_task(car.run(stop), name="hil-car")
    gateway: subprocess.Popen[bytes] | None = None
    log_path = settings.parent / "gateway.log"
    try:
        async with aiomqtt.Client(*options.broker, identifier=f"hil-rig-{scenario.name}",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{PREFIX}/{run.vehicle_id}/#", qos=1)
            listener = asyncio.create_task(_listen(client, run), name="hil-listen")
            with log_path.open("wb") as log_file:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "run", "--config", str(settings)],
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                if await _ready(run, gateway, options.ready_timeout_s):
                    run.t0 = clock.monotonic()
                    await _timeline(run, car, vehicle, gateway, client, key)
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
    except aiomqtt.MqttError as exc:
        run.problems.append(f"broker {options.broker[0]}:{options.broker[1]}: {exc}")
    finally:
        ran = run.now()
        if gateway is not None:
            # In a thread: the car keeps sending while the daemon shuts down.
            await asyncio.to_thread(_stop_gateway, gateway, run)
        stop.set()
        try:
            await vehicle
        except Exception as exc:  # any failure of the car is the run's problem
            run.problems.append(f"the simulated car failed: {exc!r}")
    run.problems += _log_problems(log_path, tail=bool(run.problems))
    # Without a time 0 the gateway never came online: nothing was judged against the car.
    stalls = CarStalls(in_scenario_time(car.stalls, run.t0, ran) if run.t0 is not None else (),
                       receive_watches(_profile_of(scenario, options, settings.parent)), ran)
    return evaluate(scenario, run.scenario_records(), ran, run.problems, stalls)


def _profile_of(scenario: Scenario, options: RigOptions, workdir: Path) -> Path:
    """The profile the gateway runs with: the rig's, unless the scenario's settings name
    another (relative to the settings file, as the gateway reads it)."""
    named = scenario.settings.get("gateway", {}).get("profile")
    return workdir / Path(named).expanduser() if named else options.profile


def write_settings(scenario: Scenario, options: RigOptions, workdir: Path, key_toml: str,
                   gnss_device: str | None) -> Path:
    """The gateway's settings file for this run; the scenario's ``[settings]`` win."""
    keys = workdir / "keys.toml"
    keys.write_text(key_toml)
    bus_name = load_profile(options.profile).buses[0].name
    base: dict[str, Any] = {
        "gateway": {"vehicle_id": options.vehicle_id(scenario),
                    "profile": str(options.profile),
                    "state_dir": str(workdir / "state")},
        "mqtt": {"host": options.broker[0], "port": options.broker[1], "protocol": "5",
                 "backoff_min": 0.2, "backoff_max": 2.0},
        "commands": {"keys": str(keys)},
        "can": {bus_name: options.gateway_bus},
        "health": {"interval_s": 2},
        "telemetry": {"state_interval": 1.0},
    }
    if gnss_device is not None:
        base["gnss"] = {"device": gnss_device, "baud": 115200}
    import tomli_w  # the [hil] extra: only the rig writes TOML, not a gateway on a car

    path = workdir / "gateway.toml"
    path.write_text(tomli_w.dumps(merge(base, scenario.settings)))
    return path


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


async def _listen(client: aiomqtt.Client, run: _Run) -> None:
    prefix = f"{PREFIX}/{run.vehicle_id}/"
    async for message in client.messages:
        topic = str(message.topic)[len(prefix):]
        raw = message.payload if isinstance(message.payload, bytes) else b""
        run.records.append((run.clock.monotonic(), topic, _payload(topic, raw)))


def _payload(topic: str, raw: bytes) -> dict[str, Any]:
    try:
        if topic.startswith("cmd/res/"):
            return env.open_result(raw, None).body()
        data = json.loads(raw) if raw else {}
    except (ValueError, env.Malformed):
        return {"unreadable": raw[:200].decode("utf-8", "replace")}
    return data if isinstance(data, dict) else {"value": data}


async def _ready(run: _Run, gateway: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until the gateway says it is online and has published telemetry."""
    deadline = run.clock.monotonic() + timeout
    while run.clock.monotonic() < deadline:
        if gateway.poll() is not None:
            run.problems.append(f"the gateway exited with status {gateway.returncode} "
                                "before it came online")
            return False
        topics = {(t, p.get("state")) for _, t, p in run.records}
        if ("status", "online") in topics and any(t == "telemetry" for t, _ in topics):
            return True
        await run.clock.sleep(POLL_S)
    run.problems.append(f"the gateway was not online and publishing within {timeout:g} s")
    return False


async def _timeline(run: _Run, car: LiveVehicle, vehicle: asyncio.Task[int],
                    gateway: subprocess.Popen[bytes], client: aiomqtt.Client,
                    key: Any) -> None:
    scenario = run.scenario
    pending = list(scenario.steps)
    progress, fed = Progress(scenario), 0
    while run.now() < scenario.duration_s:
        if vehicle.done():
            return  # its exception is reported at teardown
        if gateway.poll() is not None:
            run.problems.append(f"the gateway exited with status {gateway.returncode} at "
                                f"{run.now():.1f} s")
            return
        while pending and pending[0].at <= run.now():
            step = pending.pop(0)
            if step.do == "command":
                await _command(client, run.vehicle_id, step, key, run.clock)
            else:
                car.apply(step)
        new = run.scenario_records(fed)
        fed += len(new)
        progress.feed(new)
        met = None if pending else progress.met_at
        if met is not None and run.now() >= max(met, scenario.quiet_until) + SETTLE_S:
            return
        await run.clock.sleep(POLL_S)


async def _command(client: aiomqtt.Client, vehicle_id: str, step: Step, key: Any,
                   clock: Clock) -> None:
    command = build_command(vehicle_id, step.args["cmd"], step.args["args"], key,
                            COMMAND_TTL_S, clock.time())
    await client.publish(Topics(vehicle_id).command_request,
                         env.sign_command(command, key), qos=1)


def _stop_gateway(gateway: subprocess.Popen[bytes], run: _Run) -> None:
    if gateway.poll() is not None:
        return  # the timeline already reported how it ended
    if not stop_process(gateway, 30):
        run.problems.append("the gateway did not stop within 30 s of SIGTERM")
    elif gateway.returncode != 0:
        run.problems.append(f"the gateway exited with status {gateway.returncode} "
                            "on SIGTERM")


def _log_problems(log_path: Path, tail: bool) -> list[str]:
    """A traceback in the daemon's log is a failure even when every check passed; after
    another problem, the log's last lines say what the daemon was doing."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for n, line in enumerate(lines):
        if line.startswith("Traceback"):
            out.append(f"traceback in {log_path}: " + " | ".join(lines[n:n + 12][-3:]))
    out = out[:3]
    if tail and lines:
        out.append(f"the last lines of {log_path}:\n" +
                   "\n".join(f"               {line}" for line in lines[-LOG_TAIL:]))
    return out
