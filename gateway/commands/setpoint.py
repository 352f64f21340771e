"""Commands that change a value the gateway keeps on the bus: charge limit, speed profile.

Both are desired state: the new value is persisted, sent at once and then
at the message's cycle (controllers fall back to their default when the
frame stops). The command succeeds when the controller's report shows the
value in a frame that arrived after the send; otherwise one more frame is
sent and, if the report still disagrees, the command fails with
``timeout``. The value stays requested either way: the latest request of
an authorised user stands, and the speed cap's own check raises
``speedcap.not_applied`` while the controller ignores it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
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
from gateway.config.commands import SetpointSpec
from gateway.persist import load_json, save_json
from gateway.safety.speedcap import SpeedCap, reports
from gateway.safety.transmit import TransmitGuard
from gateway.state import SignalState, StateStore

log = logging.getLogger(__name__)

ARGUMENT = {"charge-limit": "soc"}
"""The argument that carries each setpoint command's value."""


async def _confirm(send: Callable[[], bool], report: SignalState,
                   matches: Callable[[], bool], confirmations: Confirmations,
                   timeout: float, interlock: Callable[[], Outcome | None]) -> Outcome:
    """Send, wait for a fresh matching report, retry once; the interlock holds before
    each frame (the value stays requested if it no longer does)."""
    for attempt in (1, 2):
        refusal = interlock()
        if refusal is not None:
            return refusal if attempt == 1 else unconfirmed(attempt - 1, refusal)
        before = report.timestamp
        if not send():
            return Outcome("failed", "transmit_failed", {"attempts": attempt})
        if await confirmations.wait(functools.partial(_fresh_match, report, before, matches),
                                    timeout):
            return Outcome("succeeded", None, {"attempts": attempt})
    value, valid = report.reading()
    return Outcome("failed", "timeout", {"attempts": 2, "reported": value if valid else None})


def _fresh_match(report: SignalState, before: float | None, matches: Callable[[], bool]
                 ) -> bool:
    ts = report.timestamp
    return ts is not None and (before is None or ts > before) and report.reading()[1] \
        and matches()


class Setpoint:
    """A value kept on the bus by a cyclic frame (the charge limit)."""

    def __init__(self, spec: SetpointSpec, guard: TransmitGuard, bus: str, store: StateStore,
                 clock: Clock, confirmations: Confirmations, state_file: Path | None) -> None:
        """Raises KeyError (not allow-listed) or ValueError (a name the DBC or state lacks)."""
        self.spec = spec
        self._guard = guard
        self._bus = bus
        self._clock = clock
        self._confirmations = confirmations
        self._state_file = state_file
        self._encoder = guard.encoder(spec.message, bus, {spec.signal, *spec.fixed})
        if spec.report not in store:
            raise ValueError(f"report {spec.report} is not mapped by the profile")
        self._report = store.slot(spec.report)
        for value in (spec.minimum, spec.maximum):
            trial_encode(self._encoder, self._values(value))
        self.cycle_s = guard.cycle_s(spec.message, bus) or 1.0
        self.value = self._load()

    def _values(self, value: float) -> dict[str, float]:
        return {**self.spec.fixed, self.spec.signal: value}

    def check(self, args: dict[str, Any]) -> Outcome | None:
        """Refuse a missing, non-numeric or out-of-range value."""
        name = ARGUMENT.get(self.spec.name, "value")
        refusal = bad_arguments(args, {name: f"{self.spec.minimum:g}-{self.spec.maximum:g}"})
        if refusal is not None:
            return refusal
        value = args.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not math.isfinite(value) \
                or not self.spec.minimum <= value <= self.spec.maximum:
            return rejected("bad_arguments", error=f"{name} must be a number from "
                            f"{self.spec.minimum:g} to {self.spec.maximum:g}")
        return None

    async def run(self, args: dict[str, Any], interlock: Callable[[], Outcome | None]
                  ) -> Outcome:
        """Select the new value, send it and wait for the report."""
        refusal = interlock()
        if refusal is not None:
            return refusal
        value = float(args[ARGUMENT.get(self.spec.name, "value")])
        self.value = value
        self._save()
        return await _confirm(self.send, self._report,
                              lambda: self._report.reading()[0] == value,
                              self._confirmations, self.spec.timeout_s, interlock)

    def send(self) -> bool:
        """Send the current value once (nothing to send before one was set)."""
        if self.value is None:
            return False
        return self._guard.send(self._bus, self._encoder.encode(self._values(self.value)))

    async def loop(self) -> None:
        """Keep the value on the bus at the message's cycle until cancelled."""
        while True:
            self.send()
            await self._clock.sleep(self.cycle_s)

    def _load(self) -> float | None:
        if self._state_file is None or not self._state_file.exists():
            return None
        try:
            value = load_json(self._state_file)["value"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s: cannot read %s (%s); not sending one", self.spec.name,
                      self._state_file, exc)
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not self.spec.minimum <= value <= self.spec.maximum:
            log.error("%s: %s holds %r, outside %g-%g; not sending one", self.spec.name,
                      self._state_file, value, self.spec.minimum, self.spec.maximum)
            return None
        return float(value)

    def _save(self) -> None:
        if self._state_file is not None:
            save_json(self._state_file, {"value": self.value})


class SpeedProfile:
    """The ``speed-profile`` command: selects a speed-cap profile of the safety stage."""

    def __init__(self, cap: SpeedCap, store: StateStore, confirmations: Confirmations,
                 timeout_s: float) -> None:
        if cap.spec.report is None:
            raise ValueError("[safety.speed_cap] needs a report to confirm speed-profile")
        self._cap = cap
        self._report = store.slot(cap.spec.report)
        self._confirmations = confirmations
        self._timeout = timeout_s

    def check(self, args: dict[str, Any]) -> Outcome | None:
        """Refuse anything but a profile name of the vehicle (or ``none``)."""
        names = [*self._cap.spec.profiles, "none"]
        refusal = bad_arguments(args, {"profile": "|".join(names)})
        if refusal is not None:
            return refusal
        if args.get("profile") not in names:
            return rejected("bad_arguments", error=f"profile must be one of {', '.join(names)}")
        return None

    async def run(self, args: dict[str, Any], interlock: Callable[[], Outcome | None]
                  ) -> Outcome:
        """Select the profile, send its request at once and wait for the report."""
        refusal = interlock()
        if refusal is not None:
            return refusal
        name = args["profile"]
        self._cap.select(None if name == "none" else name)
        cap = self._cap.cap_kmh
        return await _confirm(self._cap.send, self._report,
                              lambda: reports(self._report.reading()[0], cap),
                              self._confirmations, self._timeout, interlock)
