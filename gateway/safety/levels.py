"""The level machine every limit rule runs: warning and critical levels with
hysteresis, debounce and latching.

A rule measures one number (the worst case over its inputs) and this machine
decides the level: 0 (fine), 1 (warning), 2 (critical). Each level is
tracked on its own:

- it turns on once its condition has held for ``debounce_s``;
- once on, its threshold moves back by ``hysteresis``, and it turns off
  only after that relaxed condition has been false for ``clear_s``;
- unknown input (stale or invalid data) neither raises nor clears: the
  machine holds its level and forgets any pending change, so a silent BMS
  never makes an over-voltage look fixed;
- a partial measurement (some inputs unknown) may raise a level, because the
  good inputs already prove the condition, but cannot clear one.

Latching keeps a critical level on after its condition went away: ``clear``
until the rule is completely clear (back below the warning level, too);
``reset`` additionally until :meth:`LevelMachine.reset` is called.

Times are source timestamps where a reading has one, so a backlog in the
frame queue does not stretch a debounce.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.config.limits import LimitSpec


class Measurement(NamedTuple):
    """A rule's reading: the worst-case value and the source time it refers to.

    ``complete`` is False when some inputs were unknown: the value is then a
    lower bound of the worst case (for a high limit) and may raise but not clear.
    """

    value: float
    ts: float
    complete: bool = True


NOT_APPLICABLE = "n/a"
"""The rule does not apply now (a charge limit while driving): its levels clear."""


class LevelMachine:
    """Level state of one rule. ``high`` rules trip above their levels, others below."""

    def __init__(self, spec: LimitSpec, high: bool) -> None:
        self.spec = spec
        self.high = high
        self.level = 0
        self.latched = False
        self.reset_pending = False
        self.value: float | None = None
        self.ts: float | None = None
        # Per level (index 1 and 2): when its condition started holding, and when it stopped.
        self._true_since: list[float | None] = [None, None, None]
        self._false_since: list[float | None] = [None, None, None]
        self._on = [False, False, False]
        levels = [x for x in (spec.warning, spec.critical) if x is not None]
        # The least severe level: a value short of it, with nothing pending, changes nothing.
        self._first = (min(levels) if high else max(levels)) if levels else None

    def threshold(self, level: int) -> float | None:
        """The configured value of ``level`` (1 warning, 2 critical)."""
        return self.spec.warning if level == 1 else self.spec.critical

    def update(self, m: Measurement | str | None, now: float) -> int:
        """Feed one evaluation; returns the level after it.

        ``m`` is a measurement, :data:`NOT_APPLICABLE`, or None for unknown.
        ``now`` is the evaluation time (for debounce when a reading is old).
        """
        if self.level == 0 and self._idle():
            # Fast path for the common case: all quiet and the value is nowhere near a level.
            if isinstance(m, Measurement):
                first = self._first
                if first is None or (m.value < first if self.high else m.value > first):
                    self.value, self.ts = m.value, m.ts
                    return 0
            elif m is not None:
                return 0
        if m is None:
            # Unknown: hold, and restart any pending change once data is back.
            self._true_since = [None, None, None]
            self._false_since = [None, None, None]
            return self.level
        for level in (1, 2):
            limit = self.threshold(level)
            if limit is None:
                self._on[level] = False
                continue
            self._step(level, limit, m, now)
        if isinstance(m, Measurement):
            self.value, self.ts = m.value, m.ts
        self.level = 2 if self._on[2] else 1 if self._on[1] else 0
        self._apply_latch()
        return self.level

    def _idle(self) -> bool:
        ts = self._true_since
        return ts[1] is None and ts[2] is None and not self.latched

    def _step(self, level: int, limit: float, m: Measurement | str, now: float) -> None:
        on = self._on[level]
        if isinstance(m, Measurement):
            edge = limit - self.spec.hysteresis if on and self.high else \
                limit + self.spec.hysteresis if on else limit
            holds = m.value >= edge if self.high else m.value <= edge
            at = min(m.ts, now)
            if not holds and not m.complete:
                # The good inputs do not prove the condition; the unknown ones might.
                self._true_since[level] = None
                self._false_since[level] = None
                return
        else:
            holds, at = False, now
        if holds:
            self._false_since[level] = None
            if self._true_since[level] is None:
                self._true_since[level] = at
            since = self._true_since[level]
            assert since is not None
            if not on and now - since >= self.spec.debounce_s:
                self._on[level] = True
        else:
            self._true_since[level] = None
            if self._false_since[level] is None:
                self._false_since[level] = at
            since = self._false_since[level]
            assert since is not None
            if on and now - since >= self.spec.clear_s:
                self._on[level] = False

    def _apply_latch(self) -> None:
        if self.spec.latch == "none":
            return
        if self.level == 2:
            self.latched = True
            self.reset_pending = self.spec.latch == "reset"
            return
        if not self.latched:
            return
        if self.level == 0 and not self.reset_pending:
            self.latched = False
            return
        self.level = 2  # latched: critical until clear (and, for "reset", a reset)

    @property
    def waiting_for_reset(self) -> bool:
        """Latched, the condition is gone, and only an explicit reset will clear it."""
        return self.latched and self.reset_pending and not self._on[1] and not self._on[2]

    def reset(self) -> bool:
        """Acknowledge a ``reset`` latch; returns True if that released it."""
        if not self.waiting_for_reset:
            return False  # nothing to reset, or still faulty: a reset cannot hide a fault
        self.reset_pending = False
        self.latched = False
        self.level = 0
        return True
