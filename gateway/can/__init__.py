"""CAN input: opening python-can buses and turning them into batches of frames.

Named ``gateway.can``; inside it, ``import can`` still means python-can
(absolute imports).
"""

from gateway.can.bus import BusOptions, open_bus
from gateway.can.replay import ReplaySource, read_log
from gateway.can.source import LiveSource

__all__ = ["BusOptions", "LiveSource", "ReplaySource", "open_bus", "read_log"]
