"""The Modbus RTU driver against the simulated site's RTU line, over a real pseudo-terminal:
two device ids on one line, planned block reads, verified coil writes, one transaction at a
time with the inter-frame silence kept, wire counters, and a typed error for every fault."""

from __future__ import annotations

import asyncio
import errno
import os
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from lmt.config import load_profile, load_site
from lmt.config.site import Faults, SiteConfig
from lmt.drivers.errors import DeviceException, DeviceUnavailable
from lmt.drivers.modbus import ModbusDevice, ModbusTcpBus
from lmt.drivers.modbus_rtu import ModbusRtuBus, answer_size, open_error, silence_s
from lmt.firmware_sim import SimulatedSite
from lmt.firmware_sim.rtu import RtuLineServer
from tests.conftest import EXAMPLES

T0 = 1_750_000_000.0
METER = load_profile("eastron-sdm630")
RELAYS = load_profile("generic-relay-8")


def rtu_config(baud: int = 9600, link: Path | None = None,
               faults: dict[str, dict[str, Any]] | None = None) -> SiteConfig:
    """The demo site with its meter (id 1) and relay module (id 2) on one RTU line."""
    raw = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    line: dict[str, Any] = {"name": "rs485", "protocol": "modbus-rtu", "baud": baud}
    if link is not None:
        line["link"] = str(link)
    raw["lines"] = [line]
    for d in raw["devices"]:
        d["line"] = "rs485"
        if faults and d["name"] in faults:
            d["faults"] = faults[d["name"]]
    return SiteConfig.model_validate(raw)


Body = Callable[[SimulatedSite, RtuLineServer, ModbusRtuBus], Awaitable[Any]]


def with_line(body: Body, baud: int = 9600, timeout_s: float = 0.3,
              config: SiteConfig | None = None) -> Any:
    async def main() -> Any:
        site = SimulatedSite(config or rtu_config(baud), port=0, clock=lambda: T0)
        await site.start()
        line = site.rtu_lines["rs485"]
        assert line.path is not None
        bus = ModbusRtuBus(line.path, baud=baud, timeout_s=timeout_s)
        try:
            return await body(site, line, bus)
        finally:
            bus.close()
            await site.stop()
    return asyncio.run(main())


