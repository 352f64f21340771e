"""The systemd watchdog: ping only while the pipeline is healthy.

With ``Type=notify`` and ``WatchdogSec=`` systemd expects ``WATCHDOG=1``
at least once per watchdog period and restarts the service when the pings
stop. Pinging from a timer alone would prove only that the event loop runs;
:class:`Watchdog` asks a health check first and withholds the ping (saying
why in ``STATUS=``) while the check fails, so systemd restarts a gateway
that is alive but no longer doing its job. :class:`PipelineHealth` is that
check; its docstring gives the rules.

The notify protocol is a datagram of ``KEY=value`` lines sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` names the
abstract namespace). It is small enough to speak directly.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway.clock import Clock
from gateway.health.counters import Counters
from gateway.health.lag import LoopLag
from gateway.health.ratelimit import RateLimitedLog
from gateway.state import StateStore
from gateway.state.mode import Mode, current_mode

log = logging.getLogger("gateway.health")

HealthCheck = Callable[[], tuple[bool, str]]
"""Returns (healthy, reason): a reason fit for ``systemctl status``."""


class Notifier:
    """Sends notify messages to systemd; does nothing without ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if not address:
            return
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        else:  # vsock: and the like serve VMs talking to their host, not this daemon
            log.warning("health: NOTIFY_SOCKET %r is not a unix socket path; not notifying",
                        address)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for in the environment."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """True when there is somewhere to send to."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; False when it could not be sent.

        Never blocks: a full socket buffer loses the message, as a missed ping
        is what the watchdog exists to notice anyway.
        """
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # systemd gone or a wrong path: once is informative enough
                self._warned = True
                log.warning("health: cannot notify systemd at %r: %s", self.address, exc)
            return False
        return True

    def ready(self) -> bool:
        """Start-up finished (``Type=notify`` services count as started from here)."""
        return self.send("READY=1", "STATUS=running")

    def watchdog(self) -> bool:
        """The watchdog ping."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.send("STATUS=" + " ".join(text.split()))

    def stopping(self) -> bool:
        """Shutdown began."""
        return self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        """Close the socket (a later send opens it again)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between checks: a quarter of ``$WATCHDOG_USEC`` (so one unhealthy check can
    be forgiven and the next ping still lands in time), None when there is no watchdog
    (unset, unparsable, or meant for another process by ``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 4e6


def last_seen_mode(store: StateStore) -> Mode:
    """The mode the latest readings show, however old they are.

    ``current_mode`` treats anything stale as unknown and unknown as driving;
    for a bus that has gone quiet the question is what the car said last.
    Judged at the earliest conceivable instant no reading is stale yet, while
    a signal never received still counts as unknown.
    """
    return current_mode(store, -math.inf)


@dataclass
class _Bus:
    received: int = 0
    decoded: int = 0
    received_at: float | None = None
    """Monotonic time of the check that first saw the latest received frames."""
    stuck_since: float | None = None
    """Monotonic time of the first check in a row that found frames waiting, undecoded."""


class PipelineHealth:
    """The watchdog's health check: the loop is responsive and every bus is decoded.

    Unhealthy means a restart could help:

    - **Loop lag** above ``max_loop_lag_s`` at any sample since the last check:
      something blocks the event loop, and every stage starves with it.
    - **Decoding stalled**: frames are waiting in a bus's queue
      (``queue.can.<bus>.in`` minus dropped minus decoded ``can.<bus>.frames``)
      and no frame of that bus was decoded in checks spanning
      ``stall_after_s``: the decode task died or hangs.
    - **A bus went silent while the car was not parked**: nothing received
      for ``stall_after_s`` although the latest readings (``last_seen_mode``)
      show the car driving or charging. Cars do not drop their bus while in
      use, so the socket or the adapter is wedged, and reopening it is the one
      thing the gateway can do about it.

    Healthy otherwise, in particular a bus that is silent after the car was
    last seen parked (its ECUs sleep), and a bus that has delivered nothing
    since this process started: a restart would only repeat the start that
    just happened, and the bus source already retries opening on its own.
    The checks compare counters between calls, so they cost no work per frame.
    """

    def __init__(self, counters: Counters, buses: Sequence[str], lag: LoopLag,
                 mode: Callable[[], Mode], clock: Clock, max_loop_lag_s: float,
                 stall_after_s: float) -> None:
        self._counters = counters
        self._lag = lag
        self._mode = mode
        self._clock = clock
        self._max_lag = max_loop_lag_s
        self._stall = stall_after_s
        self._buses = {bus: _Bus() for bus in buses}

    def __call__(self) -> tuple[bool, str]:
        """(healthy, reason); call it at a steady pace (each call is an observation)."""
        now = self._clock.monotonic()
        problems = []
        lag = self._lag.take_max("watchdog")
        if lag > self._max_lag:
            problems.append(f"event loop lag {lag:.2f} s (limit {self._max_lag:g} s)")
        for name, bus in self._buses.items():
            problem = self._bus(name, bus, now)
            if problem:
                problems.append(problem)
        return (not problems, "; ".join(problems) if problems else "healthy")

    def _bus(self, name: str, bus: _Bus, now: float) -> str | None:
        counters = self._counters
        received = counters.get(f"queue.can.{name}.in")
        decoded = counters.get(f"can.{name}.frames")
        waiting = received - counters.get(f"queue.can.{name}.dropped") - decoded
        if received > bus.received:
            bus.received, bus.received_at = received, now
        progressed, bus.decoded = decoded > bus.decoded, decoded
        if progressed or waiting <= 0:
            bus.stuck_since = None
        elif bus.stuck_since is None:
            bus.stuck_since = now
        elif now - bus.stuck_since >= self._stall:
            return (f"bus {name}: {waiting} frames waiting, none decoded for "
                    f"{now - bus.stuck_since:.1f} s")
        if bus.received_at is not None and now - bus.received_at >= self._stall:
            mode = self._mode()
            if mode != "park":
                return (f"bus {name}: no frames for {now - bus.received_at:.1f} s "
                        f"although the car was last seen in mode {mode}")
        return None


class Watchdog:
    """Pings systemd every ``interval`` seconds while ``health_check`` says healthy."""

    def __init__(self, notifier: Notifier, clock: Clock, health_check: HealthCheck,
                 interval: float | None) -> None:
        self.notifier = notifier
        self.interval = interval
        self._clock = clock
        self._check = health_check
        self._rlog = RateLimitedLog(log, clock, interval=60.0)
        self.healthy = True
        self.reason = "healthy"
        self._bad = 0
        """Consecutive unhealthy checks."""
        self._withholding = False

    async def run(self) -> None:
        """Check and ping until cancelled; returns at once without a watchdog interval."""
        if self.interval is None:
            return
        while True:
            self.step()
            await self._clock.sleep(self.interval)

    def step(self) -> bool:
        """One check, and the ping if healthy; returns whether it pinged."""
        try:
            healthy, reason = self._check()
        except Exception as exc:  # a broken check must not look like a healthy gateway
            healthy, reason = False, f"health check failed: {exc!r}"
        self.healthy, self.reason = healthy, reason
        self._bad = 0 if healthy else self._bad + 1
        if not healthy and self._bad == 1:
            # One bad check (a GC pause, an SD card stall) is forgiven: only a condition that
            # lasts two checks, half the watchdog period, gets the gateway restarted.
            return self.notifier.watchdog()
        if not healthy:
            self._withholding = True
            self.notifier.status(f"unhealthy, not pinging the watchdog: {reason}")
            self._rlog.error("watchdog", f"health: unhealthy, withholding the watchdog ping: "
                                         f"{reason}")
            return False
        if self._withholding:
            self._withholding = False
            self.notifier.status("running")
            log.info("health: healthy again, pinging the watchdog")
        return self.notifier.watchdog()
