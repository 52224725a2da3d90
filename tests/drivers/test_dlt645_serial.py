"""The DL/T 645 driver against the simulated meter line over a real pseudo-terminal: every point
of the profile, two meters on one line, read address, time sync, verified 1C commands, a refused
1C, and a typed error for every fault, after which the line still works."""

from __future__ import annotations

import asyncio
import errno
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import serial

from lmt.config.profiles import Profile, load_profile
from lmt.config.site import Faults, SimDevice, SimLine, SiteConfig, SiteInfo
from lmt.drivers.dlt645 import Dlt645FrameError, Dlt645Meter, Dlt645Refused, decode_value
from lmt.drivers.errors import DeviceUnavailable, VerificationError
from lmt.drivers.serial_line import SerialLine, dlt645_silence_s
from lmt.firmware_sim.dlt645 import Dlt645Line
from lmt.firmware_sim.physics import SitePhysics, lookup

T0 = 1_750_000_000.0
A1 = "123456789012"
A2 = "000000000002"
PROFILE = load_profile("dlt645-2007-3phase")


def physics() -> SitePhysics:
    site = SiteConfig(
        site=SiteInfo(base_load_kw=30.0, noise_kw=0.5),
        lines=[SimLine(name="rs485", protocol="dlt645")],
        devices=[SimDevice(name="main", profile="dlt645-2007-3phase", address=A1, line="rs485")])
    return SitePhysics(site)


def exporting(t: float) -> dict[str, float]:
    """A meter on a site that exports: negative powers and currents."""
    return {"voltage_l1_v": 231.4, "voltage_l2_v": 229.9, "voltage_l3_v": 230.0,
            "current_l1_a": -12.345, "current_l2_a": -0.001, "current_l3_a": 7.5,
            "power_w": -4321.2, "power_l1_w": -2857.1, "power_l2_w": -0.3, "power_l3_w": 1725.0,
            "power_factor": -0.875, "frequency_hz": 49.98,
            "import_energy_kwh": 1234.56, "export_energy_kwh": 98765.43}


def expected(q: Mapping[str, float], name: str) -> float:
    """What the meter holds for point ``name``, worked out here, not by the simulator."""
    if name == "reactive_power_kvar":
        pf = q["power_factor"]
        return q["power_w"] * math.sqrt(1 - pf * pf) / pf / 1000
    if name == "combined_energy_kwh":
        return q["import_energy_kwh"] + q["export_energy_kwh"]
    return lookup(q, name)


def resolution(name: str, profile: Profile = PROFILE) -> float:
    return 10.0 ** -profile.point(name).dlt_decimals


async def wait_until(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


def with_line(body: Callable[[Dlt645Line, SerialLine], Awaitable[Any]], *,
              meters: Mapping[str, Profile | None] | None = None,
              quantities: Any = None, baud: int = 9600, timeout_s: float = 0.5,
              link: Path | None = None, **sim_kw: Any) -> Any:
    sim_kw.setdefault("response_delay_s", 0.005)

    async def main() -> Any:
        sim = Dlt645Line(meters or {A1: None}, quantities or physics().quantities,
                         clock=lambda: T0,
                         line_settings=SimLine(name="rs485", protocol="dlt645", baud=baud, link=link),
                         **sim_kw)
        await sim.start()
        line = SerialLine(str(link) if link else sim.device_path, baud_rate=baud, parity="E",
                          timeout_s=timeout_s, silence_s=dlt645_silence_s(baud), name="rs485")
        try:
            return await body(sim, line)
        finally:
            line.close()
            await sim.stop()
    return asyncio.run(main())


# -- reading -----------------------------------------------------------------------------------


def test_every_point_reads_what_the_simulator_holds() -> None:
    phys = physics()

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE, timeout_s=0.5)
        values = await meter.read_points()
        assert line.transactions == len({p.di for p in PROFILE.points}) == 26
        q = phys.quantities(T0)
        assert set(values) == {p.name for p in PROFILE.points}
        for name, got in values.items():
            assert got is not None
            assert got == pytest.approx(expected(q, name), abs=resolution(name) / 2 + 1e-9), name
        assert values["power_kw"] == pytest.approx(q["power_w"] / 1000, abs=1e-4)
        assert meter.last_latency_s > 0
        assert line.bytes_sent > 0 and line.bytes_received > 0
    with_line(body, quantities=phys.quantities)


def test_two_meters_on_one_line_with_signed_values() -> None:
    phys = physics()

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        main = Dlt645Meter("main", line, A1, PROFILE)
        pv = Dlt645Meter("pv", line, A2, PROFILE)
        # Both at once: the line runs one transaction at a time.
        a, b = await asyncio.gather(main.read_points(), pv.read_points())
        q1, q2 = phys.quantities(T0), exporting(T0)
        for name in a:
            tol = resolution(name) / 2 + 1e-9
            assert a[name] == pytest.approx(expected(q1, name), abs=tol), name
            assert b[name] == pytest.approx(expected(q2, name), abs=tol), name
        assert b["current_l1_a"] == pytest.approx(-12.345)
        assert b["power_kw"] == pytest.approx(-4.3212)
        assert b["power_factor"] == pytest.approx(-0.875)
        assert b["combined_energy_kwh"] == pytest.approx(99999.99)
    with_line(body, meters={A1: None, A2: None},
              quantities={A1: phys.quantities, A2: exporting})


