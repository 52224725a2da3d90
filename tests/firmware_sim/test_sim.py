"""The simulated site, seen from the wire: a hand-written Modbus TCP client over a real socket.

The client builds MBAP headers and PDUs with ``struct`` itself (no pymodbus client, no
``lmt.drivers``), so these tests check the simulator against the protocol, not against our own
driver. The demo site's register map is written out here independently of the profiles, as
docs/simulator.md gives it to other Modbus masters.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lmt.config
from lmt.config import SiteConfig, load_site
from lmt.config.profiles import DataType, Point, Profile, Table
from lmt.config.site import SimDevice, SimServer, SiteInfo
from lmt.firmware_sim import CoilChange, SimulatedSite, SitePhysics, run_site
from lmt.firmware_sim.cli import main as sim_main
from lmt.firmware_sim.encoding import encode
from lmt.firmware_sim.physics import lookup

DEMO_SITE = Path(lmt.config.__file__).parent / "examples" / "demo-site.toml"
T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC, an hour after the demo site's peak
METER, RELAYS, ABSENT = 1, 2, 9  # device ids

# Eastron SDM630 input registers (function 04), float32, high word first.
SDM630: dict[str, int] = {
    "voltage_l1_v": 0x00, "voltage_l2_v": 0x02, "voltage_l3_v": 0x04,
    "current_l1_a": 0x06, "current_l2_a": 0x08, "current_l3_a": 0x0A,
    "power_l1_w": 0x0C, "power_l2_w": 0x0E, "power_l3_w": 0x10,
    "power_factor_l1": 0x1E, "power_factor_l2": 0x20, "power_factor_l3": 0x22,
    "power_w": 0x34, "frequency_hz": 0x46, "import_energy_kwh": 0x48,
    "export_energy_kwh": 0x4A,
}
SDM630_WORDS = 0x4C  # one read of 0x00-0x4B bridges the map's gaps, as a driver does


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


# -- a raw Modbus TCP client ---------------------------------------------------------------------


class ModbusError(Exception):
    def __init__(self, function: int, code: int) -> None:
        super().__init__(f"function {function:#04x}: exception {code:#04x}")
        self.function = function
        self.code = code


class RawClient:
    """Modbus TCP master: MBAP header (transaction, protocol 0, length, unit id) + PDU."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.tid = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf

    def transact(self, unit: int, pdu: bytes) -> bytes:
        """Send one request PDU; return the response PDU, raise ModbusError for an exception."""
        self.tid = (self.tid + 1) & 0xFFFF
        self.sock.sendall(struct.pack(">HHHB", self.tid, 0, len(pdu) + 1, unit) + pdu)
        tid, proto, length, r_unit = struct.unpack(">HHHB", self._recv_exact(7))
        body = self._recv_exact(length - 1)
        assert (tid, proto, r_unit) == (self.tid, 0, unit)
        if body[0] == pdu[0] | 0x80:
            assert len(body) == 2
            raise ModbusError(pdu[0], body[1])
        assert body[0] == pdu[0]
        return body

    def read_registers(self, unit: int, function: int, address: int, count: int) -> list[int]:
        body = self.transact(unit, struct.pack(">BHH", function, address, count))
        assert body[1] == 2 * count == len(body) - 2
        return list(struct.unpack(f">{count}H", body[2:]))

    def read_bits(self, unit: int, function: int, address: int, count: int) -> list[bool]:
        body = self.transact(unit, struct.pack(">BHH", function, address, count))
        assert body[1] == (count + 7) // 8 == len(body) - 2
        return [bool(body[2 + i // 8] >> (i % 8) & 1) for i in range(count)]

    def write_coil(self, unit: int, address: int, on: bool, raw: int | None = None) -> None:
        value = raw if raw is not None else (0xFF00 if on else 0x0000)
        request = struct.pack(">BHH", 5, address, value)
        assert self.transact(unit, request) == request  # function 05 echoes the request

    def read_meter(self, unit: int = METER) -> dict[str, float]:
        regs = self.read_registers(unit, 4, 0, SDM630_WORDS)
        return {name: f32(regs[a], regs[a + 1]) for name, a in SDM630.items()}

    def power_w(self, unit: int = METER) -> float:
        return f32(*self.read_registers(unit, 4, SDM630["power_w"], 2))


def f32(high: int, low: int) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", high, low))[0])


# -- a site in a background event loop ---------------------------------------------------------


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class RunningSite:
    """A SimulatedSite served from an event loop in a background thread."""

    def __init__(self, site: SimulatedSite) -> None:
        self.site = site
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(site.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.site.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def demo() -> SiteConfig:
    return load_site(DEMO_SITE)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def changes() -> list[CoilChange]:
    return []


@pytest.fixture
def running(demo: SiteConfig, clock: FakeClock, changes: list[CoilChange],
            ) -> Iterator[RunningSite]:
    site = SimulatedSite(demo, port=0, clock=clock)
    site.add_listener(changes.append)
    rs = RunningSite(site)
    try:
        yield rs
    finally:
        rs.stop()


@pytest.fixture
def client(running: RunningSite) -> Iterator[RawClient]:
    with RawClient(running.port) as c:
        yield c


# -- the meter ---------------------------------------------------------------------------------


def test_meter_values_are_plausible_and_consistent(running: RunningSite, client: RawClient,
                                                   demo: SiteConfig, clock: FakeClock) -> None:
    m = client.read_meter()
    s = demo.site
    phases = ("l1", "l2", "l3")
    for ph in phases:
        v = m[f"voltage_{ph}_v"]
        assert abs(v - s.voltage_v) <= 0.0031 * s.voltage_v
        assert m[f"power_factor_{ph}"] == pytest.approx(s.power_factor, abs=1e-6)
        p = m[f"power_{ph}_w"]
        assert p == pytest.approx(v * m[f"current_{ph}_a"] * m[f"power_factor_{ph}"], rel=1e-5)
        assert p == pytest.approx(m["power_w"] / 3, rel=0.03)  # small phase imbalance
    assert m["power_w"] == pytest.approx(sum(m[f"power_{ph}_w"] for ph in phases), rel=1e-6)
    assert 49.97 <= m["frequency_hz"] <= 50.03
    switched_kw = sum(load.kw for load in demo.loads if load.on)
    low = s.base_load_kw * (1 - s.daily_swing) - 5 * s.noise_kw + switched_kw
    high = s.base_load_kw * (1 + s.daily_swing) + 5 * s.noise_kw + switched_kw
    assert low <= m["power_w"] / 1000 <= high
    assert m["power_w"] / 1000 == pytest.approx(running.site.site_power_kw(clock.t), rel=1e-6)
    assert m["import_energy_kwh"] == pytest.approx(s.import_energy_kwh, abs=0.002)
    assert m["export_energy_kwh"] == 0.0


def test_gaps_within_max_gap_read_as_zero(client: RawClient) -> None:
    # 0x12-0x1D lies between power_l3_w and power_factor_l1; the profile's max_gap (16) says a
    # block read may bridge it, so the meter answers it (with zeros).
    regs = client.read_registers(METER, 4, 0, SDM630_WORDS)
    assert regs[0x12:0x1E] == [0] * 12
    assert client.read_registers(METER, 4, 0x12, 2) == [0, 0]


def test_values_follow_the_clock(client: RawClient, clock: FakeClock) -> None:
    first = client.read_meter()
    assert client.read_meter() == first  # same instant, same values
    clock.t += 5
    later = client.read_meter()
    assert later["power_w"] != first["power_w"]
    assert later["frequency_hz"] != first["frequency_hz"]


# -- relays --------------------------------------------------------------------------------------


def test_relay_coils_start_as_configured(client: RawClient, demo: SiteConfig) -> None:
    on = {load.relay: load.on for load in demo.loads}
    expected = [on.get(f"relays.relay_{i}", False) for i in range(1, 9)]
    assert client.read_bits(RELAYS, 1, 0, 8) == expected
    assert client.read_bits(RELAYS, 1, 3, 1) == [expected[3]]


def test_switching_a_relay_changes_the_metered_power(running: RunningSite, client: RawClient,
                                                     clock: FakeClock,
                                                     changes: list[CoilChange]) -> None:
    site = running.site
    before = client.power_w()
    client.write_coil(RELAYS, 3, False)  # relay_4: ev-chargers, 22 kW
    after = client.power_w()  # the very next read, same instant: exactly the load's power
    assert before - after == pytest.approx(22_000.0, abs=0.1)
    assert client.read_bits(RELAYS, 1, 3, 1) == [False]
    assert site.loads_on()["ev-chargers"] is False
    assert site.coil_writes["relays"] == [(clock.t, "relays", "relay_4", False)]
    assert [c.describe() for c in changes] == ["relays.relay_4 -> OFF (ev-chargers, 22.0 kW)"]

    clock.t += 10  # new noise: the load still shows, within the noise of two readings
    off = client.power_w()
    client.write_coil(RELAYS, 3, True)
    clock.t += 1
    on = client.power_w()
    assert on - off == pytest.approx(22_000.0, abs=2 * 5 * 800.0)
    assert site.loads_on()["ev-chargers"] is True

    client.write_coil(RELAYS, 3, True)  # no change: recorded as a write, not as a change
    assert len(site.coil_writes["relays"]) == 3
    assert len(changes) == 2
    assert site.coil_writes["main-meter"] == []


def test_a_relay_without_a_load_switches_nothing(running: RunningSite, client: RawClient,
                                                 changes: list[CoilChange]) -> None:
    before = client.power_w()
    client.write_coil(RELAYS, 7, True)  # relay_8 has no load in the demo site
    assert client.read_bits(RELAYS, 1, 7, 1) == [True]
    assert client.power_w() == before
    assert [c.describe() for c in changes] == ["relays.relay_8 -> ON (no load)"]


def test_write_multiple_coils(running: RunningSite, client: RawClient) -> None:
    # function 15: relay_1 and relay_2 (both chillers) off in one request
    request = struct.pack(">BHHBB", 15, 0, 2, 1, 0b00)
    assert client.transact(RELAYS, request) == request[:5]
    assert client.read_bits(RELAYS, 1, 0, 3) == [False, False, True]
    loads = running.site.loads_on()
    assert (loads["chiller-1"], loads["chiller-2"], loads["air-compressor"]) == (False, False, True)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("unit", "function", "address", "count"), [
    (METER, 4, 0x0100, 2),  # far beyond the map
    (METER, 4, SDM630_WORDS, 2),  # just past export_energy_kwh
    (METER, 4, 0x4A, 4),  # runs past the end
    (METER, 3, 0x0000, 2),  # the meter has no holding registers
    (RELAYS, 4, 0x0000, 1),  # the relay module has no input registers
])
def test_undefined_registers_answer_illegal_address(client: RawClient, unit: int,
                                                    function: int, address: int,
                                                    count: int) -> None:
    with pytest.raises(ModbusError) as err:
        client.read_registers(unit, function, address, count)
    assert err.value.code == 0x02


@pytest.mark.parametrize(("unit", "function", "address", "count"), [
    (RELAYS, 1, 8, 1),  # relay_8 is coil 7; coil 8 does not exist
    (RELAYS, 1, 0, 9),  # one bit too many, though in the same 16-bit word
    (RELAYS, 2, 0, 1),  # no discrete inputs
    (METER, 1, 0, 1),  # the meter has no coils
])
def test_undefined_bits_answer_illegal_address(client: RawClient, unit: int, function: int,
                                               address: int, count: int) -> None:
    with pytest.raises(ModbusError) as err:
        client.read_bits(unit, function, address, count)
    assert err.value.code == 0x02


def test_bad_writes_are_refused(running: RunningSite, client: RawClient) -> None:
    with pytest.raises(ModbusError) as err:
        client.write_coil(RELAYS, 8, True)
    assert err.value.code == 0x02
    with pytest.raises(ModbusError) as err:
        client.write_coil(METER, 0, True)
    assert err.value.code == 0x02
    with pytest.raises(ModbusError) as err:
        client.write_coil(RELAYS, 0, True, raw=0x1234)  # only FF00 and 0000 are valid
    assert err.value.code == 0x03
    with pytest.raises(ModbusError) as err:  # function 06 on an input-register meter
        client.transact(METER, struct.pack(">BHH", 6, 0, 1))
    assert err.value.code == 0x02
    assert client.read_bits(RELAYS, 1, 0, 1) == [True]
    assert running.site.coil_writes["relays"] == []


def test_an_absent_device_id_answers_gateway_no_response(client: RawClient) -> None:
    for request in (struct.pack(">BHH", 4, 0, 2), struct.pack(">BHH", 1, 0, 1),
                    struct.pack(">BHH", 5, 0, 0xFF00)):
        with pytest.raises(ModbusError) as err:
            client.transact(ABSENT, request)
        assert err.value.code == 0x0B
    assert client.read_bits(RELAYS, 1, 0, 1) == [True]  # the connection is still usable


# -- energy --------------------------------------------------------------------------------------


def test_import_energy_integrates_power(client: RawClient, clock: FakeClock) -> None:
    def read() -> tuple[float, float]:
        m = client.read_meter()
        return m["import_energy_kwh"], m["power_w"] / 1000

    e0, p0 = read()
    clock.t += 1800
    e1, p1 = read()
    assert e1 - e0 == pytest.approx((p0 + p1) / 2 * 0.5, abs=0.004)  # trapezoid over 30 min
    client.write_coil(RELAYS, 0, False)  # chiller-1 off halfway
    e1b, p1b = read()
    assert e1b == e1
    assert p1 - p1b == pytest.approx(30.0, abs=1e-4)
    clock.t += 1800
    e2, p2 = read()
    assert e2 - e1 == pytest.approx((p1b + p2) / 2 * 0.5, abs=0.004)
    assert e2 > e1 > e0

    clock.t -= 600  # a clock stepping back never decreases the register
    e3, _ = read()
    assert e3 == e2
    assert client.read_meter()["export_energy_kwh"] == 0.0


# -- run_site / lmt sim --------------------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_run_site_serves_until_cancelled(tmp_path: Path) -> None:
    ready = tmp_path / "ready"

    async def scenario() -> int:
        task = asyncio.create_task(run_site(DEMO_SITE, 0, ready))
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "no ready file"
            await asyncio.sleep(0.01)
        port = int(ready.read_text())

        def talk() -> list[bool]:
            with RawClient(port) as c:
                return c.read_bits(RELAYS, 1, 0, 8)

        assert (await asyncio.to_thread(talk))[:7] == [True] * 7
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return port

    port = asyncio.run(scenario())
    assert not ready.exists()
    assert list(tmp_path.iterdir()) == []
    assert _refused(port)


def test_lmt_sim_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "sim.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmt.firmware_sim", str(DEMO_SITE), "--port", "0",
         "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "the ready file")
        assert proc.poll() is None, proc.communicate()[1]
        port = int(ready.read_text())
        with RawClient(port) as c:
            c.write_coil(RELAYS, 3, False)
            c.write_coil(RELAYS, 3, False)
            c.write_coil(RELAYS, 3, True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert lines[0].startswith(f"lmt sim: demo-factory on 127.0.0.1:{port}: main-meter (id 1")
    assert lines[1:] == ["relays.relay_4 -> OFF (ev-chargers, 22.0 kW)",
                         "relays.relay_4 -> ON (ev-chargers, 22.0 kW)",
                         "lmt sim: demo-factory stopped"]
    assert not ready.exists()
    assert _refused(port)


def test_lmt_sim_rejects_a_bad_site_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text('[[devices]]\nname = "m"\nprofile = "no-such-profile"\ndevice_id = 1\n')
    assert sim_main([str(bad)]) == 2
    assert "devices[0].profile: unknown profile 'no-such-profile'" in capsys.readouterr().err


def test_port_in_use_is_an_error(demo: SiteConfig) -> None:
    async def scenario() -> None:
        first = SimulatedSite(demo, port=0)
        port = await first.start()
        try:
            with pytest.raises(OSError, match="cannot listen"):
                await SimulatedSite(demo, port=port).start()
        finally:
            await first.stop()

    asyncio.run(scenario())


# -- the model, directly -------------------------------------------------------------------------


def _quiet(demo: SiteConfig, **site: float) -> SiteConfig:
    return demo.model_copy(update={"site": demo.site.model_copy(update=site)})


def test_daily_curve_peaks_at_peak_hour(demo: SiteConfig) -> None:
    phys = SitePhysics(_quiet(demo, noise_kw=0.0))
    midnight = 1_749_945_600.0  # 2025-06-15 00:00 UTC
    s = demo.site
    assert phys.base_load_kw(midnight + s.peak_hour * 3600) == pytest.approx(
        s.base_load_kw * (1 + s.daily_swing))
    assert phys.base_load_kw(midnight + (s.peak_hour - 12) * 3600) == pytest.approx(
        s.base_load_kw * (1 - s.daily_swing))
    assert phys.base_load_kw(midnight + (s.peak_hour + 6) * 3600) == pytest.approx(s.base_load_kw)


def test_model_is_reproducible_and_consistent(demo: SiteConfig) -> None:
    a, b = SitePhysics(demo), SitePhysics(demo)
    b.quantities(T0 + 77)  # query order does not matter
    qa, qb = a.quantities(T0), b.quantities(T0)
    assert qa == qb
    assert qa["power_l1_w"] + qa["power_l2_w"] + qa["power_l3_w"] == pytest.approx(
        qa["power_w"], rel=1e-12)
    for ph in ("l1", "l2", "l3"):
        assert qa[f"power_{ph}_w"] == pytest.approx(
            qa[f"voltage_{ph}_v"] * qa[f"current_{ph}_a"] * qa[f"power_factor_{ph}"], rel=1e-12)
    assert lookup(qa, "power_kw") == pytest.approx(qa["power_w"] / 1000)
    assert lookup(qa, "power_l2_kw") == pytest.approx(qa["power_l2_w"] / 1000)
    assert lookup(qa, "import_energy_wh") == pytest.approx(qa["import_energy_kwh"] * 1000)
    assert lookup(qa, "no_such_quantity") == 0.0


def test_base_load_never_goes_negative(demo: SiteConfig) -> None:
    phys = SitePhysics(_quiet(demo, base_load_kw=0.5, noise_kw=50.0))
    for load in demo.loads:
        phys.set_relay(load.relay, False)
    powers = [phys.power_kw(T0 + i) for i in range(200)]
    assert min(powers) == 0.0
    q = phys.quantities(next(T0 + i for i, p in enumerate(powers) if p == 0.0))
    assert q["current_l1_a"] == 0.0 and q["power_w"] == 0.0


def test_set_relay(demo: SiteConfig) -> None:
    phys = SitePhysics(demo)
    load = phys.set_relay("relays.relay_5", False)
    assert load is not None and load.name == "water-heater"
    assert phys.loads_on()["water-heater"] is False
    assert phys.set_relay("relays.relay_8", True) is None
    assert phys.relay_on("relays.relay_8") is False


# -- encoding ------------------------------------------------------------------------------------


def _point(type_: DataType, word_order: str = "big", multiplier: float = 1.0) -> Point:
    return Point(name="x", table=Table.HOLDING, address=0, type=type_, word_order=word_order,
                 multiplier=multiplier)


def test_encoding() -> None:
    assert encode(1.5, _point(DataType.FLOAT32)) == [0x3FC0, 0x0000]
    assert encode(1.5, _point(DataType.FLOAT32, "little")) == [0x0000, 0x3FC0]
    assert encode(123.4, _point(DataType.UINT32, multiplier=0.1)) == [0, 1234]
    assert encode(-2, _point(DataType.INT16)) == [0xFFFE]
    assert encode(1e9, _point(DataType.INT16)) == [0x7FFF]  # saturates
    assert encode(-1, _point(DataType.UINT16)) == [0]
    assert encode(math.nan, _point(DataType.UINT16)) == [0]
    words = encode(12345.678, _point(DataType.FLOAT64))
    assert struct.unpack(">d", struct.pack(">4H", *words))[0] == 12345.678


# -- bit fields that share a register ------------------------------------------------------------


def _bits_profile(*extra: Point) -> Profile:
    """A status word (holding register 300) of four bit fields, built here, not from a file:
    bit 0 ``ev_charging`` and bit 1 ``ev_available`` come from the model, bit 2 is a name the
    model does not know, bit 3 is writable; the charging current setpoint follows at 302."""
    def bit(name: str, n: int, writable: bool = False) -> Point:
        return Point(name=name, table=Table.HOLDING, address=300, type=DataType.UINT16, bit=n,
                     writable=writable)
    return Profile(id="test-status-word", vendor="test", model="status word", kind="load",
                   source="this test", max_gap=0, points=(
                       bit("ev_charging", 0), bit("ev_available", 1), bit("door_open", 2),
                       bit("remote_enable", 3, writable=True),
                       Point(name="ev_setpoint_a", table=Table.HOLDING, address=302,
                             type=DataType.FLOAT32, writable=True),
                       *extra))


def _one_device_site(profile: Profile) -> SiteConfig:
    # model_construct: the profile is not in the library, which the site file's check requires
    return SiteConfig.model_construct(
        site=SiteInfo(seed=3), server=SimServer(port=0), lines=[], loads=[],
        devices=[SimDevice(name="dut", profile=profile.id, device_id=5)])


def test_bit_fields_of_one_register_are_merged() -> None:
    profile = _bits_profile()
    site = SimulatedSite(_one_device_site(profile), port=0, clock=FakeClock(T0),
                         profiles={profile.id: profile})
    rs = RunningSite(site)
    try:
        with RawClient(rs.port) as c:
            # not charging (setpoint 0 A), available: bit 1 only
            assert c.read_registers(5, 3, 300, 1) == [0b0010]
            # a write of the whole register: only the writable bit 3 takes it
            request = struct.pack(">BHH", 6, 300, 0xFFFF)
            assert c.transact(5, request) == request
            assert c.read_registers(5, 3, 300, 1) == [0b1010]
            assert site.physics.ev_setpoint_a == 0.0
            # 16 A: the car charges, bit 0 follows the model
            words = struct.unpack(">2H", struct.pack(">f", 16.0))
            c.transact(5, struct.pack(">BHHB2H", 16, 302, 2, 4, *words))
            assert site.physics.ev_setpoint_a == 16.0
            assert c.read_registers(5, 3, 300, 1) == [0b1011]
            # clearing the register clears the writable bit; the model's bits stay
            c.transact(5, struct.pack(">BHH", 6, 300, 0))
            assert c.read_registers(5, 3, 300, 1) == [0b0011]
    finally:
        rs.stop()


def test_other_overlapping_points_are_refused() -> None:
    profile = _bits_profile(Point(name="power_w", table=Table.HOLDING, address=303,
                                  type=DataType.FLOAT32))  # overlaps the setpoint's low word
    with pytest.raises(ValueError, match=r"points ev_setpoint_a, power_w overlap at register "
                                         r"302; only bit fields"):
        SimulatedSite(_one_device_site(profile), port=0, profiles={profile.id: profile})
