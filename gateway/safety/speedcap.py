"""Speed cap: ask the motor controller for a cap, keep asking, and check it obeys.

The profile names the caps a fleet may choose from (``eu_l6e = 45``,
``valet = 20``, ...). The selected one is persisted in the state directory,
so a restart never lifts a cap. The request frame is encoded through the DBC
(with counter and checksum) and re-sent at its cycle; controllers drop a cap
whose request stops (the reference MCU after 500 ms), so the gateway must
keep sending. Two checks raise alerts:

- ``speedcap.not_applied`` (critical): the controller does not report the
  requested cap within ``confirm_s``;
- ``speedcap.overspeed`` (warning): wheel speed above cap + tolerance for
  longer than ``debounce_s``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.alerts import AlertBook, Severity
from gateway.clock import Clock
from gateway.config.limits import LimitSpec
from gateway.config.safety import SpeedCapSpec
from gateway.persist import load_json, save_json
from gateway.safety import inputs as inp
from gateway.safety.inputs import SPEED
from gateway.safety.levels import NOT_APPLICABLE, LevelMachine, Measurement
from gateway.safety.transmit import TransmitGuard
from gateway.state import StateStore

log = logging.getLogger(__name__)

OVERSPEED = "speedcap.overspeed"
NOT_APPLIED = "speedcap.not_applied"


def reports(value: object, cap: float | None) -> bool:
    """Whether a controller report ``value`` says ``cap`` is in force (None: no cap)."""
    reported = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if cap is None:
        return reported is None
    return reported is not None and abs(reported - cap) < 0.5


class SpeedCap:
    """The active speed-cap profile, its request frame and its two checks."""

    def __init__(self, spec: SpeedCapSpec, guard: TransmitGuard, bus: str, store: StateStore,
                 alerts: AlertBook, clock: Clock, state_file: Path | None = None) -> None:
        self.spec = spec
        self._guard = guard
        self._bus = bus
        self._store = store
        self._alerts = alerts
        self._clock = clock
        self._state_file = state_file
        self._encoder = guard.encoder(spec.message, bus, {spec.signal, *spec.fixed})
        if spec.report is not None and spec.report not in store:
            raise ValueError(f"report {spec.report} is not mapped by the profile")
        for cap in (None, *spec.profiles.values()):
            # Every request this profile can make must encode: found now, not at run time.
            try:
                self._encoder.encode(self._values(cap))
            except Exception as exc:  # cantools raises EncodeError, ValueError, KeyError
                raise ValueError(f"{spec.message} cannot carry the request for "
                                 f"{'no cap' if cap is None else f'{cap:g} km/h'}: {exc}"
                                 ) from None
        self._encoder.count = 0  # the trial encodes above sent nothing
        self.cycle_s = guard.cycle_s(spec.message, bus) or 0.1
        self._selected_at: float | None = None
        self.active = self._load()
        self._overspeed = LevelMachine(
            LimitSpec("speedcap_overspeed", spec.tolerance_kmh, None, 1.0, spec.debounce_s,
                      spec.debounce_s), high=True)
        self._confirm = LevelMachine(
            LimitSpec("speedcap_confirm", None, 1.0, 0.0, spec.confirm_s, spec.confirm_s),
            high=True)
        self._levels = {OVERSPEED: 0, NOT_APPLIED: 0}

    @property
    def cap_kmh(self) -> float | None:
        """The cap being requested now; None for no cap."""
        return None if self.active is None else self.spec.profiles[self.active]

    def select(self, name: str | None) -> None:
        """Make ``name`` the active profile (None: no cap) and persist it."""
        if name is not None and name not in self.spec.profiles:
            raise KeyError(f"no speed-cap profile {name!r}")
        self.active = name
        self._selected_at = self._clock.time()
        self._save()

    def send(self) -> bool:
        """Send the request frame once (through the transmit guard)."""
        return self._guard.send(self._bus, self._encoder.encode(self._values(self.cap_kmh)))

    def _values(self, cap: float | None) -> dict[str, float]:
        values = dict(self.spec.fixed)
        values[self.spec.signal] = self.spec.none_value if cap is None else round(cap)
        return values

    async def run(self) -> None:
        """Send the request at the message's cycle until cancelled."""
        while True:
            self.send()
            await self._clock.sleep(self.cycle_s)

    def evaluate(self, now: float) -> None:
        """Update the overspeed and not-applied checks; raise or clear their alerts."""
        cap = self.cap_kmh
        speed = inp.good(self._store.slot(SPEED), now) if SPEED in self._store else None
        if cap is None:
            over: Measurement | str | None = NOT_APPLICABLE
        else:
            over = None if speed is None else Measurement(speed[0] - cap, speed[1])
        self._check(OVERSPEED, self._overspeed, over, now, cap)
        self._check(NOT_APPLIED, self._confirm, self._applied(cap, now), now, cap)

    def _applied(self, cap: float | None, now: float) -> Measurement | None:
        path = self.spec.report
        if path is None:
            return None
        slot = self._store.slot(path)
        if slot.is_stale(now):
            return None
        value, valid = slot.reading()
        if not valid:
            return None
        ts = slot.timestamp
        assert ts is not None  # not stale implies received
        ok = reports(value, cap)
        # A report from before the selection says nothing about the new cap: confirm_s
        # counts from the selection at the earliest.
        since = ts if self._selected_at is None else max(ts, self._selected_at)
        return Measurement(0.0 if ok else 1.0, since)

    def _check(self, key: str, machine: LevelMachine, reading: Measurement | str | None,
               now: float, cap: float | None) -> None:
        level = machine.update(reading, now)
        if level == self._levels[key]:
            return
        self._levels[key] = level
        if level == 0:
            self._alerts.clear(key, source_ts=machine.ts)
            return
        if key == OVERSPEED:
            assert cap is not None and machine.value is not None
            speed = cap + machine.value
            self._alerts.raise_(key, Severity.WARNING,
                                f"Speed {speed:.0f} km/h above the {self.active} cap of "
                                f"{cap:.0f} km/h", signal=SPEED, value=round(speed, 1),
                                limit=cap + self.spec.tolerance_kmh, source_ts=machine.ts)
        else:
            wanted = "no cap" if cap is None else f"{cap:.0f} km/h"
            self._alerts.raise_(key, Severity.CRITICAL,
                                f"Motor controller does not apply the speed cap ({wanted})",
                                signal=self.spec.report, value=cap, source_ts=machine.ts)

    def _load(self) -> str | None:
        default = self.spec.default
        if self._state_file is None or not self._state_file.exists():
            return default
        try:
            name = load_json(self._state_file)["profile"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("speed cap: cannot read %s (%s); using %s", self._state_file, exc,
                      default or "no cap")
            return default
        if name is not None and (not isinstance(name, str) or name not in self.spec.profiles):
            log.error("speed cap: %s names unknown profile %r; using %s", self._state_file,
                      name, default or "no cap")
            return default
        return name

    def _save(self) -> None:
        if self._state_file is not None:
            save_json(self._state_file, {"profile": self.active})