def test_at_2400_baud_the_default_line_speed() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A2, PROFILE, timeout_s=1.0)
        got = await meter.read_points(["import_energy_kwh", "power_kw"])
        assert got == {"import_energy_kwh": pytest.approx(1234.56), "power_kw": pytest.approx(-4.3212)}
        # 20-byte request and 24-byte reply at 11 bits per character are on the wire ~100 ms.
        assert meter.last_latency_s >= 24 * 11 / 2400
    with_line(body, meters={A2: None}, quantities=exporting, baud=2400, response_delay_s=0.02)


def test_unknown_data_identifier() -> None:
    extra = Profile.model_validate({
        **PROFILE.model_dump(exclude={"points"}),
        "points": [*(p.model_dump() for p in PROFILE.points[:2]),
                   {"name": "neutral_current_a", "di": "02800001", "format": "XXX.XXX",
                    "signed": True, "unit": "A"}]})

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, extra)
        with pytest.raises(Dlt645Refused, match="no data requested") as ei:
            await meter.read_di("02800001")
        assert ei.value.no_data
        values = await meter.read_points()
        assert values["neutral_current_a"] is None  # the meter has no such data
        assert values["import_energy_kwh"] == pytest.approx(12345.6)
    with_line(body)


def test_multi_frame_replies() -> None:
    long = bytes(range(256)) * 2  # a test-only DI with 512 data bytes

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A2, PROFILE)
        sim.set_raw(A2, "04800001", long)
        before = line.transactions
        assert await meter.read_di("04800001") == long
        assert line.transactions - before == 3  # 200 + 200 + 112 bytes
        sim.max_reply_data = 4
        before = line.transactions
        block = await meter.read_di("0201FF00")  # phase voltages, 6 bytes: 4 + 2
        assert line.transactions - before == 2
        volts = [decode_value(block[i:i + 2], PROFILE.point(f"voltage_l{n}_v"))
                 for n, i in ((1, 0), (2, 2), (3, 4))]
        assert volts == [pytest.approx(231.4), pytest.approx(229.9), pytest.approx(230.0)]
    with_line(body, meters={A2: None}, quantities=exporting)


# -- read address, time sync -------------------------------------------------------------------


def test_read_address_of_the_only_meter() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        assert await Dlt645Meter.read_address(line) == A1
    with_line(body)


def test_read_address_with_two_meters_collides() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        with pytest.raises(DeviceUnavailable, match="exactly one meter"):
            await Dlt645Meter.read_address(line)
        # The line is fine for addressed requests.
        assert (await Dlt645Meter("pv", line, A2, PROFILE).read_points(["power_kw"]))["power_kw"] \
            == pytest.approx(-4.3212)
    with_line(body, meters={A1: None, A2: None}, quantities=exporting)


def test_broadcast_time_sync_sets_every_meter_clock() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5)

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE)
        before = sim.requests
        await meter.sync_time(when)
        await wait_until(lambda: sim.requests > before, 2, "the broadcast to arrive")
        assert sim.meter_time(A1) == when and sim.meter_time(A2) == when
        assert sim.replies == 0  # nobody answers a broadcast
        assert await meter.read_clock() == when
        assert await Dlt645Meter("pv", line, A2, PROFILE).read_clock() == when
    with_line(body, meters={A1: None, A2: None}, quantities=exporting)


# -- 1C control --------------------------------------------------------------------------------


def test_trip_and_allow_close_confirmed_by_status_word_3() -> None:
    events: list[tuple[str, bool]] = []

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE)
        st = await meter.read_status_word3()
        assert not st.relay_open and not st.relay_command_open
        st = await meter.trip()
        assert st is not None and st.relay_open and st.relay_command_open
        assert events == [(A1, False)] and not sim.relay_closed(A1)
        st = await meter.allow_close()
        assert st is not None and not st.relay_open and not st.relay_command_open
        assert events == [(A1, False), (A1, True)] and sim.relay_closed(A1)

        st = await meter.alarm()
        assert st is not None and st.pre_trip_alarm
        st = await meter.clear_alarm()
        assert st is not None and not st.pre_trip_alarm

        st = await meter.guarantee(True)
        assert st is not None and st.guarantee
        with pytest.raises(VerificationError, match="power guarantee"):
            await meter.trip(settle_s=0)
        assert sim.relay_closed(A1) and len(events) == 2
        st = await meter.guarantee(False)
        assert st is not None and not st.guarantee
        await meter.trip()
        assert sim.status_word3(A1) & 0x50 == 0x50
    with_line(body, on_relay=lambda a, closed: events.append((a, closed)))


