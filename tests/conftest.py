"""Shared fixtures: repository paths, the reference profile, a pipeline on a manual clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import pytest

from gateway.app import Pipeline
from gateway.checksum import crc8_j1850_bytes
from gateway.clock import ManualClock
from gateway.config import Profile, load_profile
from hil.broker import Mosquitto, find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
DBC = ROOT / "dbc"
REF_PROFILE = DBC / "profiles" / "microev-ref.toml"
AMI_PROFILE = DBC / "profiles" / "citroen-ami.toml"
DATA = Path(__file__).resolve().parent / "data"
# CI clones the repository with shared/ beside it.
SHARED_DBC = ROOT.parent / "shared" / "data" / "real-dbc"
FOXBMS = SHARED_DBC / "foxbms"


@pytest.fixture
def clock() -> ManualClock:
    """A clock that only moves when the test moves it."""
    return ManualClock()


@pytest.fixture(scope="session")
def ref_profile() -> Profile:
    """The reference micro-EV profile."""
    return load_profile(REF_PROFILE)


@pytest.fixture
def ref_pipeline(ref_profile: Profile, clock: ManualClock) -> Pipeline:
    """A fresh pipeline for the reference vehicle on the manual clock."""
    return Pipeline.build(ref_profile, clock)


@pytest.fixture
def foxbms_dir() -> Path:
    """The real foxBMS DBC and trace from shared/ (skipped when shared/ is not beside the repo)."""
    if not (FOXBMS / "foxbms.dbc").is_file():
        pytest.skip(f"shared real-dbc data not found at {FOXBMS}")
    return FOXBMS


def seal(data: bytes | bytearray, counter: int | None = None) -> bytes:
    """A reference-DBC payload with its CRC-8 J1850 in byte 7 (and the 4-bit counter at
    bits 48-51, if given), as the reference profile's receive checks expect."""
    out = bytearray(data)
    if counter is not None:
        out[6] = (out[6] & 0xF0) | (counter & 0x0F)
    out[7] = crc8_j1850_bytes(bytes(out[:7]))
    return bytes(out)


def frame(
    arbitration_id: int, data: bytes | list[int], ts: float, *, extended: bool = False,
    **kwargs: Any,
) -> can.Message:
    """A CAN frame with a source timestamp."""
    return can.Message(arbitration_id=arbitration_id, data=bytes(data), timestamp=ts,
                       is_extended_id=extended, **kwargs)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private mosquitto on a free port, stopped after the test."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests through `bash deploy/dev.sh test`")
    m = Mosquitto(tmp_path / "broker")
    m.start()
    try:
        yield m
    finally:
        m.stop()