async def until(cond: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    """Wait for ``cond`` to hold, polling the event loop; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


# -- reading and writing -----------------------------------------------------------------------


@pytest.mark.parametrize("baud", [9600, 2400])
def test_reads_meter_and_relays_on_one_line(baud: int) -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        assert len(meter.plan()) == 1
        t0 = time.monotonic()
        values = await meter.read_points()
        elapsed = time.monotonic() - t0
        assert set(values) == {p.name for p in METER.points}
        assert values["power_w"] / 1000 == pytest.approx(site.site_power_kw(T0), rel=1e-5)
        phases = sum(values[f"power_l{i}_w"] for i in (1, 2, 3))
        assert phases == pytest.approx(values["power_w"], rel=1e-4)
        assert 49.9 < values["frequency_hz"] < 50.1
        # one request of 8 bytes, one answer of 76 registers: 3 + 152 + 2 bytes
        assert (bus.transactions, bus.bytes_sent, bus.bytes_received) == (1, 8, 157)
        # 165 bytes on a 2400 bit/s line take 0.69 s, more than timeout_s: the timeout runs
        # from the end of the request to the end of the expected answer
        assert elapsed >= 165 * bus.char_time_s
        assert await relays.read_points() == {f"relay_{i}": i != 8 for i in range(1, 9)}
        assert (bus.transactions, bus.bytes_sent, bus.bytes_received) == (2, 16, 163)
        assert [(f.device_id, f.function) for f in line.frames] == [(1, 4), (2, 1)]
    with_line(body, baud=baud, timeout_s=0.2)


def test_verified_coil_write_switches_the_load() -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        meter = ModbusDevice("main-meter", bus, 1, METER)
        p0 = (await meter.read_points(["power_w"]))["power_w"]
        await relays.write_coil("relay_4", False)
        assert site.loads_on()["ev-chargers"] is False
        assert site.coil_writes["relays"][-1][2:] == ("relay_4", False)
        p1 = (await meter.read_points(["power_w"]))["power_w"]
        assert (p0 - p1) / 1000 == pytest.approx(22.0, abs=1e-3)
        await relays.write_coil("relay_4", True)
        assert site.loads_on()["ev-chargers"] is True
    with_line(body)


def test_one_transaction_at_a_time() -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        relays = ModbusDevice("relays", bus, 2, RELAYS)

        async def worker(n: int) -> list[Any]:
            got: list[Any] = []
            for i in range(3):
                dev = meter if (n + i) % 2 else relays
                got.append(await dev.read_points(["power_w"] if dev is meter else None))
            return got

        results = await asyncio.gather(*(worker(n) for n in range(5)))
        assert sum(len(r) for r in results) == 15
        assert bus.transactions == len(line.frames) == 15
        assert line.overlaps == 0
        assert not any(f.overlapped for f in line.frames)
        assert all(f.answered for f in line.frames)
    with_line(body)


@pytest.mark.parametrize("baud", [9600, 2400])
def test_inter_frame_silence_is_kept(baud: int) -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        meter = ModbusDevice("main-meter", bus, 1, METER)
        await asyncio.gather(*(d.read_points(["power_w"] if d is meter else None)
                               for d in (relays, meter, relays, relays, meter, relays)))
        three_and_a_half_chars = 3.5 * 10 / baud  # 8N1: 10 bits a character
        gap = line.min_gap_s()
        assert gap is not None and gap >= three_and_a_half_chars
        assert len(line.frames) == 6
    with_line(body, baud=baud)


def test_serial_timing_arithmetic() -> None:
    assert silence_s(9600) == pytest.approx(3.5 * 10 / 9600)
    assert silence_s(9600, parity="E") == pytest.approx(3.5 * 11 / 9600)
    assert silence_s(9600, stop_bits=2) == pytest.approx(3.5 * 11 / 9600)
    assert silence_s(38400) == silence_s(115200) == 0.00175  # fixed above 19200 bit/s
    assert ModbusRtuBus("/dev/null", baud=2400, parity="E").char_time_s == pytest.approx(11 / 2400)
    assert answer_size(bytes([1, 4, 0, 0, 0, 76, 0, 0])) == 157
    assert answer_size(bytes([2, 1, 0, 0, 0, 9, 0, 0])) == 7
    assert answer_size(bytes([2, 5, 0, 3, 0, 0, 0, 0])) == 8


def test_per_line_serial_settings() -> None:
    # a pseudo-terminal carries 8 data bits without parity: 8N2 has the 11-bit character of 8E1
    config = rtu_config()
    line = config.lines[0].model_copy(update={"baud": 19200, "parity": "E"})
    config = config.model_copy(update={"lines": [line]})

    async def main() -> None:
        site = SimulatedSite(config, port=0, clock=lambda: T0)
        await site.start()
        sim = site.rtu_lines["rs485"]
        assert sim.path is not None
        assert sim.char_time_s == pytest.approx(11 / 19200)
        bus = ModbusRtuBus(sim.path, baud=19200, stop_bits=2, timeout_s=0.3)
        assert bus.silence_s == pytest.approx(3.5 * 11 / 19200) == pytest.approx(sim.silence_s)
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        even = ModbusRtuBus(sim.path, baud=19200, parity="E", timeout_s=0.3)
        try:
            for _ in range(3):
                assert (await relays.read_points())["relay_1"] is True
            gap = sim.min_gap_s()
            assert gap is not None and gap >= 3.5 * 11 / 19200
            bus.close()
            with pytest.raises(DeviceUnavailable, match=r"cannot set 19200 8E1 .*pseudo-terminal"):
                await ModbusDevice("relays", even, 2, RELAYS).read_points()
            assert (await relays.read_points())["relay_1"] is True  # nothing left locked
        finally:
            bus.close()
            even.close()
            await site.stop()
    asyncio.run(main())


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("faults", "error", "match"), [
    ({"offline": True}, DeviceUnavailable, "no answer within 0.15 s"),
    ({"no_answer_rate": 1.0}, DeviceUnavailable, "no answer within 0.15 s"),
    ({"exception_code": 6}, DeviceException, r"exception 6 \(server device busy\)"),
    ({"crc_error_rate": 1.0}, DeviceUnavailable, "CRC error in the answer"),
    ({"garbage_rate": 1.0}, DeviceUnavailable, "garbled answer"),
    ({"delay_s": 0.4}, DeviceUnavailable, "no answer within 0.15 s"),
    ({"drop_rate": 1.0}, None, ""),  # TCP only: ignored on a serial line
], ids=["offline", "no-answer", "exception", "crc", "garbage", "too-slow", "drop"])
def test_each_fault_is_a_typed_error_and_the_bus_recovers(
        faults: dict[str, Any], error: type[Exception] | None, match: str) -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        assert "power_w" in await meter.read_points(["power_w"])
        site.set_faults("main-meter", Faults.model_validate(faults))
        if error is None:
            assert "power_w" in await meter.read_points(["power_w"])
        else:
            with pytest.raises(error, match=match) as ei:
                await meter.read_points(["power_w"])
            assert ei.value.device == "main-meter"  # type: ignore[attr-defined]
        await until(lambda: line.idle, "the simulated line to finish answering")
        # the other device on the line still answers while the meter misbehaves
        assert (await relays.read_points())["relay_1"] is True
        site.set_faults("main-meter", Faults())
        assert "power_w" in await meter.read_points(["power_w"])
        assert line.overlaps == 0
    with_line(body, timeout_s=0.15)


def test_a_slow_device_within_the_timeout_is_read() -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        site.set_faults("main-meter", Faults(delay_s=0.1))
        await meter.read_points(["power_w"])
        assert meter.last_latency_s >= 0.1
    with_line(body, timeout_s=0.3)


def test_faults_from_the_site_file() -> None:
    config = rtu_config(faults={"main-meter": {"exception_code": 4}})

    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        with pytest.raises(DeviceException) as ei:
            await meter.read_points(["power_w"])
        assert ei.value.code == 4
        site.set_faults("main-meter", Faults())
        assert "power_w" in await meter.read_points(["power_w"])
    with_line(body, config=config)


def test_a_late_answer_is_never_taken_for_the_next_one() -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        site.set_faults("main-meter", Faults(delay_s=0.25))
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await meter.read_points(["power_w"])
        # the meter's late answer (id 1) comes while we wait for the relays' (id 2): skipped
        assert (await relays.read_points(["relay_1"])) == {"relay_1": True}
        await until(lambda: line.idle, "the late answer")

        with pytest.raises(DeviceUnavailable, match="no answer"):
            await meter.read_points(["power_w"])
        site.set_faults("main-meter", Faults())
        # same device id, another function: the late 04 answer is refused for this 03 request
        with pytest.raises(DeviceUnavailable, match=r"answer to another request \(function 4, "
                                                    r"expected 3\)"):
            await bus.call("main-meter", 3, lambda c: c.read_holding_registers(0, count=2,
                                                                               device_id=1))
        received = bus.bytes_received
        await until(lambda: line.idle, "the simulated line to answer the 03 request")
        # its answer (exception 02, 5 bytes) reaches us between transactions: dropped
        await until(lambda: bus.bytes_received >= received + 5, "the answer to reach the bus")
        assert "power_w" in await meter.read_points(["power_w"])
    with_line(body, timeout_s=0.15)


# -- the port ---------------------------------------------------------------------------------


def test_no_such_port(tmp_path: Path) -> None:
    async def main() -> None:
        bus = ModbusRtuBus(str(tmp_path / "ttyUSB9"), timeout_s=0.2)
        with pytest.raises(DeviceUnavailable, match=r"no such serial port .*ttyUSB9"):
            await ModbusDevice("meter", bus, 1, METER).read_points()
        bus.close()
    asyncio.run(main())


def test_port_busy() -> None:
    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        await ModbusDevice("relays", bus, 2, RELAYS).read_points()
        assert line.path is not None
        other = ModbusRtuBus(line.path, timeout_s=0.2)
        with pytest.raises(DeviceUnavailable, match="is busy: another program holds it"):
            await ModbusDevice("relays", other, 2, RELAYS).read_points()
        other.close()
    with_line(body)


def test_permission_denied_names_the_dialout_group() -> None:
    msg = open_error("/dev/ttyUSB0", PermissionError(errno.EACCES, "Permission denied"))
    assert msg.startswith("permission denied on /dev/ttyUSB0") and "'dialout' group" in msg
    if os.geteuid() == 0:
        return  # root opens any tty: the real case needs an ordinary user

    async def body(site: SimulatedSite, line: RtuLineServer, bus: ModbusRtuBus) -> None:
        assert line.path is not None
        os.chmod(line.path, 0)
        with pytest.raises(DeviceUnavailable, match=r"permission denied.*dialout"):
            await ModbusDevice("relays", bus, 2, RELAYS).read_points()
    with_line(body)


def test_port_gone_and_back(tmp_path: Path) -> None:
    link = tmp_path / "ttyRS485"
    config = rtu_config(link=link)

    async def main() -> None:
        site = SimulatedSite(config, port=0, clock=lambda: T0)
        await site.start()
        bus = ModbusRtuBus(str(link), timeout_s=0.2)
        relays = ModbusDevice("relays", bus, 2, RELAYS)
        try:
            assert (await relays.read_points())["relay_1"] is True
            await site.stop()
            await until(lambda: not bus.connected, "the bus to see the port vanish")
            with pytest.raises(DeviceUnavailable, match="no such serial port"):
                await relays.read_points()
            site = SimulatedSite(config, port=0, clock=lambda: T0)
            await site.start()
            assert (await relays.read_points())["relay_1"] is True
        finally:
            bus.close()
            await site.stop()
    asyncio.run(main())


# -- the shared base, over TCP ------------------------------------------------------------------


def test_tcp_bus_counts_bytes_and_reports_a_dropped_connection() -> None:
    async def main() -> None:
        site = SimulatedSite(load_site(EXAMPLES / "demo-site.toml"), port=0, clock=lambda: T0)
        port = await site.start()
        bus = ModbusTcpBus("127.0.0.1", port, timeout_s=0.3)
        meter = ModbusDevice("main-meter", bus, 1, METER)
        try:
            await meter.read_points()
            # MBAP header (7) + PDU: request 7 + 5, answer 7 + 2 + 152
            assert (bus.transactions, bus.bytes_sent, bus.bytes_received) == (1, 12, 161)
            site.set_faults("main-meter", Faults(drop_rate=1.0))
            with pytest.raises(DeviceUnavailable, match="connection closed by the device"):
                await meter.read_points()
            site.set_faults("main-meter", Faults(garbage_rate=1.0))
            with pytest.raises(DeviceUnavailable, match="garbled answer"):
                await meter.read_points()
            site.set_faults("main-meter", Faults())
            assert "power_w" in await meter.read_points()
        finally:
            bus.close()
            await site.stop()
    asyncio.run(main())
