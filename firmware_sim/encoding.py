"""Encode engineering values into Modbus registers, as a device would hold them.

Kept independent of ``lmt.drivers``: the simulator is a peer of the drivers, not built on them,
so a shared encoding bug cannot hide behind both sides agreeing. This module therefore works
on plain integers (bit patterns) where the driver's codec works with ``struct`` formats.

How a value is laid out, from the engineering value to the registers on the wire:

1. ``raw = (value - offset) / multiplier`` (a point reads ``raw * multiplier + offset``);
   integer types round and saturate at their range (a device clamps rather than wraps).
2. The raw value becomes an N-bit pattern: two's complement for signed types, IEEE 754 for
   floats. A bit field (``bit = k``) holds the value's truth in bit ``k``, other bits zero.
3. The pattern is cut into 16-bit words, most significant first; ``word_order = "little"``
   reverses the words, ``byte_order = "little"`` swaps the two bytes inside every word.

A value that is not available (``None`` or NaN) is stored as the point's first ``invalid``
sentinel when it declares one; otherwise a float point holds NaN and an integer point 0.
"""

from __future__ import annotations

import math
import struct

from lmt.config.profiles import DataType, Point

_SIGNED = {DataType.INT16, DataType.INT32, DataType.INT64}
_FLOATS = {DataType.FLOAT32: ">f", DataType.FLOAT64: ">d"}
_FLOAT32_MAX = 3.4028234663852886e38


def _bits(point: Point) -> int:
    assert point.type is not None
    return 16 * point.type.registers


def _int_range(point: Point) -> tuple[int, int]:
    n = _bits(point)
    if point.type in _SIGNED:
        return -(1 << (n - 1)), (1 << (n - 1)) - 1
    return 0, (1 << n) - 1


def _to_words(pattern: int, point: Point) -> list[int]:
    """Cut an N-bit unsigned pattern into words in the point's word and byte order."""
    n = point.size
    words = [(pattern >> (16 * (n - 1 - i))) & 0xFFFF for i in range(n)]
    if point.word_order == "little":
        words.reverse()
    if point.byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words


def _from_words(registers: list[int] | tuple[int, ...], point: Point) -> int:
    """The N-bit unsigned pattern held in ``registers`` (the inverse of :func:`_to_words`)."""
    words = [int(w) & 0xFFFF for w in registers]
    if point.byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if point.word_order == "little":
        words.reverse()
    pattern = 0
    for w in words:
        pattern = (pattern << 16) | w
    return pattern


def _sentinel_pattern(sentinel: int, point: Point) -> int:
    """A declared sentinel as an N-bit pattern (negative sentinels in two's complement)."""
    return sentinel & ((1 << _bits(point)) - 1)


def encode(value: float | bool | None, point: Point) -> list[int]:
    """Registers holding ``value`` (engineering units) for a register point.

    The raw value is ``(value - offset) / multiplier``; integer types are rounded and saturate
    at their range. ``None``/NaN is stored as the first ``invalid`` sentinel if the point has
    one, else as NaN (floats) or 0 (integers). A bit field sets bit ``point.bit`` when
    ``value`` is true and leaves every other bit 0.
    """
    if point.type is None or point.type is DataType.BOOL:
        raise ValueError(f"{point.name}: a bool point has no registers")
    unavailable = value is None or (isinstance(value, float) and math.isnan(value))
    if unavailable and point.invalid:
        return _to_words(_sentinel_pattern(point.invalid[0], point), point)
    if point.bit is not None:
        on = not unavailable and bool(value)
        return _to_words((1 << point.bit) if on else 0, point)
    if point.type in _FLOATS:
        raw = math.nan if value is None else (float(value) - point.offset) / point.multiplier
        if point.type is DataType.FLOAT32 and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
            raw = math.copysign(math.inf, raw)
        pattern = int.from_bytes(struct.pack(_FLOATS[point.type], raw), "big")
        return _to_words(pattern, point)
    lo, hi = _int_range(point)
    if value is None:
        raw_int = 0
    elif isinstance(value, int) and point.multiplier == 1.0 and point.offset == 0.0:
        raw_int = min(hi, max(lo, value))  # exact, also beyond float's 53 bits
    else:
        raw = (float(value) - point.offset) / point.multiplier
        if math.isnan(raw):
            raw_int = 0
        elif math.isinf(raw):
            raw_int = hi if raw > 0 else lo
        else:
            raw_int = min(hi, max(lo, round(raw)))
    return _to_words(raw_int & ((1 << _bits(point)) - 1), point)


def decode(registers: list[int] | tuple[int, ...], point: Point) -> float | bool | None:
    """The engineering value a master wrote into ``registers`` (the inverse of :func:`encode`).

    Used by the simulator to understand writes to its holding registers. ``None`` for a
    declared ``invalid`` sentinel or a NaN float.
    """
    if point.type is None or point.type is DataType.BOOL:
        raise ValueError(f"{point.name}: a bool point has no registers")
    if len(registers) != point.size:
        raise ValueError(f"{point.name}: expected {point.size} registers, got {len(registers)}")
    pattern = _from_words(registers, point)
    n = _bits(point)
    if point.type in _FLOATS:
        raw: float | int = struct.unpack(_FLOATS[point.type], pattern.to_bytes(n // 8, "big"))[0]
    elif point.type in _SIGNED and pattern >> (n - 1):
        raw = pattern - (1 << n)
    else:
        raw = pattern
    if any(_sentinel_pattern(s, point) == pattern for s in point.invalid):
        return None
    if isinstance(raw, float) and math.isnan(raw):
        return None
    if point.bit is not None:
        return bool((pattern >> point.bit) & 1)
    return raw * point.multiplier + point.offset
