"""Health bookkeeping shared by every stage: named counters and rate-limited logs."""

from gateway.health.counters import Counters
from gateway.health.ratelimit import RateLimitedLog

__all__ = ["Counters", "RateLimitedLog"]
