"""Command round trip (publish -> result received) beside a bare MQTT request/response echo.

Usage: ``python bench/bench_commands.py [--n N] [--period-ms MS] [--micro-rounds R]
[--workdir DIR]``

One process: a private mosquitto, the simulated vehicle (park mode) on a
python-can ``virtual`` bus, the gateway with commands on (state directory on a
real disk, as the replay cache's fsync is part of the cost) and an app client
(TCP_NODELAY) holding an owner key. Once motion is stationary, each of N rounds
sends a signed lock or unlock (alternately), QoS 1 with an MQTT 5 response topic
and correlation data, timed from the publish call to the arrival of "accepted"
and of the final result; and a bare echo of a same-sized payload through a tiny
aiomqtt responder, QoS 1 both ways. Which goes first alternates per round. The
ratio is what the gateway adds to the broker hop: verification, replay cache
fsync, CAN, the controller's confirmation. All share one event loop.

Rounds start ``--period-ms`` apart (default 120): the reference profile lets
GW_BodyCommand out at most 10 times a second (burst 3); a faster pace measures
that limit's refusals. Micro-figures (medians over rounds): Ed25519 verification
of one envelope (unwrap + parse + verify) and one awaited ReplayCache.record()
(an INSERT committed with ``synchronous=FULL``, i.e. the fsync) in the work dir.

A benchmark, not a test: the target is printed, not asserted. It exits non-zero
when a command did not succeed or an echo was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mqtt_rig import PROFILE, median, percentile, until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.app import Gateway, Safety
from gateway.clock import SystemClock
from gateway.commands import envelope as env
from gateway.commands.keys import generate_private_key, key_entry, load_private_key
from gateway.commands.replay import Record, ReplayCache
from gateway.config import load_profile
from gateway.config.settings import default_settings, with_overrides
from gateway.safety import Motion
from hil.broker import Mosquitto
from hil.sim import VehicleEcus, VehicleModel
from hil.sim.runner import close_quietly, open_sim_bus, run_vehicle

VEHICLE = "bench-cmd"
TARGET_P99_MS = 50.0
WARMUP = 4
"""Uncounted rounds first: the link's command subscription, SQLite pages, code paths."""
RESULT_TIMEOUT = 5.0
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
V5 = aiomqtt.ProtocolVersion.V5
ECHO_REQ = "bench/echo/req"
COLUMNS = ("p50", "p90", "p99", "max")


@dataclasses.dataclass
class Waiter:
    """What arrived (perf_counter seconds, payload) for one correlation id."""

    final: bool
    """A command: done at its final result; an echo: at its first arrival."""
    arrivals: list[tuple[float, bytes]] = dataclasses.field(default_factory=list)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def _is_final(payload: bytes) -> bool:
    try:
        return env.open_result(payload, None).final
    except env.Malformed:
        return True  # nothing more to wait for; the caller's verification reports it


