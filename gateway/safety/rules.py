"""The limit and plausibility rules: what each one measures.

Each :class:`Rule` pairs a measurement over the state store with a
:class:`LevelMachine` holding its parameters. Vehicle code never computes
statistics: a profile maps raw signals (cell voltages, sensor temperatures,
fault bits) and the rules take the worst case themselves, as OVMS's BMS layer
does. A rule whose inputs the profile does not map is simply not built.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from gateway.config.limits import LimitSpec
from gateway.config.safety import SafetySpec
from gateway.safety import inputs as inp
from gateway.safety.inputs import CURRENT, GNSS_SPEED, MOTOR_SPEED, SOC, SPEED, TB, TM
from gateway.safety.levels import NOT_APPLICABLE, LevelMachine, Measurement
from gateway.state import SignalState, StateStore

Reading = Measurement | str | None
Measure = Callable[[float], Reading]

FAULT_LEVELS = {"None": 0.0, "Warning": 1.0, "Derate": 1.0, "Shutdown": 2.0}
"""Controller fault-level names (as DBC value tables spell them) -> rule level."""


@dataclass(eq=False)
class Rule:
    """One alert-raising rule."""

    key: str
    title: str
    signal: str
    unit: str
    machine: LevelMachine
    measure: Measure
    inputs: tuple[SignalState, ...]
    gates_pack: bool = False
    """A critical level of this rule makes ``pack_ok`` false."""
    charge: bool = False
    """The rule guards charging: any level makes ``charging_allowed`` false."""
    flag: bool = False
    """A yes/no condition (fault bit, silence): its alert text has no value and limit."""
    raised: int = field(default=0)

    def describe(self, level: int) -> tuple[str, float | None]:
        """Alert text for ``level`` and the limit it crossed."""
        m = self.machine
        value = m.value
        limit = m.threshold(level) if level else None
        latched = " (latched: needs a reset)" if m.waiting_for_reset else ""
        if self.flag or value is None or limit is None:
            return self.title + latched, limit
        word = "at or above" if m.high else "at or below"
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.title}: {_num(value)}{unit}, {word} the limit of {_num(limit)}{unit}"
        return text + latched, limit


def _num(x: float) -> str:
    return f"{x:.4g}"


def build_rules(store: StateStore, spec: SafetySpec) -> list[Rule]:
    """Every enabled rule whose inputs the store maps."""
    rules: list[Rule] = []
    lim = spec.limits

    def add(name: str, key: str, title: str, paths: Sequence[str], high: bool,
            measure: Callable[[list[SignalState]], Measure], gates_pack: bool = False,
            charge: bool = False, limit: LimitSpec | None = None,
            unit: str | None = None, flag: bool = False) -> None:
        limit = limit or lim[name]
        slots = inp.select(store, paths)
        if not limit.enabled or not slots:
            return
        rules.append(Rule(key, title, slots[0].path, slots[0].unit if unit is None else unit,
                          LevelMachine(limit, high), measure(slots), tuple(slots), gates_pack,
                          charge, flag))

    # The statistic the alert names comes first; the other one is dropped by extreme().
    cells_hi = [f"{TB}.CellVoltage.Max", f"{TB}.CellVoltage.Min", f"{TB}.Cell.*.Voltage"]
    cells_lo = [f"{TB}.CellVoltage.Min", f"{TB}.CellVoltage.Max", f"{TB}.Cell.*.Voltage"]
    temps_hi = [f"{TB}.Temperature.Max", f"{TB}.Temperature.Min",
                f"{TB}.TemperatureSensor.*.Temperature"]
    temps_lo = [f"{TB}.Temperature.Min", f"{TB}.Temperature.Max",
                f"{TB}.TemperatureSensor.*.Temperature"]

    def extreme(high: bool, when: Callable[[float], bool | None] | None = None
                ) -> Callable[[list[SignalState]], Measure]:
        def make(slots: list[SignalState]) -> Measure:
            # A Max statistic says nothing about the lowest cell, and vice versa.
            drop = ".Min" if high else ".Max"
            use = [s for s in slots if not s.path.endswith(drop)]

            def measure(now: float) -> Reading:
                if when is not None:
                    applies = when(now)
                    if applies is False:
                        return NOT_APPLICABLE
                return inp.worst(use, now, high)
            return measure
        return make

    def charging(now: float) -> bool | None:
        # Unknown charging state: both charge and discharge limits apply (the stricter wins).
        state = inp.charging_state(store, now)
        return None if state is None else state

    def not_charging(now: float) -> bool | None:
        state = inp.charging_state(store, now)
        return None if state is None else not state

    add("cell_overvoltage", "battery.cell_overvoltage", "Cell over-voltage", cells_hi, True,
        extreme(True), gates_pack=True, charge=True)
    add("cell_undervoltage", "battery.cell_undervoltage", "Cell under-voltage", cells_lo, False,
        extreme(False), gates_pack=True)
    add("cell_imbalance", "battery.cell_imbalance", "Cell imbalance", cells_hi, True,
        _imbalance(store, spec), gates_pack=False)
    add("pack_overtemp_discharge", "battery.overtemp_discharge", "Pack over-temperature",
        temps_hi, True, extreme(True, not_charging), gates_pack=True)
    add("pack_overtemp_charge", "battery.overtemp_charge", "Pack too hot to charge", temps_hi,
        True, extreme(True, charging), gates_pack=True, charge=True)
    add("pack_undertemp_discharge", "battery.undertemp_discharge", "Pack under-temperature",
        temps_lo, False, extreme(False, not_charging), gates_pack=True)
    add("pack_undertemp_charge", "battery.undertemp_charge", "Pack too cold to charge", temps_lo,
        False, extreme(False, charging), gates_pack=True, charge=True)
    add("overcurrent_discharge", "battery.overcurrent_discharge", "Discharge over-current",
        [CURRENT], True, _current(-1.0), gates_pack=True)
    add("overcurrent_charge", "battery.overcurrent_charge", "Charge over-current",
        [CURRENT], True, _current(1.0), gates_pack=True, charge=True)
    add("motor_overtemp", "motor.overtemp", "Motor over-temperature", [f"{TM}.Temperature"],
        True, extreme(True))
    add("inverter_overtemp", "motor.inverter_overtemp", "Inverter over-temperature",
        [f"{TM}.InverterTemperature"], True, extreme(True))
    add("insulation_low", "battery.insulation", "Insulation resistance low",
        [f"{TB}.InsulationResistance"], False, extreme(False), gates_pack=True, charge=True)
    add("aux_battery_low", "aux_battery.low", "12 V battery low",
        ["Vehicle.LowVoltageBattery.CurrentVoltage"], False, extreme(False))
    add("soc_low", "battery.soc_low", "State of charge low", [SOC],
        False, extreme(False))
    for owner, node, base in (("bms_fault", "bms", TB), ("mcu_fault", "mcu", TM)):
        for s in inp.select(store, [f"{base}.Fault.*"]):
            name = s.path.rsplit(".", 1)[1]
            add(owner, f"{node}.fault.{name}", f"{node.upper()} reports fault {name}", [s.path],
                True, _flag, gates_pack=node == "bms", charge=node == "bms", flag=True)
        add(owner, f"{node}.fault_level", f"{node.upper()} fault level", [f"{base}.FaultLevel"],
            True, _fault_level, gates_pack=node == "bms", charge=node == "bms",
            limit=replace(lim[owner], warning=1.0, critical=2.0), flag=True)
    _plausibility(store, spec, add)
    return rules


AddRule = Callable[..., None]


def _plausibility(store: StateStore, spec: SafetySpec, add: AddRule) -> None:
    ratio = kmh_per_rpm(spec)
    if ratio is not None and SPEED in store and MOTOR_SPEED in store:
        add("speed_vs_motor", "plausibility.speed_vs_motor",
            "Wheel speed disagrees with motor speed", [SPEED, MOTOR_SPEED], True,
            _difference(ratio))
    if SPEED in store and GNSS_SPEED in store:
        add("speed_vs_gnss", "plausibility.speed_vs_gnss",
            "Wheel speed disagrees with GNSS speed", [SPEED, GNSS_SPEED], True,
            _difference(1.0))
    add("soc_jump", "plausibility.soc_jump", "State of charge jumped",
        [SOC], True, _soc_jump(spec.soc_window_s))
    if f"{TB}.CurrentVoltage" in store and inp.select(store, [f"{TB}.Cell.*.Voltage"]):
        add("pack_vs_cells", "plausibility.pack_vs_cells",
            "Pack voltage disagrees with the sum of the cells",
            [f"{TB}.CurrentVoltage", f"{TB}.Cell.*.Voltage"], True, _pack_vs_cells, unit="%")


def kmh_per_rpm(spec: SafetySpec) -> float | None:
    """Wheel km/h per motor rpm from the reduction ratio and tyre radius, if both are known."""
    if spec.gear_ratio is None or spec.wheel_radius_m is None:
        return None
    return 2 * math.pi * spec.wheel_radius_m * 60 / 1000 / spec.gear_ratio


def _current(sign: float) -> Callable[[list[SignalState]], Measure]:
    # VSS counts current into the pack as positive: charge is +, discharge is -.
    def make(slots: list[SignalState]) -> Measure:
        def measure(now: float) -> Reading:
            m = inp.worst(slots, now, True)
            return None if m is None else m._replace(value=max(0.0, sign * m.value))
        return measure
    return make


def _imbalance(store: StateStore, spec: SafetySpec) -> Callable[[list[SignalState]], Measure]:
    current = inp.slot(store, CURRENT)
    soc = inp.slot(store, SOC)
    low, high = spec.imbalance_soc

    def make(slots: list[SignalState]) -> Measure:
        cells = [s for s in slots if ".Cell." in s.path]
        stats = [s for s in slots if ".CellVoltage." in s.path]

        def measure(now: float) -> Reading:
            # Under load, cell resistance spreads the voltages; only a pack at rest
            # shows its true imbalance. Unknown current: no judgement either way.
            amps = inp.good(current, now) if current is not None else None
            if amps is None or abs(amps[0]) > spec.rest_current_a:
                return None
            level = inp.good(soc, now) if soc is not None else None
            if level is None or not low <= level[0] <= high:
                return None
            return inp.spread(cells, now) if cells else inp.spread(stats, now)
        return measure
    return make


def _flag(slots: list[SignalState]) -> Measure:
    s = slots[0]

    def measure(now: float) -> Reading:
        value = inp.good_bool(s, now)
        if value is None:
            return None
        ts = s.timestamp
        assert ts is not None  # fresh implies received
        return Measurement(float(value), ts)
    return measure


def _fault_level(slots: list[SignalState]) -> Measure:
    s = slots[0]

    def measure(now: float) -> Reading:
        if s.is_stale(now):
            return None
        value, valid = s.reading()
        level = FAULT_LEVELS.get(value) if isinstance(value, str) else None
        if not valid or level is None:
            return None
        ts = s.timestamp
        assert ts is not None  # fresh implies received
        return Measurement(level, ts)
    return measure


def _difference(rpm_factor: float) -> Callable[[list[SignalState]], Measure]:
    def make(slots: list[SignalState]) -> Measure:
        wheel, other = slots[0], slots[1]

        def measure(now: float) -> Reading:
            a, b = inp.good(wheel, now), inp.good(other, now)
            if a is None or b is None:
                return None
            return Measurement(abs(abs(a[0]) - abs(b[0]) * rpm_factor), max(a[1], b[1]))
        return measure
    return make


def _soc_jump(window: float) -> Callable[[list[SignalState]], Measure]:
    def make(slots: list[SignalState]) -> Measure:
        s = slots[0]
        seen: deque[tuple[float, float]] = deque()

        def measure(now: float) -> Reading:
            reading = inp.good(s, now)
            if reading is None:
                return None
            value, ts = reading
            if not seen or ts > seen[-1][0]:
                seen.append((ts, value))
            while seen and seen[0][0] < ts - window:
                seen.popleft()
            values = [v for _, v in seen]
            return Measurement(max(values) - min(values), ts)
        return measure
    return make


def _pack_vs_cells(slots: list[SignalState]) -> Measure:
    pack = slots[0]
    cells = [s for s in slots[1:] if ".Cell." in s.path]

    def measure(now: float) -> Reading:
        p = inp.good(pack, now)
        readings = [inp.good(c, now) for c in cells]
        if p is None or p[0] <= 0 or any(r is None for r in readings):
            return None
        total = sum(r[0] for r in readings if r is not None)
        ts = max([p[1], *(r[1] for r in readings if r is not None)])
        return Measurement(abs(p[0] - total) / p[0] * 100.0, ts)
    return measure
