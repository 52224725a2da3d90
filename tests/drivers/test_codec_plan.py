"""Register decoding and read planning."""

from __future__ import annotations

import itertools
import math
import random
import struct

import pytest

from lmt.config.profiles import DataType, Point, Table, available_profiles, load_profile
from lmt.drivers.codec import decode_registers, decoder, encode_value
from lmt.drivers.plan import (
    MAX_BITS,
    MAX_REGISTERS,
    Block,
    CostModel,
    due_points,
    max_age_s,
    min_transactions,
    plan_due,
    plan_reads,
)
from lmt.firmware_sim.encoding import decode as sim_decode
from lmt.firmware_sim.encoding import encode as sim_encode


def pt(name: str, address: int, type_: str = "float32", table: str = "input", **kw: object) -> Point:
    return Point(name=name, table=Table(table), address=address, type=DataType(type_), **kw)


# -- decoding and encoding -----------------------------------------------------------------------


def test_float32_big_and_little_word_order() -> None:
    words = list(struct.unpack(">2H", struct.pack(">f", 230.5)))
    assert decode_registers(words, pt("v", 0)) == pytest.approx(230.5)
    assert decode_registers(words[::-1], pt("v", 0, word_order="little")) == pytest.approx(230.5)


@pytest.mark.parametrize("type_,value", [("int16", -1234), ("uint16", 65000), ("int32", -70000),
                                          ("uint32", 4_000_000_000), ("int64", -2**40),
                                          ("uint64", 2**63 + 2**20), ("float32", 1234.5),
                                          ("float64", 1234.5678)])
@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
def test_round_trip(type_: str, value: float, word_order: str, byte_order: str) -> None:
    p = pt("x", 0, type_, table="holding", word_order=word_order, byte_order=byte_order)
    assert decode_registers(encode_value(value, p), p) == pytest.approx(value)


# The bytes of 0x0102030405060708 (a uint64), as registers on the wire for every order.
_LAYOUTS = {
    ("big", "big"): [0x0102, 0x0304, 0x0506, 0x0708],        # ABCDEFGH, the Modbus convention
    ("little", "big"): [0x0708, 0x0506, 0x0304, 0x0102],     # GHEFCDAB, low word first
    ("big", "little"): [0x0201, 0x0403, 0x0605, 0x0807],     # BADCFEHG, bytes swapped
    ("little", "little"): [0x0807, 0x0605, 0x0403, 0x0201],  # HGFEDCBA, fully little-endian
}


@pytest.mark.parametrize("orders", list(_LAYOUTS))
def test_word_and_byte_order_layouts(orders: tuple[str, str]) -> None:
    word_order, byte_order = orders
    p = pt("x", 0, "uint64", table="holding", word_order=word_order, byte_order=byte_order)
    assert encode_value(0x0102030405060708, p) == _LAYOUTS[orders]
    assert decode_registers(_LAYOUTS[orders], p) == float(0x0102030405060708)
    assert sim_encode(0x0102030405060708, p) == _LAYOUTS[orders]
    p16 = pt("y", 0, "uint16", table="holding", byte_order=byte_order)
    assert decode_registers([0x1234], p16) == (0x1234 if byte_order == "big" else 0x3412)


def test_carlo_gavazzi_int32_lsw_first() -> None:
    p = pt("p", 0x28, "int32", table="holding", word_order="little", multiplier=0.1)
    # -1234.5 W = raw -12345 = 0xFFFFCFC7: low word 0xCFC7 first
    assert encode_value(-1234.5, p) == [0xCFC7, 0xFFFF]
    assert decode_registers([0xCFC7, 0xFFFF], p) == pytest.approx(-1234.5)


