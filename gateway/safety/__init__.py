"""Safety: receive checks, limit and plausibility rules, verdicts, speed cap, transmit guard.

Default deny throughout (see docs/safety.md): stale or invalid data is never
a good value, unknown motion counts as moving, and nothing leaves on a CAN
bus unless the profile allow-lists it.
"""

from gateway.safety.monitor import SafetyMonitor
from gateway.safety.receive import RxCheck, attach_checks
from gateway.safety.speedcap import SpeedCap
from gateway.safety.transmit import FrameEncoder, TransmitGuard
from gateway.safety.verdicts import Motion, Verdicts

__all__ = [
    "FrameEncoder", "Motion", "RxCheck", "SafetyMonitor", "SpeedCap", "TransmitGuard",
    "Verdicts", "attach_checks",
]
