"""A live terminal view of the vehicle state.

Groups signals as the MQTT state topics will (battery, charging, motion,
body, health), shows stale and invalid values as such rather than as numbers,
and folds per-cell signals into one summary line per array.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from gateway.state import SignalView

GROUPS = ("battery", "charging", "motion", "body", "location", "health", "safety")
_ARRAY = re.compile(r"^(?P<head>.+)\.(?P<n>\d+)\.(?P<leaf>\w+)$")
_FLAGS = re.compile(r"^(?P<head>.+\.(?:Fault|ChargerFault))\.(?P<leaf>\w+)$")
_PREFIXES = ("Vehicle.Powertrain.TractionBattery.", "Vehicle.Powertrain.", "Vehicle.")


def short(path: str) -> str:
    """A display label: the path without its common VSS prefix."""
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def fmt_value(view: SignalView) -> str:
    """The value as shown: STALE / N/A markers beat numbers."""
    if view.timestamp is None:
        return "-- (no data)"
    if not view.valid:
        return "N/A"
    value = view.value
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.1f}"
    else:
        text = str(value)
    if view.unit and not isinstance(value, str):
        text += f" {view.unit}"
    return text + ("  STALE" if view.stale else "")


def render(
    title: str, views: Iterable[SignalView], status: str = "", width: int = 100
) -> str:
    """The whole screen as text."""
    by_group: dict[str, list[SignalView]] = {g: [] for g in GROUPS}
    arrays: dict[tuple[str, str, str], list[SignalView]] = {}
    flags: dict[tuple[str, str], list[SignalView]] = {}
    for v in views:
        m = _ARRAY.match(v.path)
        f = _FLAGS.match(v.path)
        if m:
            arrays.setdefault((v.group, m["head"], m["leaf"]), []).append(v)
        elif f:
            flags.setdefault((v.group, f["head"]), []).append(v)
        else:
            by_group.setdefault(v.group, []).append(v)
    lines = [title, status, ""]
    for group, members in by_group.items():
        rows = [(short(v.path), fmt_value(v)) for v in members]
        rows += [_array_row(head, leaf, items) for (g, head, leaf), items in arrays.items()
                 if g == group]
        rows += [_flags_row(head, items) for (g, head), items in flags.items() if g == group]
        if not rows:
            continue
        lines.append(group.upper())
        cells = [f"  {label:<38.38} {value:<18.18}" for label, value in rows]
        per_line = max(1, width // 58)
        for i in range(0, len(cells), per_line):
            lines.append("".join(cells[i:i + per_line]).rstrip())
        lines.append("")
    return "\n".join(lines)


def _array_row(head: str, leaf: str, items: list[SignalView]) -> tuple[str, str]:
    values = [float(v.value) for v in items
              if v.good and isinstance(v.value, int | float) and not isinstance(v.value, bool)]
    label = f"{short(head)}.*.{leaf} ({len(values)}/{len(items)} fresh)"
    if not values:
        return label, "no fresh data"
    return label, f"{min(values):g}..{max(values):g} {items[0].unit}"


def _flags_row(head: str, items: list[SignalView]) -> tuple[str, str]:
    label = f"{short(head)}.* ({len(items)})"
    unknown = [v for v in items if not v.good]
    active = [v.path.rsplit(".", 1)[1] for v in items if v.good and v.value is True]
    if active:
        return label, "ACTIVE: " + ", ".join(active)
    if unknown:
        return label, f"{len(unknown)} unknown"
    return label, "none active"


def clock_line(now: float) -> str:
    """Local time for the title line."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
