"""Declarative HIL scenarios: the file format, the real-time car, the rig and the checks."""
