"""Simulated reference micro-EV: a physical model and the ECUs that put it on CAN."""

from hil.sim.ecus import VehicleEcus
from hil.sim.model import DriveCycle, VehicleModel

__all__ = ["DriveCycle", "VehicleEcus", "VehicleModel"]
