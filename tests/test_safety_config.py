"""The profile's safety tables: presets, pack-data scaling, overrides and every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import Pipeline
from gateway.clock import ManualClock
from gateway.config import ConfigError, Profile, load_profile
from gateway.config.limits import CHEMISTRIES, LIMIT_NAMES, preset
from gateway.safety.rules import build_rules
from tests.conftest import DBC

REF = DBC / "reference"
CELL_RULES = ("cell_overvoltage", "cell_undervoltage", "cell_imbalance",
              "pack_overtemp_discharge", "pack_overtemp_charge", "pack_undertemp_discharge",
              "pack_undertemp_charge", "overcurrent_discharge", "overcurrent_charge")
TB = "Vehicle.Powertrain.TractionBattery"


def profile_text(body: str = "", chemistry: str | None = "LFP", head: str = "") -> str:
    """A profile on the reference DBCs (absolute paths) mapping a few battery signals."""
    dbcs = ", ".join(f'"{REF / n}"' for n in ("microev_bms.dbc", "microev_mcu.dbc"))
    chem = f'chemistry = "{chemistry}"\n' if chemistry else ""
    return f"""[vehicle]
name = "t"
{chem}{head}
[[bus]]
name = "vehicle"
interface = "virtual"
channel = "t"
dbc = [{dbcs}]

[[signal]]
path = "{TB}.CellVoltage.Max"
message = "BMS_CellStats"
signal = "BMS_MaxCellVoltage"

[[signal]]
path = "{TB}.CurrentCurrent"
message = "BMS_Pack"
signal = "BMS_PackCurrent"

[[signal]]
path = "{TB}.InsulationResistance"
message = "BMS_Faults"
signal = "BMS_InsulationResistance"

[[signal]]
path = "Vehicle.Powertrain.TractionMotor.Temperature"
message = "MCU_Thermal"
signal = "MCU_MotorTemp"
{body}"""


def load(tmp_path: Path, body: str = "", **kw: str | None) -> Profile:
    path = tmp_path / "p.toml"
    path.write_text(profile_text(body, **kw))  # type: ignore[arg-type]
    return load_profile(path)


def rule_keys(profile: Profile) -> set[str]:
    pipeline = Pipeline.build(profile, ManualClock())
    return {r.key for r in build_rules(pipeline.store, profile.safety)}


# ---- presets and scaling ----------------------------------------------------------------

@pytest.mark.parametrize(("chemistry", "over", "under"), [
    ("LFP", (3.60, 3.65), (2.80, 2.50)),
    ("NMC", (4.20, 4.25), (3.00, 2.70)),
    ("LTO", (2.75, 2.85), (1.80, 1.50)),
])
def test_presets_by_chemistry(tmp_path, chemistry, over, under):
    limits = load(tmp_path, chemistry=chemistry).safety.limits
    assert (limits["cell_overvoltage"].warning, limits["cell_overvoltage"].critical) == over
    assert (limits["cell_undervoltage"].warning, limits["cell_undervoltage"].critical) == under
    assert limits["cell_overvoltage"].latch == "reset"
    assert set(limits) == set(LIMIT_NAMES)
    assert limits["motor_overtemp"] == preset(chemistry)["motor_overtemp"]
    assert chemistry in CHEMISTRIES


def test_without_a_chemistry_the_cell_rules_are_off(tmp_path):
    profile = load(tmp_path, chemistry=None)
    limits = profile.safety.limits
    for name in CELL_RULES:
        assert not limits[name].enabled, name
        assert limits[name].warning is None and limits[name].critical is None
    assert limits["motor_overtemp"].enabled
    assert rule_keys(profile) == {"motor.overtemp"}
    assert rule_keys(load(tmp_path)) >= {"battery.cell_overvoltage", "motor.overtemp"}


@pytest.mark.parametrize(("chemistry", "capacity", "discharge", "charge"), [
    ("LFP", 100, (250.0, 300.0, 10.0), (100.0, 150.0, 10.0)),
    ("NMC", 50, (100.0, 150.0, 5.0), (35.0, 50.0, 5.0)),
    ("LTO", 20, (80.0, 120.0, 4.0), (80.0, 120.0, 4.0)),
])
def test_currents_scale_with_capacity(tmp_path, chemistry, capacity, discharge, charge):
    limits = load(tmp_path, f"[safety]\ncapacity_ah = {capacity}\n", chemistry=chemistry) \
        .safety.limits
    for name, want in (("overcurrent_discharge", discharge), ("overcurrent_charge", charge)):
        spec = limits[name]
        assert (spec.warning, spec.critical, spec.hysteresis) == want
        assert spec.enabled and spec.scale is None
    assert not limits["insulation_low"].enabled, "no nominal_voltage: insulation stays off"


def test_insulation_scales_with_nominal_voltage(tmp_path):
    profile = load(tmp_path, "[safety]\nnominal_voltage = 400\n")
    spec = profile.safety.limits["insulation_low"]
    # 500 and 100 ohm per volt at 400 V, in kOhm.
    assert (spec.warning, spec.critical, spec.hysteresis, spec.scale) == (200.0, 40.0, 20.0, None)
    assert profile.safety.nominal_voltage == 400.0
    assert not profile.safety.limits["overcurrent_discharge"].enabled
    assert "battery.insulation" in rule_keys(profile)


def test_missing_pack_data_disables_current_and_insulation_rules(tmp_path):
    profile = load(tmp_path)
    limits = profile.safety.limits
    for name, scale in (("overcurrent_discharge", "capacity_ah"),
                        ("overcurrent_charge", "capacity_ah"),
                        ("insulation_low", "nominal_voltage")):
        assert not limits[name].enabled and limits[name].scale == scale
    keys = rule_keys(profile)
    assert not keys & {"battery.overcurrent_discharge", "battery.overcurrent_charge",
                       "battery.insulation"}
    assert "battery.cell_overvoltage" in keys


def test_safety_defaults_and_settings(tmp_path):
    default = load(tmp_path).safety
    assert (default.standstill_kmh, default.stationary_hold_s, default.rest_current_a,
            default.soc_window_s, default.tick_hz, default.imbalance_soc) == \
        (0.5, 1.0, 10.0, 10.0, 10.0, (20.0, 90.0))
    assert default.speed_cap is None and default.line is None
    spec = load(tmp_path, """[safety]