class Requester:
    """The app side: publishes requests and matches answers by correlation data."""

    def __init__(self, client: aiomqtt.Client, gateway_key: Ed25519PrivateKey,
                 owner: Ed25519PrivateKey) -> None:
        self.client = client
        self.response = f"bench/app/{os.getpid()}/res"
        self._pending: dict[bytes, Waiter] = {}
        self._gateway_pub = gateway_key.public_key()
        self._owner = owner
        self._kid = env.key_id(owner.public_key())

    async def dispatch(self) -> None:
        """Stamp each answer as it arrives (verified after the round, untimed)."""
        async for m in self.client.messages:
            at = time.perf_counter()
            corr = getattr(m.properties, "CorrelationData", None)
            waiter = self._pending.get(bytes(corr)) if corr is not None else None
            if waiter is not None and isinstance(m.payload, bytes):
                waiter.arrivals.append((at, m.payload))
                if not waiter.final or _is_final(m.payload):
                    waiter.done.set()

    def envelope(self, cmd: str) -> bytes:
        """A fresh signed command for the bench vehicle."""
        now = int(time.time() * 1000)
        return env.sign_command(env.Command(VEHICLE, env.new_command_id(), cmd, {}, now,
                                            now + 30_000, self._kid), self._owner)

    async def _ask(self, topic: str, payload: bytes, final: bool, timeout: float
                   ) -> tuple[float, Waiter]:
        corr = os.urandom(8)
        waiter = self._pending[corr] = Waiter(final)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.response
        props.CorrelationData = corr
        try:
            start = time.perf_counter()
            await self.client.publish(topic, payload, qos=1, properties=props)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.done.wait(), timeout)
        finally:
            del self._pending[corr]
        return start, waiter

    async def command(self, cmd: str, timeout: float = RESULT_TIMEOUT
                      ) -> tuple[float | None, float | None, str]:
        """(ms to "accepted", ms to the final result, its status[/reason] or "no result")."""
        start, waiter = await self._ask(f"evgw/v1/{VEHICLE}/cmd/req", self.envelope(cmd),
                                        True, timeout)
        ms: dict[str, float] = {}
        status = "no result"
        for at, payload in waiter.arrivals:
            try:
                result = env.open_result(payload, self._gateway_pub)
            except env.Malformed:
                return None, None, "bad signature"
            ms.setdefault("final" if result.final else result.status, (at - start) * 1000)
            if result.final:
                status = result.status + (f"/{result.reason}" if result.reason else "")
        return ms.get("accepted"), ms.get("final"), status

    async def echo(self, payload: bytes) -> float | None:
        """ms until the echo of ``payload`` came back; None if it did not."""
        start, waiter = await self._ask(ECHO_REQ, payload, False, RESULT_TIMEOUT)
        return (waiter.arrivals[0][0] - start) * 1000 if waiter.arrivals else None


async def responder(client: aiomqtt.Client) -> None:
    """The bare baseline: every request published back to its response topic, QoS 1."""
    async for m in client.messages:
        props_in = m.properties
        topic = getattr(props_in, "ResponseTopic", None)
        if topic is None or not isinstance(m.payload, bytes):
            continue
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = getattr(props_in, "CorrelationData", b"")
        await client.publish(topic, m.payload, qos=1, properties=props)


@contextlib.asynccontextmanager
async def gateway(work: Path, broker: Mosquitto, owner: Ed25519PrivateKey
                  ) -> AsyncIterator[tuple[Ed25519PrivateKey, Safety, VehicleEcus]]:
    """The gateway (commands on) and the simulated vehicle; yields the gateway's key."""
    keys = work / "keys.toml"
    keys.write_text(key_entry("owner", "owner", owner.public_key()))
    (work / "state").mkdir()
    profile = load_profile(PROFILE)
    clock = SystemClock()
    settings = with_overrides(default_settings(VEHICLE, profile.file, work / "state"),
                              host=broker.host, port=broker.port, keys=keys)
    # The per-key limit (20/min by default) would refuse most rounds: lift it.
    settings = dataclasses.replace(settings, commands=dataclasses.replace(
        settings.commands, rate_per_minute=600_000.0, burst=1000))
    gw = Gateway.build(profile, clock, settings, settings.state_dir)
    stop = asyncio.Event()
    channel = f"bench-commands-{os.getpid()}"
    sim_bus = open_sim_bus("virtual", channel)
    ecus = VehicleEcus(VehicleModel(mode="park", soc=70))
    sim = asyncio.create_task(run_vehicle(sim_bus, ecus, clock, stop))
    try:
        await gw.start(gw.pipeline.bus_options({"vehicle": f"virtual:{channel}"}))
        assert gw.publishing is not None
        await asyncio.wait_for(gw.publishing.link.connected_event.wait(), 15)
        yield load_private_key(settings.gateway_key_path), gw.safety, ecus
    finally:
        stop.set()
        await sim
        close_quietly(sim_bus)
        await gw.stop()