def test_multiplier_and_offset() -> None:
    p = pt("e", 0, "uint32", table="holding", multiplier=0.01)
    assert decode_registers([0, 12345], p) == pytest.approx(123.45)
    assert encode_value(123.45, p) == [0, 12345]
    # a temperature in 0.1 K: value degC = raw * 0.1 - 273.15
    k = pt("t", 0, "uint16", table="holding", multiplier=0.1, offset=-273.15)
    assert decode_registers([2981], k) == pytest.approx(24.95)
    assert encode_value(24.95, k) == [2981]
    assert sim_encode(24.95, k) == [2981]
    # int16 phase sequence: raw 0 -> 1 (in order), raw -1 -> 0 (reversed)
    seq = pt("s", 0, "int16", table="holding", offset=1.0)
    assert decode_registers([0], seq) == 1.0 and decode_registers([0xFFFF], seq) == 0.0


def test_bit_fields() -> None:
    p = pt("err", 300, "uint16", table="holding", bit=3)
    assert decode_registers([0b1000], p) is True
    assert decode_registers([0b0111], p) is False
    # encoding sets or clears that bit and keeps the others (read-modify-write)
    assert encode_value(True, p) == [0b1000]
    assert encode_value(True, p, registers=[0b0101]) == [0b1101]
    assert encode_value(False, p, registers=[0xFFFF]) == [0xFFF7]
    hi = pt("hi", 0, "uint32", table="holding", bit=20)  # a bit in the high word
    assert decode_registers([0x0010, 0x0000], hi) is True
    assert decode_registers([0x0000, 0x0010], pt("hi", 0, "uint32", table="holding", bit=20,
                                                  word_order="little")) is True
    assert sim_encode(1.0, p) == [0b1000] and sim_encode(0.0, p) == [0]


def test_invalid_sentinels_and_nan() -> None:
    u16 = pt("a", 0, "uint16", table="holding", invalid=(0xFFFF,))
    assert decode_registers([0xFFFF], u16) is None
    assert decode_registers([1], u16) == 1.0
    # a sentinel matches the typed raw value or the bit pattern: both spellings work
    for spelling in (0x8000, -32768):
        i16 = pt("b", 0, "int16", table="holding", invalid=(spelling,))
        assert decode_registers([0x8000], i16) is None
        assert encode_value(None, i16) == [0x8000]
        assert sim_encode(math.nan, i16) == [0x8000]
    i32 = pt("c", 0, "int32", table="holding", invalid=(0x7FFFFFFF,), multiplier=0.1)
    assert decode_registers([0x7FFF, 0xFFFF], i32) is None
    i32le = pt("c", 0, "int32", table="holding", invalid=(0x7FFFFFFF,), word_order="little")
    assert decode_registers([0xFFFF, 0x7FFF], i32le) is None
    i64 = pt("d", 0, "int64", table="holding", invalid=(-(2**63),))
    assert decode_registers([0x8000, 0, 0, 0], i64) is None
    assert sim_encode(None, i64) == [0x8000, 0, 0, 0]
    # NaN floats are "not available" with or without a sentinel
    f32 = pt("f", 0)
    assert decode_registers(list(struct.unpack(">2H", struct.pack(">f", math.nan))), f32) is None
    assert decode_registers([0xFFC0, 0x0000], f32) is None
    assert decode_registers(encode_value(math.nan, pt("g", 0, "float64")), pt("g", 0, "float64")) \
        is None
    # a bit field whose register reads the sentinel is not available either
    bits = pt("e", 0, "uint16", table="holding", bit=0, invalid=(0xFFFF,))
    assert decode_registers([0xFFFF], bits) is None


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_value(70000, pt("x", 0, "uint16", table="holding"))
    with pytest.raises(ValueError, match="does not fit"):
        encode_value(-1, pt("x", 0, "uint32", table="holding"))
    with pytest.raises(ValueError, match="no invalid sentinel"):
        encode_value(None, pt("x", 0, "int16", table="holding"))
    # the simulator clamps instead, as a device would
    assert sim_encode(70000, pt("x", 0, "uint16", table="holding")) == [0xFFFF]


def test_wrong_register_count_raises() -> None:
    with pytest.raises(ValueError):
        decode_registers([1], pt("v", 0))
    with pytest.raises(ValueError):
        decode_registers([0x1_0000, 0], pt("v", 0))


_TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]


