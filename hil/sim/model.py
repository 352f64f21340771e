"""A small physical model of the reference micro-EV.

Good enough to produce believable traffic: a speed trace from a drive cycle,
road-load physics for the traction power, a 30S LFP pack with per-cell
capacity and resistance spread, lumped thermal models, and a CC/CV charger.
Units are SI inside except where a name says otherwise.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

CELLS = 30
TEMP_SENSORS = 12
CAPACITY_AH = 120.0
MASS_KG = 750.0
CRR = 0.012
CDA_M2 = 0.62
AIR_DENSITY = 1.2
WHEEL_RADIUS_M = 0.28
GEAR_RATIO = 8.5
DRIVE_EFFICIENCY = 0.88
REGEN_EFFICIENCY = 0.65
AUX_LOAD_W = 250.0
CELL_R_OHM = 0.0012
MAX_MOTOR_POWER_W = 20_000.0
CHARGER_POWER_W = 3_300.0
CELL_CV_VOLTAGE = 3.55

# LFP open-circuit voltage against SoC: the long flat plateau is what makes
# LFP SoC estimation hard, and what a realistic pack shows.
_OCV = [(0.0, 2.80), (5.0, 3.10), (10.0, 3.20), (20.0, 3.25), (40.0, 3.28), (60.0, 3.30),
        (80.0, 3.33), (90.0, 3.35), (97.0, 3.40), (100.0, 3.55)]


def lfp_ocv(soc: float) -> float:
    """Open-circuit cell voltage for a state of charge in percent."""
    soc = min(100.0, max(0.0, soc))
    for (s0, v0), (s1, v1) in itertools.pairwise(_OCV):
        if soc <= s1:
            return v0 + (v1 - v0) * (soc - s0) / (s1 - s0)
    return _OCV[-1][1]


@dataclass
class DriveCycle:
    """A repeating speed trace: (duration s, target km/h) segments."""

    segments: list[tuple[float, float]] = field(default_factory=lambda: [
        (12, 30), (20, 30), (10, 50), (25, 50), (8, 20), (6, 0), (10, 0),
        (15, 45), (30, 60), (10, 35), (8, 0), (8, 0),
    ])

    @property
    def period(self) -> float:
        """Length of one lap of the cycle in seconds."""
        return sum(d for d, _ in self.segments)

    def target(self, t: float) -> float:
        """Target speed in km/h at time ``t`` into the cycle (linear ramps between segments)."""
        t = t % self.period
        prev = self.segments[-1][1]
        for duration, speed in self.segments:
            if t < duration:
                ramp = min(1.0, t / 4.0)
                return prev + (speed - prev) * ramp
            t -= duration
            prev = speed
        return prev


@dataclass
class VehicleModel:
    """State of the simulated car, advanced with :meth:`step`."""

    mode: str = "drive"  # "drive", "charge" or "park"
    soc: float = 80.0
    ambient_c: float = 22.0
    cycle: DriveCycle = field(default_factory=DriveCycle)
    seed: int = 7
    t: float = 0.0
    speed_kmh: float = 0.0
    accel: float = 0.0
    pack_current: float = 0.0  # positive = discharge, as on the BMS frame
    motor_torque: float = 0.0
    odometer_km: float = 12_345.6
    trip_km: float = 0.0
    speed_cap_kmh: float | None = None
    charge_limit: int = 100
    charge_state: int = 0
    locks: list[int] = field(default_factory=lambda: [1, 1, 1])
    last_lock_source: int = 0
    cmd_ack_seq: int = 0
    locate_requests: list[int] = field(default_factory=list)
    """GW_LocateRequest values the body controller carried out (1 flash, 2 horn, 3 both)."""
    aux_12v: float = 13.2
    pack_temp_c: float = 0.0
    motor_temp_c: float = 0.0
    inverter_temp_c: float = 0.0
    cell_soc_offset: list[float] = field(default_factory=list)
    cell_r: list[float] = field(default_factory=list)
    sensor_offset: list[float] = field(default_factory=list)
    lat: float = 48.85837
    lon: float = 2.29448
    heading_deg: float = 90.0
    """Course over ground; the car turns right by 90 degrees at each stop, so a drive
    cycle traces a loop instead of a straight line off the map."""
    gnss_fix: bool = True
    """False while the receiver has no fix (a tunnel, an unplugged antenna)."""
    # Injected faults of the pack itself, so every frame that carries the reading shows it
    # (the per-cell frames, the BMS's min/max, the pack voltage): volts added to a cell
    # (1-based number), and heating beyond the model's own, in kelvin per second.
    cell_fault_v: dict[int, float] = field(default_factory=dict)
    heat_c_per_s: float = 0.0
    # Ground truth for checking what the gateway computes from the CAN frames:
    # battery-side energy and charge, split by direction (Wh and Ah; "out" = discharge).
    energy_out_wh: float = 0.0
    energy_in_wh: float = 0.0
    ah_out: float = 0.0
    ah_in: float = 0.0
    distance_km: float = 0.0

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._rng = rng
        if not self.cell_soc_offset:
            self.cell_soc_offset = [rng.gauss(0.0, 0.8) for _ in range(CELLS)]
        if not self.cell_r:
            self.cell_r = [CELL_R_OHM * rng.uniform(0.9, 1.15) for _ in range(CELLS)]
        if not self.sensor_offset:
            self.sensor_offset = [rng.uniform(-1.5, 1.5) for _ in range(TEMP_SENSORS)]
        self.pack_temp_c = self.pack_temp_c or self.ambient_c + 3.0
        self.motor_temp_c = self.motor_temp_c or self.ambient_c + 5.0
        self.inverter_temp_c = self.inverter_temp_c or self.ambient_c + 4.0

    # ---- derived readings -------------------------------------------------

    def cell_voltages(self) -> list[float]:
        """Terminal voltage of each cell (V), including IR drop under load."""
        return [
            lfp_ocv(self.soc + off) - self.pack_current * r + self.cell_fault_v.get(n, 0.0)
            for n, (off, r) in enumerate(zip(self.cell_soc_offset, self.cell_r, strict=True),
                                         start=1)
        ]

    def pack_voltage(self) -> float:
        """Sum of the cells (V)."""
        return sum(self.cell_voltages())

    def sensor_temps(self) -> list[float]:
        """Module temperature sensors (°C)."""
        return [self.pack_temp_c + off for off in self.sensor_offset]

    def motor_rpm(self) -> float:
        """Motor speed from wheel speed and the reduction ratio."""
        wheel_rps = (self.speed_kmh / 3.6) / (2 * math.pi * WHEEL_RADIUS_M)
        return wheel_rps * 60.0 * GEAR_RATIO

    @property
    def ready(self) -> bool:
        """Drive-ready (HV on, gear selectable)."""
        return self.mode == "drive"

    @property
    def gear(self) -> int:
        """0 Neutral, 1 Drive, 3 Park, as on MCU_Gear."""
        if self.mode != "drive":
            return 3
        return 1 if self.speed_kmh > 0.1 or self.cycle.target(self.t) > 0 else 0

    # ---- reactions to the gateway ----------------------------------------

    def command_lock(self, lock: bool, seq: int) -> None:
        """Body controller executing a gateway lock/unlock request."""
        self.locks = [1 if lock else 0] * 3
        self.last_lock_source = 3
        self.cmd_ack_seq = seq

    def command_locate(self, request: int, seq: int) -> None:
        """Body controller flashing the lights and/or sounding the horn."""
        self.locate_requests.append(request)
        self.cmd_ack_seq = seq

    # ---- time ---------------------------------------------------------------

    def step(self, dt: float) -> None:
        """Advance the model by ``dt`` seconds."""
        self.t += dt
        if self.mode == "drive":
            self._drive(dt)
        elif self.mode == "charge":
            self._charge(dt)
        else:
            self.speed_kmh = 0.0
            self.pack_current = 0.3  # parked: BMS and telematics quiescent draw
            self.motor_torque = 0.0
        self._account(dt)
        used = self.pack_current * dt / 3600 / CAPACITY_AH * 100
        self.soc = max(0.0, min(100.0, self.soc - used))
        self._thermal(dt)

    def _account(self, dt: float) -> None:
        amps = self.pack_current
        watts = amps * self.pack_voltage()
        if amps >= 0:
            self.energy_out_wh += watts * dt / 3600
            self.ah_out += amps * dt / 3600
        else:
            self.energy_in_wh -= watts * dt / 3600
            self.ah_in -= amps * dt / 3600

    def _move(self, v_old: float, v_new: float, dt: float) -> None:
        metres = v_new * dt
        self.odometer_km += metres / 1000
        self.trip_km += metres / 1000
        self.distance_km += metres / 1000
        if v_old > 0.05 >= v_new:
            self.heading_deg = (self.heading_deg + 90.0) % 360.0
        rad = math.radians(self.heading_deg)
        self.lat += metres * math.cos(rad) / 111_320.0
        self.lon += metres * math.sin(rad) / (111_320.0 * math.cos(math.radians(self.lat)))

    def _drive(self, dt: float) -> None:
        target = self.cycle.target(self.t)
        if self.speed_cap_kmh is not None:
            target = min(target, self.speed_cap_kmh)
        v = self.speed_kmh / 3.6
        accel = max(-2.5, min(1.8, (target / 3.6 - v) / 2.0))
        force = MASS_KG * accel + MASS_KG * 9.81 * CRR * (1 if v > 0.05 else 0) \
            + 0.5 * AIR_DENSITY * CDA_M2 * v * v
        mech_w = force * v
        mech_w = min(mech_w, MAX_MOTOR_POWER_W)
        elec_w = mech_w / DRIVE_EFFICIENCY if mech_w >= 0 else mech_w * REGEN_EFFICIENCY
        elec_w += AUX_LOAD_W
        v_new = max(0.0, v + accel * dt)
        self.accel = accel
        self.speed_kmh = v_new * 3.6
        self._move(v, v_new, dt)
        self.pack_current = elec_w / max(self.pack_voltage(), 60.0)
        wheel_torque = force * WHEEL_RADIUS_M
        self.motor_torque = wheel_torque / GEAR_RATIO

    def _charge(self, dt: float) -> None:
        self.speed_kmh = 0.0
        self.motor_torque = 0.0
        if self.soc >= self.charge_limit:
            self.charge_state = 3
            self.pack_current = 0.0
            return
        cc_current = -CHARGER_POWER_W / max(self.pack_voltage(), 60.0)
        vmax = max(lfp_ocv(self.soc + o) for o in self.cell_soc_offset)
        if vmax - cc_current * CELL_R_OHM < CELL_CV_VOLTAGE:
            self.charge_state = 1
            self.pack_current = cc_current
        else:
            self.charge_state = 2
            self.pack_current = cc_current * 0.3

    def _thermal(self, dt: float) -> None:
        heat_w = self.pack_current ** 2 * CELL_R_OHM * CELLS
        self.pack_temp_c += (heat_w / 60_000.0 + self.heat_c_per_s
                             - (self.pack_temp_c - self.ambient_c) / 3600.0) * dt
        load = abs(self.motor_torque) / 90.0
        self.motor_temp_c += (load * 0.08 - (self.motor_temp_c - self.ambient_c) / 900.0) * dt
        self.inverter_temp_c += (load * 0.05 - (self.inverter_temp_c - self.ambient_c) / 600.0) * dt

    def noise(self, sigma: float) -> float:
        """Measurement noise for sensors."""
        return self._rng.gauss(0.0, sigma)
