"""Helpers for bench_mqtt.py: paced CAN traffic, a subscriber in its own process, settings.

Kept apart so the benchmark itself reads as the three measurements it makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiomqtt
import can

from gateway.config.settings import Settings, default_settings, with_overrides
from hil.sim.ecus import VehicleEcus, crc8_j1850
from hil.sim.model import VehicleModel

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "dbc" / "profiles" / "microev-ref.toml"
BUS = "vehicle"
FAULT_SIGNAL = "BMS_Flt_CellOverVoltage"
FAULT_PATH = "Vehicle.Powertrain.TractionBattery.Fault.CellOverVoltage"
TOGGLE_EVERY = 0.05
"""Seconds between BMS_Faults frames; each one flips FAULT_SIGNAL."""
SIM_STEP = 0.005
SEND_TICK = 0.001

Record = tuple[str, int, float, float | None]
"""(topic, envelope seq, arrival epoch seconds, newest source ts carried or None)."""


class Traffic:
    """The reference vehicle's own frames, topped up with filler to ``rate`` frames/s.

    The vehicle's cyclic BMS_Faults frames are left out and replaced by one
    every TOGGLE_EVERY seconds that flips FAULT_SIGNAL, so every BMS_Faults
    frame on the bus is a change the gateway must react to. Filler repeats the
    latest frame of each other mapped ID (the decoder's payload cache makes
    those cheap, as repeated cyclic payloads are on a real bus).
    """

    def __init__(self, rate: float, seed: int = 7) -> None:
        self.rate = rate
        self.ecus = VehicleEcus(VehicleModel(mode="drive", seed=seed))
        self._faults = self.ecus.db.get_message_by_name("BMS_Faults")
        self._latest: dict[tuple[int, bool], can.Message] = {}
        self._sim_t = 0.0
        self._next_toggle = TOGGLE_EVERY
        self._fill = 0
        self._counter = 0
        self.fault = False
        self.toggles = 0
        self.sent = 0

    def due(self, elapsed: float) -> list[can.Message]:
        """Frames to send now, ``elapsed`` seconds after the start; timestamps are not set."""
        while self._sim_t < elapsed:
            self.ecus.model.step(SIM_STEP)
            self._sim_t += SIM_STEP
        frames = [f for f in self.ecus.due_frames(self._sim_t)
                  if f.arbitration_id != self._faults.frame_id]
        for f in frames:
            self._latest[(f.arbitration_id, f.is_extended_id)] = f
        if elapsed >= self._next_toggle:
            frames.append(self._fault_frame())
            self._next_toggle += TOGGLE_EVERY
        templates = list(self._latest.values())
        # Before the vehicle's first frames there is nothing to repeat; the count catches up.
        short = int(elapsed * self.rate) - self.sent - len(frames) if templates else 0
        for _ in range(short):
            frames.append(templates[self._fill % len(templates)])
            self._fill += 1
        self.sent += len(frames)
        return frames

    def _fault_frame(self) -> can.Message:
        self.fault = not self.fault
        self.toggles += 1
        signals: dict[str, int] = {s.name: 0 for s in self._faults.signals}
        signals[FAULT_SIGNAL] = int(self.fault)
        signals["BMS_InsulationResistance"] = 2500
        signals["BMS_Faults_Counter"] = self._counter
        self._counter = (self._counter + 1) & 0xF
        data = bytearray(self._faults.encode(signals, strict=False))
        data[7] = crc8_j1850(bytes(data[:7]))
        return can.Message(arbitration_id=self._faults.frame_id, is_extended_id=False,
                           data=bytes(data))


class Sender(threading.Thread):
    """Sends ``traffic`` on ``bus`` for ``seconds``, each frame stamped with time.time().

    A thread rather than a task, so that sending goes on while the gateway's
    event loop is busy, as frames keep arriving from a real bus.
    """

    def __init__(self, bus: can.BusABC, traffic: Traffic, seconds: float) -> None:
        super().__init__(name="bench-sender", daemon=True)
        self.bus = bus
        self.traffic = traffic
        self.seconds = seconds
        self.started_at = 0.0
        self.elapsed = 0.0
        self.failed = 0

    def run(self) -> None:
        """Send until ``seconds`` have passed."""
        self.started_at = time.time()
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < self.seconds:
            for frame in self.traffic.due(elapsed):
                frame.timestamp = time.time()
                try:
                    self.bus.send(frame)
                except can.CanError:
                    self.failed += 1
            time.sleep(SEND_TICK)
        self.elapsed = time.perf_counter() - start

    @property
    def rate(self) -> float:
        """Frames per second actually sent."""
        return (self.traffic.sent - self.failed) / self.elapsed if self.elapsed else 0.0


class SubscriberProcess:
    """An aiomqtt subscriber in a child process, recording when each message arrived.

    A separate process keeps the arrival times free of the gateway's event loop
    and of the GIL. With ``client_id`` the session is persistent (clean session
    off), so messages published while it reconnects are kept for it.
    """

    def __init__(self, host: str, port: int, filters: Sequence[str],
                 client_id: str | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_subscriber_main, daemon=True,
                                 args=(child, host, port, list(filters), client_id))

    def start(self, timeout: float = 30.0) -> None:
        """Start the child and wait until it has subscribed."""
        self._proc.start()
        try:
            ready = self._conn.poll(timeout) and self._conn.recv() == "ready"
        except EOFError:  # the child died; its traceback is on stderr
            ready = False
        if not ready:
            self.close()
            raise RuntimeError("the subscriber process did not subscribe")

    def count(self, topic: str, min_seq: int = 1) -> tuple[int, float]:
        """Distinct messages on ``topic`` with seq >= ``min_seq``, and the last one's arrival."""
        self._conn.send(("count", topic, min_seq))
        n, last = self._conn.recv()
        return int(n), float(last)

    async def wait_count(self, topic: str, n: int, timeout: float, min_seq: int = 1
                         ) -> tuple[int, float]:
        """``count`` once it reaches ``n``, or as it stands after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got, last = await asyncio.to_thread(self.count, topic, min_seq)
            if got >= n or time.monotonic() > deadline:
                return got, last
            await asyncio.sleep(0.05)  # arrival times are the child's: polling adds nothing

    def dump(self) -> list[Record]:
        """Every message recorded (first arrival of each seq); stops the child."""
        self._conn.send(("dump",))
        records: list[Record] = self._conn.recv()
        self._proc.join(10)
        self.close()
        return records

    def close(self) -> None:
        """Stop the child if it is still running."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)