gear_ratio = 9
wheel_radius_m = 0.3
standstill_kmh = 0
stationary_hold_s = 2.5
rest_current_a = 4
imbalance_soc = [10, 95.5]
soc_window_s = 30
tick_hz = 20
""").safety
    assert (spec.gear_ratio, spec.wheel_radius_m, spec.standstill_kmh, spec.stationary_hold_s,
            spec.rest_current_a, spec.imbalance_soc, spec.soc_window_s, spec.tick_hz) == \
        (9.0, 0.3, 0.0, 2.5, 4.0, (10.0, 95.5), 30.0, 20.0)


# ---- overrides -----------------------------------------------------------------------------

def test_an_override_changes_only_what_it_names(tmp_path):
    limits = load(tmp_path, """[safety.limits.cell_overvoltage]
critical = 3.7
latch = "clear"
debounce_s = 1

[safety.limits.soc_low]
enabled = false
""").safety.limits
    spec = limits["cell_overvoltage"]
    assert (spec.warning, spec.critical, spec.hysteresis, spec.debounce_s, spec.clear_s,
            spec.latch, spec.enabled) == (3.6, 3.7, 0.02, 1.0, 2.0, "clear", True)
    assert not limits["soc_low"].enabled
    assert limits["cell_undervoltage"] == preset("LFP")["cell_undervoltage"]


@pytest.mark.parametrize(("body", "want"), [
    ("critical = 400", (None, 400.0, 20.0)),          # hysteresis: 5 % of the own level
    ("warning = 300\ncritical = 400", (300.0, 400.0, 15.0)),
    ("critical = 400\nhysteresis = 7", (None, 400.0, 7.0)),
])
def test_absolute_levels_switch_on_a_per_unit_rule_without_pack_data(tmp_path, body, want):
    profile = load(tmp_path, f"[safety.limits.overcurrent_discharge]\n{body}\n")
    spec = profile.safety.limits["overcurrent_discharge"]
    assert (spec.warning, spec.critical, spec.hysteresis) == want
    assert spec.enabled and spec.scale is None
    assert "battery.overcurrent_discharge" in rule_keys(profile)


def test_a_per_unit_rule_can_be_switched_off_explicitly(tmp_path):
    spec = load(tmp_path, "[safety.limits.insulation_low]\nenabled = false\n") \
        .safety.limits["insulation_low"]
    assert not spec.enabled and spec.hysteresis == 0.0


def test_own_levels_switch_on_a_cell_rule_without_chemistry(tmp_path):
    profile = load(tmp_path, "[safety.limits.cell_overvoltage]\nwarning = 4.1\n"
                   "critical = 4.2\n", chemistry=None)
    spec = profile.safety.limits["cell_overvoltage"]
    assert (spec.warning, spec.critical, spec.enabled) == (4.1, 4.2, True)
    assert rule_keys(profile) == {"motor.overtemp", "battery.cell_overvoltage"}


# ---- errors: file, line and key -------------------------------------------------------------

CAP = """[safety.speed_cap]
message = "GW_SpeedLimit"
signal = "GW_SpeedLimitRequest"
"""
CAP_PROFILES = CAP + "\n[safety.speed_cap.profiles]\neu_l6e = 45\n"
TX = '\n[[transmit]]\nmessage = "GW_SpeedLimit"\n'


def line_of(text: str, needle: str) -> int:
    """1-based line of the one line containing ``needle``."""
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def config_error(tmp_path: Path, text: str) -> tuple[ConfigError, Path]:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    return info.value, path


# (body, the line the error points at, key, words in the message)
ERRORS = {
    "unknown-rule-key": ("[safety.limits.soc_low]\nwarnin = 3\n", "warnin",
                         "safety.limits.soc_low.warnin", "unknown key"),
    "unknown-safety-key": ("[safety]\ncapacity = 3\n", "capacity =", "safety.capacity",
                           "unknown key"),
    "bad-latch": ('[safety.limits.soc_low]\nlatch = "sticky"\n', "sticky",
                  "safety.limits.soc_low.latch", "expected one of none, clear, reset"),
    "latch-type": ("[safety.limits.soc_low]\nlatch = 3\n", "latch", "safety.limits.soc_low.latch",
                   "expected a string"),
    "level-type": ('[safety.limits.soc_low]\nwarning = "high"\n', "warning",
                   "safety.limits.soc_low.warning", "expected a number"),
    "enabled-type": ("[safety.limits.soc_low]\nenabled = 1\n", "enabled",
                     "safety.limits.soc_low.enabled", "true or false"),
    "negative-hysteresis": ("[safety.limits.soc_low]\nhysteresis = -1\n", "hysteresis",
                            "safety.limits.soc_low.hysteresis", ">= 0, got -1"),
    "negative-debounce": ("[safety.limits.motor_overtemp]\ndebounce_s = -0.5\n", "debounce_s",
                          "safety.limits.motor_overtemp.debounce_s", ">= 0, got -0.5"),
    "negative-clear": ("[safety.limits.motor_overtemp]\nclear_s = -2\n", "clear_s",
                       "safety.limits.motor_overtemp.clear_s", ">= 0"),
    "negative-capacity": ("[safety]\ncapacity_ah = -5\n", "capacity_ah", "safety.capacity_ah",
                          "> 0, got -5"),
    "zero-voltage": ("[safety]\nnominal_voltage = 0\n", "nominal_voltage",
                     "safety.nominal_voltage", "> 0, got 0"),
    "negative-ratio": ("[safety]\ngear_ratio = -8\n", "gear_ratio", "safety.gear_ratio", "> 0"),
    "zero-radius": ("[safety]\nwheel_radius_m = 0\n", "wheel_radius_m", "safety.wheel_radius_m",
                    "> 0"),
    "negative-standstill": ("[safety]\nstandstill_kmh = -1\n", "standstill_kmh",
                            "safety.standstill_kmh", ">= 0"),
    "negative-hold": ("[safety]\nstationary_hold_s = -1\n", "stationary_hold_s",
                      "safety.stationary_hold_s", ">= 0"),
    "negative-rest": ("[safety]\nrest_current_a = -1\n", "rest_current_a",
                      "safety.rest_current_a", ">= 0"),
    "zero-soc-window": ("[safety]\nsoc_window_s = 0\n", "soc_window_s", "safety.soc_window_s",
                        "> 0"),
    "slow-tick": ("[safety]\ntick_hz = 5\n", "tick_hz", "safety.tick_hz", "10 Hz or more"),
    "zero-tick": ("[safety]\ntick_hz = 0\n", "tick_hz", "safety.tick_hz", "> 0"),
    "limit-not-a-table": ("[safety.limits]\nsoc_low = 5\n", "soc_low", "safety.limits.soc_low",
                          "expected a table"),
    "unknown-rule-inline": ("[safety.limits]\ncell_overvolt = { warning = 3 }\n", "cell_overvolt",
                            "safety.limits.cell_overvolt", "no rule 'cell_overvolt'; rules: "),
    "per-unit-without-levels": ("\n[safety.limits.overcurrent_discharge]\nenabled = true\n",
                                "[safety.limits.overcurrent_discharge]",
                                "safety.limits.overcurrent_discharge", "per unit of pack data"),
    "soc-range-order": ("[safety]\nimbalance_soc = [90, 20]\n", "imbalance_soc",
                        "safety.imbalance_soc", "expected [low, high] percentages"),
    "soc-range-short": ("[safety]\nimbalance_soc = [20]\n", "imbalance_soc",
                        "safety.imbalance_soc", "got [20]"),
    "soc-range-bool": ("[safety]\nimbalance_soc = [true, 90]\n", "imbalance_soc",
                       "safety.imbalance_soc", "[low, high]"),
    "soc-range-type": ('[safety]\nimbalance_soc = "20-90"\n', "imbalance_soc",
                       "safety.imbalance_soc", "[low, high]"),
    "soc-range-above-100": ("[safety]\nimbalance_soc = [20, 101]\n", "imbalance_soc",
                            "safety.imbalance_soc", "[low, high]"),
    "soc-range-negative": ("[safety]\nimbalance_soc = [-1, 90]\n", "imbalance_soc",
                           "safety.imbalance_soc", "[low, high]"),
    "cap-without-profiles": (CAP, "[safety.speed_cap]", "safety.speed_cap.profiles",
                             "at least one named cap"),
    "cap-profiles-not-a-table": (CAP + "profiles = 5\n", "profiles", "safety.speed_cap.profiles",
                                 "expected a table"),
    "cap-zero": (CAP + "\n[safety.speed_cap.profiles]\nslow = 0\n", "slow",
                 "safety.speed_cap.profiles.slow", "between 0 and 250"),
    "cap-too-high": (CAP + "\n[safety.speed_cap.profiles]\nfast = 250\n", "fast",
                     "safety.speed_cap.profiles.fast", "between 0 and 250"),
    "cap-not-a-number": (CAP + '\n[safety.speed_cap.profiles]\nfast = "x"\n', "fast",
                         "safety.speed_cap.profiles.fast", "expected a number"),
    "cap-unknown-default": (CAP.replace("signal", 'default = "valet"\nsignal') +
                            "\n[safety.speed_cap.profiles]\neu_l6e = 45\n", "valet",
                            "safety.speed_cap.default", "no profile 'valet'; profiles: eu_l6e"),
    "cap-no-message": (CAP_PROFILES.replace('message = "GW_SpeedLimit"\n', ""),
                       "[safety.speed_cap]", "safety.speed_cap.message", "missing"),
    "cap-unknown-key": (CAP_PROFILES.replace("signal", "colour = 1\nsignal"), "colour",
                        "safety.speed_cap.colour", "unknown key"),
    "cap-none-value": (CAP_PROFILES.replace("signal", "none_value = -1\nsignal"), "none_value",
                       "safety.speed_cap.none_value", ">= 0"),
    "cap-tolerance": (CAP_PROFILES.replace("signal", "tolerance_kmh = -3\nsignal"),
                      "tolerance_kmh", "safety.speed_cap.tolerance_kmh", ">= 0"),
    "cap-confirm": (CAP_PROFILES.replace("signal", "confirm_s = 0\nsignal"), "confirm_s",
                    "safety.speed_cap.confirm_s", "> 0"),
    "cap-fixed-not-a-number": (CAP_PROFILES + '\n[safety.speed_cap.fixed]\nGW_DerateRequest = '
                               '"on"\n', "GW_DerateRequest", "safety.speed_cap.fixed."
                               "GW_DerateRequest", "expected a number"),
    "transmit-twice": (TX + 'max_rate_hz = 5\n\n[[transmit]]\nmessage = "GW_SpeedLimit"  # 2\n',
                       "# 2", "transmit[1].message", "GW_SpeedLimit is allow-listed twice"),
    "transmit-unknown-bus": (TX + 'bus = "body"\n', "body", "transmit[0].bus",
                             "no bus named 'body'; buses: vehicle"),
    "transmit-no-message": ('\n[[transmit]]\nburst = 3\n', "[[transmit]]", "transmit[0].message",
                            "missing"),
    "transmit-burst": (TX + "burst = 0\n", "burst", "transmit[0].burst", ">= 1"),
    "transmit-rate": (TX + "max_rate_hz = 0\n", "max_rate_hz", "transmit[0].max_rate_hz", "> 0"),
    "transmit-unknown-key": (TX + "rate = 3\n", "rate =", "transmit[0].rate", "unknown key"),
    "message-checksum": ('\n[messages.BMS_Pack]\nchecksum_algorithm = "crc99"\n', "crc99",
                         "messages.BMS_Pack.checksum_algorithm",
                         "unknown algorithm 'crc99'; known: crc8_j1850"),
}


@pytest.mark.parametrize(("body", "needle", "key", "words"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_file_line_and_key(tmp_path, body, needle, key, words):
    text = profile_text(body)
    err, path = config_error(tmp_path, text)
    assert str(err).startswith(f"{path}:{line_of(text, needle)}: {key}: "), str(err)
    assert words in str(err)
    assert (err.file, err.key) == (str(path), key)


def test_safety_must_be_a_table(tmp_path):
    err, path = config_error(tmp_path, "safety = 5\n" + profile_text())
    assert str(err).startswith(f"{path}:1: profile.safety: expected a table")


def test_tuning_a_rule_that_lacks_pack_data_leaves_it_off(tmp_path):
    spec = load(tmp_path, "[safety.limits.overcurrent_discharge]\ndebounce_s = 1\n") \
        .safety.limits["overcurrent_discharge"]
    assert not spec.enabled and spec.debounce_s == 1.0


def test_an_enabled_rule_needs_a_level(tmp_path):
    text = profile_text("\n[safety.limits.cell_overvoltage]\nenabled = true\n", chemistry=None)
    err, path = config_error(tmp_path, text)
    line = line_of(text, "[safety.limits.cell_overvoltage]")
    assert str(err) == f"{path}:{line}: safety.limits.cell_overvoltage: an enabled rule " \
        "needs a warning or a critical level"


def test_unknown_default_checksum_algorithm(tmp_path):
    text = profile_text(head='\n[defaults]\nchecksum_algorithm = "md5"\n')
    err, path = config_error(tmp_path, text)
    assert str(err).startswith(f"{path}:{line_of(text, 'md5')}: defaults.checksum_algorithm: ")
    assert "unknown algorithm 'md5'" in str(err)


def test_transmit_needs_a_bus_when_there_are_several(tmp_path):
    text = profile_text(TX).replace(
        '[[signal]]', f'[[bus]]\nname = "body"\ninterface = "virtual"\nchannel = "b"\n'
        f'dbc = ["{REF / "microev_bcm.dbc"}"]\n\n[[signal]]', 1
    ).replace('signal = "', 'bus = "vehicle"\nsignal = "')
    err, path = config_error(tmp_path, text)
    assert str(err).startswith(f"{path}:{line_of(text, '[[transmit]]')}: transmit[0].bus: ")
    assert "several buses" in str(err)


def test_transmit_entries_parse(tmp_path):
    profile = load(tmp_path, TX + '\n[[transmit]]\nmessage = "GW_ChargeControl"\n'
                   'max_rate_hz = 4\nburst = 3\nbus = "vehicle"\n')
    first, second = profile.transmit
    assert (first.message, first.bus, first.max_rate_hz, first.burst) == \
        ("GW_SpeedLimit", None, None, 2)
    assert (second.message, second.bus, second.max_rate_hz, second.burst) == \
        ("GW_ChargeControl", "vehicle", 4.0, 3)
    assert first.line is not None and second.line is not None and second.line > first.line


def test_speed_cap_parses(tmp_path):
    cap = load(tmp_path, CAP_PROFILES.replace("signal", 'default = "none"\nsignal') +
               "valet = 20\n\n[safety.speed_cap.fixed]\nGW_TorqueLimitRequest = 100\n"
               ).safety.speed_cap
    assert cap is not None
    assert (cap.message, cap.signal, cap.none_value, cap.report, cap.default) == \
        ("GW_SpeedLimit", "GW_SpeedLimitRequest", 255, None, None)
    assert cap.profiles == {"eu_l6e": 45.0, "valet": 20.0}
    assert cap.fixed == {"GW_TorqueLimitRequest": 100.0}
    assert (cap.tolerance_kmh, cap.debounce_s, cap.confirm_s, cap.bus) == (3.0, 3.0, 1.0, None)
    chosen = load(tmp_path, CAP_PROFILES.replace("signal", 'default = "eu_l6e"\nsignal'))
    assert chosen.safety.speed_cap is not None and chosen.safety.speed_cap.default == "eu_l6e"


def test_unknown_rule_header_names_its_line(tmp_path):
    text = profile_text("\n[safety.limits.cell_overvolt]\nwarning = 3\n")
    err, _ = config_error(tmp_path, text)
    assert err.line == line_of(text, "[safety.limits.cell_overvolt]")


def test_bad_inline_speed_cap_profile_names_its_line(tmp_path):
    text = profile_text(CAP + "profiles = { eu_l6e = 300 }\n")
    err, _ = config_error(tmp_path, text)
    assert err.key == "safety.speed_cap.profiles.eu_l6e"
    assert err.line == line_of(text, "profiles =")
