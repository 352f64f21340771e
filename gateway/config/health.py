"""Site settings for health reporting and the systemd watchdog: ``[health]``.

What the gateway says about itself: how often it publishes its health
report, whether it serves Prometheus metrics on a local port, and the limits
the watchdog judges the pipeline by. docs/health.md explains each figure.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from gateway.config.toml_table import Table


@dataclass(frozen=True)
class HealthSettings:
    """The health report, the optional metrics endpoint and the watchdog limits."""

    interval_s: float = 30.0
    """How often the health report is built (and published while connected)."""
    prometheus_port: int | None = None
    """TCP port of the Prometheus text endpoint; None serves no metrics."""
    prometheus_host: str = "127.0.0.1"
    """Loopback address the endpoint binds to: the metrics carry no authentication."""
    max_loop_lag_s: float = 1.0
    """The watchdog stops pinging while the event loop wakes up later than this."""
    stall_after_s: float = 10.0
    """How long a bus may stay undecoded, or silent while the car was not parked, before
    the watchdog stops pinging."""


def parse_health(t: Table) -> HealthSettings:
    """``[health]``: every key optional; ranges and the loopback-only host are checked."""
    t.check_keys(["interval_s", "prometheus_port", "prometheus_host", "max_loop_lag_s",
                  "stall_after_s"])
    default = HealthSettings()
    port = t.opt_int("prometheus_port", None, minimum=1)
    if port is not None and port > 65535:
        t.fail("prometheus_port", f"expected a TCP port from 1 to 65535, got {port}")
    host = t.opt_str("prometheus_host", default.prometheus_host) or ""
    if not _loopback(host):
        # Anyone who can reach the port can read the metrics, so they stay on this machine.
        t.fail("prometheus_host", f"expected a loopback address such as 127.0.0.1 or ::1, "
                                  f"got {host!r}")
    return HealthSettings(
        interval_s=_number(t, "interval_s", default.interval_s, 1.0, 3600.0),
        prometheus_port=port,
        prometheus_host=host,
        max_loop_lag_s=_number(t, "max_loop_lag_s", default.max_loop_lag_s, 0.05, 60.0),
        stall_after_s=_number(t, "stall_after_s", default.stall_after_s, 1.0, 3600.0),
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(t: Table, key: str, default: float, low: float, high: float) -> float:
    value = t.opt_float(key, default)
    if value is None or not math.isfinite(value) or not low <= value <= high:
        t.fail(key, f"expected a number from {low:g} to {high:g}, got {value}")
    return value
