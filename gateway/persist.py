"""Small JSON state files that survive power cuts (speed cap, charge limit)."""

from __future__ import annotations

import json
import os
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