@dataclasses.dataclass
class Figures:
    """Milliseconds per path and the final status of each counted command."""

    accepted: list[float] = dataclasses.field(default_factory=list)
    succeeded: list[float] = dataclasses.field(default_factory=list)
    echo: list[float] = dataclasses.field(default_factory=list)
    statuses: list[str] = dataclasses.field(default_factory=list)

    def add(self, accepted: float | None, final: float | None, status: str,
            echo: float | None) -> None:
        """One round's figures; a missing time (no answer) is left out of its list."""
        self.statuses.append(status)
        if status != "succeeded":
            final = None
        for values, ms in ((self.accepted, accepted), (self.succeeded, final), (self.echo, echo)):
            if ms is not None:
                values.append(ms)


async def measure(work: Path, n: int, period: float) -> Figures:
    """N interleaved rounds against one broker; see the module docstring."""
    owner = generate_private_key(work / "owner.key")
    fig = Figures()
    with Mosquitto(work / "broker", nodelay=True) as broker:
        async with gateway(work, broker, owner) as (gw_key, safety, ecus), \
                aiomqtt.Client(broker.host, broker.port, protocol=V5,
                               socket_options=NODELAY) as app, \
                aiomqtt.Client(broker.host, broker.port, protocol=V5,
                               socket_options=NODELAY) as echo_client:
            req = Requester(app, gw_key, owner)
            await app.subscribe(req.response, qos=1)
            await echo_client.subscribe(ECHO_REQ, qos=1)
            tasks = [asyncio.create_task(req.dispatch()),
                     asyncio.create_task(responder(echo_client))]
            try:
                if not await until(lambda: safety.monitor.verdicts.motion is Motion.STATIONARY,
                                   30):
                    raise RuntimeError("the motion verdict never became stationary")
                # Until the link has subscribed to the command topic a request goes unheard.
                for _ in range(20):
                    if (await req.command("lock", 1.0))[2] != "no result":
                        break
                else:
                    raise RuntimeError("the gateway never answered a command")
                cmds = ("unlock", "lock") if ecus.model.locks[0] else ("lock", "unlock")
                next_round = time.monotonic()
                for i in range(-WARMUP, n):
                    await asyncio.sleep(max(0.0, next_round - time.monotonic()))
                    next_round = time.monotonic() + period
                    echo = await req.echo(req.envelope(cmds[i % 2])) if i % 2 else None
                    outcome = await req.command(cmds[i % 2])
                    if i % 2 == 0:
                        echo = await req.echo(req.envelope(cmds[i % 2]))
                    if i >= 0:
                        fig.add(*outcome, echo)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    return fig


