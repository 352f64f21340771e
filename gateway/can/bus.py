"""Opening a python-can bus from a profile's bus spec plus command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import can

from gateway.config.profile import BusSpec


@dataclass(frozen=True)
class BusOptions:
    """What is needed to open one bus; built from a BusSpec, overridable per run."""

    name: str
    interface: str
    channel: str
    bitrate: int | None = None
    fd: bool = False
    data_bitrate: int | None = None

    @classmethod
    def from_spec(cls, spec: BusSpec) -> BusOptions:
        """Options as the profile states them."""
        return cls(spec.name, spec.interface, spec.channel, spec.bitrate, spec.fd,
                   spec.data_bitrate)

    def override(self, text: str) -> BusOptions:
        """Apply an ``interface:channel`` override (e.g. ``virtual:demo``, ``socketcan:vcan0``)."""
        interface, sep, channel = text.partition(":")
        if not sep or not interface or not channel:
            raise ValueError(f"bus override {text!r}: expected INTERFACE:CHANNEL")
        return replace(self, interface=interface, channel=channel)


def open_bus(options: BusOptions) -> can.BusABC:
    """Open the bus. Raises can.CanError / OSError / ValueError when it cannot be opened."""
    kwargs: dict[str, Any] = {"interface": options.interface, "channel": options.channel}
    if options.interface in ("socketcan", "udp_multicast"):
        kwargs["fd"] = options.fd
    if options.interface == "udp_multicast":
        kwargs["receive_own_messages"] = False
    if options.interface == "slcan" and options.bitrate:
        kwargs["bitrate"] = options.bitrate
    if options.interface not in ("socketcan", "virtual", "udp_multicast", "slcan"):
        # Adapters that configure the controller themselves take bitrates here; on
        # socketcan the kernel interface is configured by the system (deploy/).
        if options.bitrate:
            kwargs["bitrate"] = options.bitrate
        if options.fd:
            kwargs["fd"] = True
            if options.data_bitrate:
                kwargs["data_bitrate"] = options.data_bitrate
    return can.Bus(**kwargs)
