"""The safety parts of a vehicle profile: ``[safety]``, ``[safety.limits.*]``,
``[safety.speed_cap]`` and the transmit allow-list ``[[transmit]]``.

Parsing and validation only, with file:line:key errors like the rest of the
profile; names of messages and signals are checked against the DBCs when the
safety stage is built. See docs/safety.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gateway.config.limits import LATCHES, LIMIT_NAMES, LimitSpec, preset, scaled
from gateway.config.toml_table import Table


@dataclass(frozen=True)
class SpeedCapSpec:
    """How the gateway asks the motor controller for a speed cap, and checks it."""

    message: str
    signal: str
    none_value: int
    report: str | None
    profiles: dict[str, float]
    default: str | None
    tolerance_kmh: float
    debounce_s: float
    confirm_s: float
    fixed: dict[str, float]
    """Other signals of the request frame and the values they always carry."""
    bus: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class TransmitSpec:
    """One message the gateway may send: the allow-list entry and its rate limit."""

    message: str
    bus: str | None
    max_rate_hz: float | None
    """None: twice the DBC cycle rate (an event message must say)."""
    burst: int
    line: int | None = None


@dataclass(frozen=True)
class SafetySpec:
    """Safety parameters of one vehicle."""

    chemistry: str | None = None
    capacity_ah: float | None = None
    nominal_voltage: float | None = None
    gear_ratio: float | None = None
    wheel_radius_m: float | None = None
    standstill_kmh: float = 0.5
    stationary_hold_s: float = 1.0
    rest_current_a: float = 10.0
    imbalance_soc: tuple[float, float] = (20.0, 90.0)
    """SoC range in which cell imbalance is judged: outside it, the steep ends of the
    voltage curve turn harmless SoC differences into large voltage differences."""
    soc_window_s: float = 10.0
    tick_hz: float = 10.0
    limits: dict[str, LimitSpec] = field(default_factory=dict)
    speed_cap: SpeedCapSpec | None = None
    line: int | None = None


_LIMIT_KEYS = ("warning", "critical", "hysteresis", "debounce_s", "clear_s", "latch", "enabled")


def parse_safety(top: Table, chemistry: str | None) -> SafetySpec:
    """The ``[safety]`` table (all optional: presets apply without it)."""
    t = top.sub("safety", "safety", "safety") or Table({}, top.file, top.source, "safety")
    t.check_keys(["capacity_ah", "nominal_voltage", "gear_ratio", "wheel_radius_m",
                  "standstill_kmh", "stationary_hold_s", "rest_current_a", "imbalance_soc",
                  "soc_window_s",
                  "tick_hz", "limits", "speed_cap"])
    capacity = _positive(t, "capacity_ah", None)
    nominal = _positive(t, "nominal_voltage", None)
    tick_hz = _positive(t, "tick_hz", 10.0) or 10.0
    if tick_hz < 10.0:
        t.fail("tick_hz", "staleness must be evaluated at 10 Hz or more")
    limits = {name: scaled(spec, capacity, nominal) for name, spec in preset(chemistry).items()}
    raw_limits = t.sub("limits", "safety.limits", "safety.limits")
    if raw_limits is not None:
        for name in raw_limits.data:
            if name not in LIMIT_NAMES:
                where = Table({}, t.file, t.source, f"safety.limits.{name}",
                              label="safety.limits", anchor=raw_limits.line)
                if where.line is None:  # written as a key, not as its own [header]
                    raw_limits.fail(name, f"no rule {name!r}; rules: {', '.join(LIMIT_NAMES)}")
                where.fail(name, f"no rule {name!r}; rules: {', '.join(LIMIT_NAMES)}")
            sub = raw_limits.sub(name, f"safety.limits.{name}", f"safety.limits.{name}")
            assert sub is not None
            limits[name] = _override(sub, limits[name])
    return SafetySpec(
        chemistry=chemistry,
        capacity_ah=capacity,
        nominal_voltage=nominal,
        gear_ratio=_positive(t, "gear_ratio", None),
        wheel_radius_m=_positive(t, "wheel_radius_m", None),
        standstill_kmh=_non_negative(t, "standstill_kmh", 0.5),
        stationary_hold_s=_non_negative(t, "stationary_hold_s", 1.0),
        rest_current_a=_non_negative(t, "rest_current_a", 10.0),
        imbalance_soc=_soc_range(t),
        soc_window_s=_positive(t, "soc_window_s", 10.0) or 10.0,
        tick_hz=tick_hz,
        limits=limits,
        speed_cap=_speed_cap(t),
        line=t.line,
    )


def _override(t: Table, base: LimitSpec) -> LimitSpec:
    t.check_keys(_LIMIT_KEYS)
    latch = t.opt_str("latch", base.latch)
    if latch not in LATCHES:
        t.fail("latch", f"expected one of {', '.join(LATCHES)}, got {latch!r}")
    per_unit = base.scale is not None
    no_preset = base.warning is None and base.critical is None
    gave_levels = "warning" in t.data or "critical" in t.data
    # Levels given for a rule that had none usable (per-unit without pack data, or a
    # cell rule without a chemistry) switch it on.
    enabled = t.opt_bool("enabled", True if (per_unit or no_preset) and gave_levels
                         else base.enabled)
    if per_unit and not gave_levels and enabled:
        t.fail(None, "this rule's preset is per unit of pack data; set capacity_ah / "
               "nominal_voltage in [safety] or give absolute warning and critical levels")
    spec = replace(
        base,
        warning=_level(t, "warning", base.warning, per_unit),
        critical=_level(t, "critical", base.critical, per_unit),
        hysteresis=_non_negative(t, "hysteresis", _hysteresis(t, base, per_unit)),
        debounce_s=_non_negative(t, "debounce_s", base.debounce_s),
        clear_s=_non_negative(t, "clear_s", base.clear_s),
        latch=latch,
        enabled=enabled,
        # A profile's own levels are absolute: they are not scaled by pack data.
        scale=None,
    )
    if spec.enabled and spec.warning is None and spec.critical is None:
        t.fail(None, "an enabled rule needs a warning or a critical level")
    return spec


def _hysteresis(t: Table, base: LimitSpec, per_unit: bool) -> float:
    if not per_unit:
        return base.hysteresis
    # The preset's hysteresis is per unit too; 5 % of the profile's own level instead.
    levels = [abs(x) for k in ("warning", "critical") if (x := t.opt_float(k, None))]
    return round(min(levels) * 0.05, 6) if levels else 0.0


def _level(t: Table, key: str, base: float | None, per_unit: bool) -> float | None:
    if key in t.data:
        return t.opt_float(key, None)
    # A per-unit preset level means nothing next to the profile's absolute one.
    return None if per_unit else base


def _speed_cap(t: Table) -> SpeedCapSpec | None:
    s = t.sub("speed_cap", "safety.speed_cap", "safety.speed_cap")
    if s is None:
        return None
    s.check_keys(["message", "signal", "none_value", "report", "profiles", "default",
                  "tolerance_kmh", "debounce_s", "confirm_s", "fixed", "bus"])
    profiles_t = s.sub("profiles", "safety.speed_cap.profiles", "safety.speed_cap.profiles")
    profiles: dict[str, float] = {}
    if profiles_t is not None:
        for name in profiles_t.data:
            value = profiles_t.opt_float(name, None)
            if value is None or not 0 < value < 250:
                profiles_t.fail(name, "expected a cap in km/h between 0 and 250")
            profiles[name] = value
    if not profiles:
        s.fail("profiles", "expected at least one named cap, e.g. eu_l6e = 45")
    default = s.opt_str("default")
    if default is not None and default != "none" and default not in profiles:
        s.fail("default", f"no profile {default!r}; profiles: {', '.join(sorted(profiles))}")
    fixed_t = s.sub("fixed", "safety.speed_cap.fixed", "safety.speed_cap.fixed")
    fixed = {}
    if fixed_t is not None:
        for name in fixed_t.data:
            value = fixed_t.opt_float(name, None)
            assert value is not None
            fixed[name] = value
    return SpeedCapSpec(
        message=s.req_str("message"),
        signal=s.req_str("signal"),
        none_value=s.opt_int("none_value", 255, minimum=0) or 0,
        report=s.opt_str("report"),
        profiles=profiles,
        default=None if default in (None, "none") else default,
        tolerance_kmh=_non_negative(s, "tolerance_kmh", 3.0),
        debounce_s=_non_negative(s, "debounce_s", 3.0),
        confirm_s=_positive(s, "confirm_s", 1.0) or 1.0,
        fixed=fixed,
        bus=s.opt_str("bus"),
        line=s.line,
    )


def parse_transmit(tables: list[Table], bus_names: set[str]) -> tuple[TransmitSpec, ...]:
    """The ``[[transmit]]`` allow-list."""
    out: list[TransmitSpec] = []
    for t in tables:
        t.check_keys(["message", "bus", "max_rate_hz", "burst"])
        bus = t.opt_str("bus")
        if bus is None and len(bus_names) > 1:
            t.fail("bus", "required when the profile has several buses")
        if bus is not None and bus not in bus_names:
            t.fail("bus", f"no bus named {bus!r}; buses: {', '.join(sorted(bus_names))}")
        message = t.req_str("message")
        if any(o.message == message and o.bus == bus for o in out):
            t.fail("message", f"{message} is allow-listed twice")
        out.append(TransmitSpec(message, bus, _positive(t, "max_rate_hz", None),
                                t.opt_int("burst", 2, minimum=1) or 2, t.line))
    return tuple(out)


def _soc_range(t: Table) -> tuple[float, float]:
    raw = t.data.get("imbalance_soc", [20.0, 90.0])
    ok = isinstance(raw, list) and len(raw) == 2 and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in raw)
    if not ok or not 0 <= raw[0] < raw[1] <= 100:
        t.fail("imbalance_soc", f"expected [low, high] percentages, got {raw!r}")
    return float(raw[0]), float(raw[1])


def _positive(t: Table, key: str, default: float | None) -> float | None:
    value = t.opt_float(key, default)
    if value is not None and key in t.data and value <= 0:
        t.fail(key, f"expected a number > 0, got {value:g}")
    return value


def _non_negative(t: Table, key: str, default: float) -> float:
    value = t.opt_float(key, default)
    assert value is not None
    if value < 0:
        t.fail(key, f"expected a number >= 0, got {value:g}")
    return value
