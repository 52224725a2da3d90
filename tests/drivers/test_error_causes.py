"""Every driver failure carries a machine-readable ``cause``, checked over real transports: TCP
sockets to the simulated site, pseudo-terminals for Modbus RTU and DL/T 645 lines. And
``read(names)`` returns the values of a partial read together with its failures."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import termios
import tomllib
import tty
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmt.agent.broker import free_port
from lmt.config import load_profile, load_site
from lmt.config.site import Faults, SimLine, SiteConfig
from lmt.drivers.dlt645 import Dlt645FrameError, Dlt645Meter, Dlt645Refused, frame_length, read_request
from lmt.drivers.errors import (
    CAUSES,
    DeviceException,
    DeviceUnavailable,
    DriverError,
    VerificationError,
)
from lmt.drivers.modbus import ModbusDevice, ModbusTcpBus
from lmt.drivers.modbus_rtu import ModbusRtuBus
from lmt.drivers.result import ReadResult
from lmt.drivers.serial_line import NoisyLine, SerialLine, dlt645_silence_s
from lmt.firmware_sim import SimulatedSite
from lmt.firmware_sim.dlt645 import Dlt645Line
from tests.conftest import EXAMPLES

T0 = 1_750_000_000.0
METER = load_profile("eastron-sdm630")
RELAYS = load_profile("generic-relay-8")
DLT645 = load_profile("dlt645-2007-3phase")
A1 = "123456789012"
NOBODY = 65534


async def failure(read: Awaitable[Any]) -> DriverError:
    """The driver error ``read`` raises (the test fails if it raises none)."""
    with pytest.raises(DriverError) as ei:
        await read
    assert ei.value.cause in CAUSES
    return ei.value


@pytest.fixture
def pty_path() -> Iterator[str]:
    """A pseudo-terminal nobody answers on (the test holds the other end)."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


# -- Modbus TCP --------------------------------------------------------------------------------


def with_tcp_site(body: Callable[[SimulatedSite, ModbusTcpBus], Awaitable[Any]],
                  config: SiteConfig | None = None, **site_kw: Any) -> Any:
    async def main() -> Any:
        site = SimulatedSite(config or load_site(EXAMPLES / "demo-site.toml"), port=0,
                             clock=lambda: T0, **site_kw)
        port = await site.start()
        bus = ModbusTcpBus("127.0.0.1", port, timeout_s=0.3)
        try:
            return await body(site, bus)
        finally:
            bus.close()
            await site.stop()
    return asyncio.run(main())


@pytest.mark.parametrize(("faults", "error", "cause"), [
    (Faults(offline=True), DeviceUnavailable, "no_answer"),
    (Faults(no_answer_rate=1.0), DeviceUnavailable, "no_answer"),
    (Faults(garbage_rate=1.0), DeviceUnavailable, "garbled"),
    (Faults(drop_rate=1.0), DeviceUnavailable, "connect"),
    (Faults(exception_code=4), DeviceException, "exception"),
    (Faults(exception_code=6), DeviceException, "busy"),
], ids=["offline", "no-answer", "garbage", "drop", "exception", "device-busy"])
def test_tcp_fault_causes(faults: Faults, error: type[DriverError], cause: str) -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        assert "power_w" in await meter.read_points(["power_w"])
        site.set_faults("main-meter", faults)
        exc = await failure(meter.read_points(["power_w"]))
        assert isinstance(exc, error) and exc.cause == cause, exc
        # read() fails alike: nothing at all could be read
        assert (await failure(meter.read(["power_w"]))).cause == cause
    with_tcp_site(body)


def test_tcp_adaptive_timeout_is_no_answer() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        bus.request_timeout_s = 0.1  # the agent's per-request timeout, under pymodbus's 0.3 s
        meter = ModbusDevice("main-meter", bus, 1, METER)
        site.set_faults("main-meter", Faults(no_answer_rate=1.0))
        exc = await failure(meter.read_points(["power_w"]))
        assert exc.cause == "no_answer" and "no answer within 0.1 s" in str(exc)
    with_tcp_site(body)


