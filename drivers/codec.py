"""Register encoding and decoding for profile points.

Modbus registers are big-endian 16-bit words. A multi-register value is either high word
first (``word_order = "big"``, the Modbus convention) or low word first (``"little"``).
A point's engineering value is ``raw * multiplier``.
"""

from __future__ import annotations

import struct

from lmt.config.profiles import DataType, Point

_FORMATS: dict[DataType, str] = {
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
    DataType.FLOAT32: "f",
    DataType.FLOAT64: "d",
}


def decode_registers(registers: list[int] | tuple[int, ...], point: Point) -> float:
    """Decode ``point.size`` registers into the point's engineering value."""
    n = point.size
    if len(registers) != n:
        raise ValueError(f"{point.name}: expected {n} registers, got {len(registers)}")
    words = list(registers)
    if point.word_order == "little":
        words.reverse()
    raw = struct.unpack(">" + _FORMATS[point.type], struct.pack(f">{n}H", *words))[0]
    if point.multiplier == 1.0:
        return float(raw)
    return raw * point.multiplier


def encode_value(value: float, point: Point) -> list[int]:
    """Encode an engineering value into registers (the inverse of :func:`decode_registers`)."""
    raw: float | int = value / point.multiplier if point.multiplier != 1.0 else value
    if point.type not in (DataType.FLOAT32, DataType.FLOAT64):
        raw = round(raw)
    n = point.size
    words = list(struct.unpack(f">{n}H", struct.pack(">" + _FORMATS[point.type], raw)))
    if point.word_order == "little":
        words.reverse()
    return words
