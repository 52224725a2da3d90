"""The Modbus TCP driver against the simulated site over real TCP sockets: planned block reads,
decoded values, verified coil writes, and typed errors for every kind of failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from lmt.agent.broker import free_port
from lmt.config import load_profile, load_site
from lmt.drivers.errors import DeviceException, DeviceUnavailable, VerificationError
from lmt.drivers.modbus_tcp import ModbusDevice, ModbusTcpBus
from lmt.firmware_sim import SimulatedSite
from tests.conftest import EXAMPLES

T0 = 1_750_000_000.0


def with_site(body: Callable[[SimulatedSite, ModbusTcpBus], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        site = SimulatedSite(load_site(EXAMPLES / "demo-site.toml"), port=0, clock=lambda: T0)
        port = await site.start()
        bus = ModbusTcpBus("127.0.0.1", port, timeout_s=1.0)
        try:
            return await body(site, bus)
        finally:
            bus.close()
            await site.stop()
    return asyncio.run(main())


def test_reads_whole_meter_in_one_transaction_and_decodes() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, load_profile("eastron-sdm630"))
        assert len(meter.plan()) == 1
        before = bus.transactions
        values = await meter.read_points()
        assert bus.transactions - before == 1
        assert set(values) == {p.name for p in meter.profile.points}
        assert values["power_w"] / 1000 == pytest.approx(site.site_power_kw(T0), rel=1e-5)
        phases = sum(values[f"power_l{i}_w"] for i in (1, 2, 3))
        assert phases == pytest.approx(values["power_w"], rel=1e-4)
        assert 49.9 < values["frequency_hz"] < 50.1
        assert values["export_energy_kwh"] == 0.0
    with_site(body)


def test_verified_coil_write_switches_the_load() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        relays = ModbusDevice("relays", bus, 2, load_profile("generic-relay-8"))
        meter = ModbusDevice("main-meter", bus, 1, load_profile("eastron-sdm630"))
        p0 = (await meter.read_points(["power_w"]))["power_w"]
        await relays.write_coil("relay_4", False)
        assert site.loads_on()["ev-chargers"] is False
        assert (await relays.read_points())["relay_4"] is False
        p1 = (await meter.read_points(["power_w"]))["power_w"]
        assert (p0 - p1) / 1000 == pytest.approx(22.0, abs=1e-3)
        await relays.write_coil("relay_4", True)
        assert site.loads_on()["ev-chargers"] is True
        with pytest.raises(ValueError, match="not a writable coil"):
            await meter.write_coil("power_w", True)
    with_site(body)


def test_read_back_mismatch_raises_verification_error() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        relays = ModbusDevice("relays", bus, 2, load_profile("generic-relay-8"))
        # a stuck relay: the module accepts the write but the coil stays as it was
        original = relays.read_points

        async def stuck(names: Any = None) -> dict[str, Any]:
            got = await original(names)
            return {k: True for k in got}
        relays.read_points = stuck  # type: ignore[method-assign]
        with pytest.raises(VerificationError, match="relay_2 written False, reads True"):
            await relays.write_coil("relay_2", False)
    with_site(body)


def test_exception_answer_is_a_typed_error() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        # the relay module has no holding registers: the device answers exception 2
        wrong = ModbusDevice("relays", bus, 2, load_profile("eastron-sdm630"))
        with pytest.raises(DeviceException) as ei:
            await wrong.read_points()
        assert ei.value.code == 2 and "illegal data address" in str(ei.value)
        # an unknown device id behind the gateway: exception 11
        ghost = ModbusDevice("ghost", bus, 9, load_profile("generic-relay-8"))
        with pytest.raises(DeviceException) as ei:
            await ghost.read_points()
        assert ei.value.code == 11
    with_site(body)


def test_unreachable_device_is_a_typed_error() -> None:
    async def body() -> None:
        bus = ModbusTcpBus("127.0.0.1", free_port(), timeout_s=0.5)
        dev = ModbusDevice("meter", bus, 1, load_profile("eastron-sdm630"))
        with pytest.raises(DeviceUnavailable, match="cannot connect"):
            await dev.read_points()
        bus.close()
    asyncio.run(body())


def test_connection_dropped_midway_is_a_typed_error_and_recovers() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, load_profile("eastron-sdm630"))
        await meter.read_points()
        port = site.bound_port
        await site.stop()
        with pytest.raises(DeviceUnavailable):
            await meter.read_points()
        site2 = SimulatedSite(load_site(EXAMPLES / "demo-site.toml"), port=port, clock=lambda: T0)
        await site2.start()
        try:
            assert "power_w" in await meter.read_points()
        finally:
            await site2.stop()
    with_site(body)