def test_simulator_and_driver_agree_on_random_values() -> None:
    """Two independent implementations: what the simulator encodes, the driver decodes."""
    rng = random.Random(1)
    for _ in range(3000):
        type_ = rng.choice(_TYPES)
        dtype = DataType(type_)
        kw: dict[str, object] = {"word_order": rng.choice(["big", "little"]),
                                 "byte_order": rng.choice(["big", "little"])}
        bits = 16 * dtype.registers
        if type_.startswith("float"):
            raw: float = rng.uniform(-1e6, 1e6)
        else:
            lo = -(1 << (bits - 1)) if type_.startswith("int") else 0
            hi = (1 << (bits - 1)) - 1 if type_.startswith("int") else (1 << bits) - 1
            raw = rng.randint(max(lo, -(1 << 40)), min(hi, 1 << 40))
            kw["multiplier"] = rng.choice([1.0, 0.1, 0.01, 20.0])
            kw["offset"] = rng.choice([0.0, -40.0, 1.0])
        if not type_.startswith("float") and rng.random() < 0.3:
            kw["bit"] = rng.randrange(bits)
            kw.pop("multiplier", None)
            kw.pop("offset", None)
        p = pt("x", 0, type_, table="holding", **kw)
        value = raw * p.multiplier + p.offset if p.bit is None else bool(rng.getrandbits(1))
        words = sim_encode(value, p)
        assert all(0 <= w <= 0xFFFF for w in words) and len(words) == p.size
        got = decode_registers(words, p)
        if p.bit is not None:
            assert got is value
        elif dtype is DataType.FLOAT32:
            assert got == pytest.approx(value, rel=2**-23)
        else:
            assert got == pytest.approx(value, rel=1e-12, abs=abs(p.multiplier) * 1e-9)
        assert encode_value(value, p) == words  # and the driver encodes it the same way
        assert sim_decode(words, p) == got if got is not None else sim_decode(words, p) is None
        fast = decoder(p)(words)  # the specialised decoder the driver reads with
        assert fast == got and type(fast) is type(got)


def test_the_specialised_decoder_is_decode_registers() -> None:
    """Sentinels, NaN, bit fields, scaling, word orders and bad input: the same answers."""
    rng = random.Random(2)
    cases = [pt("v", 0, "float32", table="holding"), pt("v", 0, "int16", table="holding",
                                                         invalid=[0x8000]),
             pt("v", 0, "uint32", table="holding", multiplier=0.1, offset=-5.0),
             pt("v", 0, "uint16", table="holding", bit=3),
             pt("v", 0, "float64", table="holding", word_order="little"),
             pt("v", 0, "int32", table="holding", byte_order="little")]
    nan32 = list(struct.unpack(">2H", struct.pack(">f", math.nan)))
    for p in cases:
        for regs in ([rng.randrange(0x10000) for _ in range(p.size)] for _ in range(200)):
            want = decode_registers(regs, p)
            got = decoder(p)(regs)
            assert got == want or (got is None and want is None) or (
                isinstance(got, float) and math.isnan(got) and math.isnan(want))  # type: ignore[arg-type]
    assert decoder(cases[0])(nan32) is None and decode_registers(nan32, cases[0]) is None
    for p in cases[:3]:
        with pytest.raises(ValueError):
            decoder(p)([0x1_0000] * p.size)
        with pytest.raises(ValueError):
            decoder(p)([1] * (p.size + 1))


# -- planning: merging, limits, barriers ---------------------------------------------------------


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


def test_plan_bit_limit_is_2000() -> None:
    coils = [pt(f"c{i}", i, "bool", table="coil") for i in range(0, 4500, 3)]
    blocks = plan_reads(coils, max_gap=8)
    assert [b.count for b in blocks] == [1999, 1999, 496]  # 2000 bits would end past a coil
    assert all(b.count <= MAX_BITS for b in blocks)
    assert sum(len(b.points) for b in blocks) == len(coils)