def _subscriber_main(conn: Connection, host: str, port: int, filters: list[str],
                     client_id: str | None) -> None:
    asyncio.run(_subscribe(conn, host, port, filters, client_id))


async def _subscribe(conn: Connection, host: str, port: int, filters: list[str],
                     client_id: str | None) -> None:
    seen: dict[str, dict[int, tuple[float, float | None]]] = {}
    done = asyncio.Event()

    def newest_ts(data: dict[str, Any]) -> float | None:
        stamps = [s.get("ts") for s in dict(data.get("signals") or {}).values()]
        return max((t for t in stamps if isinstance(t, int | float)), default=None)

    def on_command() -> None:
        while not done.is_set() and conn.poll():
            try:
                cmd = conn.recv()
            except EOFError:  # the parent is gone
                cmd = ("exit",)
            if cmd[0] == "count":
                hits = [arr for seq, (arr, _) in seen.get(cmd[1], {}).items() if seq >= cmd[2]]
                conn.send((len(hits), max(hits, default=0.0)))
            else:
                if cmd[0] == "dump":
                    conn.send([(t, s, a, n) for t, by_seq in seen.items()
                               for s, (a, n) in by_seq.items()])
                done.set()

    async def receive() -> None:
        ready = False
        while True:
            try:
                async with aiomqtt.Client(host, port, identifier=client_id,
                                          clean_session=False if client_id else None) as client:
                    for topic_filter in filters:
                        await client.subscribe(topic_filter, qos=1)
                    if not ready:
                        ready = True
                        conn.send("ready")
                    async for m in client.messages:
                        arrival = time.time()
                        data = _json_object(m.payload)
                        by_seq = seen.setdefault(str(m.topic), {})
                        # QoS 1 may deliver twice; the first arrival counts.
                        by_seq.setdefault(int(data.get("seq", 0)), (arrival, newest_ts(data)))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.02)

    asyncio.get_running_loop().add_reader(conn.fileno(), on_command)
    task = asyncio.create_task(receive())
    await done.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _json_object(payload: object) -> dict[str, Any]:
    """A JSON object payload as a dict; anything else as an empty one (seq 0)."""
    try:
        data = json.loads(payload) if isinstance(payload, bytes | str) else None
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {}


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (1..99), inclusive method; NaN for no values."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def bench_settings(vehicle_id: str, state_dir: Path, host: str, port: int,
                   backoff: float | None = None) -> Settings:
    """Default settings for the reference profile, pointed at a private broker."""
    settings = with_overrides(default_settings(vehicle_id, PROFILE, state_dir),
                              host=host, port=port)
    if backoff is not None:
        settings = replace(settings, mqtt=replace(settings.mqtt, backoff_min=backoff,
                                                  backoff_max=backoff))
    return settings


class GatewayProcess:
    """``python -m gateway.cli run`` on a generated settings file, as it is deployed."""

    def __init__(self, workdir: Path, vehicle_id: str, host: str, port: int, bus: str) -> None:
        self.config = workdir / "gateway.toml"
        # JSON strings are valid TOML basic strings, escapes included.
        self.config.write_text(
            f"[gateway]\nvehicle_id = {json.dumps(vehicle_id)}\n"
            f"profile = {json.dumps(str(PROFILE))}\n"
            f"state_dir = {json.dumps(str(workdir / 'state'))}\n"
            f"[mqtt]\nhost = {json.dumps(host)}\nport = {port}\n")
        self.log = workdir / "gateway.log"
        self.args = [sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "run",
                     "--config", str(self.config), "--bus", bus]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, online: Callable[[], bool], timeout: float = 30.0) -> None:
        """Start the gateway and wait until ``online()`` says it is up."""
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                         stderr=log)
        deadline = time.monotonic() + timeout
        while not online():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not come online; see {self.log}")
            time.sleep(0.05)

    def status_kb(self, key: str) -> int:
        """A ``kB`` figure (VmRSS, VmHWM) from /proc/<pid>/status."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise KeyError(f"{key} not in /proc/{self.proc.pid}/status")

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if that takes too long."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``predicate()`` holds; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else float("nan")
