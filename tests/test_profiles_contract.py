"""The profile contract: every Modbus profile, served by the simulator, reads back through the
drivers as the simulator's physics says.

One parametrized test per profile in ``config/profiles`` (evcc instantiates every template in
CI; so do we). Each builds a one-device site, serves it from ``lmt.firmware_sim`` over real
Modbus TCP on a free port, reads every point with ``lmt.drivers`` and compares with the model
at the same, fixed moment: values in = values out, within the resolution of the encoding
(half a multiplier step for integers, float32 rounding for float32). Not-available values
(NaN in the model) must read ``None``. Writable points are written through the driver and read
back. The simulator encodes with ``lmt.firmware_sim.encoding`` and the driver decodes with
``lmt.drivers.codec``: two independent implementations meet only on the wire.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from lmt.config.profiles import DataType, Point, Profile, Table, available_profiles, load_profile
from lmt.config.site import SimDevice, SimLoad, SiteConfig, SiteInfo
from lmt.drivers.modbus_tcp import ModbusDevice, ModbusTcpBus
from lmt.drivers.plan import min_transactions
from lmt.firmware_sim import SimulatedSite
from lmt.firmware_sim.physics import is_known, lookup

T0 = 1_750_000_000.25  # a fixed clock; a quarter second past, so sub-second quantities show
DEVICE = "dut"
DEVICE_ID = 7


def _modbus_profiles() -> list[str]:
    return sorted(pid for pid in available_profiles() if load_profile(pid).protocol == "modbus")


PROFILES = _modbus_profiles()


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


@pytest.mark.parametrize("profile_id", PROFILES)
def test_profile_contract(profile_id: str) -> None:
    profile = load_profile(profile_id)

    async def scenario() -> None:
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

    asyncio.run(scenario())


@pytest.mark.parametrize("profile_id", PROFILES)
def test_profile_follows_the_conventions(profile_id: str) -> None:
    """Names the simulator knows, units in names, energy totals polled slow, a cited source."""
    profile = load_profile(profile_id)
    assert len(profile.source) > 20, "name the public register map the profile comes from"
    for p in profile.points:
        if p.table is Table.COIL:
            continue
        assert is_known(p.name), f"{p.name}: not a quantity the simulator models (physics.py)"
        if "energy" in p.name:
            assert p.poll == "slow", f"{p.name}: energy totals are polled slow"
        if p.writable:
            assert p.table is Table.HOLDING, f"{p.name}: only holding registers are writable"
