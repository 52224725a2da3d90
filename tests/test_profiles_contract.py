"""The profile contract: every profile, served by the simulator, reads back through the drivers
as the simulator's physics says.

One parametrized test per profile in ``config/profile_library`` (evcc instantiates every template in
CI; so do we), whatever its protocol. Each builds a one-device site at a fixed moment and
serves it from ``lmt.firmware_sim``: a Modbus profile over real Modbus TCP on a free port, a
DL/T 645 profile on a DL/T 645 line (a pseudo-terminal). Every point is read with
``lmt.drivers`` (``ModbusDevice`` over ``ModbusTcpBus``; ``Dlt645Meter`` over ``SerialLine``)
and compared with the model at that moment: values in = values out, within the resolution of
the encoding (half a multiplier step for integers, float32 rounding for float32, half a unit of
the last BCD digit for DL/T 645). Not-available values (NaN in the model) must read ``None``.
Writable points are written through the driver and read back. The simulator encodes with
``lmt.firmware_sim.encoding`` / ``lmt.firmware_sim.dlt645`` and the drivers decode with
``lmt.drivers.codec`` / ``lmt.drivers.dlt645``: independent implementations that meet only on
the wire.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, get_args

import pytest

from lmt.config.profiles import (
    PROFILE_DIR,
    DataType,
    Point,
    Profile,
    Table,
    available_profiles,
    load_profile,
)
from lmt.config.site import SimDevice, SimLine, SimLoad, SiteConfig, SiteInfo
from lmt.drivers.dlt645 import Dlt645Meter
from lmt.drivers.modbus_tcp import ModbusDevice, ModbusTcpBus
from lmt.drivers.plan import min_transactions
from lmt.drivers.serial_line import SerialLine, dlt645_silence_s
from lmt.firmware_sim import SimulatedSite
from lmt.firmware_sim.physics import is_known, lookup

T0 = 1_750_000_000.25  # a fixed clock; a quarter second past, so sub-second quantities show
DEVICE = "dut"
DEVICE_ID = 7


LINE = "mains"  # the DL/T 645 line
METER_ADDRESS = "202500000007"
BAUD = 9600

#: DL/T 645 quantities the simulated meter derives from the model's (combination word 05).
DLT645_DERIVED = {"combined_energy_kwh": ("import_energy_kwh", "export_energy_kwh")}

PROFILES = sorted(available_profiles())


def test_every_profile_and_protocol_is_a_parameter() -> None:
    assert PROFILES == sorted(f.stem for f in PROFILE_DIR.glob("*.toml"))
    assert len(PROFILES) == 8
    protocols = set(get_args(Profile.model_fields["protocol"].annotation))
    assert protocols == set(SCENARIOS), "every protocol needs a contract scenario"
    assert {load_profile(pid).protocol for pid in PROFILES} == protocols


# -- Modbus: one device on the simulator's Modbus TCP server -------------------------------------


def _site(profile: Profile) -> SiteConfig:
    """A one-device site; a load hangs on the first coil, so coils read both on and off."""
    coils = [p for p in profile.points if p.table is Table.COIL]
    loads = [SimLoad(name="load-1", relay=f"{DEVICE}.{coils[0].name}", kw=5.0, on=True)] \
        if coils else []
    return SiteConfig(site=SiteInfo(name="contract", seed=3),
                      devices=[SimDevice(name=DEVICE, profile=profile.id, device_id=DEVICE_ID)],
                      loads=loads)


def _tolerance(p: Point) -> dict[str, float]:
    """How close a read value must be to the model's: the resolution of the point's encoding."""
    step = abs(p.multiplier)
    if p.type is DataType.FLOAT32:
        return {"rel": 2.0 ** -23, "abs": step * 1e-6}
    if p.type is DataType.FLOAT64:
        return {"rel": 1e-12, "abs": step * 1e-12}
    return {"rel": 1e-12, "abs": step / 2 * (1 + 1e-9)}


def _expected(site: SimulatedSite, p: Point) -> float | bool | None:
    """What the simulator holds for ``p`` now, as the driver should decode it."""
    if p.table is Table.COIL:
        return site.physics.relay_on(f"{DEVICE}.{p.name}")
    quantities = site.physics.quantities(site.clock())
    value = 0.0 if p.writable else lookup(quantities, p.name)  # writable: what was written (0)
    if p.table is Table.DISCRETE:
        return bool(value)
    if math.isnan(value):
        if p.invalid or p.type in (DataType.FLOAT32, DataType.FLOAT64):
            return None
        return p.offset  # an integer with no sentinel holds 0
    if p.bit is not None:
        return bool(value)
    return value


def _check(site: SimulatedSite, values: dict[str, Any], points: list[Point]) -> None:
    for p in points:
        want = _expected(site, p)
        got = values[p.name]
        if want is None or isinstance(want, bool):
            assert got is want, f"{p.name}: read {got!r}, the simulator holds {want!r}"
        else:
            assert isinstance(got, float), f"{p.name}: read {got!r}, expected a number"
            assert got == pytest.approx(want, **_tolerance(p)), \
                f"{p.name}: read {got}, the simulator holds {want}"


def _test_value(p: Point) -> float:
    """A value to write to ``p`` that its encoding holds exactly enough to compare."""
    value = 16.0  # a charging current, a relay channel, a percentage: fits every type
    if p.type not in (DataType.FLOAT32, DataType.FLOAT64):
        value = round((value - p.offset) / p.multiplier) * p.multiplier + p.offset
    return value


async def _write(device: ModbusDevice, p: Point, value: float) -> None:
    """Write a point through the driver, verified by its read-back."""
    await device.write_point(p.name, value)


async def _modbus_contract(profile: Profile) -> None:
    """Every point over Modbus TCP: all at once in the fewest block reads, each poll class on
    its own, writable points written and read back."""
    site = SimulatedSite(_site(profile), host="127.0.0.1", port=0, clock=lambda: T0)
    port = await site.start()
    bus = ModbusTcpBus("127.0.0.1", port, timeout_s=2.0)
    device = ModbusDevice(DEVICE, bus, DEVICE_ID, profile)
    try:
        # every point, in the planned block reads, which are the fewest possible
        before = bus.transactions
        values = await device.read_points()
        assert bus.transactions - before == len(device.plan()) \
            == min_transactions(profile.points, profile.max_gap)
        assert set(values) == {p.name for p in profile.points}
        _check(site, values, list(profile.points))

        # each poll class on its own (what the agent reads when only that class is due)
        for poll in ("fast", "slow"):
            names = [p.name for p in profile.points if p.poll == poll]
            if names:
                _check(site, await device.read_points(names),
                       [profile.point(n) for n in names])

        # writable points: written through the driver, read back the same
        for p in profile.points:
            if not p.writable:
                continue
            if p.table is Table.COIL:
                old = values[p.name]
                await device.write_coil(p.name, not old)
                assert (await device.read_points([p.name]))[p.name] is (not old)
                assert site.physics.relay_on(f"{DEVICE}.{p.name}") is not old \
                    or site.physics.load_for(f"{DEVICE}.{p.name}") is None
                continue
            value = _test_value(p)
            await _write(device, p, value)
            got = (await device.read_points([p.name]))[p.name]
            assert got == pytest.approx(value, **_tolerance(p)), \
                f"{p.name}: wrote {value}, read back {got}"

        # after the writes the simulator still serves its model, whatever the writes did
        after = await device.read_points()
        _check(site, after, [p for p in profile.points if not p.writable])
    finally:
        bus.close()
        await site.stop()


# -- DL/T 645: one meter on a simulated DL/T 645 line (a pseudo-terminal) ------------------------


def _dlt645_site(profile: Profile) -> SiteConfig:
    """A one-meter site: well inside the profile's BCD formats (total power under 80 kW)."""
    return SiteConfig(site=SiteInfo(name="contract", seed=3),
                      lines=[SimLine(name=LINE, protocol="dlt645", baud=BAUD)],
                      devices=[SimDevice(name=DEVICE, profile=profile.id, line=LINE,
                                         address=METER_ADDRESS)])


