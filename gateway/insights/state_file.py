"""Small versioned JSON state files for the recorders, and the checks that make a
damaged one harmless.

A trip or charging session in progress must survive a gateway restart (the
head unit may lose power with the car), so its start values are written to
the state directory. What comes back is checked field by field: a file a
power cut or a person damaged is counted, logged once and ignored, never
trusted.

Every write is an fsync on what is often an SD card, so a recorder that is
asked to save once a minute writes only when the content differs from what
the file already holds (:meth:`StateFile.save_if_changed`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gateway.health import Counters, RateLimitedLog
from gateway.insights.energy import Totals
from gateway.persist import load_json, save_json

STATE_VERSION = 1
STATE_FILE_ERRORS = "insights.state_file_errors"


def plus(a: Totals, b: Totals) -> Totals:
    """The sum of two totals."""
    return Totals(a.wh_out + b.wh_out, a.wh_in + b.wh_in, a.ah_out + b.ah_out,
                  a.ah_in + b.ah_in, a.km_speed + b.km_speed)


def totals_json(t: Totals) -> list[float]:
    """Totals as a JSON list (the field order of :class:`Totals`)."""
    return [t.wh_out, t.wh_in, t.ah_out, t.ah_in, t.km_speed]


def _kind_ok(kind: str, value: Any) -> bool:
    if value is None:
        return kind.endswith("?")
    kind = kind.rstrip("?")
    if kind == "num":
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)
    if kind in ("point", "totals"):
        size = 2 if kind == "point" else 5
        return isinstance(value, list) and len(value) == size \
            and all(_kind_ok("num", v) for v in value)
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, {"str": str, "bool": bool}[kind])


def checked(data: Any, kinds: dict[str, str]) -> dict[str, Any]:
    """``data`` when it is an object whose keys have ``kinds`` ("num", "count", "str",
    "bool", "point" [lat, lon], "totals"; "?" allows null), with points as tuples and
    totals as :class:`Totals`; ValueError naming the first bad key otherwise."""
    if not isinstance(data, dict):
        raise ValueError("expected an object")
    out: dict[str, Any] = {}
    for key, kind in kinds.items():
        value = data.get(key)
        if not _kind_ok(kind, value):
            raise ValueError(f"{key}: expected {kind}, got {value!r}")
        if value is not None and kind.startswith("point"):
            value = (float(value[0]), float(value[1]))
        elif value is not None and kind.startswith("totals"):
            value = Totals(*map(float, value))
        out[key] = value
    return out


class StateFile:
    """One small JSON state file; a broken one is counted, logged once and ignored."""

    def __init__(self, path: Path | None, name: str, counters: Counters,
                 rlog: RateLimitedLog, *, versioned: bool = True) -> None:
        self.path = path
        self._name = name
        self._versioned = versioned
        """Whether :meth:`load` insists on ``"version": STATE_VERSION`` (files whose
        format predates the field check their content themselves)."""
        self._counters = counters
        self._rlog = rlog
        self._written: str | None = None
        """The JSON text the file is known to hold (last loaded or written), None if unknown."""

    def load(self, absent: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The stored object (of the current version, if versioned), or None when absent or
        broken; a caller that finds the content unusable reports it with :meth:`broken`.
        ``absent`` is the state a missing file stands for: saving it writes nothing."""
        if self.path is None:
            return None
        try:
            data = load_json(self.path)
        except FileNotFoundError:
            self._written = None if absent is None else json.dumps(absent)
            return None
        except (OSError, ValueError) as exc:
            self.broken(str(exc))
            return None
        if not isinstance(data, dict):
            self.broken("expected a JSON object")
            return None
        if self._versioned and data.get("version") != STATE_VERSION:
            self.broken(f"expected an object with version {STATE_VERSION}")
            return None
        self._written = json.dumps(data)
        return data

    def save(self, value: dict[str, Any]) -> bool:
        """Write ``value`` atomically; a failure is counted and logged. True when written."""
        if self.path is None:
            return False
        try:
            save_json(self.path, value)
        except OSError as exc:
            self._written = None  # what the file holds now is unknown
            self._counters.inc(STATE_FILE_ERRORS)
            self._rlog.error(f"{self._name}.state_file.save",
                             f"cannot save the {self._name} state to {self.path}: {exc}")
            return False
        self._written = json.dumps(value)
        return True

    def save_if_changed(self, value: dict[str, Any]) -> bool:
        """:meth:`save` unless the file already holds ``value`` (as last loaded or written
        through this object); True when it tried to write. After a failed write the next
        call tries again."""
        if self.path is None or json.dumps(value) == self._written:
            return False
        self.save(value)
        return True

    def broken(self, why: str) -> None:
        """Count and log a state file that cannot be used."""
        self._counters.inc(STATE_FILE_ERRORS)
        self._rlog.warning(f"{self._name}.state_file.load",
                           f"ignoring the {self._name} state file {self.path}: {why}")