def micro_verify(rounds: int, calls: int = 300) -> list[float]:
    """Microseconds per unwrap + parse + verify of one signed envelope, per round."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    now = int(time.time() * 1000)
    payload = env.sign_command(env.Command(VEHICLE, env.new_command_id(), "unlock", {}, now,
                                           now + 30_000, env.key_id(pub)), key)
    out = []
    for _ in range(rounds + 1):  # the first round warms caches and the CPU clock up
        start = time.perf_counter()
        for _ in range(calls):
            signed = env.unwrap(payload)
            env.parse_command(signed.body)
            if not env.verify(pub, env.COMMAND_CONTEXT, signed):
                raise RuntimeError("the envelope did not verify")
        out.append((time.perf_counter() - start) / calls * 1e6)
    return out[1:]


async def micro_record(path: Path, rounds: int, calls: int = 20) -> list[float]:
    """Milliseconds per awaited ReplayCache.record() (a durable INSERT), per round."""
    cache = ReplayCache(path)
    await cache.open()
    out = []
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                record = Record(env.new_command_id(), os.urandom(32), "0" * 16, False, b"x" * 400)
                await cache.record(record, int(time.time() * 1000) + 30_000, time.time())
            out.append((time.perf_counter() - start) / calls * 1000)
    finally:
        await cache.close()
    return out


def filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount in /proc/mounts)."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    mine = [(m, t) for m, t in mounts if path.resolve().is_relative_to(m)]
    return max(mine, key=lambda mt: len(mt[0]), default=("", "unknown"))[1]


def print_report(fig: Figures, n: int, verify_us: Sequence[float],
                 record_ms: Sequence[float], fs: str) -> bool:
    """The table, ratios, micro-figures and the target; True when every round succeeded."""
    def line(label: str, values: Sequence[float]) -> None:
        cells = [percentile(values, q) for q in (50, 90, 99)] + [max(values, default=0.0)]
        print(f"{label:<28}" + "".join(f"{v:>9.2f}" for v in cells) + f"{len(values):>9}")

    print(f"\n{'round trip (ms)':<28}" + "".join(f"{c:>9}" for c in COLUMNS) + f"{'n':>9}")
    line("gateway: accepted", fig.accepted)
    line("gateway: succeeded", fig.succeeded)
    line("bare MQTT echo", fig.echo)
    for label, values in (("accepted", fig.accepted), ("succeeded", fig.succeeded)):
        r50, r99 = (percentile(values, q) / percentile(fig.echo, q) for q in (50, 99))
        print(f"ratio gateway/echo, {label + ':':<11} p50 {r50:.1f}x  p99 {r99:.1f}x")
    print(f"Ed25519 verify of one envelope (unwrap+parse+verify): {median(verify_us):.1f} us "
          f"(median of {len(verify_us)})")
    print(f"replay-cache record() on {fs}: {median(record_ms):.2f} ms "
          f"(median of {len(record_ms)})")
    failures = [st for st in fig.statuses if st != "succeeded"]
    other = ", ".join(f"{st} {failures.count(st)}" for st in sorted(set(failures)))
    lost = n - len(fig.echo)
    print(f"results: {n} commands, succeeded {n - len(failures)}, not succeeded "
          f"{len(failures)}{' (' + other + ')' if other else ''}; echoes lost {lost}")
    p99 = percentile(fig.succeeded, 99)
    met = p99 < TARGET_P99_MS and not failures  # a p99 over only the successes proves nothing
    print(f"target p99 < {TARGET_P99_MS:g} ms: {'met' if met else 'NOT met'} "
          f"(publish -> succeeded p99 {p99:.2f} ms)")
    return not failures and lost == 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; 1 if any command did not succeed."""
    parser = argparse.ArgumentParser(description="command round trip vs a bare MQTT echo")
    parser.add_argument("--n", type=int, default=200, help="commands (default 200)")
    parser.add_argument("--period-ms", type=float, default=120.0,
                        help="from one round's start to the next (default 120)")
    parser.add_argument("--micro-rounds", type=int, default=7, help="default 7")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent of the temporary state directory (default: the system "
                             "temp directory, /var/tmp if that is tmpfs)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.micro_rounds < 1 or args.period_ms < 0:
        parser.error("--n and --micro-rounds must be positive, --period-ms not negative")
    logging.getLogger("gateway").setLevel(logging.ERROR)
    # Not tmpfs: there an fsync costs nothing and the replay cache would look free.
    parent: Path = args.workdir or Path(tempfile.gettempdir())
    if args.workdir is None and filesystem(parent) == "tmpfs":
        parent = Path("/var/tmp")
    fs = f"{filesystem(parent)} ({parent})"
    print(f"python {sys.version.split()[0]}, aiomqtt {aiomqtt.__version__}; N={args.n} "
          f"lock/unlock alternately, {WARMUP} warm-up rounds, one every {args.period_ms:g} ms; "
          f"state dir on {fs}; interleaved with a bare echo, order alternating")
    with tempfile.TemporaryDirectory(prefix="bench-commands-", dir=parent) as tmp:
        work = Path(tmp)
        fig = asyncio.run(measure(work, args.n, args.period_ms / 1000))
        verify_us = micro_verify(args.micro_rounds)
        record_ms = asyncio.run(micro_record(work / "micro.sqlite", args.micro_rounds))
    return 0 if print_report(fig, args.n, verify_us, record_ms, fs) else 1


if __name__ == "__main__":
    sys.exit(main())