def test_plan_never_spans_into_a_barrier() -> None:
    pts = [pt("a", 0), pt("b", 2), pt("energy", 4, barrier=True), pt("e2", 6)]
    blocks = plan_reads(pts, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 4), (4, 4)]
    # a block may start at the barrier, and a barrier that is not read still splits
    assert [(b.address, b.count) for b in plan_reads(pts[2:], max_gap=8)] == [(4, 4)]
    assert [(b.address, b.count) for b in plan_reads([pts[0], pts[3]], max_gap=8,
                                                     barriers=pts)] == [(0, 2), (6, 2)]


def test_cost_model_matches_max_gap() -> None:
    cost = CostModel.from_max_gap(8)
    assert cost.request_overhead == 9 and cost.max_gap == 8
    a, b = pt("a", 0), pt("b", 10)  # gap of 8: bridging (8) is cheaper than a request (9)
    one = plan_reads([a, b], max_gap=cost.max_gap)
    two = plan_reads([a, b], max_gap=cost.max_gap - 1)
    assert len(one) == 1 and len(two) == 2
    assert cost.cost(one) < cost.cost(two)
    # at 9600 baud (960 bytes/s) a 20 ms turnaround is worth ~10 registers on top of framing
    rtu = CostModel.from_link(round_trip_s=0.02, bytes_per_s=960, frame_bytes=13)
    assert rtu.request_overhead == pytest.approx(16.1) and rtu.max_gap == 16


# -- poll by age ---------------------------------------------------------------------------------


def test_due_points_by_age() -> None:
    power = pt("power_w", 0)
    energy = pt("import_energy_kwh", 2, poll="slow")
    pts = [power, energy]
    assert due_points(pts, {}, now=100.0, fast_interval_s=1.0, slow_interval_s=60.0) == pts
    last = {"power_w": 100.0, "import_energy_kwh": 100.0}
    assert due_points(pts, last, 100.5, 1.0, 60.0) == []
    assert due_points(pts, last, 101.0, 1.0, 60.0) == [power]  # as old as its max age: due
    assert due_points(pts, last, 160.0, 1.0, 60.0) == pts
    assert max_age_s(energy, 1.0, 60.0) == 60.0 and max_age_s(power, 1.0, 60.0) == 1.0


def test_plan_due_reads_only_what_is_due_and_free_riders() -> None:
    v = pt("voltage_v", 0)
    p = pt("power_w", 2)
    e = pt("energy_kwh", 4, poll="slow")
    far = pt("export_kwh", 40, poll="slow")
    pts = [v, p, e, far]
    last = {n.name: 0.0 for n in pts}
    blocks = plan_due(pts, last, now=1.0, fast_interval_s=1.0, slow_interval_s=60.0, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 4)]
    assert [q.name for q in blocks[0].points] == ["voltage_v", "power_w"]
    # energy due too: one block reaches it; the far export is not due but it is not free either
    last["energy_kwh"] = -60.0
    blocks = plan_due(pts, last, 1.0, 1.0, 60.0, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 6)]
    # only the energy is due, but the fast points sit inside its block: they ride along
    last.update(voltage_v=0.9, power_w=0.9)
    blocks = plan_due(pts, last, 1.0, 1.0, 60.0, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(4, 2)]
    assert plan_due(pts, {n.name: 1.0 for n in pts}, 1.0, 1.0, 60.0, max_gap=8) == []


def test_plan_due_keeps_barriers_of_points_not_due() -> None:
    a = pt("a", 0)
    wall = pt("wall", 4, poll="slow", barrier=True)
    b = pt("b", 6)
    blocks = plan_due([a, wall, b], {"wall": 0.0}, 1.0, 1.0, 60.0, max_gap=8)
    assert [(blk.address, blk.count) for blk in blocks] == [(0, 2), (6, 2)]


# -- the minimum number of transactions ----------------------------------------------------------


