"""Helper process for the kill -9 test: a gateway that queues alerts while its broker is down.

Usage: python tests/gateway_flood.py SETTINGS.toml COUNT

Raises and clears alerts until COUNT alert messages are committed to the
outbox, prints ``queued <boot id>`` and then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

from gateway.alerts import Severity
from gateway.app import Pipeline, Publishing
from gateway.clock import SystemClock
from gateway.config import load_profile
from gateway.config.settings import load_settings


async def main(config: str, count: int) -> None:
    """Queue ``count`` alert transitions, report, and wait forever."""
    settings = load_settings(config)
    pipeline = Pipeline.build(load_profile(settings.profile), SystemClock())
    pub = await Publishing.start(pipeline, settings)
    for i in range(count // 2):
        key = f"flood.{i % 7}"
        pub.alerts.raise_(key, Severity.WARNING, "flood test", value=i, limit=0)
        pub.alerts.clear(key, value=i)
    while pipeline.counters.get("outbox.in.alert") < count or pub.durable.pending:
        await asyncio.sleep(0.01)
    print("queued", pub.envelope.boot_id, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
