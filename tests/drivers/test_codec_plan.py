"""Register decoding and read planning."""

from __future__ import annotations

import struct

import pytest

from lmt.config.profiles import DataType, Point, Table
from lmt.drivers.codec import decode_registers, encode_value
from lmt.drivers.plan import MAX_REGISTERS, plan_reads


def pt(name: str, address: int, type_: str = "float32", table: str = "input", **kw: object) -> Point:
    return Point(name=name, table=Table(table), address=address, type=DataType(type_), **kw)


def test_float32_big_and_little_word_order() -> None:
    words = list(struct.unpack(">2H", struct.pack(">f", 230.5)))
    assert decode_registers(words, pt("v", 0)) == pytest.approx(230.5)
    assert decode_registers(words[::-1], pt("v", 0, word_order="little")) == pytest.approx(230.5)


@pytest.mark.parametrize("type_,value", [("int16", -1234), ("uint16", 65000), ("int32", -70000),
                                          ("uint32", 4_000_000_000), ("int64", -2**40),
                                          ("float64", 1234.5678)])
@pytest.mark.parametrize("order", ["big", "little"])
def test_round_trip(type_: str, value: float, order: str) -> None:
    p = pt("x", 0, type_, table="holding", word_order=order)
    assert decode_registers(encode_value(value, p), p) == pytest.approx(value)


def test_multiplier() -> None:
    p = pt("e", 0, "uint32", table="holding", multiplier=0.01)
    assert decode_registers([0, 12345], p) == pytest.approx(123.45)
    assert encode_value(123.45, p) == [0, 12345]


def test_wrong_register_count_raises() -> None:
    with pytest.raises(ValueError):
        decode_registers([1], pt("v", 0))


def test_plan_merges_bridges_and_splits() -> None:
    pts = [pt("a", 0), pt("b", 2), pt("c", 10), pt("d", 100)]
    blocks = plan_reads(pts, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 12), (100, 2)]
    blocks = plan_reads(pts, max_gap=0)
    assert [(b.address, b.count) for b in blocks] == [(0, 4), (10, 2), (100, 2)]


def test_plan_respects_protocol_limit_and_tables() -> None:
    pts = [pt(f"p{i}", i * 2) for i in range(100)]  # 200 contiguous registers
    blocks = plan_reads(pts, max_gap=8)
    assert all(b.count <= MAX_REGISTERS for b in blocks)
    assert sum(len(b.points) for b in blocks) == 100 and len(blocks) == 2
    mixed = [pt("h", 0, table="holding"), pt("i", 0), pt("c", 0, "bool", table="coil")]
    assert len(plan_reads(mixed, max_gap=8)) == 3
