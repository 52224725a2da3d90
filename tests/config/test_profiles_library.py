"""The profile library's values: voltages every profile must hold, and DL/T 645 points that share
a data identifier (a block DI) each decoded from their own bytes.

Voltages go through the wire path of the contract test, without a server: the simulator's
encoder (``lmt.firmware_sim.encoding`` / ``lmt.firmware_sim.dlt645``) and the drivers' decoder
(``lmt.drivers.codec`` / ``lmt.drivers.dlt645``). A profile has no declared plausible range: what
a point can hold is its encoding (type, multiplier, BCD digits) minus its ``invalid`` sentinels.
The only voltage plausibility range is ``lmt scan``'s (``lmt.agent.fieldtools.PLAUSIBLE``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping

import pytest

from lmt.agent.fieldtools import plausibility
from lmt.config.profiles import DataType, Point, Profile, available_profiles, load_profile
from lmt.config.site import SimLine
from lmt.drivers.codec import decode_registers
from lmt.drivers.dlt645 import Dlt645Meter, decode_value
from lmt.drivers.serial_line import SerialLine, dlt645_silence_s
from lmt.firmware_sim.dlt645 import Dlt645Line, encode_point
from lmt.firmware_sim.encoding import encode

LINE_TO_LINE = re.compile(r"^voltage_l([123])_l([123])_v$")
LINE_TO_NEUTRAL = re.compile(r"^voltage_l[123]_v$")
LL_VOLTS = (400.0, 415.0, 440.0, 480.0)  # 230/400 V, 240/415 V (UK, AU), 277/480 V markets
LN_VOLTS = (230.0, 277.0)

VOLTAGE_POINTS = [(pid, p.name) for pid in sorted(available_profiles())
                  for p in load_profile(pid).points if p.name.startswith("voltage")]
LL_POINTS = [(pid, name) for pid, name in VOLTAGE_POINTS if LINE_TO_LINE.match(name)]
LN_POINTS = [(pid, name) for pid, name in VOLTAGE_POINTS if LINE_TO_NEUTRAL.match(name)]


def _ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{pid}:{name}" for pid, name in pairs]


def _through_the_wire(value: float, p: Point) -> float | bool | None:
    """``value`` as the simulator encodes it for ``p`` and the driver decodes it."""
    if p.di is not None:
        return decode_value(encode_point(value, p), p)
    return decode_registers(encode(value, p), p)


def _resolution(p: Point, value: float) -> float:
    if p.di is not None:
        return abs(p.multiplier) * 10.0 ** -p.dlt_decimals / 2 * (1 + 1e-9)
    if p.type is DataType.FLOAT32:
        return abs(value) * 2.0 ** -23
    if p.type is DataType.FLOAT64:
        return abs(value) * 1e-12
    return abs(p.multiplier) / 2 * (1 + 1e-9)


# -- voltages ------------------------------------------------------------------------------------


def test_the_library_has_both_kinds_of_voltage_point() -> None:
    unknown = [f"{pid}:{name}" for pid, name in VOLTAGE_POINTS
               if not LINE_TO_LINE.match(name) and not LINE_TO_NEUTRAL.match(name)]
    assert not unknown, f"voltage points neither L-N nor L-L (extend this test): {unknown}"
    assert {pid for pid, _ in LL_POINTS} == {"alfen-ng9xx", "carlo-gavazzi-em24",
                                             "schneider-iem3255"}
    for pid, name in LL_POINTS:
        a, b = LINE_TO_LINE.match(name).groups()  # type: ignore[union-attr]
        assert a != b, f"{pid}:{name}"


@pytest.mark.parametrize(("profile_id", "name"), LL_POINTS, ids=_ids(LL_POINTS))
def test_line_to_line_points_hold_400_to_480_v(profile_id: str, name: str) -> None:
    p = load_profile(profile_id).point(name)
    for volts in LL_VOLTS:
        got = _through_the_wire(volts, p)
        assert isinstance(got, float), f"{name}: {volts} V reads {got!r}"
        assert got == pytest.approx(volts, abs=_resolution(p, volts)), f"{name}: {volts} V"


@pytest.mark.parametrize(("profile_id", "name"), LN_POINTS, ids=_ids(LN_POINTS))
def test_line_to_neutral_points_hold_230_v(profile_id: str, name: str) -> None:
    p = load_profile(profile_id).point(name)
    for volts in LN_VOLTS:
        got = _through_the_wire(volts, p)
        assert isinstance(got, float), f"{name}: {volts} V reads {got!r}"
        assert got == pytest.approx(volts, abs=_resolution(p, volts)), f"{name}: {volts} V"


def test_scan_finds_line_to_neutral_voltages_plausible() -> None:
    for _, name in LN_POINTS:
        assert plausibility({name: 230.0}) == 1.0, name


def test_scan_finds_line_to_line_voltages_plausible() -> None:
    for _, name in LL_POINTS:
        for volts in LL_VOLTS:
            assert plausibility({name: volts}) == 1.0, f"{name}: {volts} V"


# -- DL/T 645 points sharing a data identifier ---------------------------------------------------

DLT645 = load_profile("dlt645-2007-3phase")
ADDRESS = "202500000007"
BAUD = 9600
#: Block DIs (one FF byte) and where each point of the shipped profile lies in their data: the
#: members in DI order, each as long as its format (DL/T 645-2007 appendix A).
BLOCKS = {
    "0201FF00": ("voltage_l1_v", "voltage_l2_v", "voltage_l3_v"),
    "0202FF00": ("current_l1_a", "current_l2_a", "current_l3_a"),
    "0203FF00": ("power_kw", "power_l1_kw", "power_l2_kw", "power_l3_kw"),
}


def _block_profile() -> Profile:
    """The shipped profile with the block points read through their block DI."""
    moved: dict[str, dict[str, object]] = {}
    for di, names in BLOCKS.items():
        at = 0
        for name in names:
            moved[name] = {"di": di, "byte_offset": at}
            at += DLT645.point(name).dlt_bytes
    return Profile.model_validate({
        **DLT645.model_dump(exclude={"points", "id"}), "id": "dlt645-block-reads",
        "points": [{**p.model_dump(), **moved.get(p.name, {})} for p in DLT645.points]})


def _site_values(t: float) -> dict[str, float]:
    """Known values, different on every phase, so a point decoded from a neighbour's bytes shows."""
    return {"voltage_l1_v": 231.4, "voltage_l2_v": 228.7, "voltage_l3_v": 233.2,
            "current_l1_a": 12.345, "current_l2_a": 10.5, "current_l3_a": -7.125,
            "power_w": 3482.1, "power_l1_w": 2857.1, "power_l2_w": 2400.0, "power_l3_w": -1775.0,
            "power_factor": 0.95, "frequency_hz": 50.01,
            "import_energy_kwh": 1234.56, "export_energy_kwh": 98.76}


