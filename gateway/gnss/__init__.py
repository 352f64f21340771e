"""GNSS: NMEA from a serial receiver, one position fix per epoch, and its publish policy."""
