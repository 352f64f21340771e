"""Event commands (lock, unlock, locate): one frame, acknowledged by the controller.

The frame is encoded through the DBC with the next value of the sequence
signal (one past the controller's last acknowledgement). The command has
succeeded once the controller echoes that value on ``ack`` and every
``confirm`` state holds, both in frames that arrived after the send. No
echo within ``timeout_s``: the same frame is sent once more. Because the
sequence is unchanged, a controller that acted but whose echo was lost
does not act again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from gateway.clock import Clock
from gateway.commands.outcome import (
    Confirmations,
    Outcome,
    bad_arguments,
    rejected,
    trial_encode,
    unconfirmed,
)
from gateway.config.commands import PulseSpec
from gateway.safety.transmit import TransmitGuard
from gateway.state import SignalState, StateStore

ATTEMPTS = 2
"""The first send and one retry."""


class Pulse:
    """One event command of the profile."""

    def __init__(self, spec: PulseSpec, guard: TransmitGuard, bus: str, store: StateStore,
                 clock: Clock, confirmations: Confirmations, lock: asyncio.Lock) -> None:
        """Raises KeyError (not allow-listed) or ValueError (a name the DBC or state lacks)."""
        self.spec = spec
        self._guard = guard
        self._bus = bus
        self._clock = clock
        self._confirmations = confirmations
        self._lock = lock  # one command at a time per message: sequence values stay in order
        used = set(spec.signals) | {n for m in spec.modes.values() for n in m}
        if spec.sequence is not None:
            used.add(spec.sequence)
        self._encoder = guard.encoder(spec.message, bus, used)
        signals = {s.name: s for s in self._encoder.message.signals}
        paths = [p for p in (spec.ack, *spec.confirm) if p is not None]
        missing = [p for p in paths if p not in store]
        if missing:
            raise ValueError(f"{', '.join(missing)} is not mapped by the profile")
        self._modulus = 1 << signals[spec.sequence].length if spec.sequence else 1
        self._ack = store.slot(spec.ack) if spec.ack else None
        self._confirm = [(store.slot(p), v) for p, v in spec.confirm.items()]
        modes: list[str | None] = [*spec.modes] or [None]
        for mode in modes:
            trial_encode(self._encoder, self._values(mode, 0))

    def _values(self, mode: str | None, seq: int) -> dict[str, float]:
        values = dict(self.spec.signals)
        if mode is not None:
            values.update(self.spec.modes[mode])
        if self.spec.sequence is not None:
            values[self.spec.sequence] = seq
        return values

    def _mode(self, args: dict[str, Any]) -> str | None:
        return args.get("mode", self.spec.default_mode) if self.spec.modes else None

    def check(self, args: dict[str, Any]) -> Outcome | None:
        """Refuse unknown arguments and modes, and a controller whose status is not fresh
        (its acknowledgement could not be seen)."""
        allowed = {"mode": "|".join(self.spec.modes)} if self.spec.modes else {}
        refusal = bad_arguments(args, allowed)
        if refusal is not None:
            return refusal
        mode = self._mode(args)
        if self.spec.modes and (not isinstance(mode, str) or mode not in self.spec.modes):
            return rejected("bad_arguments",
                            error=f"mode must be one of {', '.join(self.spec.modes)}")
        now = self._clock.time()
        for slot in self._slots():
            if slot.is_stale(now) or not slot.reading()[1]:
                return rejected("controller_unavailable", signal=slot.path)
        return None

    async def run(self, args: dict[str, Any], interlock: Callable[[], Outcome | None]
                  ) -> Outcome:
        """Send the frame, wait for the acknowledgement, retry once."""
        async with self._lock:
            seq = 0
            if self._ack is not None:
                value, _ = self._ack.reading()
                seq = (int(value) + 1) % self._modulus if isinstance(value, int | float) else 0
            frame = self._encoder.encode(self._values(self._mode(args), seq))
            for attempt in range(1, ATTEMPTS + 1):
                refusal = interlock()
                if refusal is not None:
                    return refusal if attempt == 1 else unconfirmed(attempt - 1, refusal)
                seen = self._timestamps()
                if not self._guard.send(self._bus, frame):
                    return Outcome("failed", "transmit_failed", {"attempts": attempt})
                if await self._confirmations.wait(functools.partial(self._done, seq, seen),
                                                  self.spec.timeout_s):
                    return Outcome("succeeded", None, {"attempts": attempt})
            return Outcome("failed", "timeout", {"attempts": ATTEMPTS})

    def _slots(self) -> list[SignalState]:
        return ([self._ack] if self._ack is not None else []) + [s for s, _ in self._confirm]

    def _timestamps(self) -> list[float | None]:
        return [s.timestamp for s in self._slots()]

    def _done(self, seq: int, seen: list[float | None]) -> bool:
        for slot, before in zip(self._slots(), seen, strict=True):
            ts = slot.timestamp
            if ts is None or (before is not None and ts <= before):
                return False  # no frame since the send: says nothing about this command
        if self._ack is not None:
            value, valid = self._ack.reading()
            if not valid or value != seq:
                return False
        for slot, expected in self._confirm:
            value, valid = slot.reading()
            if not valid or value != expected:
                return False
        return True
