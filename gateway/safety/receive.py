"""Receive checks: the per-message table that decides whether a frame may be consumed.

Modelled on panda's receive-check idea: every safety-relevant message
declares, in the profile, its length, rolling counter and checksum (its cycle
time and "not available" values are handled by the decode tables). The
decoder asks the message's :class:`RxCheck` before a frame reaches the state;
a frame that fails is not consumed, its signals become invalid, and the
failure is counted per reason.

The checksum is verified only when a payload is new: the decoder's payload
cache holds payloads that already passed. The counter is checked on every
frame, with leaky-bucket tolerance so that one lost frame on a busy bus does
not invalidate a message, while a frozen or erratic counter does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cantools.database.can import Message, Signal

from gateway import checksum
from gateway.config.errors import ConfigError
from gateway.config.profile import MessageSpec, Profile
from gateway.decode.plan import BusPlan


class RxCheck:
    """Counter and checksum state of one received message."""

    __slots__ = ("_algorithm", "_counter", "_index", "_last", "_modulus", "_tolerance",
                 "bucket", "failing", "failing_since", "frame_id", "name", "passing_since")

    def __init__(self, name: str, frame_id: int, counter: str | None, modulus: int,
                 tolerance: int, algorithm: checksum.Checksum | None, index: int) -> None:
        self.name = name
        self.frame_id = frame_id
        self._counter = counter
        self._modulus = modulus
        self._tolerance = tolerance
        self._algorithm = algorithm
        self._index = index
        self._last: int | None = None
        self.bucket = 0
        self.failing: str | None = None
        """Reason the latest frame was rejected; None while frames pass."""
        self.failing_since: float | None = None
        self.passing_since: float | None = None

    def checksum_ok(self, data: bytes) -> bool:
        """True when the payload's checksum byte is right (or the message has none)."""
        algorithm = self._algorithm
        if algorithm is None:
            return True
        return len(data) > self._index and \
            data[self._index] == algorithm(data, self._index, self.frame_id)

    def accept(self, values: Mapping[str, Any], ts: float) -> bool:
        """Count the frame's rolling counter; True if the frame may be consumed."""
        name = self._counter
        if name is not None:
            counter = values.get(name)
            last, self._last = self._last, counter
            if last is not None:
                if counter == (last + 1) % self._modulus:
                    if self.bucket:
                        self.bucket -= 1
                elif self.bucket < self._tolerance:
                    self.bucket += 1
            if self.bucket >= self._tolerance:
                self.reject("bad_counter", ts)
                return False
        if self.failing is not None:
            self.failing, self.failing_since = None, None
        if self.passing_since is None:
            self.passing_since = ts
        return True

    def reject(self, reason: str, ts: float) -> None:
        """Record that a frame of this message failed for ``reason`` at ``ts``."""
        if self.failing is None:
            self.failing_since = ts
        self.failing = reason
        self.passing_since = None


def attach_checks(profile: Profile, plans: dict[str, BusPlan]) -> dict[str, RxCheck]:
    """Build the checks the profile declares and hang them on the decode tables.

    Returns them by message name. Raises ConfigError for a counter or
    checksum signal the DBC does not have or cannot carry.
    """
    checks: dict[str, RxCheck] = {}
    for bus in plans.values():
        for plan in bus.mapped.values():
            spec = profile.messages.get(plan.name)
            if spec is None:
                continue
            if spec.dlc is not None:
                if spec.dlc < plan.message.length:
                    raise _error(profile, spec, "dlc", f"the DBC says {plan.name} has "
                                 f"{plan.message.length} bytes; a shorter frame cannot decode")
                plan.length = spec.dlc
            check = build_check(profile, spec, plan.message)
            if check is not None:
                plan.check = check
                checks[plan.name] = check
    return checks


def build_check(profile: Profile, spec: MessageSpec, message: Message) -> RxCheck | None:
    """The check for ``message`` as ``spec`` declares it; None if it declares none."""
    if spec.counter is None and spec.checksum is None:
        return None
    modulus, index, algorithm = 0, 0, None
    if spec.counter is not None:
        modulus = 1 << message_signal(profile, spec, message, "counter", spec.counter).length
    if spec.checksum is not None:
        index = checksum_byte(profile, spec, message)
        algorithm = checksum.algorithm(spec.checksum_algorithm)
    return RxCheck(spec.name, message.frame_id, spec.counter, modulus, spec.counter_tolerance,
                   algorithm, index)


def checksum_byte(profile: Profile, spec: MessageSpec, message: Message) -> int:
    """Index of the payload byte that holds ``spec.checksum``."""
    assert spec.checksum is not None
    sig = message_signal(profile, spec, message, "checksum", spec.checksum)
    aligned = sig.start % 8 == (7 if sig.byte_order == "big_endian" else 0)
    if sig.length != 8 or not aligned:
        raise _error(profile, spec, "checksum",
                     f"{sig.name} must be one whole byte to hold a checksum")
    return int(sig.start // 8)


def message_signal(profile: Profile, spec: MessageSpec, message: Message, key: str,
                   name: str) -> Signal:
    """Signal ``name`` of ``message``, which ``spec``'s key ``key`` names (ConfigError if none)."""
    for sig in message.signals:
        if sig.name == name:
            return sig
    raise _error(profile, spec, key, f"message {message.name} has no signal {name!r}")


def _error(profile: Profile, spec: MessageSpec, key: str, text: str) -> ConfigError:
    return ConfigError(str(profile.file), text,
                       line=profile.source.key_line(f"messages.{spec.name}", 0, key) or spec.line,
                       key=f"messages.{spec.name}.{key}")
