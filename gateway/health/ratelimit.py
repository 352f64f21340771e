"""Logging that cannot flood.

Bad input arrives at frame rate: one log line per bad frame would drown the
journal and the CPU of a head unit. Each distinct problem (a *key*) logs its
first occurrence at once, then at most once per interval, with the number of
occurrences it did not log in between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.clock import Clock


@dataclass
class _KeyState:
    last_logged: float
    suppressed: int = 0


class RateLimitedLog:
    """One line per key per interval; counts what it held back."""

    def __init__(
        self, logger: logging.Logger, clock: Clock, interval: float = 10.0, max_keys: int = 4096
    ) -> None:
        self._logger = logger
        self._clock = clock
        self._interval = interval
        self._max_keys = max_keys
        self._keys: dict[str, _KeyState] = {}
        self.suppressed_total = 0

    def log(self, level: int, key: str, message: str) -> bool:
        """Log ``message`` under ``key`` unless that key logged within the interval.

        Returns True when a line was written.
        """
        now = self._clock.monotonic()
        state = self._keys.get(key)
        if state is not None and now - state.last_logged < self._interval:
            state.suppressed += 1
            self.suppressed_total += 1
            return False
        if state is None:
            if len(self._keys) >= self._max_keys:
                # A flood of distinct keys (e.g. random IDs) must not grow memory without bound.
                self._keys.clear()
            self._keys[key] = _KeyState(last_logged=now)
            suffix = ""
        else:
            suffix = f" ({state.suppressed} similar suppressed)" if state.suppressed else ""
            state.last_logged = now
            state.suppressed = 0
        self._logger.log(level, "%s%s", message, suffix)
        return True

    def warning(self, key: str, message: str) -> bool:
        """Rate-limited warning."""
        return self.log(logging.WARNING, key, message)

    def error(self, key: str, message: str) -> bool:
        """Rate-limited error."""
        return self.log(logging.ERROR, key, message)
