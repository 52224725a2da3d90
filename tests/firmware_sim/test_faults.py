"""Fault injection over Modbus TCP, seen by a hand-written client on a real socket: set from the
site file, with ``SimulatedSite.set_faults`` and at runtime through the control channel. The
``frozen`` fault is also seen over a Modbus RTU line and on DL/T 645 meters (pseudo-terminals)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmt.config
from lmt.config import SiteConfig, load_site
from lmt.config.site import Faults
from lmt.firmware_sim import SimulatedSite, run_site
from lmt.firmware_sim.cli import main as sim_main
from lmt.firmware_sim.control import ControlServer, request, request_async
from lmt.firmware_sim.faults import FaultInjector, Outcome
from tests.firmware_sim.test_field_site import Field, with_field
from tests.firmware_sim.test_rtu import RawRtu, rtu_config
from tests.firmware_sim.test_rtu import crc16 as rtu_crc16
from tests.firmware_sim.test_rtu import frame as rtu_frame

DEMO_SITE = Path(lmt.config.__file__).parent / "examples" / "demo-site.toml"
T0 = 1_750_000_000.0
METER, RELAYS = 1, 2
READ_POWER = struct.pack(">BHH", 4, 0x34, 2)  # input registers 0x34-0x35: power_w
READ_RELAYS = struct.pack(">BHH", 1, 0, 8)


class ModbusError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"exception {code}")
        self.code = code


class RawClient:
    """Modbus TCP master built on ``struct`` and a socket with a short timeout."""

    def __init__(self, port: int, timeout_s: float = 0.3) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.tid = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, unit: int, pdu: bytes) -> int:
        self.tid += 1
        self.sock.sendall(struct.pack(">HHHB", self.tid, 0, len(pdu) + 1, unit) + pdu)
        return self.tid

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        return buf

    def receive(self) -> tuple[int, int, bytes]:
        tid, proto, length, unit = struct.unpack(">HHHB", self.recv_exact(7))
        assert proto == 0
        return tid, unit, self.recv_exact(length - 1)

    def transact(self, unit: int, pdu: bytes) -> bytes:
        tid = self.send(unit, pdu)
        r_tid, r_unit, body = self.receive()
        assert (r_tid, r_unit) == (tid, unit)
        if body[0] == pdu[0] | 0x80:
            raise ModbusError(body[1])
        assert body[0] == pdu[0]
        return body


@contextlib.contextmanager
def client(port: int, timeout_s: float = 0.3) -> Iterator[RawClient]:
    c = RawClient(port, timeout_s)
    try:
        yield c
    finally:
        c.close()


class RunningSite:
    """A SimulatedSite (and optionally its control channel) served from a background loop."""

    def __init__(self, site: SimulatedSite, control: bool = False) -> None:
        self.site = site
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port: int = self.call(site.start())
        self.control = ControlServer(site) if control else None
        self.control_port: int = self.call(self.control.start()) if self.control else 0

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        if self.control is not None:
            self.call(self.control.stop())
        self.call(self.site.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def serving(config: SiteConfig, control: bool = False) -> Iterator[RunningSite]:
    rs = RunningSite(SimulatedSite(config, port=0, clock=lambda: T0), control)
    try:
        yield rs
    finally:
        rs.stop()


@pytest.fixture
def demo() -> SiteConfig:
    return load_site(DEMO_SITE)


@pytest.fixture
def running(demo: SiteConfig) -> Iterator[RunningSite]:
    with serving(demo, control=True) as rs:
        yield rs


def with_faults(demo: SiteConfig, device: str, **faults: Any) -> SiteConfig:
    devices = [d.model_copy(update={"faults": Faults(**faults)}) if d.name == device else d
               for d in demo.devices]
    return demo.model_copy(update={"devices": devices})


# -- each fault, seen from the wire -------------------------------------------------------------


@pytest.mark.parametrize("faults", [{"offline": True}, {"no_answer_rate": 1.0}])
def test_no_answer_times_out_and_the_others_still_answer(demo: SiteConfig,
                                                         faults: dict[str, Any]) -> None:
    with serving(with_faults(demo, "main-meter", **faults)) as rs, client(rs.port) as c:
        c.send(METER, READ_POWER)
        with pytest.raises(TimeoutError):
            c.receive()
        assert c.transact(RELAYS, READ_RELAYS)[2] == 0b0111_1111  # same connection, in step


def test_exception_fault(running: RunningSite) -> None:
    running.site.set_faults("main-meter", Faults(exception_code=4))
    with client(running.port) as c:
        with pytest.raises(ModbusError) as err:
            c.transact(METER, READ_POWER)
        assert err.value.code == 4
        running.site.set_faults("main-meter", Faults(exception_code=4, exception_rate=0.0))
        assert c.transact(METER, READ_POWER)[:2] == bytes([4, 4])


def test_garbage_fault(running: RunningSite) -> None:
    running.site.set_faults("main-meter", Faults(garbage_rate=1.0))
    with client(running.port) as c:
        tid = c.send(METER, READ_POWER)
        got = c.recv_exact(7 + 2 + 4)  # as many bytes as the answer would have
        assert got[:4] != struct.pack(">HH", tid, 0)  # not an MBAP header of ours


def test_delay_fault_answers_late_without_holding_up_other_devices(running: RunningSite) -> None:
    running.site.set_faults("main-meter", Faults(delay_s=0.25))
    with client(running.port, timeout_s=2.0) as c:
        t0 = time.monotonic()
        slow = c.send(METER, READ_POWER)
        fast = c.send(RELAYS, READ_RELAYS)
        first, second = c.receive(), c.receive()
        elapsed = time.monotonic() - t0
    assert (first[0], second[0]) == (fast, slow)  # the relays answered first
    assert second[2][:2] == bytes([4, 4])
    assert elapsed >= 0.25


def test_drop_fault_closes_the_connection(running: RunningSite) -> None:
    running.site.set_faults("main-meter", Faults(drop_rate=1.0))
    with client(running.port) as c:
        c.send(METER, READ_POWER)
        assert c.sock.recv(1) == b""
    running.site.set_faults("main-meter", Faults())
    with client(running.port) as c:
        assert c.transact(METER, READ_POWER)[:2] == bytes([4, 4])


def test_crc_errors_do_not_apply_to_tcp(running: RunningSite) -> None:
    running.site.set_faults("main-meter", Faults(crc_error_rate=1.0))
    with client(running.port) as c:
        assert c.transact(METER, READ_POWER)[:2] == bytes([4, 4])


def test_no_answer_means_a_write_did_not_happen(running: RunningSite) -> None:
    running.site.set_faults("relays", Faults(no_answer_rate=1.0))
    with client(running.port) as c:
        c.send(RELAYS, struct.pack(">BHH", 5, 3, 0))
        with pytest.raises(TimeoutError):
            c.receive()
    assert running.site.loads_on()["ev-chargers"] is True
    assert running.site.coil_writes["relays"] == []


def test_faults_from_the_site_file(tmp_path: Path) -> None:
    text = DEMO_SITE.read_text().replace(
        'profile = "eastron-sdm630"\ndevice_id = 1\n',
        'profile = "eastron-sdm630"\ndevice_id = 1\n\n[devices.faults]\nexception_code = 6\n')
    assert "[devices.faults]" in text
    (tmp_path / "site.toml").write_text(text)
    config = load_site(tmp_path / "site.toml")
    assert config.devices[0].faults == Faults(exception_code=6)
    with serving(config) as rs, client(rs.port) as c:
        with pytest.raises(ModbusError) as err:
            c.transact(METER, READ_POWER)
        assert err.value.code == 6
        assert c.transact(RELAYS, READ_RELAYS)[2] == 0b0111_1111


# -- reproducible rates ---------------------------------------------------------------------------


def _pattern(config: SiteConfig, n: int = 40) -> list[bool]:
    """Which of ``n`` meter reads got the exception (rate 0.5)."""
    config = with_faults(config, "main-meter", exception_code=4, exception_rate=0.5)
    got = []
    with serving(config) as rs, client(rs.port) as c:
        for _ in range(n):
            try:
                c.transact(METER, READ_POWER)
                got.append(False)
            except ModbusError:
                got.append(True)
    return got


def test_fault_rates_are_drawn_from_the_site_seed(demo: SiteConfig) -> None:
    first, again = _pattern(demo), _pattern(demo)
    other = _pattern(demo.model_copy(update={"site": demo.site.model_copy(update={"seed": 8})}))
    assert first == again
    assert first != other
    assert 10 <= sum(first) <= 30


def test_decision_order() -> None:
    everything = Faults(offline=True, no_answer_rate=1, exception_code=3, crc_error_rate=1,
                        garbage_rate=1, drop_rate=1, delay_s=0.5)
    assert FaultInjector(everything, 1).decide(serial=False).outcome is Outcome.SILENT
    inj = FaultInjector(everything.model_copy(update={"offline": False, "no_answer_rate": 0}), 1)
    assert inj.decide(serial=False).outcome is Outcome.DROP
    decision = inj.decide(serial=True)  # no connection to drop on a line
    assert (decision.outcome, decision.exception_code, decision.delay_s) == (
        Outcome.EXCEPTION, 3, 0.5)
    inj.faults = Faults(crc_error_rate=1, garbage_rate=1)
    assert inj.decide(serial=True).outcome is Outcome.CRC_ERROR
    assert inj.decide(serial=False).outcome is Outcome.GARBAGE  # TCP has no CRC
    assert inj.counts == {Outcome.DROP: 1, Outcome.EXCEPTION: 1, Outcome.CRC_ERROR: 1,
                          Outcome.GARBAGE: 1}
    assert not FaultInjector(Faults(), 1).active and inj.active


# -- the control channel ------------------------------------------------------------------------


def test_control_channel_sets_and_reports_faults(running: RunningSite) -> None:
    port = running.control_port
    answer = request(port, {"device": "main-meter", "faults": {"exception_code": 4}})
    assert answer["ok"] is True and answer["device"] == "main-meter"
    assert answer["faults"] == Faults(exception_code=4).model_dump(mode="json")
    with client(running.port) as c:
        with pytest.raises(ModbusError) as err:
            c.transact(METER, READ_POWER)
        assert err.value.code == 4
        faults = request(port, {"get": "faults"})
        assert faults["ok"] is True
        assert faults["faults"]["main-meter"]["exception_code"] == 4
        assert faults["faults"]["relays"] == Faults().model_dump(mode="json")
        assert request(port, {"device": "main-meter", "faults": {}})["ok"] is True
        assert c.transact(METER, READ_POWER)[:2] == bytes([4, 4])
    stats = request(port, {"get": "stats"})
    assert stats["devices"]["main-meter"] == {"exception": 1, "answer": 1}
    assert request(port, {"get": "lines"}) == {"ok": True, "lines": {}}


@pytest.mark.parametrize(("message", "error"), [
    ({"device": "ghost", "faults": {}}, "no device named 'ghost' (devices: main-meter, relays)"),
    ({"device": "relays", "faults": {"no_answer_rate": 2}},
     "faults.no_answer_rate: Input should be less than or equal to 1"),
    ({"device": "relays", "faults": {"bogus": 1}}, "faults.bogus: Extra inputs are not permitted"),
    ({"device": "relays", "faults": []}, "faults must be a JSON object"),
    ({"device": "relays"}, 'expected {"device": "<name>", "faults": {...}}'),
    ({"get": "everything"}, "cannot get 'everything'"),
    ([1, 2], "a request is a JSON object"),
])
def test_control_channel_errors(running: RunningSite, message: Any, error: str) -> None:
    answer = request(running.control_port, message)
    assert answer["ok"] is False
    assert error in answer["error"]
    assert running.site.faults("relays") == Faults()


def test_control_connection_survives_bad_lines(running: RunningSite) -> None:
    with socket.create_connection(("127.0.0.1", running.control_port), timeout=5) as s:
        f = s.makefile("rwb")
        f.write(b"this is not json\n\n")
        f.write(b'{"device": "relays", "faults": {"offline": true}}\n')
        f.flush()
        first, second = json.loads(f.readline()), json.loads(f.readline())
    assert first["ok"] is False and first["error"].startswith("not JSON")
    assert second["ok"] is True
    assert running.site.faults("relays").offline


def test_run_site_with_a_control_port(tmp_path: Path) -> None:
    ready = tmp_path / "ready"

    async def scenario() -> None:
        task = asyncio.create_task(run_site(DEMO_SITE, 0, ready, control_port=0))
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "no ready file"
            await asyncio.sleep(0.01)
        info = json.loads((tmp_path / "ready.json").read_text())
        assert info["port"] == int(ready.read_text()) and info["lines"] == {}
        answer = await request_async(info["control_port"],
                                     {"device": "relays", "faults": {"exception_code": 11}})
        assert answer["ok"] is True

        def talk() -> int:
            with client(info["port"]) as c:
                try:
                    c.transact(RELAYS, READ_RELAYS)
                except ModbusError as exc:
                    return exc.code
            return 0

        assert await asyncio.to_thread(talk) == 11
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert list(tmp_path.iterdir()) == []


def test_lmt_sim_checks_the_control_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main([str(DEMO_SITE), "--control-port", "70000"]) == 2
    assert "--control-port must be 0-65535" in capsys.readouterr().err


# -- frozen: reads answer a snapshot while the model goes on underneath --------------------------

READ_PHASES = struct.pack(">BHH", 4, 0, 0x12)  # voltages, currents and powers of the 3 phases
CHILLER_1_OFF = struct.pack(">BHH", 5, 0, 0x0000)  # relay_1: chiller-1, 30 kW


def _power_w(answer: bytes) -> float:
    """power_w from the answer to READ_POWER (function, byte count, a float32)."""
    return float(struct.unpack(">f", answer[2:6])[0])


@pytest.mark.parametrize("how", ["set_faults", "control"])
def test_a_frozen_meter_answers_its_snapshot_while_the_model_goes_on(running: RunningSite,
                                                                      how: str) -> None:
    site = running.site

    def freeze(on: bool) -> None:
        if how == "set_faults":
            site.set_faults("main-meter", Faults(frozen=on))
        else:
            answer = request(running.control_port, {"device": "main-meter",
                                                    "faults": {"frozen": on} if on else {}})
            assert answer["ok"] is True and answer["faults"]["frozen"] is on
        assert site.faults("main-meter").frozen is on

    with client(running.port) as c:
        live, phases = c.transact(METER, READ_POWER), c.transact(METER, READ_PHASES)
        assert _power_w(live) == pytest.approx(site.site_power_kw() * 1000, rel=1e-6)
        freeze(True)
        c.transact(RELAYS, CHILLER_1_OFF)  # the relay module is not frozen: the load goes off
        assert site.loads_on()["chiller-1"] is False
        assert site.site_power_kw() * 1000 == pytest.approx(_power_w(live) - 30_000, rel=1e-6)
        for _ in range(3):  # the meter keeps answering, the same values
            assert c.transact(METER, READ_POWER) == live
            assert c.transact(METER, READ_PHASES) == phases
        freeze(False)  # live again
        thawed = c.transact(METER, READ_POWER)
        assert _power_w(thawed) == pytest.approx(site.site_power_kw() * 1000, rel=1e-6)
        assert _power_w(thawed) == pytest.approx(_power_w(live) - 30_000, rel=1e-6)
        assert c.transact(METER, READ_PHASES) != phases
        # frozen again: a new snapshot, of the values now
        freeze(True)
        c.transact(RELAYS, struct.pack(">BHH", 5, 0, 0xFF00))
        assert site.loads_on()["chiller-1"] is True
        assert c.transact(METER, READ_POWER) == thawed
    assert request(running.control_port, {"get": "faults"})["faults"]["main-meter"]["frozen"] \
        is True


def test_a_frozen_relay_module_switches_but_reads_back_its_old_state(running: RunningSite) -> None:
    site = running.site
    with client(running.port) as c:
        assert c.transact(RELAYS, READ_RELAYS)[2] == 0b0111_1111
        meter = c.transact(METER, READ_POWER)
        site.set_faults("relays", Faults(frozen=True))
        # the write takes effect and its answer echoes it; reads give the state at the freeze
        assert c.transact(RELAYS, struct.pack(">BHH", 5, 3, 0)) == bytes([5, 0, 3, 0, 0])
        assert c.transact(RELAYS, struct.pack(">BHHBB", 15, 4, 2, 1, 0)) == bytes([15, 0, 4, 0, 2])
        assert [(w.point, w.value) for w in site.coil_writes["relays"]] == [
            ("relay_4", False), ("relay_5", False), ("relay_6", False)]
        assert not any(site.loads_on()[n] for n in ("ev-chargers", "water-heater",
                                                   "hall-b-lighting"))
        assert c.transact(RELAYS, READ_RELAYS)[2] == 0b0111_1111
        assert c.transact(RELAYS, struct.pack(">BHH", 1, 3, 1))[2] == 1  # relay_4 alone
        # the meter is not frozen: it measures the loads gone
        assert _power_w(c.transact(METER, READ_POWER)) == pytest.approx(
            _power_w(meter) - 42_000, rel=1e-6)
        site.set_faults("relays", Faults())
        assert c.transact(RELAYS, READ_RELAYS)[2] == 0b0100_0111


def test_a_device_frozen_in_the_site_file_answers_what_it_had_at_start(demo: SiteConfig) -> None:
    with serving(with_faults(demo, "main-meter", frozen=True)) as rs, client(rs.port) as c:
        at_start = rs.site.site_power_kw() * 1000
        c.transact(RELAYS, CHILLER_1_OFF)
        assert rs.site.site_power_kw() * 1000 == pytest.approx(at_start - 30_000, rel=1e-6)
        assert _power_w(c.transact(METER, READ_POWER)) == pytest.approx(at_start, rel=1e-6)


def test_frozen_over_an_rtu_line() -> None:
    rs = RunningSite(SimulatedSite(rtu_config(), port=0, clock=lambda: T0), control=True)
    try:
        path = rs.site.rtu_lines["rs485"].path
        assert path is not None
        m = RawRtu(path)
        try:
            live = m.transact(METER, READ_POWER, 6)
            answer = request(rs.control_port, {"device": "main-meter", "faults": {"frozen": True}})
            assert answer["ok"] is True
            assert m.transact(RELAYS, CHILLER_1_OFF, 5) == CHILLER_1_OFF
            assert rs.site.loads_on()["chiller-1"] is False
            assert m.transact(METER, READ_POWER, 6) == live
            # frozen combines with the other faults: a bad CRC around the snapshot
            rs.site.set_faults("main-meter", Faults(frozen=True, crc_error_rate=1.0))
            m.send(rtu_frame(METER, READ_POWER))
            got = m.read(9)
            assert got[1:-2] == live and rtu_crc16(got[:-2]) != got[-2:]
            assert request(rs.control_port, {"device": "main-meter", "faults": {}})["ok"]
            now = m.transact(METER, READ_POWER, 6)
            assert _power_w(now) == pytest.approx(_power_w(live) - 30_000, rel=1e-6)
        finally:
            m.close()
    finally:
        rs.stop()


def test_frozen_meters_on_the_field_site_dlt645_and_rtu() -> None:
    async def body(f: Field) -> None:
        meter, office = f.meters["meter-a"], f.modbus["office-meter"]
        points = ["power_l1_kw", "voltage_l1_v", "current_l1_a"]
        dlt_before = await meter.read_points(points)
        rtu_before = await office.read_points(["power_l1_w", "current_l1_a"])
        status_before = await meter.read_status_word3()
        assert not status_before.relay_open
        answer = await request_async(f.control_port, {"device": "meter-a",
                                                      "faults": {"frozen": True}})
        assert answer["ok"] is True
        f.site.set_faults("office-meter", Faults(frozen=True))

        await f.modbus["relays"].write_point("relay_1", False)  # chiller-1 off, read back
        q = f.site.physics.quantities(T0)
        assert q["power_l1_w"] < rtu_before["power_l1_w"] - 5000  # type: ignore[operator]
        assert await meter.read_points(points) == dlt_before
        assert await office.read_points(["power_l1_w", "current_l1_a"]) == rtu_before
        # a 1C still acts on a frozen meter; its status word reads the old state
        await meter.trip(verify=False)
        assert not f.site.meter_relay_closed("meter-a")
        assert await meter.read_status_word3() == status_before
        assert f.site.dlt645_lines["mains"].faults("202300000001").frozen
        # meter-b on the same line is live
        got = await f.meters["meter-b"].read_points(["power_l1_kw"])
        assert got["power_l1_kw"] == pytest.approx(q["power_l1_w"] / 1000, abs=5e-5)

        await request_async(f.control_port, {"device": "meter-a", "faults": {}})
        f.site.set_faults("office-meter", Faults())
        got = await meter.read_points(points)
        assert got["power_l1_kw"] == pytest.approx(q["power_l1_w"] / 1000, abs=5e-5)
        assert (await meter.read_status_word3()).relay_open
        rtu = await office.read_points(["power_l1_w"])
        assert rtu["power_l1_w"] == pytest.approx(q["power_l1_w"], rel=1e-6)
        await meter.allow_close()
    with_field(body)
