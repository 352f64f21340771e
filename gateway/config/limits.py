"""Default safety limits: chemistry presets and the chemistry-independent rules.

Only numbers live here; what each rule measures is in gateway/safety/rules.py.
A profile starts from the preset of its chemistry and overrides single
parameters in ``[safety.limits.NAME]`` (see docs/safety.md, which explains
every default).

Two kinds of limit depend on the pack rather than the chemistry, so the
presets give them per unit and the profile's pack data scales them:
currents in C (times ``capacity_ah``) and insulation in ohm per volt (times
``nominal_voltage``, as ISO 6469-3 states it). Without that pack data those
rules stay off unless the profile gives absolute values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Latch = Literal["none", "clear", "reset"]
LATCHES: tuple[Latch, ...] = ("none", "clear", "reset")
Scale = Literal["capacity_ah", "nominal_voltage"]


@dataclass(frozen=True)
class LimitSpec:
    """Parameters of one rule.

    ``warning`` / ``critical``: levels (either may be None: that level is not
    used). Whether a rule trips above or below them is the rule's nature
    (see gateway.safety.rules). ``hysteresis``: how far back past a level the
    value must go to leave it. ``debounce_s``: how long a level must hold
    before it is raised; ``clear_s``: how long it must be gone before it
    clears. ``latch``: ``clear`` keeps a critical alert critical until the
    rule clears completely; ``reset`` also needs an explicit reset.
    """

    name: str
    warning: float | None
    critical: float | None
    hysteresis: float
    debounce_s: float
    clear_s: float
    latch: Latch = "none"
    enabled: bool = True
    scale: Scale | None = None
    """Set while the levels are still per unit (C or kOhm/V): the pack data was missing."""


def _spec(name: str, warning: float | None, critical: float | None, hysteresis: float,
          debounce_s: float, clear_s: float | None = None, latch: Latch = "none",
          scale: Scale | None = None) -> LimitSpec:
    return LimitSpec(name, warning, critical, hysteresis, debounce_s,
                     debounce_s if clear_s is None else clear_s, latch, True, scale)


_COMMON = [
    _spec("motor_overtemp", 130.0, 150.0, 5.0, 3.0, latch="clear"),
    _spec("inverter_overtemp", 80.0, 90.0, 3.0, 3.0, latch="clear"),
    # kOhm per volt: 500 ohm/V warns, 100 ohm/V is the ISO 6469-3 minimum for DC circuits.
    _spec("insulation_low", 0.5, 0.1, 0.05, 5.0, latch="clear", scale="nominal_voltage"),
    # Cranking and heavy 12 V loads dip for seconds; only a sustained low is a flat battery.
    _spec("aux_battery_low", 11.8, 11.0, 0.3, 30.0),
    _spec("soc_low", 15.0, 5.0, 2.0, 10.0),
    _spec("bms_fault", None, 1.0, 0.0, 0.3, 1.0, latch="clear"),
    _spec("mcu_fault", None, 1.0, 0.0, 0.3, 1.0, latch="clear"),
    # Plausibility: wheel speed against motor speed x ratio, and against GNSS (km/h).
    _spec("speed_vs_motor", 5.0, None, 1.0, 2.0),
    _spec("speed_vs_gnss", 10.0, None, 2.0, 5.0),
    # Largest SoC change (percentage points) within the SoC window; a BMS re-calibration or a
    # corrupted value, never real charge flow at micro-EV currents.
    _spec("soc_jump", 5.0, None, 0.0, 0.0, 60.0),
    # |pack voltage - sum of cells| in percent of the pack voltage.
    _spec("pack_vs_cells", 3.0, None, 0.5, 5.0),
]

_CHEMISTRY = {
    "LFP": [
        _spec("cell_overvoltage", 3.60, 3.65, 0.02, 2.0, latch="reset"),
        _spec("cell_undervoltage", 2.80, 2.50, 0.05, 2.0, latch="clear"),
        _spec("cell_imbalance", 0.05, 0.10, 0.01, 10.0),
        _spec("pack_overtemp_discharge", 55.0, 60.0, 3.0, 5.0, latch="clear"),
        _spec("pack_overtemp_charge", 45.0, 50.0, 3.0, 5.0, latch="clear"),
        _spec("pack_undertemp_discharge", -15.0, -20.0, 3.0, 5.0),
        _spec("pack_undertemp_charge", 2.0, 0.0, 2.0, 5.0),
        _spec("overcurrent_discharge", 2.5, 3.0, 0.1, 2.0, latch="clear", scale="capacity_ah"),
        _spec("overcurrent_charge", 1.0, 1.5, 0.1, 2.0, latch="clear", scale="capacity_ah"),
    ],
    "NMC": [
        _spec("cell_overvoltage", 4.20, 4.25, 0.02, 2.0, latch="reset"),
        _spec("cell_undervoltage", 3.00, 2.70, 0.05, 2.0, latch="clear"),
        _spec("cell_imbalance", 0.05, 0.10, 0.01, 10.0),
        _spec("pack_overtemp_discharge", 55.0, 60.0, 3.0, 5.0, latch="clear"),
        _spec("pack_overtemp_charge", 45.0, 50.0, 3.0, 5.0, latch="clear"),
        _spec("pack_undertemp_discharge", -15.0, -20.0, 3.0, 5.0),
        _spec("pack_undertemp_charge", 5.0, 0.0, 2.0, 5.0),
        _spec("overcurrent_discharge", 2.0, 3.0, 0.1, 2.0, latch="clear", scale="capacity_ah"),
        _spec("overcurrent_charge", 0.7, 1.0, 0.1, 2.0, latch="clear", scale="capacity_ah"),
    ],
    "LTO": [
        _spec("cell_overvoltage", 2.75, 2.85, 0.02, 2.0, latch="reset"),
        _spec("cell_undervoltage", 1.80, 1.50, 0.05, 2.0, latch="clear"),
        _spec("cell_imbalance", 0.05, 0.10, 0.01, 10.0),
        _spec("pack_overtemp_discharge", 55.0, 60.0, 3.0, 5.0, latch="clear"),
        _spec("pack_overtemp_charge", 50.0, 55.0, 3.0, 5.0, latch="clear"),
        _spec("pack_undertemp_discharge", -25.0, -30.0, 3.0, 5.0),
        _spec("pack_undertemp_charge", -15.0, -20.0, 2.0, 5.0),
        _spec("overcurrent_discharge", 4.0, 6.0, 0.2, 2.0, latch="clear", scale="capacity_ah"),
        _spec("overcurrent_charge", 4.0, 6.0, 0.2, 2.0, latch="clear", scale="capacity_ah"),
    ],
}

CHEMISTRIES = tuple(_CHEMISTRY)
LIMIT_NAMES = tuple(s.name for s in _COMMON + _CHEMISTRY["LFP"])


def preset(chemistry: str | None) -> dict[str, LimitSpec]:
    """Every rule's defaults for ``chemistry``; cell rules are off without a chemistry."""
    out = {s.name: s for s in _COMMON}
    cells = _CHEMISTRY.get(chemistry or "")
    if cells is None:
        # Cell voltage windows differ by a volt between chemistries: guessing would
        # either trip on every charge or never trip at all.
        out.update({s.name: replace(s, enabled=False, warning=None, critical=None)
                    for s in _CHEMISTRY["LFP"]})
    else:
        out.update({s.name: s for s in cells})
    return out


def scaled(spec: LimitSpec, capacity_ah: float | None,
           nominal_voltage: float | None) -> LimitSpec:
    """``spec`` with per-unit levels turned absolute; disabled if the pack data is missing."""
    if spec.scale is None:
        return spec
    k = capacity_ah if spec.scale == "capacity_ah" else nominal_voltage
    if k is None:
        return replace(spec, enabled=False)

    def mul(x: float | None) -> float | None:
        return None if x is None else round(x * k, 6)

    return replace(spec, warning=mul(spec.warning), critical=mul(spec.critical),
                   hysteresis=mul(spec.hysteresis) or 0.0, scale=None)
