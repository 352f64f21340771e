"""Unit names and conversions between them.

DBC files spell units freely ("V", "Volt", "°C", "degC", "km/h", "kph").
They are first normalised to one spelling, then converted to the catalog's
unit with an affine map ``canonical = raw * factor + offset``, which the
decoder folds into the DBC's own scale and offset.
"""

from __future__ import annotations

ALIASES: dict[str, str] = {
    "volt": "V", "volts": "V", "v": "V",
    "mv": "mV", "millivolt": "mV",
    "ampere": "A", "amp": "A", "amps": "A", "a": "A",
    "ma": "mA",
    "kw": "kW", "w": "W", "watt": "W",
    "kwh": "kWh", "wh": "Wh",
    "°c": "degC", "degc": "degC", "c": "degC", "deg c": "degC", "celsius": "degC",
    "°f": "degF", "degf": "degF", "f": "degF",
    "k": "K", "kelvin": "K",
    "km/h": "km/h", "kph": "km/h", "kmh": "km/h",
    "m/s": "m/s", "mph": "mph",
    "km": "km", "m": "m", "mi": "mi", "miles": "mi",
    "rpm": "rpm", "1/min": "rpm",
    "nm": "Nm",
    "%": "%", "percent": "%",
    "ohm": "Ohm", "kohm": "kOhm", "megaohm": "MOhm", "milliohm": "mOhm",
    "s": "s", "sec": "s", "min": "min", "h": "h",
}

# Spellings where case carries meaning (milli vs mega) are matched exactly, first.
EXACT: dict[str, str] = {"mOhm": "mOhm", "MOhm": "MOhm", "mW": "mW", "MW": "MW"}

# (from, to) -> (factor, offset)
_AFFINE: dict[tuple[str, str], tuple[float, float]] = {
    ("mV", "V"): (0.001, 0.0),
    ("V", "mV"): (1000.0, 0.0),
    ("mA", "A"): (0.001, 0.0),
    ("W", "kW"): (0.001, 0.0),
    ("kW", "W"): (1000.0, 0.0),
    ("Wh", "kWh"): (0.001, 0.0),
    ("kWh", "Wh"): (1000.0, 0.0),
    ("degF", "degC"): (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("K", "degC"): (1.0, -273.15),
    ("m/s", "km/h"): (3.6, 0.0),
    ("mph", "km/h"): (1.609344, 0.0),
    ("km/h", "m/s"): (1.0 / 3.6, 0.0),
    ("km", "m"): (1000.0, 0.0),
    ("m", "km"): (0.001, 0.0),
    ("mi", "km"): (1.609344, 0.0),
    ("mi", "m"): (1609.344, 0.0),
    ("Ohm", "kOhm"): (0.001, 0.0),
    ("MOhm", "kOhm"): (1000.0, 0.0),
    ("mOhm", "Ohm"): (0.001, 0.0),
    ("mOhm", "kOhm"): (1e-6, 0.0),
    ("mW", "W"): (0.001, 0.0),
    ("MW", "kW"): (1000.0, 0.0),
    ("min", "s"): (60.0, 0.0),
    ("h", "s"): (3600.0, 0.0),
    ("s", "min"): (1.0 / 60.0, 0.0),
}


def normalise(unit: str | None) -> str:
    """The canonical spelling of ``unit``; unknown spellings pass through unchanged."""
    if not unit:
        return ""
    text = unit.strip()
    if text in EXACT:
        return EXACT[text]
    return ALIASES.get(text.lower(), text)


def conversion(src: str, dst: str) -> tuple[float, float] | None:
    """Affine (factor, offset) from ``src`` to ``dst``; None if no conversion is known.

    Same units convert with (1, 0). Units are normalised first.
    """
    a, b = normalise(src), normalise(dst)
    if a == b:
        return (1.0, 0.0)
    return _AFFINE.get((a, b))
