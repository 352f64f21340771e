"""Verdicts the rest of the gateway acts on: motion, pack_ok, charging_allowed.

Each verdict comes with reason codes, so a refused command can say why.
Default deny throughout:

- ``motion`` is ``stationary`` only when every mapped wheel or motor speed
  input is good and at standstill, and has been for ``stationary_hold_s``.
  Any of them stale or invalid makes it ``unknown``, which consumers must
  treat as moving. GNSS speed only ever adds evidence of motion: a receiver
  without a fix (a garage) must not block an unlock, and GNSS drift must not
  either, so it counts only above a walking-pace margin.
- ``pack_ok`` needs the BMS's core readings good and no critical battery
  rule active or latched.
- ``charging_allowed`` needs ``pack_ok``, no level on any rule that guards
  charging, and the pack temperature inside the charge window now.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config.safety import SafetySpec
from gateway.safety import inputs as inp
from gateway.safety.inputs import GNSS_SPEED, MOTOR_SPEED, SPEED, TB
from gateway.safety.rules import Rule, kmh_per_rpm
from gateway.state import SignalState, StateStore

GNSS_MOVING_KMH = 5.0
"""GNSS speed above this is motion; below it, a static receiver's drift."""

PACK_CORE = (f"{TB}.CellVoltage.Max", f"{TB}.CellVoltage.Min", f"{TB}.Temperature.Max",
             f"{TB}.Temperature.Min", f"{TB}.CurrentVoltage", f"{TB}.CurrentCurrent")


class Motion(enum.Enum):
    """Is the car moving? ``UNKNOWN`` must be treated as ``MOVING``."""

    STATIONARY = "stationary"
    MOVING = "moving"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Verdicts:
    """The verdicts at one evaluation, with the reasons behind each negative one."""

    motion: Motion
    motion_reasons: tuple[str, ...]
    pack_ok: bool
    pack_reasons: tuple[str, ...]
    charging_allowed: bool
    charging_reasons: tuple[str, ...]
    ts: float

    @property
    def stationary(self) -> bool:
        """True only for a proven standstill."""
        return self.motion is Motion.STATIONARY


class MotionJudge:
    """Decides ``motion`` from the speed inputs the profile maps."""

    def __init__(self, store: StateStore, spec: SafetySpec) -> None:
        self._spec = spec
        ratio = kmh_per_rpm(spec)
        self._required: list[tuple[SignalState, float, str]] = []
        if SPEED in store:
            self._required.append((store.slot(SPEED), 1.0, "speed"))
        if MOTOR_SPEED in store and ratio is not None:
            self._required.append((store.slot(MOTOR_SPEED), ratio, "motor_speed"))
        self._gnss = inp.slot(store, GNSS_SPEED)
        self._still_since: float | None = None

    def judge(self, now: float) -> tuple[Motion, tuple[str, ...]]:
        """Motion at ``now`` and the reasons when it is not a proven standstill."""
        if not self._required:
            return Motion.UNKNOWN, ("no_speed_signal",)
        moving = False
        oldest = now
        for slot, factor, name in self._required:
            reading = inp.good(slot, now)
            if reading is None:
                self._still_since = None
                return Motion.UNKNOWN, (f"{name}_unavailable",)
            moving = moving or abs(reading[0]) * factor > self._spec.standstill_kmh
            oldest = min(oldest, reading[1])
        gnss = inp.good(self._gnss, now) if self._gnss is not None else None
        if moving or (gnss is not None and abs(gnss[0]) > GNSS_MOVING_KMH):
            self._still_since = None
            return Motion.MOVING, ("moving",)
        if self._still_since is None:
            self._still_since = oldest
        if now - self._still_since < self._spec.stationary_hold_s:
            return Motion.MOVING, ("stopping",)
        return Motion.STATIONARY, ()


def pack_verdict(store: StateStore, rules: Sequence[Rule], now: float) -> tuple[str, ...]:
    """Reasons the pack is not OK (empty when it is)."""
    reasons: list[str] = []
    core = [store.slot(p) for p in PACK_CORE if p in store]
    if not core:
        reasons.append("no_battery_data")
    elif any(inp.good(s, now) is None for s in core):
        reasons.append("battery_data_unavailable")
    for rule in rules:
        if rule.gates_pack and rule.machine.level >= 2:
            reasons.append(rule.key)
    return tuple(reasons)


def charging_verdict(store: StateStore, rules: Sequence[Rule], spec: SafetySpec,
                     pack_reasons: tuple[str, ...], now: float) -> tuple[str, ...]:
    """Reasons charging is not allowed (empty when it is)."""
    reasons = ["pack_not_ok"] if pack_reasons else []
    reasons += [rule.key for rule in rules if rule.charge and rule.machine.level > 0]
    # The charge-temperature rules only run while charging; before a charge starts the
    # window is checked here against the same warning levels.
    hot, cold = spec.limits["pack_overtemp_charge"], spec.limits["pack_undertemp_charge"]
    hottest = inp.worst(inp.select(store, [f"{TB}.Temperature.Max",
                                           f"{TB}.TemperatureSensor.*.Temperature"]), now, True)
    coldest = inp.worst(inp.select(store, [f"{TB}.Temperature.Min",
                                           f"{TB}.TemperatureSensor.*.Temperature"]), now, False)
    if hottest is None or coldest is None:
        reasons.append("pack_temperature_unavailable")
    else:
        if hot.enabled and hot.warning is not None and hottest.value >= hot.warning:
            reasons.append("too_hot_to_charge")
        if cold.enabled and cold.warning is not None and coldest.value <= cold.warning:
            reasons.append("too_cold_to_charge")
    return tuple(dict.fromkeys(reasons))
