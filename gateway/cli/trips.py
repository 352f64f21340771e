"""``ev-gateway trips``: the finished trips and charging sessions kept on the head unit.

Reads the local log (``insights.sqlite`` in the state directory) and prints
the newest records as JSON lines, newest first: the same objects as the
``trip`` and ``charge_session`` events. It opens the log read-only, so it can
run beside the daemon.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from gateway.config.settings import DEFAULT_STATE_DIR, load_settings

LOG_NAME = "insights.sqlite"


def add_parser(sub: Any) -> None:
    """Register the sub-command."""
    p = sub.add_parser("trips", help="print the finished trips (or charging sessions) "
                                     "kept on this head unit, newest first")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="gateway settings TOML (its state directory is read)")
    where.add_argument("--state-dir", help=f"the gateway's state directory "
                                           f"(default {DEFAULT_STATE_DIR})")
    p.add_argument("--charges", action="store_true", help="charging sessions instead of trips")
    p.add_argument("--limit", type=int, default=10, help="how many (default 10)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of the sub-command."""
    state_dir = (load_settings(args.config).state_dir if args.config
                 else Path(args.state_dir or DEFAULT_STATE_DIR))
    path = state_dir / LOG_NAME
    if not path.is_file():
        print(f"ev-gateway trips: no local log at {path} (nothing finished yet, or another "
              f"state directory)", file=sys.stderr)
        return 1
    if args.limit < 1:
        raise SystemExit("ev-gateway trips: --limit must be at least 1")
    try:
        records = read_records(path, "charges" if args.charges else "trips", args.limit)
    except (sqlite3.Error, ValueError) as exc:
        print(f"ev-gateway trips: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    for record in records:
        print(json.dumps(record, separators=(",", ":")))
    return 0


def read_records(path: Path, table: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` records of ``table`` (trips or charges), newest first.

    Read-only: the daemon owns the file (it repairs and trims it); a reader must not."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute(f'SELECT data FROM {table} ORDER BY "end" DESC, id DESC LIMIT ?',
                            (limit,)).fetchall()
    finally:
        conn.close()
    return [json.loads(row[0]) for row in rows]