def _expected(name: str) -> float:
    q = _site_values(0.0)
    return q[name[:-3] + "_w"] / 1000 if name.endswith("_kw") else q[name]


def _with_meter(profile: Profile, body: object) -> None:
    """Serve the shipped profile (per-phase DIs, block DIs answered by the simulator) on a pty
    line with the known values; read it through ``Dlt645Meter`` with ``profile``."""
    async def main() -> None:
        sim = Dlt645Line({ADDRESS: None}, _site_values, clock=lambda: 1_750_000_000.0,
                         line_settings=SimLine(name="dlt", protocol="dlt645", baud=BAUD),
                         response_delay_s=0.0, wire_time=False)
        await sim.start()
        line = SerialLine(sim.device_path, baud_rate=BAUD, parity="E", timeout_s=1.0,
                          silence_s=dlt645_silence_s(BAUD), name="dlt")
        try:
            await body(Dlt645Meter("meter", line, ADDRESS, profile, timeout_s=1.0))  # type: ignore[operator]
        finally:
            line.close()
            await sim.stop()
    asyncio.run(main())


def _check(values: Mapping[str, float | None], names: list[str], profile: Profile) -> None:
    for name in names:
        step = 10.0 ** -profile.point(name).dlt_decimals
        assert values[name] == pytest.approx(_expected(name), abs=step / 2 * (1 + 1e-9)), \
            f"{name}: read {values[name]}, the meter holds {_expected(name)}"


def test_the_shipped_profile_has_one_point_per_data_identifier() -> None:
    dis = [p.di.upper() for p in DLT645.points if p.di]
    assert len(dis) == len(set(dis)) == len(DLT645.points)
    assert all(p.byte_offset == 0 for p in DLT645.points)


def test_points_sharing_a_data_identifier_must_not_overlap() -> None:
    base = DLT645.model_dump(exclude={"points"})
    same_bytes = [{"name": "voltage_l1_v", "di": "0201FF00", "format": "XXX.X"},
                  {"name": "voltage_l2_v", "di": "0201ff00", "format": "XXX.X"}]
    with pytest.raises(ValueError, match="share DI 0201FF00 and overlap"):
        Profile.model_validate({**base, "points": same_bytes})
    half_over = [same_bytes[0], {**same_bytes[1], "byte_offset": 1}]
    with pytest.raises(ValueError, match="give each its own byte_offset"):
        Profile.model_validate({**base, "points": half_over})
    apart = [same_bytes[0], {**same_bytes[1], "byte_offset": 2}]
    assert Profile.model_validate({**base, "points": apart}).point("voltage_l2_v").byte_offset == 2
    with pytest.raises(ValueError, match="DL/T 645 points"):
        Point(name="x", table="input", address=0, type="uint16", byte_offset=2)  # type: ignore[arg-type]


def test_the_simulator_answers_a_block_di_in_di_order() -> None:
    """The premise of the next test: the block layout ``_block_profile`` declares is the one on
    the wire (sliced here by hand, not by ``read_points``)."""
    profile = _block_profile()

    async def body(meter: Dlt645Meter) -> None:
        for di, names in BLOCKS.items():
            data = await meter.read_di(di)
            points = [profile.point(n) for n in names]
            assert len(data) == sum(p.dlt_bytes for p in points)
            got = {p.name: decode_value(data[p.byte_offset:p.byte_offset + p.dlt_bytes], p)
                   for p in points}
            _check(got, list(names), profile)
    _with_meter(profile, body)


def test_points_sharing_a_block_di_read_their_own_bytes() -> None:
    profile = _block_profile()
    block_points = [n for names in BLOCKS.values() for n in names]

    async def body(meter: Dlt645Meter) -> None:
        before = meter.line.transactions
        values = await meter.read_points(block_points)
        assert meter.line.transactions - before == len(BLOCKS)  # one request per block DI
        _check(values, block_points, profile)
        # a partial read: a point behind others in its block, alone
        _check(await meter.read_points(["voltage_l3_v", "power_l2_kw"]),
               ["voltage_l3_v", "power_l2_kw"], profile)
    _with_meter(profile, body)
