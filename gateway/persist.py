"""State that survives power cuts: small JSON files (speed cap, charge limit, open
trips) and SQLite transactions (outbox, insights log)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def save_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` atomically: after a power cut the old or the new
    content is there, never a torn file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_json(path: Path) -> Any:
    """The JSON value in ``path``; OSError or ValueError when it cannot be read."""
    return json.loads(path.read_text())


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back when the body or the commit fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (a full disk) can leave the transaction open.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
