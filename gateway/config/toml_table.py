"""Typed access to TOML tables with errors that name file, line and key.

``tomllib`` gives plain dicts without positions, so the loader keeps the file
text and finds the line of a table header or key by scanning it. That is
enough to point a user at the right place, and avoids a second TOML parser.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from gateway.config.errors import ConfigError

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def read_toml(file: Path, what: str) -> tuple[dict[str, Any], SourceMap]:
    """Parse ``file``; any problem is one ConfigError naming the file (and line, if known)."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(file), f"not UTF-8 text: {exc.reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        line = int(m.group(1)) if m else None
        raise ConfigError(str(file), f"invalid TOML: {exc}", line=line) from None
    return data, SourceMap(text)


class SourceMap:
    """Line numbers of table headers and keys in a TOML text."""

    def __init__(self, text: str) -> None:
        self._lines = text.splitlines()
        self._headers: dict[str, list[int]] = {}
        for number, line in enumerate(self._lines, start=1):
            m = _HEADER.match(line)
            if m:
                name = m.group(2).replace('"', "").replace("'", "")
                self._headers.setdefault(name, []).append(number)

    def header_line(self, table: str, index: int = 0) -> int | None:
        """Line of the ``index``-th header named ``table`` (1-based line)."""
        lines = self._headers.get(table)
        if not lines or index >= len(lines):
            return None
        return lines[index]

    def key_line(self, table: str, index: int, key: str) -> int | None:
        """Line where ``key`` is set inside the ``index``-th ``table``, else the header line."""
        start = self.header_line(table, index) if table else 0
        if start is None:
            return None
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for number in range(start + 1, len(self._lines) + 1):
            line = self._lines[number - 1]
            if _HEADER.match(line):
                break
            if pattern.match(line):
                return number
        return start or None


class Table:
    """A TOML table plus where it came from, with typed getters."""

    def __init__(
        self,
        data: dict[str, Any],
        file: str,
        source: SourceMap,
        table: str,
        index: int = 0,
        label: str | None = None,
        anchor: int | None = None,
    ) -> None:
        self.anchor = anchor
        """Line to report when the table has none of its own (an inline table)."""
        self.data = data
        self.file = file
        self.source = source
        self.table = table
        self.index = index
        self.label = label or table

    @property
    def line(self) -> int | None:
        """Line of this table's header."""
        return self.source.header_line(self.table, self.index) if self.table else None

    def fail(self, key: str | None, message: str) -> NoReturn:
        """Raise a ConfigError located at ``key`` in this table."""
        line = self.source.key_line(self.table, self.index, key) if key else self.line
        line = line or self.anchor
        full_key = (f"{self.label}.{key}" if self.label else key) if key else self.label
        raise ConfigError(self.file, message, line=line, key=full_key)

    def check_keys(self, allowed: Iterable[str]) -> None:
        """Reject keys this table does not define: a typo must not be silently ignored."""
        allowed_set = set(allowed)
        for key in self.data:
            if key not in allowed_set:
                self.fail(key, f"unknown key; expected one of: {', '.join(sorted(allowed_set))}")

    def _get(self, key: str, types: tuple[type, ...], what: str, default: Any) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int subclass: never accept true/false where a number is expected.
        if isinstance(value, bool) and bool not in types:
            self.fail(key, f"expected {what}, got {value!r}")
        if not isinstance(value, types):
            self.fail(key, f"expected {what}, got {value!r}")
        return value

    def req_str(self, key: str) -> str:
        """A required non-empty string."""
        if key not in self.data:
            self.fail(key, "missing; expected a string")
        value: str = self._get(key, (str,), "a string", None)
        if not value.strip():
            self.fail(key, "expected a non-empty string")
        return value

    def opt_str(self, key: str, default: str | None = None) -> str | None:
        """An optional string."""
        value: str | None = self._get(key, (str,), "a string", default)
        return value

    def opt_bool(self, key: str, default: bool) -> bool:
        """An optional boolean."""
        value: bool = self._get(key, (bool,), "true or false", default)
        return value

    def opt_int(self, key: str, default: int | None, minimum: int | None = None) -> int | None:
        """An optional integer, at least ``minimum``."""
        value: int | None = self._get(key, (int,), "an integer", default)
        if value is not None and minimum is not None and value < minimum:
            self.fail(key, f"expected an integer >= {minimum}, got {value}")
        return value

    def opt_float(self, key: str, default: float | None) -> float | None:
        """An optional number (integers accepted)."""
        value = self._get(key, (int, float), "a number", default)
        return None if value is None else float(value)

    def str_list(self, key: str, required: bool = False) -> list[str]:
        """A list of strings (a single string is accepted as a one-item list)."""
        if key not in self.data:
            if required:
                self.fail(key, "missing; expected a list of strings")
            return []
        value = self.data[key]
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, f"expected a list of strings, got {value!r}")
        if required and not value:
            self.fail(key, "expected at least one entry")
        return list(value)

    def int_list(self, key: str) -> list[int]:
        """A list of integers."""
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            self.fail(key, f"expected a list of integers, got {value!r}")
        return list(value)

    def sub(self, key: str, table: str, label: str) -> Table | None:
        """A nested table under ``key``, or None."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(key, "expected a table")
        return Table(value, self.file, self.source, table, 0, label,
                     anchor=self.source.key_line(self.table, self.index, key) or self.anchor)
