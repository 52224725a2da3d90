"""Encode engineering values into Modbus registers, as a device would hold them.

Kept independent of ``lmt.drivers``: the simulator is a peer of the drivers, not built on them,
so a shared encoding bug cannot hide behind both sides agreeing.
"""

from __future__ import annotations

import math
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

_FLOAT32_MAX = 3.4028234663852886e38

_INT_RANGES: dict[DataType, tuple[int, int]] = {
    DataType.INT16: (-(1 << 15), (1 << 15) - 1),
    DataType.UINT16: (0, (1 << 16) - 1),
    DataType.INT32: (-(1 << 31), (1 << 31) - 1),
    DataType.UINT32: (0, (1 << 32) - 1),
    DataType.INT64: (-(1 << 63), (1 << 63) - 1),
    DataType.UINT64: (0, (1 << 64) - 1),
}


def encode(value: float, point: Point) -> list[int]:
    """Registers holding ``value`` (engineering units) for a register point.

    The raw value is ``value / multiplier``; integer types are rounded and saturate at their
    range (a device clamps rather than wraps). Words are high-first for ``word_order = "big"``
    and low-first for ``"little"``; each word is big-endian, as on the wire.
    """
    if point.type is DataType.BOOL:
        raise ValueError(f"{point.name}: a bool point has no registers")
    raw: float = value / point.multiplier if point.multiplier != 1.0 else value
    packed: bytes
    if point.type in _INT_RANGES:
        lo, hi = _INT_RANGES[point.type]
        if math.isfinite(raw):
            raw_int = min(hi, max(lo, round(raw)))
        else:
            raw_int = 0 if math.isnan(raw) else (hi if raw > 0 else lo)
        packed = struct.pack(">" + _FORMATS[point.type], raw_int)
    else:
        if point.type is DataType.FLOAT32 and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
            raw = math.copysign(math.inf, raw)
        packed = struct.pack(">" + _FORMATS[point.type], raw)
    n = point.size
    words = list(struct.unpack(f">{n}H", packed))
    if point.word_order == "little":
        words.reverse()
    return words
