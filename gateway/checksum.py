"""Frame checksums, by name, for the receive checks and for frames the gateway sends.

A profile names the algorithm per message (``checksum_algorithm``); vehicles
differ, so the set is a registry that a vehicle port can extend with
:func:`register`. Every algorithm has the same shape: it gets the payload with
the checksum byte still in it, the index of that byte and the frame ID, and
returns the byte that belongs there.

CRC-8 SAE J1850 runs from a 256-entry table: one lookup per byte. crccheck's
bitwise version costs 11-30 µs per frame, too much for every received frame;
the table form is about 20 times faster (see bench/bench_safety.py).
"""

from __future__ import annotations

from collections.abc import Callable

Checksum = Callable[[bytes, int, int], int]
"""(payload, checksum byte index, frame ID) -> expected checksum byte."""


def _crc8_table(poly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_J1850 = _crc8_table(0x1D)


def crc8_j1850_bytes(data: bytes) -> int:
    """CRC-8 SAE J1850 (poly 0x1D, init 0xFF, xor-out 0xFF) of ``data``."""
    crc = 0xFF
    table = _J1850
    for b in data:
        crc = table[crc ^ b]
    return crc ^ 0xFF


def crc8_j1850(data: bytes, index: int, frame_id: int) -> int:
    """CRC-8 SAE J1850 over every payload byte except the checksum byte."""
    del frame_id  # the reference scheme does not fold the ID in
    return crc8_j1850_bytes(data[:index] + data[index + 1:])


def xor8(data: bytes, index: int, frame_id: int) -> int:
    """XOR of every payload byte except the checksum byte (common on older BMS boards)."""
    del frame_id
    out = 0
    for i, b in enumerate(data):
        if i != index:
            out ^= b
    return out


def sum8_with_id(data: bytes, index: int, frame_id: int) -> int:
    """Sum of the other payload bytes, the ID's bytes and the length, modulo 256.

    The additive scheme several Asian makers use for powertrain frames.
    """
    total = sum(b for i, b in enumerate(data) if i != index)
    total += sum(frame_id.to_bytes(4, "big")) + len(data)
    return total & 0xFF


_REGISTRY: dict[str, Checksum] = {
    "crc8_j1850": crc8_j1850,
    "xor8": xor8,
    "sum8_with_id": sum8_with_id,
}


def register(name: str, algorithm: Checksum) -> None:
    """Make ``algorithm`` available to profiles as ``checksum_algorithm = name``."""
    if name in _REGISTRY:
        raise ValueError(f"checksum algorithm {name!r} is already registered")
    _REGISTRY[name] = algorithm


def algorithm(name: str) -> Checksum:
    """The algorithm called ``name``; KeyError if there is none."""
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)