def test_tcp_exception_answers_are_exceptions() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        # the relay module has no input registers: exception 2 (illegal data address)
        exc = await failure(ModbusDevice("relays", bus, 2, METER).read_points())
        assert isinstance(exc, DeviceException) and (exc.code, exc.cause) == (2, "exception")
        # no device behind the gateway at id 9: exception 11, still the gateway's answer
        exc = await failure(ModbusDevice("ghost", bus, 9, RELAYS).read_points())
        assert isinstance(exc, DeviceException) and (exc.code, exc.cause) == (11, "exception")
    with_tcp_site(body)


def test_tcp_closed_port_is_connect() -> None:
    async def main() -> None:
        bus = ModbusTcpBus("127.0.0.1", free_port(), timeout_s=0.5)
        try:
            exc = await failure(ModbusDevice("meter", bus, 1, METER).read_points())
            assert isinstance(exc, DeviceUnavailable) and exc.cause == "connect"
            assert "cannot connect" in exc.message
        finally:
            bus.close()
    asyncio.run(main())


# -- Modbus RTU --------------------------------------------------------------------------------


def rtu_config() -> SiteConfig:
    """The demo site with its meter (id 1) and relay module (id 2) on one RTU line."""
    raw = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    raw["lines"] = [{"name": "rs485", "protocol": "modbus-rtu", "baud": 9600}]
    for d in raw["devices"]:
        d["line"] = "rs485"
    return SiteConfig.model_validate(raw)


