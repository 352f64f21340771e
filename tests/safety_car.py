"""A reference car on CAN for safety tests: real frames, a real pipeline, a real monitor.

:class:`Car` holds the physical value of every signal the reference ECUs
send, encodes them with cantools from the reference DBCs (with the rolling
counter and CRC-8 J1850 the profile declares), feeds them through the
pipeline's decoder into the state store and evaluates a real
:class:`SafetyMonitor` after each step. Alerts land in a :class:`Recorder`.

Time moves in steps of 1/32 s: exact in binary, so "held for exactly the
debounce" is an exact comparison, and shorter than the tightest staleness
window (3 cycles of a 20 ms message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import can
import pytest
from cantools.database.can import Message

from gateway.alerts import Alert, Severity
from gateway.app import Pipeline
from gateway.checksum import crc8_j1850_bytes
from gateway.clock import ManualClock
from gateway.safety import SafetyMonitor, Verdicts
from gateway.safety.rules import Rule
from gateway.state import SignalState

STEP = 1 / 32
GNSS = "Vehicle.CurrentLocation.Speed"
CELLS = 30
SENSORS = 12

HEALTHY: dict[str, dict[str, float]] = {
    "BMS_Pack": {"BMS_PackVoltage": 99.0, "BMS_PackCurrent": 0.0, "BMS_ContactorState": 2,
                 "BMS_State": 1},
    "BMS_Soc": {"BMS_SoC": 60.0, "BMS_SoH": 97.5, "BMS_RemainingEnergy": 6.9,
                "BMS_MaxDischargeCurrent": 200, "BMS_MaxChargeCurrent": 60},
    "BMS_CellStats": {"BMS_MaxCellVoltage": 3.3, "BMS_MaxCellIdx": 1,
                      "BMS_MinCellVoltage": 3.3, "BMS_MinCellIdx": 2},
    "BMS_Temps": {"BMS_MaxTemp": 25, "BMS_MaxTempIdx": 1, "BMS_MinTemp": 25,
                  "BMS_MinTempIdx": 2},
    "BMS_Faults": {"BMS_FaultLevel": 0, "BMS_InsulationResistance": 2500},
    "BMS_Charge": {"BMS_ChargeState": 0, "BMS_ChargerConnected": 0, "BMS_ChargeLimitSoc": 80,
                   "BMS_TimeToFull": 0xFFFF},
    "MCU_Drive": {"MCU_MotorSpeed": 0, "MCU_VehicleSpeed": 0.0, "MCU_Gear": 3,
                  "MCU_DriveMode": 1},
    "MCU_Thermal": {"MCU_MotorTemp": 40, "MCU_InverterTemp": 35, "MCU_SpeedLimitActive": 255,
                    "MCU_TorqueLimit": 100},
    "MCU_Faults": {"MCU_FaultLevel": 0},
    "BCM_Status": {"BCM_LockDriver": 1, "BCM_LockPassenger": 1, "BCM_LockTailgate": 1,
                   "BCM_Aux12V": 12.6},
}


@dataclass
class Recorder:
    """An alert sink that keeps every transition."""

    events: list[tuple[str, Alert]] = field(default_factory=list)
    active: list[Alert] = field(default_factory=list)

    def alert(self, transition: str, alert: Alert) -> None:
        """Record one transition."""
        self.events.append((transition, alert))

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        """Record the active set."""
        self.active = list(alerts)

    def of(self, key: str) -> list[tuple[str, Alert]]:
        """The transitions of ``key``, oldest first."""
        return [(t, a) for t, a in self.events if a.key == key]

    def severities(self, key: str) -> list[tuple[str, Severity]]:
        """(transition, severity) of ``key``, oldest first."""
        return [(t, a.severity) for t, a in self.of(key)]


class Car:
    """The reference vehicle's ECUs writing into ``pipeline`` and a monitor judging them."""

    def __init__(self, pipeline: Pipeline, *, gnss: bool = False) -> None:
        assert isinstance(pipeline.clock, ManualClock)
        self.clock = pipeline.clock
        self.pipeline = pipeline
        self.store = pipeline.store
        self.values = {name: dict(signals) for name, signals in HEALTHY.items()}
        self.cells = [3.3] * CELLS
        self.sensors = [25.0] * SENSORS
        self.silent: set[str] = set()
        self.corrupt: set[str] = set()
        """Messages sent with a wrong CRC byte."""
        self.gnss_kmh: float | None = None
        self.lag = 0.0
        """How much older than the clock the frames' source timestamps are."""
        self.gnss: SignalState | None = None
        if gnss:
            # A GNSS source would own this slot; the monitor sees it if it exists at build.
            self.gnss = self.store.register(
                SignalState(GNSS, "km/h", "number", "location", stale_after=2.0))
        self._db = pipeline.plans["vehicle"].by_name
        self._counters: dict[str, int] = {}
        self._payloads: dict[tuple[str, tuple[tuple[str, float], ...], int | None], bytes] = {}
        self.sink = Recorder()
        assert pipeline.alerts is not None
        pipeline.alerts.sink = self.sink
        self.monitor = SafetyMonitor(pipeline.profile, pipeline.plans, self.store,
                                     pipeline.alerts, self.clock, pipeline.checks)
        self.verdicts = self.tick()

    # ---- driving the car ----------------------------------------------------------

    def set(self, message: str, **signals: float) -> Verdicts:
        """The ECU reports new values from the next step on (which this takes)."""
        self.values[message].update(signals)
        return self.step()

    def set_cells(self, *volts: float) -> Verdicts:
        """Cells 1..n report ``volts`` (the others keep theirs) from the next step on."""
        self.cells[:len(volts)] = volts
        return self.step()

    def tick(self) -> Verdicts:
        """Send one round of frames at the current time and evaluate."""
        now = self.clock.time()
        if self.gnss is not None and self.gnss_kmh is not None:
            self.gnss.set(self.gnss_kmh, now)
        self.pipeline.decoders["vehicle"].process(self.frames(now - self.lag))
        self.verdicts = self.monitor.evaluate()
        return self.verdicts

    def step(self) -> Verdicts:
        """One step of time later."""
        self.clock.advance(STEP)
        return self.tick()

    def run(self, seconds: float) -> Verdicts:
        """Keep sending for ``seconds`` (rounded up to whole steps), evaluating every step."""
        for _ in range(_steps(seconds)):
            self.step()
        return self.verdicts

    def quiet(self, seconds: float) -> Verdicts:
        """Every ECU falls silent for ``seconds``; the monitor keeps ticking."""
        for _ in range(_steps(seconds)):
            self.clock.advance(STEP)
            self.verdicts = self.monitor.evaluate()
        return self.verdicts

    # ---- looking at the result ------------------------------------------------------

    def rule(self, key: str) -> Rule:
        """The rule called ``key``."""
        return next(r for r in self.monitor.rules if r.key == key)

    def level(self, key: str) -> int:
        """Current level of rule ``key``."""
        return self.rule(key).machine.level

    def active(self, key: str) -> Alert | None:
        """The active alert of ``key`` in the alert book."""
        assert self.pipeline.alerts is not None
        return next((a for a in self.pipeline.alerts.active() if a.key == key), None)

    # ---- frames ----------------------------------------------------------------------

    def frames(self, ts: float) -> list[can.Message]:
        """One frame of every message (every page of a multiplexed one) at ``ts``."""
        out = []
        for name, values in self.values.items():
            if name not in self.silent:
                out.append(self.frame(name, values, ts))
        if "BMS_CellVoltages" not in self.silent:
            for page in range(CELLS // 3):
                cells = {f"BMS_Cell{page * 3 + k + 1:02d}_V": self.cells[page * 3 + k]
                         for k in range(3)}
                out.append(self.frame("BMS_CellVoltages", {"BMS_CellMux": page, **cells}, ts))
        if "BMS_CellTemps" not in self.silent:
            for page in range(SENSORS // 6):
                temps = {f"BMS_Temp{page * 6 + k + 1:02d}": self.sensors[page * 6 + k]
                         for k in range(6)}
                out.append(self.frame("BMS_CellTemps", {"BMS_TempMux": page, **temps}, ts))
        return out

    def frame(self, name: str, values: dict[str, float], ts: float) -> can.Message:
        """``name`` encoded from physical ``values``, with counter and CRC where declared."""
        spec = self.pipeline.profile.messages.get(name)
        counter = spec.counter if spec is not None else None
        count = None
        if counter is not None:
            count = self._counters.get(name, 0)
            self._counters[name] = (count + 1) % 16
        # Payloads repeat (same values, counter modulo 16): encode each one once.
        key = (name, tuple(values.items()), count)
        data = self._payloads.get(key)
        if data is None:
            msg = self._db[name]
            raw = {s.name: 0 for s in msg.signals if s.multiplexer_ids is None}
            raw.update({sig: to_raw(msg, sig, v) for sig, v in values.items()})
            if counter is not None and count is not None:
                raw[counter] = count
            encoded = bytearray(msg.encode(raw, scaling=False, strict=False))
            if spec is not None and spec.checksum is not None:
                encoded[7] = crc8_j1850_bytes(bytes(encoded[:7]))
            data = self._payloads[key] = bytes(encoded)
        if name in self.corrupt:
            data = data[:7] + bytes([data[7] ^ 0x5A])
        msg = self._db[name]
        return can.Message(arbitration_id=msg.frame_id, is_extended_id=msg.is_extended_frame,
                           data=data, timestamp=ts)


def to_raw(msg: Message, signal: str, value: float) -> int:
    """The raw integer that carries physical ``value`` (rounded to the signal's resolution)."""
    sig = msg.get_signal_by_name(signal)
    return round((value - sig.offset) / sig.scale)


def _steps(seconds: float) -> int:
    """Steps in ``seconds``, rounded up."""
    return math.ceil(seconds / STEP - 1e-9)


def held(car: Car, key: str, seconds: float) -> list[int]:
    """Levels of ``key`` over ``seconds`` of steady traffic (one per step)."""
    return levels_over(car, key, _steps(seconds))


def levels_over(car: Car, key: str, steps: int) -> list[int]:
    """Levels of ``key`` over ``steps`` steps of steady traffic."""
    levels = []
    for _ in range(steps):
        car.step()
        levels.append(car.level(key))
    return levels


def check_limit(car: Car, key: str, message: str, signal: str, value: float, level: int,
                limit: float | None, debounce: float, shown: float | None = None) -> None:
    """``message.signal = value`` puts ``key`` at ``level`` exactly ``debounce`` later.

    The alert then carries the crossed ``limit``, the measured value (``shown``, when the
    rule's measure is not the signal itself), the source time and the severity.
    """
    car.set(message, **{signal: value})
    start = car.clock.time()
    n = math.ceil(debounce / STEP)  # the first step at or past the debounce
    levels = levels_over(car, key, n + 2)
    assert levels[:n - 1] == [0] * (n - 1), "raised before the debounce elapsed"
    assert levels[n - 1:] == [level] * (len(levels) - n + 1)
    alert = car.active(key)
    if level == 0:
        assert alert is None
        return
    assert alert is not None
    assert alert.severity is (Severity.CRITICAL if level == 2 else Severity.WARNING)
    assert alert.limit == limit
    assert alert.value == pytest.approx(value if shown is None else shown)
    assert alert.source_ts == start + n * STEP, "the time of the frame that raised it"
    assert alert.signal == car.rule(key).signal
