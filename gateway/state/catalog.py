"""The gateway's canonical signals.

Paths follow COVESA VSS naming. Where VSS has no leaf for something a micro-EV
reports (cell-level data, fault bits, inverter temperature), the catalog
extends the nearest VSS branch in the same style, as KUKSA overlays do.

The catalog fixes each signal's unit and kind, so every vehicle profile
converts into the same units and consumers never see per-vehicle units. A
profile may map a path that is not here, but must then declare its unit and
kind itself.

``{n}`` in a path stands for a 1-based index (cells, temperature sensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["number", "bool", "string"]
Group = Literal["battery", "motion", "location", "body", "charging", "health", "safety"]

TB = "Vehicle.Powertrain.TractionBattery"
TM = "Vehicle.Powertrain.TractionMotor"
LOC = "Vehicle.CurrentLocation"


@dataclass(frozen=True)
class CatalogEntry:
    """One canonical signal: unit, kind, state group and a short description."""

    path: str
    unit: str
    kind: Kind
    group: Group
    description: str


_ENTRIES = [
    # battery
    CatalogEntry(f"{TB}.StateOfCharge.Current", "%", "number", "battery", "State of charge"),
    CatalogEntry(f"{TB}.StateOfCharge.CurrentEnergy", "kWh", "number", "battery",
                 "Energy left in the pack"),
    CatalogEntry(f"{TB}.StateOfHealth", "%", "number", "battery", "Capacity-based state of health"),
    CatalogEntry(f"{TB}.CurrentVoltage", "V", "number", "battery", "Pack voltage"),
    CatalogEntry(f"{TB}.CurrentCurrent", "A", "number", "battery",
                 "Pack current; positive = into the pack (charging), as in VSS"),
    CatalogEntry(f"{TB}.CurrentPower", "W", "number", "battery",
                 "Pack power; positive = into the pack"),
    CatalogEntry(f"{TB}.CellVoltage.Max", "V", "number", "battery", "Highest cell voltage"),
    CatalogEntry(f"{TB}.CellVoltage.Min", "V", "number", "battery", "Lowest cell voltage"),
    CatalogEntry(f"{TB}.CellVoltage.MaxIndex", "", "number", "battery",
                 "1-based number of the highest cell"),
    CatalogEntry(f"{TB}.CellVoltage.MinIndex", "", "number", "battery",
                 "1-based number of the lowest cell"),
    CatalogEntry(f"{TB}.Cell.{{n}}.Voltage", "V", "number", "battery", "Voltage of cell n"),
    CatalogEntry(f"{TB}.Temperature.Max", "degC", "number", "battery", "Hottest sensor"),
    CatalogEntry(f"{TB}.Temperature.Min", "degC", "number", "battery", "Coldest sensor"),
    CatalogEntry(f"{TB}.Temperature.MaxIndex", "", "number", "battery",
                 "1-based number of the hottest sensor"),
    CatalogEntry(f"{TB}.Temperature.MinIndex", "", "number", "battery",
                 "1-based number of the coldest sensor"),
    CatalogEntry(f"{TB}.TemperatureSensor.{{n}}.Temperature", "degC", "number", "battery",
                 "Temperature sensor n"),
    CatalogEntry(f"{TB}.InsulationResistance", "kOhm", "number", "battery",
                 "Pack-to-chassis insulation resistance"),
    CatalogEntry(f"{TB}.ContactorState", "", "string", "battery", "Main contactor state"),
    CatalogEntry(f"{TB}.BmsState", "", "string", "battery", "BMS operating state"),
    CatalogEntry(f"{TB}.MaxDischargeCurrent", "A", "number", "battery",
                 "Discharge current the BMS allows now"),
    CatalogEntry(f"{TB}.MaxChargeCurrent", "A", "number", "battery",
                 "Charge current the BMS allows now"),
    CatalogEntry(f"{TB}.Fault.{{n}}", "", "bool", "health", "BMS fault flag"),
    CatalogEntry(f"{TB}.FaultLevel", "", "string", "health", "BMS fault severity"),
    # charging
    CatalogEntry(f"{TB}.Charging.IsCharging", "", "bool", "charging", "Charging now"),
    CatalogEntry(f"{TB}.Charging.State", "", "string", "charging", "Charge phase"),
    CatalogEntry(f"{TB}.Charging.IsChargingCableConnected", "", "bool", "charging",
                 "A charger is connected"),
    CatalogEntry(f"{TB}.Charging.ChargeLimit", "%", "number", "charging",
                 "Target SoC the BMS charges to"),
    CatalogEntry(f"{TB}.Charging.ChargeCurrent.DC", "A", "number", "charging",
                 "Charger output current"),
    CatalogEntry(f"{TB}.Charging.ChargeVoltage.DC", "V", "number", "charging",
                 "Charger output voltage"),
    CatalogEntry(f"{TB}.Charging.TimeToComplete", "s", "number", "charging",
                 "Time until the charge limit is reached"),
    CatalogEntry(f"{TB}.Charging.ChargePortState", "", "string", "charging",
                 "Charge-port flap and plug state"),
    CatalogEntry(f"{TB}.Charging.ChargerTemperature", "degC", "number", "charging",
                 "On-board charger temperature"),
    CatalogEntry(f"{TB}.Charging.ChargerFault.{{n}}", "", "bool", "health", "Charger fault flag"),
    # motion and drivetrain
    CatalogEntry("Vehicle.Speed", "km/h", "number", "motion", "Vehicle speed"),
    CatalogEntry("Vehicle.TraveledDistance", "km", "number", "motion", "Odometer"),
    CatalogEntry("Vehicle.TripMeterReading", "km", "number", "motion", "Trip meter"),
    CatalogEntry("Vehicle.Powertrain.Range", "m", "number", "battery", "Remaining range"),
    CatalogEntry("Vehicle.Powertrain.Transmission.SelectedGear", "", "string", "motion",
                 "Gear selector position"),
    CatalogEntry("Vehicle.Powertrain.DriveMode", "", "string", "motion", "Drive mode"),
    CatalogEntry("Vehicle.Powertrain.IsReady", "", "bool", "motion", "Ready to drive"),
    CatalogEntry("Vehicle.Chassis.ParkingBrake.IsEngaged", "", "bool", "motion",
                 "Parking brake engaged"),
    CatalogEntry(f"{TM}.Speed", "rpm", "number", "motion", "Motor speed; positive = forward"),
    CatalogEntry(f"{TM}.Torque", "Nm", "number", "motion",
                 "Motor torque; negative = regenerative"),
    CatalogEntry(f"{TM}.Temperature", "degC", "number", "health", "Motor winding temperature"),
    CatalogEntry(f"{TM}.InverterTemperature", "degC", "number", "health", "Inverter temperature"),
    CatalogEntry(f"{TM}.DcBus.Voltage", "V", "number", "motion", "Inverter DC bus voltage"),
    CatalogEntry(f"{TM}.DcBus.Current", "A", "number", "motion",
                 "Inverter DC current; positive = drawn from the pack"),
    CatalogEntry(f"{TM}.TorqueAvailable", "Nm", "number", "motion", "Torque available now"),
    CatalogEntry(f"{TM}.DerateState", "", "string", "health", "Why the motor is derated"),
    CatalogEntry(f"{TM}.SpeedLimitActive", "km/h", "number", "motion",
                 "Speed cap the controller enforces"),
    CatalogEntry(f"{TM}.TorqueLimit", "%", "number", "motion", "Torque limit in force"),
    CatalogEntry(f"{TM}.Fault.{{n}}", "", "bool", "health", "Motor-controller fault flag"),
    CatalogEntry(f"{TM}.FaultLevel", "", "string", "health", "Motor-controller fault severity"),
    # body
    CatalogEntry("Vehicle.Cabin.Door.Row1.DriverSide.IsLocked", "", "bool", "body",
                 "Driver door locked"),
    CatalogEntry("Vehicle.Cabin.Door.Row1.PassengerSide.IsLocked", "", "bool", "body",
                 "Passenger door locked"),
    CatalogEntry("Vehicle.Body.Trunk.Rear.IsLocked", "", "bool", "body", "Tailgate locked"),
    CatalogEntry("Vehicle.Cabin.Door.Row1.DriverSide.IsOpen", "", "bool", "body",
                 "Driver door open"),
    CatalogEntry("Vehicle.Cabin.Door.Row1.PassengerSide.IsOpen", "", "bool", "body",
                 "Passenger door open"),
    CatalogEntry("Vehicle.Body.Trunk.Rear.IsOpen", "", "bool", "body", "Tailgate open"),
    CatalogEntry("Vehicle.LowVoltageSystemState", "", "string", "body",
                 "Ignition: OFF, ACC, ON, START"),
    CatalogEntry("Vehicle.LowVoltageBattery.CurrentVoltage", "V", "number", "health",
                 "12 V auxiliary battery voltage"),
    CatalogEntry("Vehicle.Body.LastLockSource", "", "string", "body",
                 "Who locked or unlocked last"),
    CatalogEntry("Vehicle.Body.CommandAckSeq", "", "number", "body",
                 "Sequence number of the last body command executed"),
    CatalogEntry("Vehicle.Exterior.AirTemperature", "degC", "number", "health",
                 "Outside air temperature"),
    # verdicts of the safety stage (docs/safety.md); set by the gateway, not mapped
    CatalogEntry("Vehicle.Safety.Motion", "", "string", "safety",
                 "stationary, moving or unknown (treat unknown as moving)"),
    CatalogEntry("Vehicle.Safety.PackOk", "", "bool", "safety",
                 "Battery data good and no critical battery alert"),
    CatalogEntry("Vehicle.Safety.ChargingAllowed", "", "bool", "safety",
                 "The gateway's safety checks allow charging now"),
    # position from the serial GNSS receiver (gateway/gnss), one fix shared by all
    CatalogEntry(f"{LOC}.Latitude", "deg", "number", "location", "Latitude (WGS 84)"),
    CatalogEntry(f"{LOC}.Longitude", "deg", "number", "location", "Longitude (WGS 84)"),
    CatalogEntry(f"{LOC}.Altitude", "m", "number", "location", "Altitude above mean sea level"),
    CatalogEntry(f"{LOC}.Heading", "deg", "number", "location",
                 "Course over ground, degrees from true north"),
    CatalogEntry(f"{LOC}.Speed", "km/h", "number", "location", "Speed over ground from GNSS"),
    CatalogEntry(f"{LOC}.HorizontalAccuracy", "m", "number", "location",
                 "Estimated horizontal error (HDOP x 5 m)"),
    CatalogEntry(f"{LOC}.Timestamp", "", "string", "location",
                 "The receiver's UTC time of the fix (ISO 8601)"),
    CatalogEntry(f"{LOC}.GNSSReceiver.FixType", "", "string", "location",
                 "NONE, TWO_D or THREE_D"),
    CatalogEntry(f"{LOC}.GNSSReceiver.SatellitesUsed", "", "number", "location",
                 "Satellites used in the fix"),
    CatalogEntry(f"{LOC}.GNSSReceiver.HDOP", "", "number", "location",
                 "Horizontal dilution of precision"),
    # battery insights computed by the gateway (gateway/insights), not mapped
    CatalogEntry(f"{TB}.EquivalentFullCycles", "", "number", "battery",
                 "Discharge throughput divided by the rated capacity"),
    CatalogEntry(f"{TB}.Estimate.Capacity", "Ah", "number", "battery",
                 "Capacity measured by coulomb counting over charging sessions"),
    CatalogEntry(f"{TB}.Estimate.StateOfHealth", "%", "number", "battery",
                 "Estimated capacity against the rated capacity"),
    CatalogEntry(f"{TB}.Estimate.Consumption", "Wh/km", "number", "battery",
                 "Recent energy per km from the last trips"),
    CatalogEntry(f"{TB}.Estimate.Range", "km", "number", "battery",
                 "Range left at the recent consumption"),
    CatalogEntry(f"{TB}.CellVoltage.Spread", "mV", "number", "battery",
                 "Highest minus lowest cell voltage at rest"),
    CatalogEntry(f"{TB}.CellVoltage.SpreadTrend", "mV/30d", "number", "battery",
                 "Change of the rest spread per 30 days (least squares)"),
]

CATALOG: dict[str, CatalogEntry] = {e.path: e for e in _ENTRIES}

_INDEXED = re.compile(r"\.(\d+)(?=\.|$)")


def lookup(path: str) -> CatalogEntry | None:
    """The catalog entry for ``path``; indexed paths (``Cell.7.Voltage``, ``Fault.X``) match
    their ``{n}`` template."""
    entry = CATALOG.get(path)
    if entry is not None:
        return entry
    template = _INDEXED.sub(".{n}", path)
    entry = CATALOG.get(template)
    if entry is not None:
        return entry
    # Named flags under a Fault branch share one template.
    head, _, _ = path.rpartition(".")
    return CATALOG.get(f"{head}.{{n}}")
