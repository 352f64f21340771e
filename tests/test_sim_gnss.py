"""The simulated receiver: its sentences are well-formed NMEA, and the gateway reads them back.

Checksums and formats are checked here with the test's own code, and the
parse-back goes through the gateway's real parser and reader, so the
simulator and the gateway have to agree with each other and with NMEA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os

import pytest

from gateway.clock import ManualClock, SystemClock
from gateway.gnss.fix import Fix
from gateway.gnss.geo import distance_m
from hil.sim.gnss import NmeaSimulator, run_receiver
from hil.sim.model import VehicleModel
from tests.gnss_helpers import Pty, make_parser, wait_until
from tests.test_gnss_reader import Rig

UTC = dt.datetime(2024, 2, 29, 23, 59, 58, 250_000, tzinfo=dt.UTC).timestamp()


def xor_ok(line: bytes) -> bool:
    body, _, check = line.rstrip(b"\r\n")[1:].rpartition(b"*")
    value = 0
    for byte in body:
        value ^= byte
    return check == f"{value:02X}".encode()


def parse_back(lines: list[bytes]) -> Fix:
    parser, counters = make_parser()
    for line in lines:
        assert parser.feed(line, 5.0) is None
    fix = parser.flush(5.1)
    assert fix is not None
    assert counters.snapshot("gnss.errors") == {}
    return fix


@pytest.mark.parametrize(("lat", "lon"), [(48.85837, 2.29448), (-33.8568, -70.65),
                                          (0.0000004, -179.9999996), (48.99999999, 9.5)])
def test_epoch_parses_back_to_the_model(lat: float, lon: float) -> None:
    model = VehicleModel(lat=lat, lon=lon, heading_deg=271.25, speed_kmh=47.3)
    fix = parse_back(NmeaSimulator(model).epoch(UTC))
    assert fix.position is not None and distance_m(fix.position, (lat, lon)) < 1.0
    assert fix.speed_kmh == pytest.approx(47.3, abs=0.001)
    assert fix.heading == 271.25
    assert (fix.fix_type, fix.satellites, fix.hdop, fix.alt) == ("THREE_D", 9, 0.9, 35.0)
    assert fix.utc == pytest.approx(UTC)


def test_sentences_are_well_formed_in_ublox_order() -> None:
    sim = NmeaSimulator(VehicleModel(lat=-33.8568, lon=-70.65))
    lines = sim.epoch(UTC)
    assert all(line.startswith(b"$") and line.endswith(b"\r\n") for line in lines)
    assert all(len(line) <= 82 and xor_ok(line) for line in lines)
    kinds = [line[3:6].decode() for line in lines]
    assert kinds == ["RMC", "VTG", "GGA", "GSA", "GSA", "GSA", "GSV", "GLL"]
    assert lines[0].startswith(b"$GNRMC,235958.25,A,3351.40800,S,07039.00000,W,")
    assert b",290224," in lines[0]
    assert [k for k in (line[3:6].decode() for line in sim.epoch(UTC + 1))] == [
        "RMC", "VTG", "GGA", "GSA", "GSA", "GSA", "GLL"]  # satellites in view only now and then


def test_single_constellation_talker() -> None:
    lines = NmeaSimulator(VehicleModel(), talker="GP", satellites=7).epoch(UTC)
    assert [line[1:6] for line in lines if b"GSA" in line] == [b"GPGSA"]
    assert parse_back(lines).satellites == 7


def test_lost_fix_matches_a_real_receiver() -> None:
    model = VehicleModel(gnss_fix=False)
    lines = NmeaSimulator(model, talker="GP").epoch(UTC)
    # As captured from a u-blox receiver without a fix.
    assert b"$GPGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99*30\r\n" in lines
    fix = parse_back(lines)
    assert (fix.fix_type, fix.position, fix.speed_kmh) == ("NONE", None, None)
    assert fix.utc == pytest.approx(UTC)  # the receiver still knows the time


def test_corrupt_checksums_hit_exactly_the_next_sentences() -> None:
    sim = NmeaSimulator(VehicleModel())
    sim.corrupt_checksums = 2
    lines = sim.epoch(UTC)
    assert [xor_ok(line) for line in lines] == [False, False] + [True] * (len(lines) - 2)
    assert sim.corrupt_checksums == 0
    parser, counters = make_parser()
    for line in lines:
        parser.feed(line, 1.0)
    fix = parser.flush(1.1)
    assert fix is not None and fix.valid and fix.speed_kmh is None  # RMC and VTG were lost
    assert counters.get("gnss.errors.checksum") == 2


def test_noise_and_silence() -> None:
    sim = NmeaSimulator(VehicleModel())
    sim.inject_noise = True
    noisy = sim.epoch(UTC)
    assert noisy[0].startswith(b"\xb5\x62") and not noisy[0].isascii()
    assert all(xor_ok(line) for line in noisy[1:])
    sim.silent = True
    assert sim.epoch(UTC + 1) == []


async def test_receiver_over_a_pty_to_the_gateway_reader() -> None:
    pty = Pty()
    model = VehicleModel(lat=51.5, lon=-0.12)
    sim = NmeaSimulator(model)
    sim.inject_noise = True
    rig = Rig(pty.path, idle_flush=0.02)
    await rig.start()
    await wait_until(lambda: rig.reader.connected, "the port to open")
    stop = asyncio.Event()
    sender = asyncio.create_task(run_receiver(pty.master, sim, SystemClock(), stop, 20.0))
    try:
        await wait_until(lambda: len(rig.fixes) >= 3, "fixes from the simulator")
        model.lat += 0.001  # the caller moves the model; the receiver reports it
        await wait_until(lambda: rig.fixes[-1].lat is not None and rig.fixes[-1].lat > 51.5005,
                         "the moved position")
    finally:
        stop.set()
        epochs = await sender
        await rig.stop()
        pty.unplug()
    assert epochs >= 4
    assert rig.counters.get("gnss.errors.garbage") >= 1  # the UBX frames
    assert rig.counters.get("gnss.errors.checksum") == 0
    fix = rig.fixes[-1]
    assert fix.position is not None and distance_m(fix.position, (model.lat, model.lon)) < 1.0


async def test_run_receiver_counts_epochs_and_stops() -> None:
    read_end, write_end = os.pipe()
    sim = NmeaSimulator(VehicleModel())
    stop = asyncio.Event()
    task = asyncio.create_task(run_receiver(write_end, sim, SystemClock(), stop, rate_hz=50.0))
    await wait_until(lambda: sim.epochs >= 3, "three epochs")
    sim.silent = True
    silent_from = sim.epochs
    await asyncio.sleep(0.05)
    stop.set()
    written = await asyncio.wait_for(task, 5.0)
    assert written == silent_from  # silent periods send nothing and count nothing
    os.set_blocking(read_end, False)
    data = os.read(read_end, 1 << 20)
    assert data.count(b"RMC,") == written
    assert all(xor_ok(line) for line in data.splitlines())
    os.close(read_end)
    os.close(write_end)


async def test_run_receiver_ends_quietly_when_the_line_is_gone() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stop = asyncio.Event()
    written = await asyncio.wait_for(
        run_receiver(write_end, NmeaSimulator(VehicleModel()), ManualClock(), stop), 5.0)
    assert written == 0 and not stop.is_set()
    os.close(write_end)
