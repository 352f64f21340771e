"""The one error type for bad configuration, DBC files included."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration or DBC problem, reported as one line: ``file:line: key: what``."""

    def __init__(
        self, file: str, message: str, *, line: int | None = None, key: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.detail = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