def test_allow_close_waiting_for_the_button() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE)
        await meter.trip()
        st = await meter.allow_close()
        assert st is not None and st.relay_open and not st.relay_command_open
        sim.press_button(A1)
        assert not (await meter.read_status_word3()).relay_open
    with_line(body, auto_close=False)


def test_trip_delay_reported_while_counting_down() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE)
        with pytest.raises(VerificationError, match="counting down its trip delay"):
            await meter.trip(settle_s=0)
        st = await meter.trip(settle_s=5)  # polls status word 3 until the relay opens
        assert st is not None and st.relay_open and not st.pre_trip_alarm
    with_line(body, trip_delay_s=0.5)


def test_refused_control_says_so_and_changes_nothing() -> None:
    events: list[tuple[str, bool]] = []

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE)  # default password 000000
        with pytest.raises(Dlt645Refused) as ei:
            await meter.trip()
        text = str(ei.value)
        assert "refused the trip command" in text and "ESAM" in text
        assert "wrong password or not authorised" in text and ei.value.unauthorised
        assert sim.relay_closed(A1) and events == []
        meter.password = "123456"
        await meter.trip()
        assert not sim.relay_closed(A1) and events == [(A1, False)]
    with_line(body, password="123456", on_relay=lambda a, c: events.append((a, c)))


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("faults", "error", "match"), [
    (Faults(offline=True), DeviceUnavailable, "no answer within 0.3 s"),
    (Faults(no_answer_rate=1.0), DeviceUnavailable, "no answer within 0.3 s"),
    (Faults(delay_s=1.0), DeviceUnavailable, "no answer within 0.3 s"),
    (Faults(crc_error_rate=1.0), Dlt645FrameError, "bad checksum"),
    (Faults(garbage_rate=1.0), DeviceUnavailable, "noise"),
    (Faults(exception_code=4), Dlt645Refused, "wrong password or not authorised"),
], ids=["offline", "no-answer", "late", "checksum", "garbage", "abnormal"])
def test_fault_gives_typed_error_and_line_recovers(faults: Faults, error: type[Exception],
                                                   match: str) -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        meter = Dlt645Meter("main", line, A1, PROFILE, timeout_s=0.3)
        sim.set_faults(A1, faults)
        with pytest.raises(error, match=match):
            await meter.read_points(["power_kw"])
        sim.set_faults(A1, Faults())
        got = await meter.read_points(["power_kw", "voltage_l1_v"])
        assert got["voltage_l1_v"] == pytest.approx(231.4)
    with_line(body, quantities=exporting, timeout_s=0.3)


def test_faults_of_one_meter_leave_the_other_alone() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        sim.set_faults(A1, Faults(offline=True))
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await Dlt645Meter("main", line, A1, PROFILE, timeout_s=0.2).read_points(["power_kw"])
        got = await Dlt645Meter("pv", line, A2, PROFILE).read_points(["power_kw"])
        assert got["power_kw"] == pytest.approx(-4.3212)
    with_line(body, meters={A1: None, A2: None}, quantities=exporting)


# -- the port ----------------------------------------------------------------------------------


def test_missing_port_is_a_clear_error() -> None:
    async def main() -> None:
        line = SerialLine("/dev/ttyNOSUCHPORT", baud_rate=2400, parity="E")
        meter = Dlt645Meter("main", line, A1, PROFILE)
        with pytest.raises(DeviceUnavailable, match="no such serial port /dev/ttyNOSUCHPORT"):
            await meter.read_points()
    asyncio.run(main())


def test_port_held_by_another_program_is_busy() -> None:
    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        line.open()
        other = SerialLine(sim.device_path, baud_rate=9600, parity="E")
        with pytest.raises(DeviceUnavailable, match="busy: another program holds it"):
            other.open()
        assert (await Dlt645Meter("main", line, A1, PROFILE).read_points(["power_kw"]))["power_kw"]
    with_line(body, quantities=exporting)


def test_permission_error_names_the_dialout_group() -> None:
    line = SerialLine("/dev/ttyUSB9")
    exc = serial.SerialException(errno.EACCES, "could not open port /dev/ttyUSB9: [Errno 13]")
    assert "dialout" in line._open_error(exc)


def test_simulator_link_points_at_the_pty(tmp_path: Path) -> None:
    link = tmp_path / "ttyDLT645"

    async def body(sim: Dlt645Line, line: SerialLine) -> None:
        assert link.is_symlink() and link.resolve() == Path(sim.device_path).resolve()
        assert (await Dlt645Meter("main", line, A1, PROFILE).read_points(["frequency_hz"])) == {
            "frequency_hz": pytest.approx(49.98)}
    with_line(body, quantities=exporting, link=link)
    assert not link.exists() and not link.is_symlink()