def _feasible(start: int, end: int, table_pts: list[Point], max_gap: int, limit: int) -> bool:
    """From first principles: may one request read ``[start, end)``?"""
    if end - start > limit:
        return False
    if any(q.barrier and start < q.address < end for q in table_pts):
        return False
    inside = [q for q in table_pts if start <= q.address and q.address + q.size <= end]
    used = set()
    for q in inside:
        used.update(range(q.address, q.address + q.size))
    run = 0
    for a in range(start, end):
        run = 0 if a in used else run + 1
        if run > max_gap:
            return False
    return True


def _brute_force_minimum(points: list[Point], max_gap: int, limit: int) -> int:
    """Fewest windows ``[s, e)`` (s a point start, e a point end) covering every point."""
    n = len(points)
    starts = {p.address for p in points}
    ends = {p.address + p.size for p in points}
    masks = []
    for s, e in itertools.product(starts, ends):
        if s < e and _feasible(s, e, points, max_gap, limit):
            masks.append(sum(1 << i for i, q in enumerate(points)
                             if s <= q.address and q.address + q.size <= e))
    best = {0: 0}
    frontier = [0]
    full = (1 << n) - 1
    while full not in best:
        nxt = []
        for covered in frontier:
            for m in masks:
                c = covered | m
                if c not in best:
                    best[c] = best[covered] + 1
                    nxt.append(c)
        frontier = nxt
    return best[full]


def _random_points(rng: random.Random) -> list[Point]:
    pts: list[Point] = []
    for i in range(rng.randint(1, 7)):
        type_ = rng.choice(["uint16", "float32", "uint64"])
        address = rng.randrange(0, 40)
        pts.append(pt(f"p{i}", address, type_, table="holding",
                      barrier=rng.random() < 0.15))
    # keep them disjoint (points of one register may share it only as bit fields: see below)
    pts.sort(key=lambda p: p.address)
    out: list[Point] = []
    for p in pts:
        if not out or p.address >= out[-1].address + out[-1].size:
            out.append(p)
    if rng.random() < 0.3:  # a second bit field on the first point's register
        first = out[0]
        out.append(pt("flag", first.address, "uint16", table="holding", bit=1))
    return out


def test_greedy_plan_is_minimal_against_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(600):
        points = _random_points(rng)
        max_gap = rng.choice([0, 1, 2, 4, 8])
        limit = rng.choice([4, 6, 10, 125])
        brute = _brute_force_minimum(points, max_gap, limit)
        greedy = _plan_with_limit(points, max_gap, limit)
        assert len(greedy) == brute, (points, max_gap, limit)
        assert _min_with_limit(points, max_gap, limit) == brute
        for b in greedy:
            assert _feasible(b.address, b.end, points, max_gap, limit)


def _plan_with_limit(points: list[Point], max_gap: int, limit: int) -> list[Block]:
    import lmt.drivers.plan as plan
    saved = plan.MAX_REGISTERS
    plan.MAX_REGISTERS = limit
    try:
        return plan.plan_reads(points, max_gap)
    finally:
        plan.MAX_REGISTERS = saved


def _min_with_limit(points: list[Point], max_gap: int, limit: int) -> int:
    import lmt.drivers.plan as plan
    saved = plan.MAX_REGISTERS
    plan.MAX_REGISTERS = limit
    try:
        return plan.min_transactions(points, max_gap)
    finally:
        plan.MAX_REGISTERS = saved


_MODBUS_PROFILES = sorted(pid for pid in available_profiles()
                          if load_profile(pid).protocol == "modbus")


@pytest.mark.parametrize("profile_id", _MODBUS_PROFILES)
def test_every_profile_plans_the_minimum(profile_id: str) -> None:
    profile = load_profile(profile_id)
    blocks = plan_reads(profile.points, profile.max_gap)
    assert len(blocks) == min_transactions(profile.points, profile.max_gap)
    assert sorted(p.name for b in blocks for p in b.points) == sorted(p.name for p in profile.points)
    for b in blocks:
        assert b.count <= (MAX_BITS if b.table.is_bit else MAX_REGISTERS)
        barriers = [p.address for p in profile.points if p.barrier and p.table is b.table]
        assert not any(b.address < a < b.end for a in barriers)