def with_rtu_line(body: Callable[[SimulatedSite, ModbusRtuBus], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        site = SimulatedSite(rtu_config(), port=0, clock=lambda: T0)
        await site.start()
        path = site.rtu_lines["rs485"].path
        assert path is not None
        bus = ModbusRtuBus(path, baud=9600, timeout_s=0.15)
        try:
            return await body(site, bus)
        finally:
            bus.close()
            await site.stop()
    return asyncio.run(main())


@pytest.mark.parametrize(("faults", "error", "cause"), [
    (Faults(offline=True), DeviceUnavailable, "no_answer"),
    (Faults(no_answer_rate=1.0), DeviceUnavailable, "no_answer"),
    (Faults(crc_error_rate=1.0), DeviceUnavailable, "garbled"),
    (Faults(garbage_rate=1.0), DeviceUnavailable, "garbled"),
    (Faults(exception_code=4), DeviceException, "exception"),
    (Faults(exception_code=6), DeviceException, "busy"),
], ids=["offline", "no-answer", "crc", "garbage", "exception", "device-busy"])
def test_rtu_fault_causes(faults: Faults, error: type[DriverError], cause: str) -> None:
    async def body(site: SimulatedSite, bus: ModbusRtuBus) -> None:
        meter = ModbusDevice("main-meter", bus, 1, METER)
        assert "power_w" in await meter.read_points(["power_w"])
        site.set_faults("main-meter", faults)
        exc = await failure(meter.read_points(["power_w"]))
        assert isinstance(exc, error) and exc.cause == cause, exc
    with_rtu_line(body)


def test_rtu_missing_port_is_no_such_port(tmp_path: Path) -> None:
    async def main() -> None:
        bus = ModbusRtuBus(str(tmp_path / "ttyUSB9"), timeout_s=0.2)
        try:
            exc = await failure(ModbusDevice("meter", bus, 1, METER).read_points())
            assert exc.cause == "no_such_port" and "no such serial port" in exc.message
        finally:
            bus.close()
    asyncio.run(main())


def test_rtu_port_held_by_another_is_busy(pty_path: str) -> None:
    async def main() -> None:
        holder = SerialLine(pty_path)
        holder.open()  # an exclusive lock, as every program using the port takes
        bus = ModbusRtuBus(pty_path, timeout_s=0.2)
        try:
            exc = await failure(ModbusDevice("relays", bus, 2, RELAYS).read_points())
            assert exc.cause == "busy" and "is busy" in exc.message
        finally:
            bus.close()
            holder.close()
    asyncio.run(main())


# -- serial port permissions (needs an ordinary user: root opens any tty) -------------------------

PERMISSION_PROBE = """
import asyncio, sys
from lmt.drivers.errors import DriverError
from lmt.drivers.modbus_rtu import ModbusRtuBus
from lmt.drivers.serial_line import SerialLine

async def main(port):
    causes = []
    try:
        SerialLine(port).open()
    except DriverError as exc:
        causes.append(exc.cause)
    bus = ModbusRtuBus(port, timeout_s=0.2)
    try:
        await bus.ensure_connected()
    except DriverError as exc:
        causes.append(exc.cause)
    print(" ".join(causes))

asyncio.run(main(sys.argv[1]))
"""


def _as_nobody() -> list[str] | None:
    """A command prefix that runs a program as an ordinary user ([] when this is one), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    try:
        ok = subprocess.run([*prefix, sys.executable, "-c", "import lmt.drivers.modbus_rtu"],
                            capture_output=True, timeout=60).returncode == 0
    except OSError:
        return None
    return prefix if ok else None


def test_serial_port_not_permitted_is_permission(pty_path: str) -> None:
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("running as root and cannot switch to an ordinary user (setpriv)")
    os.chmod(pty_path, 0o600 if prefix else 0)  # root's pty, or our own with no permission
    res = subprocess.run([*prefix, sys.executable, "-c", PERMISSION_PROBE, pty_path],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["permission", "permission"]


# -- DL/T 645 ----------------------------------------------------------------------------------


def quantities(t: float) -> dict[str, float]:
    return {"voltage_l1_v": 231.4, "voltage_l2_v": 229.9, "voltage_l3_v": 230.0,
            "current_l1_a": 12.345, "current_l2_a": 0.001, "current_l3_a": 7.5,
            "power_w": 4321.2, "power_l1_w": 2857.1, "power_l2_w": 0.3, "power_l3_w": 1463.8,
            "power_factor": 0.875, "frequency_hz": 49.98,
            "import_energy_kwh": 1234.56, "export_energy_kwh": 0.0}


def with_dlt645_line(body: Callable[[Dlt645Line, Dlt645Meter], Awaitable[Any]],
                     **sim_kw: Any) -> Any:
    async def main() -> Any:
        sim = Dlt645Line({A1: None}, quantities, clock=lambda: T0, response_delay_s=0.005,
                         line_settings=SimLine(name="meters", protocol="dlt645", baud=9600),
                         **sim_kw)
        await sim.start()
        line = SerialLine(sim.device_path, baud_rate=9600, parity="E", timeout_s=0.3,
                          silence_s=dlt645_silence_s(9600), name="meters")
        try:
            return await body(sim, Dlt645Meter("main", line, A1, DLT645, timeout_s=0.3))
        finally:
            line.close()
            await sim.stop()
    return asyncio.run(main())


@pytest.mark.parametrize(("faults", "error", "cause"), [
    (Faults(offline=True), DeviceUnavailable, "no_answer"),
    (Faults(no_answer_rate=1.0), DeviceUnavailable, "no_answer"),
    (Faults(crc_error_rate=1.0), Dlt645FrameError, "garbled"),
    (Faults(garbage_rate=1.0), DeviceUnavailable, "garbled"),
    (Faults(exception_code=4), Dlt645Refused, "exception"),
], ids=["offline", "no-answer", "checksum", "garbage", "abnormal"])
def test_dlt645_fault_causes(faults: Faults, error: type[DriverError], cause: str) -> None:
    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        assert "power_kw" in await meter.read_points(["power_kw"])
        sim.set_faults(A1, faults)
        exc = await failure(meter.read_points(["power_kw"]))
        assert isinstance(exc, error) and exc.cause == cause, exc
        assert (await failure(meter.read(["power_kw"]))).cause == cause
    with_dlt645_line(body)


def test_dlt645_command_not_carried_out_is_verification() -> None:
    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        # the meter takes the trip but counts down its trip delay: not open yet
        exc = await failure(meter.trip(settle_s=0))
        assert isinstance(exc, VerificationError) and exc.cause == "verification"
    with_dlt645_line(body, trip_delay_s=0.5)


def test_dlt645_missing_and_busy_ports(tmp_path: Path) -> None:
    async def main() -> None:
        missing = SerialLine(str(tmp_path / "ttyNOSUCHPORT"), baud_rate=2400, parity="E")
        exc = await failure(Dlt645Meter("main", missing, A1, DLT645).read_points())
        assert exc.cause == "no_such_port"
    asyncio.run(main())

    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        meter.line.open()
        other = SerialLine(sim.device_path, baud_rate=9600, parity="E")
        with pytest.raises(DeviceUnavailable) as ei:
            other.open()
        assert ei.value.cause == "busy"
    with_dlt645_line(body)


def test_an_echo_alone_is_no_answer_and_a_cut_off_frame_garbled() -> None:
    """An RS-485 adapter that hears its own transmitter sends the request back: with nothing
    after it, no answer (a scan must not take it for colliding meters); a frame that starts
    and never completes is garbled."""
    async def main() -> None:
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        tail = b""

        def echo() -> None:
            try:
                os.write(master, os.read(master, 4096) + tail)
            except OSError:
                pass
        loop.add_reader(master, echo)
        line = SerialLine(os.ttyname(slave), baud_rate=9600, parity="E", timeout_s=0.2)
        request = read_request(A1, "02010100")
        try:
            exc = await failure(line.transact(request, frame_length))
            assert exc.cause == "no_answer" and "only the echo" in exc.message
            tail = bytes.fromhex("FE FE 68 12 34 56")  # a reply that starts, then stops
            exc = await failure(line.transact(request, frame_length))
            assert exc.cause == "garbled" and not isinstance(exc, NoisyLine)
            assert "no complete answer" in exc.message
        finally:
            loop.remove_reader(master)
            line.close()
            os.close(master)
            os.close(slave)
    asyncio.run(main())


# -- read(): values and failures ----------------------------------------------------------------

# A sub-meter whose firmware lacks the power-factor/frequency group of its profile: that block
# answers exception 2 (illegal data address), the other three blocks answer.
ADL400 = load_profile("acrel-adl400")
PF_BLOCK = ("power_factor_l1", "power_factor_l2", "power_factor_l3", "power_factor",
            "frequency_hz")
ADL400_NO_PF = ADL400.model_copy(update={"points": tuple(p for p in ADL400.points
                                                          if p.name not in PF_BLOCK)})
PARTIAL_SITE = {"site": {"seed": 3}, "devices": [
    {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
    {"name": "sub", "profile": "acrel-adl400", "device_id": 3}]}


def test_modbus_read_returns_the_values_and_the_failed_blocks() -> None:
    async def body(site: SimulatedSite, bus: ModbusTcpBus) -> None:
        sub = ModbusDevice("sub", bus, 3, ADL400)
        got = await sub.read()
        assert isinstance(got, ReadResult)
        assert set(got.values) == {p.name for p in ADL400.points} - set(PF_BLOCK)
        assert got.values["voltage_l1_v"] == pytest.approx(230.0, rel=0.1)
        [(points, exc)] = got.failures
        assert points == PF_BLOCK
        assert isinstance(exc, DeviceException) and (exc.code, exc.cause) == (2, "exception")
        assert not hasattr(sub, "last_failures")  # read() returns its failures: no side channel
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.failures = ()  # type: ignore[misc]
        # read_points is strict: the failing block fails the read
        assert (await failure(sub.read_points())).cause == "exception"
        # only the failing block asked: nothing read at all, so it raises
        exc = await failure(sub.read(["frequency_hz", "power_factor"]))
        assert isinstance(exc, DeviceException) and exc.cause == "exception"
        # nothing failing: no failures
        full = await ModbusDevice("main-meter", bus, 1, METER).read(["power_w", "frequency_hz"])
        assert set(full.values) == {"power_w", "frequency_hz"} and full.failures == ()
    with_tcp_site(body, SiteConfig.model_validate(PARTIAL_SITE),
                  profiles={"acrel-adl400": ADL400_NO_PF})


def test_dlt645_read_returns_the_values_and_the_failed_data_identifiers() -> None:
    di_v1 = DLT645.point("voltage_l1_v").di
    assert di_v1 is not None

    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        names = ["voltage_l1_v", "voltage_l2_v", "power_kw"]
        sim.set_raw(A1, di_v1, b"\xab\xcd")  # not BCD: this DI's data is broken
        got = await meter.read(names)
        assert got.values == {"voltage_l2_v": pytest.approx(229.9),
                              "power_kw": pytest.approx(4.3212)}
        [(points, exc)] = got.failures
        assert points == ("voltage_l1_v",)
        assert isinstance(exc, Dlt645FrameError) and exc.cause == "garbled"
        assert not hasattr(meter, "last_failures")
        # every DI failing: the read raises
        assert (await failure(meter.read(["voltage_l1_v"]))).cause == "garbled"
        sim.set_raw(A1, di_v1, bytes.fromhex("4323"))  # mended: 234.3 V
        again = await meter.read(names)
        assert again.values["voltage_l1_v"] == pytest.approx(234.3) and again.failures == ()
    with_dlt645_line(body)
