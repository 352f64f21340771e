"""can-utils against the rig: candump records the simulated car, ``ev-gateway decode``
reads the recording, cansend reaches the gateway's CAN layer, and canplayer replays the
recording into the real daemon, whose MQTT telemetry must carry the recorded values.

Test engineers use these tools on the bench every day, so the HIL suite proves they
work on the same SocketCAN interface the scenarios use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import aiomqtt

from gateway.can import BusOptions, open_bus
from gateway.clock import SystemClock
from gateway.mqtt.topics import Topics
from hil.broker import Mosquitto, stop_process
from hil.scenario.rig import REFERENCE_PROFILE
from hil.sim.ecus import VehicleEcus
from hil.sim.model import VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle

RECORD_S = 4.0
RECORDED_SOC = 63.4
"""An unusual SoC, so the value that comes out of the replay can only be the recorded one."""
SOC = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current"
_LINE = re.compile(r"^\(\d+\.\d+\) (\w+) ([0-9A-F]{3}|[0-9A-F]{8})#([0-9A-F]*)$")


class CheckFailed(Exception):
    """One can-utils check did not hold."""


def check_can_utils(iface: str, out: TextIO = sys.stdout) -> int:
    """Run every check on ``iface``; print one line each; 0 when all hold."""
    missing = [t for t in ("candump", "cansend", "canplayer") if shutil.which(t) is None]
    if missing:
        print(f"hil: can-utils missing ({', '.join(missing)}): apt-get install can-utils",
              file=out)
        return 1
    failed = 0
    with tempfile.TemporaryDirectory(prefix="ev-gateway-canutils-") as tmp:
        work = Path(tmp)
        record = work / "drive.log"
        checks: tuple[tuple[str, Callable[[], str]], ...] = (
            ("candump -L records the car", lambda: _record(iface, record)),
            ("ev-gateway decode reads it", lambda: _decode(record)),
            ("cansend reaches the gateway's bus", lambda: _cansend(iface)),
            ("canplayer replays into the daemon",
             lambda: asyncio.run(_replay(iface, record, work))))
        for name, check in checks:
            try:
                detail = check()
                print(f"  ok         can-utils: {name}: {detail}", file=out, flush=True)
            except (CheckFailed, OSError, subprocess.SubprocessError) as exc:
                failed += 1
                print(f"  FAIL       can-utils: {name}: {exc}", file=out, flush=True)
    print(f"{'PASS' if not failed else 'FAIL'} can-utils on {iface}", file=out, flush=True)
    return 1 if failed else 0


def _record(iface: str, path: Path) -> str:
    with path.open("w") as sink:
        dump = subprocess.Popen(["candump", "-L", iface], stdout=sink,
                                stderr=subprocess.PIPE)
        try:
            asyncio.run(_drive(iface, RECORD_S))
        finally:
            dump.send_signal(signal.SIGINT)
            try:
                _, err = dump.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                dump.kill()
                _, err = dump.communicate()
    lines = path.read_text().splitlines()
    bad = [line for line in lines if not _LINE.match(line)]
    if bad:
        raise CheckFailed(f"{len(bad)} lines are not candump -L format, e.g. {bad[0]!r}")
    ids = {m.group(2) for m in map(_LINE.match, lines) if m}
    if len(lines) < 100 or not {"100", "200", "300"} <= ids:
        raise CheckFailed(f"only {len(lines)} frames with ids {sorted(ids)} in {RECORD_S:g} s"
                          f"{'; candump: ' + err.decode().strip() if err else ''}")
    return f"{len(lines)} frames, {len(ids)} identifiers"


async def _drive(iface: str, seconds: float) -> None:
    bus = open_sim_bus("socketcan", iface)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    try:
        await run_vehicle(bus, VehicleEcus(VehicleModel(mode="drive", soc=RECORDED_SOC)),
                          SystemClock(), stop)
    finally:
        close_quietly(bus)


def _decode(record: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "decode", "--profile", str(REFERENCE_PROFILE),
         str(record)], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"exit {done.returncode}: {done.stderr.strip()}")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    errors = [r for r in rows if "error" in r]
    socs = {r["signals"]["BMS_SoC"] for r in rows if r.get("name") == "BMS_Soc"}
    if not rows or errors or not socs:
        raise CheckFailed(f"{len(rows)} records, {len(errors)} errors, SoC values {socs}")
    if any(abs(s - RECORDED_SOC) > 0.2 for s in socs):
        raise CheckFailed(f"decoded SoC {sorted(socs)}, the car had {RECORDED_SOC}")
    return done.stderr.strip().removeprefix("ev-gateway decode: ")


def _cansend(iface: str) -> str:
    bus = open_bus(BusOptions("vehicle", "socketcan", iface))
    try:
        subprocess.run(["cansend", iface, "7A5#0102030405060708"], check=True, timeout=10,
                       capture_output=True)
        while (msg := bus.recv(timeout=2.0)) is not None:
            if msg.arbitration_id == 0x7A5:
                if bytes(msg.data) != bytes(range(1, 9)):
                    raise CheckFailed(f"received 7A5 with data {bytes(msg.data).hex()}")
                return "7A5#0102030405060708 received by the gateway's socketcan bus"
    finally:
        close_quietly(bus)
    raise CheckFailed("the frame never arrived")


async def _replay(iface: str, record: Path, work: Path) -> str:
    vehicle = "hil-canplayer"
    with Mosquitto(work / "broker") as broker, (work / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--profile", str(REFERENCE_PROFILE),
             "--vehicle-id", vehicle, "--broker", f"{broker.host}:{broker.port}",
             "--state-dir", str(work / "state"), "--bus", f"vehicle=socketcan:{iface}"],
            stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True)
        try:
            return await _watch_replay(broker, Topics(vehicle), iface, record, gateway)
        finally:
            stop_process(gateway, 30)


async def _watch_replay(broker: Mosquitto, topics: Topics, iface: str, record: Path,
                        gateway: subprocess.Popen[bytes]) -> str:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topics.status, qos=1)
        await client.subscribe(topics.telemetry)
        player: subprocess.Popen[bytes] | None = None
        try:
            async with asyncio.timeout(90):
                async for message in client.messages:
                    data: Any = json.loads(bytes(message.payload))
                    if player is None and message.topic.matches(topics.status) and \
                            data.get("state") == "online":
                        # The recording names its interface; replay it onto ours.
                        player = subprocess.Popen(["canplayer", "-I", str(record),
                                                   f"{iface}={_recorded_iface(record)}"])
                    soc = data.get("signals", {}).get(SOC, {}).get("value")
                    if player is not None and soc is not None:
                        if abs(soc - RECORDED_SOC) > 0.2:
                            raise CheckFailed(f"the daemon published SoC {soc}, the "
                                              f"recording has {RECORDED_SOC}")
                        return f"the daemon published the recorded SoC {soc} %"
        except TimeoutError:
            raise CheckFailed("no telemetry with the recorded SoC within 90 s; gateway "
                              f"alive: {gateway.poll() is None}") from None
        finally:
            if player is not None:
                with contextlib.suppress(ProcessLookupError):
                    player.kill()
                player.wait()
    raise CheckFailed("the broker closed the subscription")


def _recorded_iface(record: Path) -> str:
    first = record.read_text().split("\n", 1)[0]
    m = _LINE.match(first)
    if m is None:
        raise CheckFailed(f"{record} does not start with a candump -L line")
    return m.group(1)
