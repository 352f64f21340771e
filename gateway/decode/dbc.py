"""Loading DBC files with errors a person can act on.

Real DBCs are messy: cp1252 degree signs, overlapping signals, value tables
for signals that do not exist. Loading rules:

- the format is forced to DBC, so a syntax error reads as a DBC syntax error
  rather than a list of every format cantools tried;
- text is read as UTF-8 and, failing that, as cp1252 (the encoding Vector
  tools write), unless the profile names an encoding;
- every failure becomes a ConfigError naming the file and, where it can be
  found, the line.
"""

from __future__ import annotations

import re
from pathlib import Path

import cantools
from cantools.database.can import Database

from gateway.config.errors import ConfigError

_LINE = re.compile(r"line (\d+)")


def read_dbc_text(path: Path, encoding: str | None = None) -> str:
    """The text of a DBC file, decoded as described in the module docstring."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read DBC: {exc.strerror or exc}") from None
    if encoding:
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ConfigError(str(path), f"cannot decode as {encoding}: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_dbc(path: Path, encoding: str | None = None, strict: bool = True) -> Database:
    """Parse one DBC file; raise ConfigError with file and line on any problem."""
    text = read_dbc_text(path, encoding)
    try:
        db = cantools.database.load_string(text, database_format="dbc", strict=strict)
    except Exception as exc:  # cantools raises several unrelated types; all mean "bad DBC"
        raise _as_config_error(path, text, exc, strict) from None
    if not isinstance(db, Database):
        raise ConfigError(str(path), "not a CAN database")
    return db


def _as_config_error(path: Path, text: str, exc: Exception, strict: bool) -> ConfigError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    m = _LINE.search(message)
    line = int(m.group(1)) if m else _line_of_message_named_in(message, text)
    hint = ""
    if strict and "overlapping" in message:
        hint = " (set strict = false on the bus to accept overlapping signals)"
    return ConfigError(str(path), f"invalid DBC: {message}{hint}", line=line)


def _line_of_message_named_in(message: str, text: str) -> int | None:
    """Best effort: the line of a ``BO_`` whose name the error message quotes."""
    names = set(re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", message))
    names |= set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", message))
    for number, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"\s*BO_\s+\d+\s+([A-Za-z_][A-Za-z0-9_]*)\s*:", line)
        if m and m.group(1) in names:
            return number
    return None
