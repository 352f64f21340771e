"""A simulated u-blox style GNSS receiver: NMEA 0183 from the vehicle model's position.

It writes its sentences itself (nothing from the gateway's parser), in the
order and format of a u-blox M8/F9 in NMEA 4.10 mode: RMC, VTG, GGA, one GSA
per constellation, GSV now and then, GLL. Fault flags make it misbehave the
way real receivers and cables do: bad checksums, binary UBX frames between
epochs, silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random

from gateway.clock import Clock
from hil.sim.model import VehicleModel

KNOT_KMH = 1.852
GSV_EVERY = 5
"""Epochs between satellites-in-view reports (real receivers send them every epoch)."""
# (NMEA 4.10 systemId, first satellite number) of the constellations used by "GN" output.
_SYSTEMS = ((1, 1), (2, 65), (3, 1))


def checksum(body: str) -> str:
    """The two hex digits of the XOR of ``body`` (between '$' and '*')."""
    value = 0
    for ch in body.encode("ascii"):
        value ^= ch
    return f"{value:02X}"


def _angle(value: float, degree_digits: int) -> str:
    """Degrees as NMEA ddmm.mmmmm (dddmm.mmmmm for longitude), without the sign."""
    minutes_total = round(abs(value) * 60.0, 5)
    degrees, minutes = divmod(minutes_total, 60.0)
    return f"{int(degrees):0{degree_digits}d}{minutes:08.5f}"


class NmeaSimulator:
    """Builds one epoch of sentences at a time from ``model``."""

    def __init__(self, model: VehicleModel, talker: str = "GN", satellites: int = 9,
                 hdop: float = 0.9, altitude_m: float = 35.0) -> None:
        self.model = model
        self.talker = talker
        self.satellites = satellites
        self.hdop = hdop
        self.altitude_m = altitude_m
        self.corrupt_checksums = 0
        """The next N sentences get a wrong checksum."""
        self.inject_noise = False
        """Put a UBX-like binary frame before each epoch."""
        self.silent = False
        """Send nothing (an unplugged antenna cable on a receiver that then goes quiet)."""
        self.epochs = 0
        self._rng = random.Random(1)

    def epoch(self, utc: float) -> list[bytes]:
        """The sentences of the epoch at ``utc`` (epoch seconds), CRLF-terminated.

        With ``inject_noise`` the first item is a binary frame, not a sentence.
        """
        if self.silent:
            return []
        self.epochs += 1
        stamp = dt.datetime.fromtimestamp(utc, dt.UTC)
        hms = stamp.strftime("%H%M%S") + f".{stamp.microsecond // 10_000:02d}"
        dmy = stamp.strftime("%d%m%y")
        fixed = self.model.gnss_fix
        bodies = [self._rmc(hms, dmy, fixed), self._vtg(fixed), self._gga(hms, fixed)]
        bodies += self._gsa(fixed)
        if self.epochs % GSV_EVERY == 1:
            bodies.append(f"GPGSV,1,1,{min(self.satellites, 4):02d}"
                          + "".join(f",{sv:02d},{30 + 9 * sv % 50:02d},{37 * sv % 360:03d},"
                                    f"{38 + sv % 9:02d}"
                                    for sv in range(1, min(self.satellites, 4) + 1)))
        bodies.append(self._gll(hms, fixed))
        lines = [self._frame(body) for body in bodies]
        if self.inject_noise:
            lines.insert(0, self._noise())
        return lines

    def _frame(self, body: str) -> bytes:
        check = checksum(body)
        if self.corrupt_checksums > 0:
            self.corrupt_checksums -= 1
            check = f"{int(check, 16) ^ 0x5A:02X}"
        return f"${body}*{check}\r\n".encode("ascii")

    def _position(self) -> str:
        m = self.model
        return (f"{_angle(m.lat, 2)},{'N' if m.lat >= 0 else 'S'},"
                f"{_angle(m.lon, 3)},{'E' if m.lon >= 0 else 'W'}")

    def _rmc(self, hms: str, dmy: str, fixed: bool) -> str:
        t = self.talker
        if not fixed:
            return f"{t}RMC,{hms},V,,,,,,,{dmy},,,N,V"
        m = self.model
        return (f"{t}RMC,{hms},A,{self._position()},{m.speed_kmh / KNOT_KMH:.3f},"
                f"{m.heading_deg % 360.0:.2f},{dmy},,,A,V")

    def _vtg(self, fixed: bool) -> str:
        if not fixed:
            return f"{self.talker}VTG,,T,,M,,N,,K,N"
        m = self.model
        return (f"{self.talker}VTG,{m.heading_deg % 360.0:.2f},T,,M,"
                f"{m.speed_kmh / KNOT_KMH:.3f},N,{m.speed_kmh:.3f},K,A")

    def _gga(self, hms: str, fixed: bool) -> str:
        if not fixed:
            return f"{self.talker}GGA,{hms},,,,,0,00,99.99,,,,,,"
        return (f"{self.talker}GGA,{hms},{self._position()},1,{self.satellites:02d},"
                f"{self.hdop:.2f},{self.altitude_m:.1f},M,47.0,M,,")

    def _gsa(self, fixed: bool) -> list[str]:
        if self.talker != "GN":
            svs = list(range(1, self.satellites + 1)) if fixed else []
            return [self._gsa_body(self.talker, svs, None, fixed)]
        shares: list[list[int]] = [[] for _ in _SYSTEMS]
        for k in range(self.satellites if fixed else 0):
            shares[k % len(_SYSTEMS)].append(_SYSTEMS[k % len(_SYSTEMS)][1] + k // 3)
        return [self._gsa_body("GN", svs, system, fixed)
                for (system, _), svs in zip(_SYSTEMS, shares, strict=True)]

    def _gsa_body(self, talker: str, svs: list[int], system: int | None, fixed: bool) -> str:
        ids = ",".join([f"{sv:02d}" for sv in svs[:12]] + [""] * (12 - len(svs[:12])))
        dops = f"{self.hdop * 1.6:.2f},{self.hdop:.2f},{self.hdop * 1.3:.2f}" if fixed \
            else "99.99,99.99,99.99"
        tail = "" if system is None else f",{system}"
        return f"{talker}GSA,A,{3 if fixed else 1},{ids},{dops}{tail}"

    def _gll(self, hms: str, fixed: bool) -> str:
        if not fixed:
            return f"{self.talker}GLL,,,,,{hms},V,N"
        return f"{self.talker}GLL,{self._position()},{hms},A,A"

    def _noise(self) -> bytes:
        """A UBX-framed NAV message of random payload, with a line end and a '$' inside."""
        payload = bytes(self._rng.randrange(256) for _ in range(28)) + b"\n$\x00"
        frame = bytes([0x01, 0x07]) + len(payload).to_bytes(2, "little") + payload
        ck_a = ck_b = 0
        for byte in frame:
            ck_a = (ck_a + byte) & 0xFF
            ck_b = (ck_b + ck_a) & 0xFF
        return b"\xb5\x62" + frame + bytes([ck_a, ck_b])


async def run_receiver(fd: int, sim: NmeaSimulator, clock: Clock, stop: asyncio.Event,
                       rate_hz: float = 1.0) -> int:
    """Write one epoch per ``1 / rate_hz`` s to ``fd`` (a pty master) until ``stop``.

    The model is not stepped here; the caller runs it. Returns the number of
    epochs written in full. A write error (the other end gone) ends it quietly,
    and a full buffer drops the rest of the epoch, as a receiver's UART would.
    """
    os.set_blocking(fd, False)  # a reader that stopped reading must not stall the loop
    written = 0
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            lines = sim.epoch(clock.time())
            if lines:
                try:
                    _write_all(fd, b"".join(lines))
                    written += 1
                except BlockingIOError:
                    pass  # the reader fell behind: the rest of this epoch is lost
                except OSError:
                    return written
            sleeper = asyncio.ensure_future(clock.sleep(1.0 / rate_hz))
            await asyncio.wait((stopper, sleeper), return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
    return written


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
