"""The reference vehicle's ECUs: BMS, charger, motor controller, body controller.

Each cyclic message of the reference DBCs is encoded with cantools from the
model's state at its ``GenMsgCycleTime``. Safety-relevant frames carry a
4-bit rolling counter and a CRC-8 SAE J1850 over bytes 0..6 in byte 7, as
dbc/README.md specifies. Frames the gateway sends (``GW_*``) are consumed
and change the model: locks, speed cap, charge limit.

Faults can be injected per message (override signals, freeze the counter,
corrupt the checksum), per node (silence it), and in the motor controller
(ignore the speed cap), so tests can show the gateway noticing each one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import can
from cantools.database.can import Database, Message
from crccheck.crc import Crc8SaeJ1850

from gateway.decode.dbc import load_dbc
from hil.sim.model import CELLS, TEMP_SENSORS, VehicleModel

REFERENCE_DBC = Path(__file__).resolve().parents[2] / "dbc" / "reference"
DBC_FILES = ("microev_bms.dbc", "microev_mcu.dbc", "microev_bcm.dbc")

Signals = dict[str, Any]

SPEED_CAP_TIMEOUT_S = 0.5
"""The MCU drops a cap whose GW_SpeedLimit frames stopped this long ago (DBC comment)."""
CHARGE_LIMIT_TIMEOUT_S = 5.0
"""The BMS falls back to 100 % this long after the last GW_ChargeControl (DBC comment)."""
BAD_CHECKSUM_XOR = 0x5A
"""What a corrupted checksum byte is xor-ed with: never zero, so it is always wrong."""


def crc8_j1850(data: bytes) -> int:
    """CRC-8 SAE J1850 (poly 0x1D, init 0xFF, xor-out 0xFF)."""
    return int(Crc8SaeJ1850.calc(data))


@dataclass
class _Cyclic:
    message: Message
    period: float
    build: Callable[[int], Signals]
    next_due: float = 0.0
    counter: int = 0
    page: int = 0
    pages: int = 1
    has_crc: bool = False
    defaults: Signals | None = None


class VehicleEcus:
    """Produces the vehicle's CAN traffic from a :class:`VehicleModel`."""

    def __init__(self, model: VehicleModel, dbc_dir: Path = REFERENCE_DBC) -> None:
        self.model = model
        self.db = Database()
        for name in DBC_FILES:
            self.db.messages.extend(load_dbc(dbc_dir / name).messages)
        self.db.refresh()
        self.silenced: set[str] = set()
        # Fault injection: per-message signal values that override the model's.
        self.overrides: dict[str, Signals] = {}
        # Fault injection by message name: a rolling counter that stops advancing, and a
        # checksum byte sent corrupted (names without a counter or checksum are unaffected).
        self.frozen_counter: set[str] = set()
        self.bad_checksum: set[str] = set()
        # A motor controller that takes GW_SpeedLimit frames but never applies or reports a cap.
        self.ignore_speed_cap = False
        # A body controller that keeps reporting its status but never acts on commands.
        self.ignore_body_commands = False
        # model.t of the GW_SpeedLimit frame the current cap came from; None if not from one.
        self._cap_heard_at: float | None = None
        self._limit_heard_at: float | None = None
        self._cells_key: tuple[float, float, float] | None = None
        self._cells_now: list[float] = []
        self.received: list[can.Message] = []
        builders: dict[str, tuple[Callable[[int], Signals], int]] = {
            "BMS_Pack": (self._bms_pack, 1),
            "BMS_Soc": (self._bms_soc, 1),
            "BMS_CellStats": (self._bms_cell_stats, 1),
            "BMS_Temps": (self._bms_temps, 1),
            "BMS_Faults": (self._bms_faults, 1),
            "BMS_Charge": (self._bms_charge, 1),
            "BMS_CellVoltages": (self._bms_cells, CELLS // 3),
            "BMS_CellTemps": (self._bms_cell_temps, TEMP_SENSORS // 6),
            "BMS_ChargeRequest": (self._bms_charge_request, 1),
            "OBC_Status": (self._obc_status, 1),
            "MCU_Drive": (self._mcu_drive, 1),
            "MCU_Power": (self._mcu_power, 1),
            "MCU_Thermal": (self._mcu_thermal, 1),
            "MCU_Faults": (self._mcu_faults, 1),
            "BCM_Status": (self._bcm_status, 1),
            "BCM_Odometer": (self._bcm_odometer, 1),
        }
        self._cyclic = []
        for name, (build, pages) in builders.items():
            msg = self.db.get_message_by_name(name)
            # Spread first transmissions so all ECUs do not fire in the same millisecond.
            offset = (msg.frame_id % 17) / 1000.0
            has_crc = any(s.name.endswith("_Checksum") for s in msg.signals)
            defaults = {s.name: 0 for s in msg.signals if s.multiplexer_ids is None}
            self._cyclic.append(
                _Cyclic(msg, (msg.cycle_time or 100) / 1000.0, build, offset, pages=pages,
                        has_crc=has_crc, defaults=defaults)
            )

    # ---- output ----------------------------------------------------------------

    def due_frames(self, now: float) -> list[can.Message]:
        """Frames whose cycle falls due at or before ``now`` (simulation seconds)."""
        self._expire_speed_cap()
        self._expire_charge_limit()
        out = []
        for c in self._cyclic:
            while c.next_due <= now:
                if c.message.senders[0] not in self.silenced:
                    out.append(self._frame(c, c.next_due))
                c.next_due += c.period
        return out

    def _frame(self, c: _Cyclic, at: float) -> can.Message:
        signals = dict(c.defaults or {})
        signals.update(c.build(c.page))
        signals.update(self.overrides.get(c.message.name, {}))
        c.page = (c.page + 1) % c.pages
        prefix = c.message.name
        if c.has_crc:
            if f"{prefix}_Counter" in (s.name for s in c.message.signals):
                if prefix in self.frozen_counter:
                    signals[f"{prefix}_Counter"] = (c.counter - 1) & 0xF  # repeat the last one
                else:
                    signals[f"{prefix}_Counter"] = c.counter
                    c.counter = (c.counter + 1) & 0xF
            signals[f"{prefix}_Checksum"] = 0
        data = bytearray(c.message.encode(signals, strict=False))
        if c.has_crc:
            data[7] = crc8_j1850(bytes(data[:7]))
            if prefix in self.bad_checksum:
                data[7] ^= BAD_CHECKSUM_XOR
        return can.Message(
            arbitration_id=c.message.frame_id, is_extended_id=c.message.is_extended_frame,
            data=bytes(data), timestamp=at,
        )

    # ---- input -----------------------------------------------------------------

    def receive(self, frames: Iterable[can.Message]) -> None:
        """React to frames the gateway sent."""
        for frame in frames:
            try:
                msg = self.db.get_message_by_frame_id(frame.arbitration_id)
            except KeyError:
                continue
            if not msg.name.startswith("GW_"):
                continue
            self.received.append(frame)
            try:
                values = cast("Signals", msg.decode(bytes(frame.data), decode_choices=False))
            except Exception:  # a garbled command is ignored, as a real ECU would
                continue
            self._apply(msg.name, values)

    def _apply(self, name: str, v: Signals) -> None:
        m = self.model
        if name == "GW_BodyCommand":
            seq = int(v["GW_CommandSeq"])
            # The BCM acts once per new sequence value: a repeated frame is ignored.
            if self.ignore_body_commands or seq == m.cmd_ack_seq:
                return
            if v["GW_LockRequest"] in (1, 2):
                m.command_lock(v["GW_LockRequest"] == 1, seq)
            elif v["GW_LocateRequest"] in (1, 2, 3):
                m.command_locate(int(v["GW_LocateRequest"]), seq)
            else:
                return
            # Besides its 100 ms cycle, the BCM reports a change at once.
            self._send_now("BCM_Status")
        elif name == "GW_SpeedLimit":
            if self.ignore_speed_cap:
                return
            cap = int(v["GW_SpeedLimitRequest"])
            m.speed_cap_kmh = None if cap == 255 else float(cap)
            self._cap_heard_at = m.t
        elif name == "GW_ChargeControl":
            m.charge_limit = int(v["GW_ChargeLimitSoc"])
            self._limit_heard_at = m.t

    def _send_now(self, name: str) -> None:
        for c in self._cyclic:
            if c.message.name == name:
                c.next_due = min(c.next_due, self.model.t)

    def _expire_charge_limit(self) -> None:
        heard = self._limit_heard_at
        if heard is not None and self.model.t - heard >= CHARGE_LIMIT_TIMEOUT_S:
            self.model.charge_limit = 100
            self._limit_heard_at = None

    def _expire_speed_cap(self) -> None:
        # Only a cap taken from GW_SpeedLimit expires; one set on the model directly stands
        # for the controller's own configuration.
        heard = self._cap_heard_at
        if heard is not None and self.model.t - heard >= SPEED_CAP_TIMEOUT_S:
            self.model.speed_cap_kmh = None
            self._cap_heard_at = None

    # ---- message builders ------------------------------------------------------

    def _cells(self) -> list[float]:
        # Most frames of a step read the cell voltages, the costliest part of the model:
        # work them out once per model state (their sum is model.pack_voltage()).
        m = self.model
        key = (m.t, m.soc, m.pack_current)
        if key != self._cells_key:
            self._cells_key = key
            self._cells_now = m.cell_voltages()
        return self._cells_now

    def _bms_pack(self, _: int) -> Signals:
        m = self.model
        contactor = 2 if m.mode in ("drive", "charge") else 0
        state = {"drive": 2, "charge": 3, "park": 1}[m.mode]
        return {"BMS_PackVoltage": sum(self._cells()),
                "BMS_PackCurrent": m.pack_current + m.noise(0.2),
                "BMS_ContactorState": contactor, "BMS_State": state}

    def _bms_soc(self, _: int) -> Signals:
        m = self.model
        return {"BMS_SoC": round(m.soc, 1), "BMS_SoH": 97.5,
                "BMS_RemainingEnergy": m.soc / 100 * 11.52 * 0.975,
                "BMS_MaxDischargeCurrent": 200 if m.soc > 10 else 80,
                "BMS_MaxChargeCurrent": 60 if m.pack_temp_c > 0 else 10}

    def _bms_cell_stats(self, _: int) -> Signals:
        cells = self._cells()
        hi = max(range(CELLS), key=cells.__getitem__)
        lo = min(range(CELLS), key=cells.__getitem__)
        return {"BMS_MaxCellVoltage": cells[hi], "BMS_MaxCellIdx": hi + 1,
                "BMS_MinCellVoltage": cells[lo], "BMS_MinCellIdx": lo + 1}

    def _bms_temps(self, _: int) -> Signals:
        temps = self.model.sensor_temps()
        hi = max(range(TEMP_SENSORS), key=temps.__getitem__)
        lo = min(range(TEMP_SENSORS), key=temps.__getitem__)
        return {"BMS_MaxTemp": round(temps[hi]), "BMS_MaxTempIdx": hi + 1,
                "BMS_MinTemp": round(temps[lo]), "BMS_MinTempIdx": lo + 1}

    def _bms_faults(self, _: int) -> Signals:
        resistance = 2500 if self.model.mode != "park" else 0xFFFF
        return {"BMS_FaultLevel": 0, "BMS_InsulationResistance": resistance}

    def _bms_charge(self, _: int) -> Signals:
        m = self.model
        charging = m.mode == "charge"
        remaining = (m.charge_limit - m.soc) / 100 * 11.52 / 3.3 * 60 if charging else None
        return {"BMS_ChargeState": m.charge_state if charging else 0,
                "BMS_ChargerConnected": int(charging),
                "BMS_ChargeLimitSoc": m.charge_limit,
                "BMS_ChargeCurrentRequest": 33.0 if charging else 0.0,
                "BMS_ChargeVoltageLimit": 106.5,
                "BMS_TimeToFull": max(0, round(remaining)) if remaining is not None else 0xFFFF}

    def _bms_cells(self, page: int) -> Signals:
        cells = self._cells()
        out: Signals = {"BMS_CellMux": page}
        for k in range(3):
            n = page * 3 + k
            out[f"BMS_Cell{n + 1:02d}_V"] = round(cells[n], 3)
        return out

    def _bms_cell_temps(self, page: int) -> Signals:
        temps = self.model.sensor_temps()
        out: Signals = {"BMS_TempMux": page}
        for k in range(6):
            n = page * 6 + k
            out[f"BMS_Temp{n + 1:02d}"] = round(temps[n])
        return out

    def _bms_charge_request(self, _: int) -> Signals:
        charging = self.model.mode == "charge"
        return {"BMS_OBC_MaxVoltage": 106.5, "BMS_OBC_MaxCurrent": 33.0 if charging else 0.0,
                "BMS_OBC_Control": 0 if charging else 1}

    def _obc_status(self, _: int) -> Signals:
        m = self.model
        charging = m.mode == "charge"
        return {"OBC_OutputVoltage": sum(self._cells()) if charging else 0.0,
                "OBC_OutputCurrent": -m.pack_current if charging else 0.0,
                "OBC_Temperature": round(m.ambient_c + (15 if charging else 0))}

    def _mcu_drive(self, _: int) -> Signals:
        m = self.model
        return {"MCU_MotorSpeed": round(m.motor_rpm()), "MCU_VehicleSpeed": round(m.speed_kmh, 1),
                "MCU_MotorTorque": round(max(-204.7, min(204.7, m.motor_torque)), 1),
                "MCU_Gear": m.gear, "MCU_DriveMode": 1}

    def _mcu_power(self, _: int) -> Signals:
        m = self.model
        return {"MCU_DcBusVoltage": sum(self._cells()) - 0.4,
                "MCU_DcBusCurrent": m.pack_current - 1.0 if m.mode == "drive" else 0.0,
                "MCU_TorqueAvailable": 95.0}

    def _mcu_thermal(self, _: int) -> Signals:
        m = self.model
        capped = m.speed_cap_kmh is not None
        return {"MCU_MotorTemp": round(m.motor_temp_c),
                "MCU_InverterTemp": round(m.inverter_temp_c),
                "MCU_DerateState": 4 if capped else 0,
                "MCU_SpeedLimitActive": int(m.speed_cap_kmh or 0) if capped else 255,
                "MCU_TorqueLimit": 100}

    def _mcu_faults(self, _: int) -> Signals:
        return {"MCU_FaultLevel": 0}

    def _bcm_status(self, _: int) -> Signals:
        m = self.model
        lock_driver, lock_pass, lock_tail = m.locks
        ignition = 2 if m.mode == "drive" else 0
        return {"BCM_LockDriver": lock_driver, "BCM_LockPassenger": lock_pass,
                "BCM_LockTailgate": lock_tail, "BCM_Ignition": ignition,
                "BCM_Ready": int(m.ready), "BCM_ChargePort": 3 if m.mode == "charge" else 0,
                "BCM_Aux12V": m.aux_12v + (0.8 if m.mode != "park" else 0.0),
                "BCM_LastLockSource": m.last_lock_source, "BCM_CmdAckSeq": m.cmd_ack_seq}

    def _bcm_odometer(self, _: int) -> Signals:
        m = self.model
        return {"BCM_Odometer": round(m.odometer_km, 1),
                "BCM_TripMeter": round(m.trip_km % 6553, 1),
                "BCM_AmbientTemp": round(m.ambient_c)}


def generate(model: VehicleModel, seconds: float, step: float = 0.005,
             start: float = 0.0) -> list[can.Message]:
    """Frames of ``seconds`` of simulated time, stamped from ``start``; no real time passes."""
    ecus = VehicleEcus(model)
    frames: list[can.Message] = []
    t = 0.0
    while t < seconds:
        model.step(step)
        t += step
        for f in ecus.due_frames(t):
            f.timestamp += start
            frames.append(f)
    return frames
