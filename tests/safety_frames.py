"""Shared pieces of the safety tests: reference frames, an alert recorder, small profiles.

Frames are built the way the simulated ECUs build them (hil/sim/ecus.py):
cantools encodes the signals, the 4-bit rolling counter sits in bits 48-51
and byte 7 carries a CRC-8 SAE J1850 over bytes 0..6. The CRC comes from
crccheck, not from gateway.checksum, so the gateway is checked against an
independent implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import can
from cantools.database.can import Database, Message
from crccheck.crc import Crc8SaeJ1850

from gateway.alerts import Alert
from gateway.decode import load_dbc
from tests.conftest import DBC

REF_DIR = DBC / "reference"
REF_DBCS = tuple(REF_DIR / n for n in ("microev_bms.dbc", "microev_mcu.dbc", "microev_bcm.dbc"))

STEP = 1 / 64
"""Frame period used by the tests: exact in binary (so boundaries compare exactly) and
shorter than the tightest staleness window (three 20 ms cycles)."""

SPEED = "Vehicle.Speed"
MOTOR_SPEED = "Vehicle.Powertrain.TractionMotor.Speed"
SPEED_LIMIT = "Vehicle.Powertrain.TractionMotor.SpeedLimitActive"


def crc8(data: bytes) -> int:
    """CRC-8 SAE J1850 by crccheck (the oracle)."""
    return int(Crc8SaeJ1850.calc(data))


class RefFrames:
    """Encodes reference-DBC messages with a correct counter and CRC, as the ECUs do."""

    def __init__(self) -> None:
        self.db = Database()
        for path in REF_DBCS:
            self.db.messages.extend(load_dbc(path).messages)
        self.db.refresh()
        self.counters: dict[str, int] = {}

    def message(self, name: str) -> Message:
        """The DBC message called ``name``."""
        return self.db.get_message_by_name(name)

    def decode(self, name: str, data: bytes) -> dict[str, Any]:
        """Raw values of a payload of ``name`` (no scaling, no value tables)."""
        return cast("dict[str, Any]", self.message(name).decode(data, decode_choices=False,
                                                                scaling=False))

    def payload(self, name: str, values: dict[str, Any] | None = None, *,
                counter: int | None = None, raw: bool = False, corrupt: bool = False) -> bytes:
        """Payload of ``name``; the counter advances per message unless ``counter`` is given.

        ``raw``: ``values`` are raw integers (to send "not available" codes).
        ``corrupt``: the CRC byte is wrong.
        """
        msg = self.message(name)
        signals: dict[str, Any] = {s.name: 0 for s in msg.signals if s.multiplexer_ids is None}
        signals.update(values or {})
        names = {s.name for s in msg.signals}
        if f"{name}_Counter" in names:
            if counter is None:
                counter = self.counters.get(name, 0)
                self.counters[name] = (counter + 1) % 16
            signals[f"{name}_Counter"] = counter
        data = bytearray(msg.encode(signals, scaling=not raw, strict=False))
        if f"{name}_Checksum" in names:
            data[7] = crc8(bytes(data[:7]))
            if corrupt:
                data[7] ^= 0x5A
        return bytes(data)

    def frame(self, name: str, ts: float, values: dict[str, Any] | None = None, *,
              counter: int | None = None, raw: bool = False, corrupt: bool = False,
              data: bytes | None = None) -> can.Message:
        """A frame of ``name`` stamped ``ts`` (``data`` replaces the encoded payload)."""
        msg = self.message(name)
        if data is None:
            data = self.payload(name, values, counter=counter, raw=raw, corrupt=corrupt)
        return can.Message(arbitration_id=msg.frame_id, is_extended_id=msg.is_extended_frame,
                           data=data, timestamp=ts)


@dataclass
class AlertLog:
    """An alert sink that keeps every transition and the latest active set."""

    transitions: list[tuple[str, Alert]] = field(default_factory=list)
    active: list[Alert] = field(default_factory=list)

    def alert(self, transition: str, alert: Alert) -> None:
        """Record one transition."""
        self.transitions.append((transition, alert))

    def active_alerts(self, alerts: Sequence[Alert]) -> None:
        """Record the active set."""
        self.active = list(alerts)

    def of(self, key: str) -> list[str]:
        """Transitions of ``key``, in order."""
        return [t for t, a in self.transitions if a.key == key]

    def get(self, key: str) -> Alert | None:
        """The active alert ``key``, if any."""
        return next((a for a in self.active if a.key == key), None)


def write_profile(tmp_path: Path, body: str, name: str = "p.toml") -> Path:
    """A one-bus profile on the reference DBCs (absolute paths) with ``body`` appended."""
    dbcs = ", ".join(f'"{p}"' for p in REF_DBCS)
    text = f"""[vehicle]
name = "safety-test"
chemistry = "LFP"

[[bus]]
name = "vehicle"
interface = "virtual"
channel = "unused"
dbc = [{dbcs}]

[[signal]]
path = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
message = "BMS_Pack"
signal = "BMS_PackVoltage"
sna = [0xFFFF]
{body}"""
    path = tmp_path / name
    path.write_text(text)
    return path
