"""Partial reads and read costs: a DL/T 645 meter whose one data identifier is unreadable still
gives the others (over a real pseudo-terminal), and what a read costs on the wire — the number
of requests and their transmission time — for the agent's per-transaction deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from lmt.config.profiles import load_profile
from lmt.config.site import Faults, SimLine
from lmt.drivers.dlt645 import Dlt645FrameError, Dlt645Meter, Dlt645Refused
from lmt.drivers.modbus import ModbusDevice
from lmt.drivers.modbus_rtu import ModbusRtuBus
from lmt.drivers.serial_line import SerialLine, dlt645_silence_s
from lmt.firmware_sim.dlt645 import Dlt645Line

T0 = 1_750_000_000.0
A1 = "123456789012"
PROFILE = load_profile("dlt645-2007-3phase")
DI_V1 = PROFILE.point("voltage_l1_v").di


def quantities(t: float) -> dict[str, float]:
    return {"voltage_l1_v": 231.4, "voltage_l2_v": 229.9, "voltage_l3_v": 230.0,
            "current_l1_a": 12.345, "current_l2_a": 0.001, "current_l3_a": 7.5,
            "power_w": 4321.2, "power_l1_w": 2857.1, "power_l2_w": 0.3, "power_l3_w": 1463.8,
            "power_factor": 0.875, "frequency_hz": 49.98,
            "import_energy_kwh": 1234.56, "export_energy_kwh": 0.0}


def run_line(body, baud: int = 9600) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        sim = Dlt645Line({A1: None}, quantities, clock=lambda: T0, response_delay_s=0.005,
                         line_settings=SimLine(name="meters", protocol="dlt645", baud=baud))
        await sim.start()
        line = SerialLine(sim.device_path, baud_rate=baud, parity="E", timeout_s=0.5,
                          silence_s=dlt645_silence_s(baud), name="meters")
        try:
            await body(sim, Dlt645Meter("main", line, A1, PROFILE, timeout_s=0.5))
        finally:
            line.close()
            await sim.stop()
    asyncio.run(main())


def test_one_undecodable_data_identifier_leaves_the_others_read() -> None:
    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        names = ["voltage_l1_v", "voltage_l2_v", "power_kw"]
        sim.set_raw(A1, DI_V1, b"\xab\xcd")  # not BCD: the meter's data for this DI is broken
        with pytest.raises(Dlt645FrameError, match="not BCD"):  # strict: the whole read fails
            await meter.read_points(names)
        got = await meter.read(names)
        assert got.values == {"voltage_l2_v": pytest.approx(229.9),
                              "power_kw": pytest.approx(4.3212)}
        [(points, exc)] = got.failures
        assert points == ("voltage_l1_v",) and isinstance(exc, Dlt645FrameError)
        assert f"DI {DI_V1}" in str(exc)
        # too short for its format: the same
        sim.set_raw(A1, DI_V1, b"\x12")
        got = await meter.read(names)
        assert "voltage_l1_v" not in got.values
        assert "needs 2" in str(got.failures[0][1])
        # every DI failing is a failure of the meter
        with pytest.raises(Dlt645FrameError):
            await meter.read(["voltage_l1_v"])
        # mended: read again, nothing failing
        sim.set_raw(A1, DI_V1, bytes.fromhex("4323"))  # 234.3 V: BCD 2343, low byte first
        again = await meter.read(names)
        assert again.values["voltage_l1_v"] == pytest.approx(234.3) and again.failures == ()
    run_line(body)


def test_a_refusing_or_silent_meter_still_fails_the_read() -> None:
    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        sim.set_faults(A1, Faults(exception_code=4))  # every request refused
        with pytest.raises(Dlt645Refused, match="not authorised"):
            await meter.read(["voltage_l1_v", "power_kw"])
        sim.set_faults(A1, Faults(offline=True))
        with pytest.raises(Exception, match="no answer"):
            await meter.read(["voltage_l1_v", "power_kw"])
    run_line(body)


def test_dlt645_read_cost_matches_the_wire_at_2400_baud() -> None:
    async def body(sim: Dlt645Line, meter: Dlt645Meter) -> None:
        names = [p.name for p in PROFILE.points]
        assert meter.transactions(names) == 26 == meter.transactions()
        wire = meter.wire_time_s(names)
        # per DI: 20-byte request, 24-byte-ish reply at 11 bits / 2400 bit/s, 20 ms idle gap
        assert 26 * 0.2 < wire < 26 * 0.25
        t0 = time.monotonic()
        await meter.read_points(names)
        took = time.monotonic() - t0
        # the simulated meter answers at the pace of the line (its request travels in no time
        # on a pseudo-terminal, so the estimate is above what it takes), yet not far off
        assert took > wire / 2
    run_line(body, baud=2400)


def test_modbus_rtu_read_cost() -> None:
    bus = ModbusRtuBus("/dev/ttyUSB0", baud=9600, parity="E")  # not opened
    meter = ModbusDevice("sub", bus, 3, load_profile("acrel-adl400"))
    assert meter.transactions() == 4
    regs = sum(b.count for b in meter.plan())
    frames = 4 * (8 + 5) + 2 * regs  # requests + answers, CRC included
    assert meter.wire_time_s() == pytest.approx(frames * 11 / 9600 + 4 * bus.silence_s)
    relays = ModbusDevice("relays", bus, 2, load_profile("generic-relay-8"))
    assert relays.wire_time_s(["relay_1"]) == pytest.approx((8 + 6) * 11 / 9600 + bus.silence_s)
