"""Everything the gateway puts on a CAN bus goes through here.

:class:`TransmitGuard` is default-deny: a frame leaves only if the profile's
``[[transmit]]`` allow-list names its message on that bus, its ID, frame
format and length match the DBC, and its message's rate limit (a token
bucket) has room. Anything else is blocked, counted under
``tx.blocked.<reason>``, logged once per interval, and reported as the
``tx.blocked`` alert, which clears a minute after the last block.

:class:`FrameEncoder` builds frames through the DBC (cantools), filling the
rolling counter and checksum the profile declares for the message, so a
command or speed cap is never hand-assembled bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import can
from cantools.database.can import Message

from gateway import checksum
from gateway.alerts import AlertBook, Severity
from gateway.clock import Clock
from gateway.config.errors import ConfigError
from gateway.config.profile import MessageSpec, Profile
from gateway.config.safety import TransmitSpec
from gateway.decode import BusPlan, frame_key
from gateway.health import Counters, RateLimitedLog
from gateway.safety.receive import checksum_byte, message_signal

BLOCK_ALERT_HOLD = 60.0
"""The ``tx.blocked`` alert clears this long after the last blocked frame."""


class FrameEncoder:
    """Encodes one DBC message, with its rolling counter and checksum filled in."""

    def __init__(self, profile: Profile, message: Message, spec: MessageSpec | None) -> None:
        self.message = message
        self._counter = spec.counter if spec else None
        self._modulus = 1
        if spec is not None and spec.counter is not None:
            self._modulus = 1 << message_signal(profile, spec, message, "counter",
                                                spec.counter).length
        self._index = 0
        self._algorithm: checksum.Checksum | None = None
        if spec is not None and spec.checksum is not None:
            self._index = checksum_byte(profile, spec, message)
            self._algorithm = checksum.algorithm(spec.checksum_algorithm)
        self.count = 0

    def encode(self, values: Mapping[str, float]) -> can.Message:
        """A frame carrying ``values`` (signals not given are 0) and the next counter."""
        signals: dict[str, float] = {s.name: 0 for s in self.message.signals}
        signals.update(values)
        if self._counter is not None:
            signals[self._counter] = self.count
            self.count = (self.count + 1) % self._modulus
        data = bytearray(self.message.encode(signals, strict=True))
        if self._algorithm is not None:
            data[self._index] = self._algorithm(bytes(data), self._index, self.message.frame_id)
        return can.Message(arbitration_id=self.message.frame_id,
                           is_extended_id=self.message.is_extended_frame, data=bytes(data))


@dataclass
class _Allowed:
    name: str
    bus: str
    dlc: int
    rate: float
    burst: float
    tokens: float
    refilled: float


class TransmitGuard:
    """The allow-list and per-message rate limits for outbound frames."""

    def __init__(self, profile: Profile, plans: dict[str, BusPlan], clock: Clock,
                 counters: Counters, rlog: RateLimitedLog, alerts: AlertBook | None = None
                 ) -> None:
        self._profile = profile
        self._plans = plans
        self._clock = clock
        self._counters = counters
        self._rlog = rlog
        self._alerts = alerts
        self._buses: dict[str, Callable[[], can.BusABC | None]] = {}
        self._allowed: dict[tuple[str, int], _Allowed] = {}
        self._last_block: float | None = None
        for spec in profile.transmit:
            self._allow(spec)

    def _allow(self, spec: TransmitSpec) -> None:
        bus = spec.bus or self._profile.buses[0].name
        message = self._plans[bus].by_name.get(spec.message)
        if message is None:
            raise ConfigError(str(self._profile.file), f"no message {spec.message!r} on bus "
                              f"{bus!r}", line=spec.line, key="transmit.message")
        rate = spec.max_rate_hz
        if rate is None:
            cycle = self._cycle_ms(message)
            if not cycle:
                raise ConfigError(str(self._profile.file),
                                  f"{spec.message} has no cycle time; set max_rate_hz",
                                  line=spec.line, key="transmit.max_rate_hz")
            rate = 2000.0 / cycle
        key = frame_key(message.frame_id, message.is_extended_frame)
        self._allowed[(bus, key)] = _Allowed(message.name, bus, message.length, rate,
                                             float(spec.burst), float(spec.burst), -1.0)

    def _cycle_ms(self, message: Message) -> int | None:
        spec = self._profile.messages.get(message.name)
        if spec is not None and spec.cycle_ms is not None:
            return spec.cycle_ms
        cycle: int | None = message.cycle_time
        return cycle

    def cycle_s(self, message: str, bus: str | None = None) -> float | None:
        """The send period of ``message`` (profile, else DBC); None for event messages."""
        bus = bus or self._profile.buses[0].name
        cycle = self._cycle_ms(self._plans[bus].by_name[message])
        return cycle / 1000.0 if cycle else None

    def allow_list(self) -> list[str]:
        """One line per allow-listed message: bus, name, length and rate limit."""
        return [f"{a.bus} {a.name} [{a.dlc} B] at most {a.rate:g}/s, burst {a.burst:g}"
                for a in self._allowed.values()]

    def allowed(self, bus: str, message: str) -> bool:
        """Whether ``message`` may be sent on ``bus`` at all."""
        return any(a.bus == bus and a.name == message for a in self._allowed.values())

    def encoder(self, message: str, bus: str | None = None, signals: Iterable[str] = ()
                ) -> FrameEncoder:
        """An encoder for an allow-listed message (KeyError for any other) that carries
        every one of ``signals`` (ValueError naming those it lacks)."""
        bus = bus or self._profile.buses[0].name
        if not self.allowed(bus, message):
            raise KeyError(f"{message} is not allow-listed on bus {bus}")
        encoder = FrameEncoder(self._profile, self._plans[bus].by_name[message],
                               self._profile.messages.get(message))
        unknown = sorted(set(signals) - {s.name for s in encoder.message.signals})
        if unknown:
            raise ValueError(f"{message} has no signal {', '.join(unknown)}")
        return encoder

    def attach(self, bus: str, get_bus: Callable[[], can.BusABC | None]) -> None:
        """Where frames for ``bus`` go: a callable returning the open bus (or None)."""
        self._buses[bus] = get_bus

    def send(self, bus: str, frame: can.Message) -> bool:
        """Send ``frame`` on ``bus`` if the allow-list and rate limit let it; True if sent."""
        key = frame_key(frame.arbitration_id, frame.is_extended_id)
        entry = self._allowed.get((bus, key))
        if entry is None or frame.is_error_frame or frame.is_remote_frame:
            return self._block(bus, frame, "not_allowed")
        if len(frame.data) != entry.dlc:
            return self._block(bus, frame, "wrong_dlc")
        now = self._clock.monotonic()
        if entry.refilled >= 0:
            entry.tokens = min(entry.burst, entry.tokens + (now - entry.refilled) * entry.rate)
        entry.refilled = now
        if entry.tokens < 1.0:
            return self._block(bus, frame, "rate_limited")
        get_bus = self._buses.get(bus)
        target = get_bus() if get_bus is not None else None
        if target is None:
            self._counters.inc(f"tx.{bus}.not_open")
            return False
        entry.tokens -= 1.0
        try:
            target.send(frame, timeout=0.0)
        except (can.CanError, OSError) as exc:  # full TX queue, bus-off: the caller retries
            self._counters.inc(f"tx.{bus}.send_failed")
            self._rlog.warning(f"tx-fail:{bus}", f"bus {bus}: send of {entry.name} failed: {exc}")
            return False
        self._counters.inc(f"tx.{bus}.sent")
        return True

    def _block(self, bus: str, frame: can.Message, reason: str) -> bool:
        self._counters.inc(f"tx.blocked.{reason}")
        self._counters.inc(f"tx.{bus}.blocked")
        width = 8 if frame.is_extended_id else 3
        ident = f"0x{frame.arbitration_id:0{width}X}"
        text = f"bus {bus}: transmit of ID {ident} blocked: {reason.replace('_', ' ')}"
        self._rlog.warning(f"tx-block:{bus}:{reason}", text)
        self._last_block = self._clock.time()
        if self._alerts is not None:
            self._alerts.raise_("tx.blocked", Severity.WARNING, text, value=ident, limit=reason)
        return False

    def evaluate(self, now: float) -> None:
        """Clear the ``tx.blocked`` alert once nothing was blocked for a while."""
        if self._last_block is not None and now - self._last_block >= BLOCK_ALERT_HOLD:
            self._last_block = None
            if self._alerts is not None:
                self._alerts.clear("tx.blocked")