def _bcd_step(p: Point) -> float:
    """The value of one unit of the last BCD digit."""
    return abs(p.multiplier) * 10.0 ** -p.dlt_decimals


def _bcd_largest(p: Point) -> float:
    """The largest magnitude the point's BCD digits hold (a signed point's top bit is the sign)."""
    digits = 2 * p.dlt_bytes
    raw = 8 * 10 ** (digits - 1) - 1 if p.signed else 10 ** digits - 1
    return raw * _bcd_step(p)


def _dlt645_expected(site: SimulatedSite, p: Point) -> float:
    """What the simulated meter holds for ``p`` now, worked out from the model's quantities."""
    quantities = site.physics.quantities(site.clock())
    if p.name in DLT645_DERIVED:
        return sum(lookup(quantities, name) for name in DLT645_DERIVED[p.name])
    return lookup(quantities, p.name)


def _dlt645_check(site: SimulatedSite, values: dict[str, float | None],
                  points: list[Point]) -> None:
    for p in points:
        want = _dlt645_expected(site, p)
        assert abs(want - p.offset) <= _bcd_largest(p), \
            f"{p.name}: the contract site's {want} does not fit {p.format}; make the site smaller"
        assert want >= p.offset or p.signed, f"{p.name}: the contract site's {want} is negative"
        got = values[p.name]
        assert isinstance(got, float), f"{p.name}: read {got!r}, expected a number"
        assert got == pytest.approx(want, rel=1e-12, abs=_bcd_step(p) / 2 * (1 + 1e-9)), \
            f"{p.name}: read {got}, the simulator holds {want}"


