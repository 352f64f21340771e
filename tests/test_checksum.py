"""The checksum registry: CRC-8 SAE J1850 against crccheck, the simple sums, registration."""

from __future__ import annotations

import uuid

import pytest
from crccheck.crc import Crc8SaeJ1850
from hypothesis import given
from hypothesis import strategies as st

from gateway import checksum
from gateway.app import Pipeline
from gateway.clock import ManualClock
from gateway.config import load_profile
from tests.safety_frames import RefFrames, write_profile


@given(st.binary(max_size=64))
def test_crc8_j1850_matches_crccheck(data):
    assert checksum.crc8_j1850_bytes(data) == Crc8SaeJ1850.calc(data)


def test_crc8_j1850_standard_check_value():
    assert checksum.crc8_j1850_bytes(b"123456789") == 0x4B
    assert Crc8SaeJ1850.calc(b"123456789") == 0x4B


@given(st.binary(min_size=1, max_size=8), st.data())
def test_crc8_j1850_skips_the_checksum_byte_and_ignores_the_id(data, draw):
    index = draw.draw(st.integers(0, len(data) - 1))
    expected = Crc8SaeJ1850.calc(data[:index] + data[index + 1:])
    assert checksum.crc8_j1850(data, index, 0x200) == expected
    assert checksum.crc8_j1850(data, index, 0x18FF50E5) == expected
    # Whatever sits in the checksum byte does not change the result.
    patched = data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]
    assert checksum.crc8_j1850(patched, index, 0x200) == expected


def test_xor8_by_hand():
    assert checksum.xor8(bytes([0x12, 0x34, 0x56, 0xFF]), 3, 0x100) == 0x70
    assert checksum.xor8(bytes([0x12, 0x34, 0x56, 0xFF]), 2, 0x100) == 0xD9
    assert checksum.xor8(bytes([0xAB]), 0, 0x100) == 0x00
    # The frame ID is not part of it.
    assert checksum.xor8(bytes([0x12, 0x34, 0x56, 0xFF]), 3, 0x7FF) == 0x70


def test_sum8_with_id_by_hand():
    # 1+2+...+7 = 28, ID 0x123 -> bytes 00 00 01 23 = 36, length 8: 72 = 0x48.
    assert checksum.sum8_with_id(bytes([1, 2, 3, 4, 5, 6, 7, 0x99]), 7, 0x123) == 0x48
    # 7 * 0xFF + (0x18 + 0xFF + 0x50 + 0xE5) + 8 = 2381, modulo 256 = 0x4D.
    assert checksum.sum8_with_id(bytes([0xFF] * 8), 0, 0x18FF50E5) == 0x4D
    # The length counts.
    # 1 + 2 + length 3 = 6; with a fourth byte (zero), 1 + 2 + 0 + length 4 = 7.
    assert checksum.sum8_with_id(bytes([1, 2, 0]), 2, 0) == 6
    assert checksum.sum8_with_id(bytes([1, 2, 0, 0]), 3, 0) == 7


def test_builtin_algorithms_by_name():
    assert checksum.algorithm("crc8_j1850") is checksum.crc8_j1850
    assert checksum.algorithm("xor8") is checksum.xor8
    assert checksum.algorithm("sum8_with_id") is checksum.sum8_with_id
    assert {"crc8_j1850", "sum8_with_id", "xor8"} <= set(checksum.names())
    assert checksum.names() == sorted(checksum.names())


def test_unknown_algorithm_is_a_key_error():
    with pytest.raises(KeyError):
        checksum.algorithm("crc99_nope")


def test_registered_algorithm_is_usable_by_a_profile(tmp_path):
    name = f"test_not_{uuid.uuid4().hex[:8]}"

    def inverted(data: bytes, index: int, frame_id: int) -> int:
        return checksum.crc8_j1850(data, index, frame_id) ^ 0xFF

    checksum.register(name, inverted)
    assert checksum.algorithm(name) is inverted
    assert name in checksum.names()

    # A vehicle port's own algorithm drives the receive check like a built-in one.
    path = write_profile(tmp_path, f"""
[messages.BMS_Pack]
checksum = "BMS_Pack_Checksum"
checksum_algorithm = "{name}"
""")
    clock = ManualClock()
    pipeline = Pipeline.build(load_profile(path), clock)
    frames = RefFrames()
    good = bytearray(frames.payload("BMS_Pack", {"BMS_PackVoltage": 99.0}))
    good[7] ^= 0xFF  # what the custom algorithm expects
    pipeline.decoders["vehicle"].process([frames.frame("BMS_Pack", clock.time(),
                                                       data=bytes(good))])
    path_v = "Vehicle.Powertrain.TractionBattery.CurrentVoltage"
    assert pipeline.store.good_value(path_v, clock.time()) == 99.0
    # A plain J1850 CRC is now the wrong checksum.
    pipeline.decoders["vehicle"].process([frames.frame("BMS_Pack", clock.time(),
                                                       {"BMS_PackVoltage": 98.0})])
    assert pipeline.counters.get("rx.BMS_Pack.bad_checksum") == 1


def test_registering_a_taken_name_fails_and_keeps_the_original():
    with pytest.raises(ValueError, match="already registered"):
        checksum.register("crc8_j1850", checksum.xor8)
    assert checksum.algorithm("crc8_j1850") is checksum.crc8_j1850
