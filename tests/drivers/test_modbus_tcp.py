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
from lmt.drivers.result import ReadResult
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


def test_write_coils_one_request_per_run_and_one_read_back() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        relays = ModbusDevice("relays", bus, 2, load_profile("generic-relay-8"))
        before = bus.transactions
        # relay_1..relay_3 adjacent: one write (function 15); relay_5 alone: one write (05);
        # then the read-back of all four, in the blocks the profile allows (max_gap 0: two)
        got = await relays.write_coils({"relay_3": False, "relay_1": False, "relay_2": False,
                                        "relay_5": False})
        assert got == dict.fromkeys(("relay_3", "relay_1", "relay_2", "relay_5"))
        assert bus.transactions - before == 4
        on = site.loads_on()
        assert [on[n] for n in ("chiller-1", "chiller-2", "air-compressor", "ev-chargers",
                                "water-heater")] == [False, False, False, True, False]
        assert [w.point for w in site.coil_writes["relays"][-4:]] == [
            "relay_1", "relay_2", "relay_3", "relay_5"]
        await relays.write_coils(dict.fromkeys(("relay_1", "relay_2", "relay_3", "relay_5"), True))
        assert all(site.loads_on().values())
        before = bus.transactions
        await relays.write_coils(dict.fromkeys(("relay_6", "relay_7", "relay_8"), False))
        assert bus.transactions - before == 2  # one write, one read
        await relays.write_coils(dict.fromkeys(("relay_6", "relay_7", "relay_8"), True))
        meter = ModbusDevice("main-meter", bus, 1, load_profile("eastron-sdm630"))
        with pytest.raises(ValueError, match="not a writable coil"):
            await meter.write_coils({"power_w": True})

    with_site(body)


def test_write_coils_falls_back_to_single_writes_without_function_15() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        relays = ModbusDevice("relays", bus, 2, load_profile("generic-relay-8"))
        call = bus.call
        asked: list[int] = []

        async def no_fc15(label: str, function: int, factory: Any) -> Any:
            # a module that knows only function 05: it answers 15 with "illegal function"
            asked.append(function)
            if function == 15:
                raise DeviceException(label, 15, 1)
            return await call(label, function, factory)
        bus.call = no_fc15  # type: ignore[method-assign]
        got = await relays.write_coils(dict.fromkeys(("relay_1", "relay_2", "relay_3"), False))
        assert got == dict.fromkeys(("relay_1", "relay_2", "relay_3"))
        assert not any(site.loads_on()[n] for n in ("chiller-1", "chiller-2", "air-compressor"))
        assert asked == [15, 5, 5, 5, 1] and not relays.multi_coil_writes
        asked.clear()  # remembered: no more function 15 for this device
        await relays.write_coils(dict.fromkeys(("relay_1", "relay_2", "relay_3"), True))
        assert asked == [5, 5, 5, 1] and all(site.loads_on().values())

    with_site(body)

def test_write_coils_reports_each_point() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        relays = ModbusDevice("relays", bus, 2, load_profile("generic-relay-8"))
        original = relays.read

        async def stuck(names: Any = None) -> ReadResult:  # relay_2 sticks on
            got = await original(names)
            return ReadResult({k: (True if k == "relay_2" else v) for k, v in got.values.items()},
                              got.failures)
        relays.read = stuck  # type: ignore[method-assign]
        got = await relays.write_coils({"relay_1": False, "relay_2": False})
        assert got["relay_1"] is None
        assert isinstance(got["relay_2"], VerificationError)
        assert "relay_2 written False, reads True" in str(got["relay_2"])

        # a module that does not answer: every point fails with the bus's error, none raises
        dead = ModbusDevice("relays", ModbusTcpBus("127.0.0.1", free_port(), timeout_s=0.2), 2,
                            load_profile("generic-relay-8"))
        got = await dead.write_coils({"relay_1": False, "relay_4": False})
        assert all(isinstance(e, DeviceUnavailable) for e in got.values()), got
        dead.bus.close()

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


# A sub-meter whose firmware lacks the power-factor/frequency register group of its profile:
# the simulator serves it without those points, so that block answers exception 2 (illegal
# data address) while the other three blocks answer.
ADL400 = load_profile("acrel-adl400")
PF_BLOCK = ("power_factor_l1", "power_factor_l2", "power_factor_l3", "power_factor",
            "frequency_hz")
ADL400_NO_PF = ADL400.model_copy(update={"points": tuple(p for p in ADL400.points
                                                          if p.name not in PF_BLOCK)})
PARTIAL_SITE = {"site": {"seed": 3}, "devices": [
    {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
    {"name": "sub", "profile": "acrel-adl400", "device_id": 3}]}


def test_one_failing_block_leaves_the_others_read() -> None:
    from lmt.config.site import SiteConfig

    async def main() -> None:
        site = SimulatedSite(SiteConfig.model_validate(PARTIAL_SITE), port=0, clock=lambda: T0,
                             profiles={"acrel-adl400": ADL400_NO_PF})
        port = await site.start()
        bus = ModbusTcpBus("127.0.0.1", port, timeout_s=1.0)
        sub = ModbusDevice("sub", bus, 3, ADL400)
        try:
            assert sub.transactions() == 4 and sub.wire_time_s() == 0.0  # TCP: no wire time
            # strict (the default, as the field tools read): any failing block raises
            with pytest.raises(DeviceException) as ei:
                await sub.read_points()
            assert ei.value.code == 2
            # read(): the three good blocks are read, the failing one is left out and named
            got = await sub.read()
            values = got.values
            assert set(values) == {p.name for p in ADL400.points} - set(PF_BLOCK)
            assert values["voltage_l1_v"] == pytest.approx(230.0, rel=0.1)
            assert values["import_energy_kwh"] > 0
            [(points, exc)] = got.failures
            assert points == PF_BLOCK
            assert isinstance(exc, DeviceException) and exc.code == 2
            assert "illegal data address" in str(exc)
            # every block failing is a failure of the device, as before
            with pytest.raises(DeviceException):
                await sub.read(["frequency_hz", "power_factor"])
            # a device that does not answer at all still raises: unreachable, not partial
            ghost = ModbusDevice("ghost", bus, 9, ADL400)
            with pytest.raises(DeviceException) as ei:
                await ghost.read()
            assert ei.value.code == 11
            # an answering device with nothing failing: no failures listed
            meter = ModbusDevice("main-meter", bus, 1, load_profile("eastron-sdm630"))
            got = await meter.read()
            assert "power_w" in got.values and got.failures == ()
        finally:
            bus.close()
            await site.stop()
    asyncio.run(main())