async def _dlt645_contract(profile: Profile) -> None:
    """Every point over a DL/T 645 line, one request per data identifier; each poll class on
    its own. The DL/T 645 driver writes no data (function 14 is not supported): no point may
    be writable."""
    assert not [p.name for p in profile.points if p.writable], "DL/T 645 points are read-only"
    site = SimulatedSite(_dlt645_site(profile), host="127.0.0.1", port=0, clock=lambda: T0,
                         wire_time=False)
    await site.start()
    line = SerialLine(site.line_paths()[LINE], baud_rate=BAUD, parity="E", timeout_s=2.0,
                      silence_s=dlt645_silence_s(BAUD), name=LINE)
    meter = Dlt645Meter(DEVICE, line, METER_ADDRESS, profile, timeout_s=2.0)
    try:
        before = line.transactions
        values = await meter.read_points()
        assert line.transactions - before == len({p.di.upper() for p in profile.points if p.di})
        assert set(values) == {p.name for p in profile.points}
        _dlt645_check(site, values, list(profile.points))

        for poll in ("fast", "slow"):
            names = [p.name for p in profile.points if p.poll == poll]
            if names:
                _dlt645_check(site, await meter.read_points(names),
                              [profile.point(n) for n in names])
    finally:
        line.close()
        await site.stop()


SCENARIOS = {"modbus": _modbus_contract, "dlt645": _dlt645_contract}


@pytest.mark.parametrize("profile_id", PROFILES)
def test_profile_contract(profile_id: str) -> None:
    profile = load_profile(profile_id)
    asyncio.run(SCENARIOS[profile.protocol](profile))


@pytest.mark.parametrize("profile_id", PROFILES)
def test_profile_follows_the_conventions(profile_id: str) -> None:
    """Names the simulator knows, units in names, energy totals polled slow, a cited source."""
    profile = load_profile(profile_id)
    assert len(profile.source) > 20, "name the public register map the profile comes from"
    for p in profile.points:
        if p.table is Table.COIL:
            continue
        assert is_known(p.name) or (profile.protocol == "dlt645" and p.name in DLT645_DERIVED), \
            f"{p.name}: not a quantity the simulator models (physics.py)"
        if "energy" in p.name:
            assert p.poll == "slow", f"{p.name}: energy totals are polled slow"
        if p.writable:
            assert p.table is Table.HOLDING, f"{p.name}: only holding registers are writable"
