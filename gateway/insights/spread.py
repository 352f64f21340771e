"""The cell spread at rest, one median per day, and its trend.

Spread (highest minus lowest cell voltage) is the first sign of a pack drifting
out of balance, but it only means something at rest: under load each cell's
resistance adds its own drop. Battery health feeds in one rest sample at a
time; this keeps a bounded daily series and fits a line through it.
"""

from __future__ import annotations

import math
import statistics
from datetime import UTC, date, datetime
from typing import Any

SPREAD_DAYS = 90


def finite(value: object) -> float:
    """``value`` as a finite float; ValueError for anything else (a state file's field)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


class SpreadSeries:
    """Rest spread samples reduced to one median per UTC day, for the last 90 days.

    A median, because one odd sample (a cell still relaxing) must not move a day.
    """

    def __init__(self) -> None:
        self.medians: dict[int, float] = {}
        """Day ordinal -> median spread (mV) of that day's samples."""
        self.today: list[float] = []
        """Samples of the newest day, from which its median is kept current."""
        self.last: tuple[float, float] | None = None
        """(source timestamp, mV) of the newest sample."""

    def add(self, ts: float, mv: float) -> None:
        """Add one sample taken at source time ``ts``."""
        day = datetime.fromtimestamp(ts, UTC).date().toordinal()
        if self.medians and day != max(self.medians):
            self.today = []
        self.today.append(mv)
        self.medians[day] = statistics.median(self.today)
        for old in [d for d in self.medians if d <= day - SPREAD_DAYS]:
            del self.medians[old]
        self.last = (ts, mv)

    def trend_per_30_days(self) -> float | None:
        """Least-squares slope of the daily medians, in mV per 30 days; None with fewer
        than 3 days or when they span less than 2 days."""
        days = sorted(self.medians)
        if len(days) < 3 or days[-1] - days[0] < 2:
            return None
        mean_x = statistics.fmean(days)
        mean_y = statistics.fmean(self.medians[d] for d in days)
        sxy = math.fsum((d - mean_x) * (self.medians[d] - mean_y) for d in days)
        sxx = math.fsum((d - mean_x) ** 2 for d in days)
        return sxy / sxx * 30.0

    def as_json(self) -> dict[str, Any]:
        """The JSON form kept in the state file (days as ISO dates, to be readable)."""
        return {"days": {date.fromordinal(d).isoformat(): m for d, m in self.medians.items()},
                "today": list(self.today), "last": list(self.last) if self.last else None}

    @classmethod
    def from_json(cls, data: Any) -> SpreadSeries:
        """Rebuild from :meth:`as_json`; ValueError/TypeError/KeyError on a malformed one."""
        if not isinstance(data, dict):
            raise ValueError("spread: not an object")
        series = cls()
        series.medians = {date.fromisoformat(d).toordinal(): finite(m)
                          for d, m in dict(data.get("days", {})).items()}
        series.today = [finite(v) for v in data.get("today", [])]
        last = data.get("last")
        if last is not None:
            ts, mv = last
            series.last = (finite(ts), finite(mv))
        return series
