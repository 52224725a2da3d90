"""Register encoding and decoding for profile points.

Modbus registers are 16-bit words sent big-endian (high byte first). A point's raw value is
laid out over ``point.size`` registers:

* ``word_order = "big"`` (the Modbus convention): the most significant word first;
  ``"little"``: the least significant word first (Carlo Gavazzi's "LSW first", "CDAB").
* ``byte_order = "big"`` (the convention): each register high byte first; ``"little"``: the two
  bytes of every register swapped ("BADC"; with little word order too, "DCBA").

A point's engineering value is ``raw * multiplier + offset``. A bit field (``bit = k``) decodes
to ``bool`` (bit ``k`` of the unsigned pattern). A raw value listed in ``invalid`` decodes to
``None`` (the device says "not available"), and so does a NaN float. A sentinel matches when it
equals the raw value as typed (``-1`` for an int16 ``0xFFFF``) or the registers' unsigned bit
pattern (``0xFFFF``), so a profile can write it either way.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

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
_UNSIGNED: dict[int, str] = {1: "H", 2: "I", 4: "Q"}  # registers -> unsigned format
# precompiled: decoding runs for every point of every reading
_RAW = {t: struct.Struct(">" + f) for t, f in _FORMATS.items()}
_PATTERN = {n: struct.Struct(">" + f) for n, f in _UNSIGNED.items()}
_REGS = {t: t.registers for t in _FORMATS}


def _check_register_point(point: Point) -> DataType:
    if point.type is None or point.type is DataType.BOOL:
        raise ValueError(f"{point.name}: not a register point")
    return point.type


_WORDS = {n: struct.Struct(f">{n}H") for n in (1, 2, 3, 4)}  # n big-endian registers


def _wire_bytes(registers: Sequence[int], point: Point) -> bytes:
    """The value's bytes, most significant first, from registers as they came off the wire."""
    words = registers[::-1] if point.word_order == "little" else registers
    n = len(words)
    try:
        data = (_WORDS[n] if n in _WORDS else struct.Struct(f">{n}H")).pack(*words)
    except struct.error:  # a value outside 0..65535 (or not an integer)
        raise ValueError(f"{point.name}: register value out of range 0..65535: "
                         f"{list(registers)}") from None
    if point.byte_order == "little":
        data = b"".join(data[i + 1:i + 2] + data[i:i + 1] for i in range(0, len(data), 2))
    return data


def _registers(data: bytes, point: Point) -> list[int]:
    """Registers for the wire from the value's bytes (the inverse of :func:`_wire_bytes`)."""
    if point.byte_order == "little":
        data = b"".join(data[i + 1:i + 2] + data[i:i + 1] for i in range(0, len(data), 2))
    words = list(struct.unpack(f">{len(data) // 2}H", data))
    if point.word_order == "little":
        words.reverse()
    return words


def _is_sentinel(pattern: int, point: Point) -> bool:
    """Whether the registers' unsigned bit pattern is a declared sentinel.

    A sentinel may be written as the pattern (``0xFFFF``) or as the typed value (``-1`` for an
    int16): reduced modulo 2^bits both are the same pattern.
    """
    width = 1 << (16 * point.size)
    return any(pattern == s % width for s in point.invalid)


def decode_registers(registers: Sequence[int], point: Point) -> float | bool | None:
    """Decode ``point.size`` registers into the point's engineering value.

    Returns ``None`` for a declared ``invalid`` sentinel or a NaN float, ``bool`` for a bit
    field, else ``raw * multiplier + offset`` as a float.
    """
    dtype = _check_register_point(point)
    n = _REGS[dtype]
    if len(registers) != n:
        raise ValueError(f"{point.name}: expected {n} registers, got {len(registers)}")
    data = _wire_bytes(registers, point)
    raw = _RAW[dtype].unpack(data)[0]
    if point.invalid or point.bit is not None:
        pattern = _PATTERN[n].unpack(data)[0]
        if point.invalid and _is_sentinel(pattern, point):
            return None
        if point.bit is not None:
            return bool((pattern >> point.bit) & 1)
    if isinstance(raw, float) and math.isnan(raw):
        return None
    if point.multiplier == 1.0 and point.offset == 0.0:
        return float(raw)
    return raw * point.multiplier + point.offset


Decoder = Callable[[Sequence[int]], "float | bool | None"]


def decoder(point: Point) -> Decoder:
    """:func:`decode_registers` specialised for one point, for reading it again and again: the
    common case (registers most significant first, no sentinel, no bit field) without a
    branch; any other point through :func:`decode_registers` itself."""
    dtype = _check_register_point(point)
    n = _REGS[dtype]
    if point.word_order == "little" or point.byte_order == "little" or point.invalid \
            or point.bit is not None or n not in _WORDS:
        return lambda registers: decode_registers(registers, point)
    words, raw_s = _WORDS[n], _RAW[dtype]
    mul, off = point.multiplier, point.offset
    plain = mul == 1.0 and off == 0.0

    def decode(registers: Sequence[int]) -> float | bool | None:
        if len(registers) != n:
            return decode_registers(registers, point)  # the error, with its message
        try:
            raw = raw_s.unpack(words.pack(*registers))[0]
        except struct.error:
            return decode_registers(registers, point)
        if raw != raw:  # NaN
            return None
        return float(raw) if plain else raw * mul + off

    return decode


def encode_value(value: float | bool | None, point: Point,
                 registers: Sequence[int] | None = None) -> list[int]:
    """Encode an engineering value into registers (the inverse of :func:`decode_registers`).

    ``raw = (value - offset) / multiplier``, rounded for integer types; a value outside the
    type's range raises ``ValueError`` (a driver must not write a wrapped setpoint). ``None`` or
    NaN encodes the point's first ``invalid`` sentinel (NaN for a float point without one). For
    a bit field, ``registers`` are the current contents (default zeros): bit ``point.bit`` is
    set or cleared and every other bit kept, for a read-modify-write.
    """
    dtype = _check_register_point(point)
    n = point.size
    fmt = ">" + _FORMATS[dtype]
    if value is None or (isinstance(value, float) and math.isnan(value)):  # unavailable
        if point.invalid:
            pattern = point.invalid[0] % (1 << (16 * n))
            return _registers(struct.pack(">" + _UNSIGNED[n], pattern), point)
        if dtype in (DataType.FLOAT32, DataType.FLOAT64):
            return _registers(struct.pack(fmt, math.nan), point)
        raise ValueError(f"{point.name}: no value to encode and no invalid sentinel declared")
    if point.bit is not None:
        current = [0] * n if registers is None else list(registers)
        pattern = struct.unpack(">" + _UNSIGNED[n], _wire_bytes(current, point))[0]
        mask = 1 << point.bit
        pattern = (pattern | mask) if value else (pattern & ~mask)
        return _registers(struct.pack(">" + _UNSIGNED[n], pattern), point)
    raw: float | int
    if isinstance(value, int) and point.multiplier == 1.0 and point.offset == 0.0:
        raw = value  # exact: a 64-bit integer does not survive a trip through float
    else:
        raw = (float(value) - point.offset) / point.multiplier
    try:
        if dtype not in (DataType.FLOAT32, DataType.FLOAT64):
            raw = round(raw)
        data = struct.pack(fmt, raw)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"{point.name}: {value} does not fit a {dtype.value}") from exc
    return _registers(data, point)
