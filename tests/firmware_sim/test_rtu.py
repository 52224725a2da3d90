"""The simulated Modbus RTU line, seen from the wire: frames built by hand on a real pseudo-terminal.

The client here computes the CRC-16 itself and writes bytes to the pty's slave device (no
pymodbus client, no ``lmt.drivers``), so the simulator is checked against the protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import tomllib
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import lmt.config
from lmt.config.site import Faults, SimDevice, SimLine, SiteConfig
from lmt.firmware_sim import CoilChange, SimulatedSite
from lmt.firmware_sim.control import request as control_request
from lmt.firmware_sim.rtu import RtuLineServer

DEMO_SITE = Path(lmt.config.__file__).parent / "examples" / "demo-site.toml"
T0 = 1_750_000_000.0
METER, RELAYS = 1, 2


def crc16(data: bytes) -> bytes:
    """Modbus CRC-16 (poly 0xA001 reflected, init 0xFFFF), low byte first."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


def frame(device_id: int, pdu: bytes) -> bytes:
    body = bytes([device_id]) + pdu
    return body + crc16(body)


def f32(high: int, low: int) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", high, low))[0])


def wait_for(cond: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def rtu_config(baud: int = 9600, link: Path | None = None, **faults: dict[str, Any]) -> SiteConfig:
    """The demo site with both devices on one RTU line; ``faults`` by device name."""
    raw = tomllib.loads(DEMO_SITE.read_text())
    line: dict[str, Any] = {"name": "rs485", "protocol": "modbus-rtu", "baud": baud}
    if link is not None:
        line["link"] = str(link)
    raw["lines"] = [line]
    for d in raw["devices"]:
        d["line"] = "rs485"
        if d["name"] in faults:
            d["faults"] = faults[d["name"]]
    return SiteConfig.model_validate(raw)


class RawRtu:
    """A Modbus RTU master made of os.write and select on the pty's slave device."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def send(self, data: bytes) -> None:
        assert os.write(self.fd, data) == len(data)

    def read(self, n: int, timeout_s: float = 3.0) -> bytes:
        """Up to ``n`` bytes: returns as soon as ``n`` arrived, or what came by the deadline."""
        got = b""
        deadline = time.monotonic() + timeout_s
        while len(got) < n and (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                got += os.read(self.fd, n - len(got))
        return got

    def transact(self, device_id: int, pdu: bytes, answer_pdu_len: int) -> bytes:
        """Send a request; return the answer's PDU after checking its device id and CRC."""
        self.send(frame(device_id, pdu))
        got = self.read(answer_pdu_len + 3)
        assert len(got) == answer_pdu_len + 3, f"answer {got.hex(' ')}"
        assert got[0] == device_id
        assert crc16(got[:-2]) == got[-2:], f"bad CRC in {got.hex(' ')}"
        return got[1:-2]


class RunningSite:
    """A SimulatedSite served from an event loop in a background thread."""

    def __init__(self, site: SimulatedSite) -> None:
        self.site = site
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(site.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @property
    def line(self) -> RtuLineServer:
        return self.site.rtu_lines["rs485"]

    def stop(self) -> None:
        self.call(self.site.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def changes() -> list[CoilChange]:
    return []


@pytest.fixture
def running(changes: list[CoilChange]) -> Iterator[RunningSite]:
    site = SimulatedSite(rtu_config(), port=0, clock=lambda: T0)
    site.add_listener(changes.append)
    rs = RunningSite(site)
    try:
        yield rs
    finally:
        rs.stop()


@pytest.fixture
def master(running: RunningSite) -> Iterator[RawRtu]:
    assert running.line.path is not None
    m = RawRtu(running.line.path)
    try:
        yield m
    finally:
        m.close()


def test_crc16_matches_the_spec_example() -> None:
    # Modbus over serial line, appendix: 02 07 -> CRC 0x1241, sent 41 12
    assert crc16(bytes([0x02, 0x07])) == bytes([0x41, 0x12])


def test_reads_the_meter_over_the_pty(running: RunningSite, master: RawRtu) -> None:
    answer = master.transact(METER, struct.pack(">BHH", 4, 0x34, 2), 2 + 4)
    assert answer[:2] == bytes([4, 4])
    power_w = f32(*struct.unpack(">HH", answer[2:]))
    assert power_w / 1000 == pytest.approx(running.site.site_power_kw(T0), rel=1e-5)
    # the whole map in one request of 76 registers, as over TCP
    answer = master.transact(METER, struct.pack(">BHH", 4, 0, 0x4C), 2 + 152)
    regs = struct.unpack(">76H", answer[2:])
    assert f32(regs[0x34], regs[0x35]) == power_w
    assert 49.9 < f32(regs[0x46], regs[0x47]) < 50.1
    assert running.line.bytes_received == 16 and running.line.bytes_sent == 9 + 157


def test_relays_answer_on_their_own_device_id(master: RawRtu) -> None:
    answer = master.transact(RELAYS, struct.pack(">BHH", 1, 0, 8), 3)
    assert answer == bytes([1, 1, 0b0111_1111])  # relay_1..7 on, relay_8 off


def test_a_coil_write_over_rtu_switches_the_load(running: RunningSite, master: RawRtu,
                                                 changes: list[CoilChange]) -> None:
    before = running.site.site_power_kw(T0)
    request = struct.pack(">BHH", 5, 3, 0x0000)  # relay_4 (ev-chargers) off
    assert master.transact(RELAYS, request, 5) == request  # function 05 echoes the request
    assert running.site.loads_on()["ev-chargers"] is False
    assert before - running.site.site_power_kw(T0) == pytest.approx(22.0, abs=1e-6)
    assert [c.describe() for c in changes] == ["relays.relay_4 -> OFF (ev-chargers, 22.0 kW)"]
    assert master.transact(RELAYS, struct.pack(">BHH", 1, 3, 1), 3) == bytes([1, 1, 0])


def test_a_register_write_over_rtu_reaches_the_model() -> None:
    raw = tomllib.loads(DEMO_SITE.read_text())
    raw["lines"] = [{"name": "rs485", "protocol": "modbus-rtu", "baud": 19200}]
    raw["devices"].append({"name": "charger", "profile": "alfen-ng9xx", "device_id": 5,
                           "line": "rs485"})
    site = SimulatedSite(SiteConfig.model_validate(raw), port=0, clock=lambda: T0)
    rs = RunningSite(site)
    try:
        assert rs.line.path is not None
        m = RawRtu(rs.line.path)
        try:
            before = site.site_power_kw(T0)
            # ev_setpoint_a: holding registers 1210-1211, float32 high word first; 16 A
            words = struct.unpack(">HH", struct.pack(">f", 16.0))
            request = struct.pack(">BHHB2H", 16, 1210, 2, 4, *words)
            assert m.transact(5, request, 5) == request[:5]  # 16 echoes address and count
            assert site.physics.ev_setpoint_a == 16.0
            assert site.site_power_kw(T0) > before  # the car charges now
            back = m.transact(5, struct.pack(">BHH", 3, 1210, 2), 2 + 4)
            assert back[2:] == struct.pack(">2H", *words)
        finally:
            m.close()
    finally:
        rs.stop()


def test_exceptions_are_framed_with_their_crc(master: RawRtu) -> None:
    # the meter has no holding registers
    assert master.transact(METER, struct.pack(">BHH", 3, 0, 2), 2) == bytes([0x83, 0x02])
    # coil 8 of an 8-relay module
    assert master.transact(RELAYS, struct.pack(">BHH", 1, 8, 1), 2) == bytes([0x81, 0x02])
    # a function the simulator does not implement: its frame ends at a silence
    assert master.transact(RELAYS, bytes([0x41, 1, 2, 3]), 2) == bytes([0xC1, 0x01])


def test_silence_for_other_ids_and_bad_crcs(running: RunningSite, master: RawRtu) -> None:
    master.send(frame(9, struct.pack(">BHH", 4, 0, 2)))  # nobody on the line has id 9
    wait_for(lambda: len(running.line.frames) == 1, "the frame to be received")
    bad = bytearray(frame(METER, struct.pack(">BHH", 4, 0, 2)))
    bad[-1] ^= 0x55
    master.send(bytes(bad))
    wait_for(lambda: running.line.bad_frames == 1, "the bad frame to be dropped")
    assert master.read(1, timeout_s=0.2) == b""
    assert running.line.answers == 0
    # the line is still in step
    assert master.transact(RELAYS, struct.pack(">BHH", 1, 0, 1), 3) == bytes([1, 1, 1])


def test_broadcast_writes_reach_every_device_and_get_no_answer(running: RunningSite,
                                                               master: RawRtu) -> None:
    master.send(frame(0, struct.pack(">BHH", 5, 4, 0x0000)))  # relay_5 (water-heater) off
    wait_for(lambda: running.site.loads_on()["water-heater"] is False, "the broadcast write")
    assert master.read(1, timeout_s=0.2) == b""


def test_back_to_back_frames_are_recorded_as_overlapping(running: RunningSite,
                                                         master: RawRtu) -> None:
    read = frame(RELAYS, struct.pack(">BHH", 1, 0, 1))
    master.send(read + read)  # no silence between them: a master that breaks the rules
    assert master.read(12) == 2 * frame(RELAYS, bytes([1, 1, 1]))
    frames = list(running.line.frames)
    assert [f.overlapped for f in frames] == [False, True]
    assert frames[1].gap_s is not None and frames[1].gap_s < 0
    assert running.line.overlaps == 1


def test_answers_take_their_wire_time() -> None:
    site = SimulatedSite(rtu_config(baud=2400), port=0, clock=lambda: T0)
    rs = RunningSite(site)
    try:
        assert rs.line.path is not None
        m = RawRtu(rs.line.path)
        try:
            t0 = time.monotonic()
            m.transact(METER, struct.pack(">BHH", 4, 0x34, 2), 6)
            elapsed = time.monotonic() - t0
        finally:
            m.close()
    finally:
        rs.stop()
    char = 10 / 2400  # 8N1
    assert elapsed >= (8 + 9 + 3.5) * char  # request, end-of-frame silence, answer


def test_faults_on_the_wire(running: RunningSite, master: RawRtu) -> None:
    site = running.site
    read = struct.pack(">BHH", 4, 0x34, 2)
    site.set_faults("main-meter", Faults(crc_error_rate=1.0))
    master.send(frame(METER, read))
    got = master.read(9)
    assert len(got) == 9 and got[:3] == bytes([METER, 4, 4])
    assert crc16(got[:-2]) != got[-2:]
    site.set_faults("main-meter", Faults(garbage_rate=1.0))
    master.send(frame(METER, read))
    got = master.read(9)
    assert len(got) == 9 and crc16(got[:-2]) != got[-2:]
    site.set_faults("main-meter", Faults(exception_code=6))
    assert master.transact(METER, read, 2) == bytes([0x84, 0x06])
    site.set_faults("main-meter", Faults(offline=True))
    master.send(frame(METER, read))
    assert master.read(1, timeout_s=0.2) == b""
    # the other device on the line is unaffected, and a cleared fault is gone
    assert master.transact(RELAYS, struct.pack(">BHH", 1, 0, 1), 3) == bytes([1, 1, 1])
    site.set_faults("main-meter", Faults())
    assert master.transact(METER, read, 6)[:2] == bytes([4, 4])


def test_link_is_made_and_removed(tmp_path: Path) -> None:
    link = tmp_path / "dev" / "ttyRS485"
    site = SimulatedSite(rtu_config(link=link), port=0, clock=lambda: T0)
    rs = RunningSite(site)
    try:
        assert link.is_symlink() and os.readlink(link) == rs.line.path
        m = RawRtu(str(link))
        try:
            assert m.transact(RELAYS, struct.pack(">BHH", 1, 0, 1), 3) == bytes([1, 1, 1])
        finally:
            m.close()
    finally:
        rs.stop()
    assert not link.exists() and not link.is_symlink()


def test_link_never_replaces_a_file(tmp_path: Path) -> None:
    link = tmp_path / "ttyRS485"
    link.write_text("not a tty")
    site = SimulatedSite(rtu_config(link=link), port=0)

    async def start() -> None:
        with pytest.raises(OSError, match="not a symlink"):
            await site.start()
        assert not site.running

    asyncio.run(start())
    assert link.read_text() == "not a tty"


def test_devices_on_dlt645_lines_are_served_on_their_own_pty() -> None:
    base = rtu_config()
    config = SiteConfig(
        site=base.site, server=base.server, loads=base.loads,
        lines=[*base.lines, SimLine(name="mains", protocol="dlt645")],
        devices=[*base.devices, SimDevice(name="dlt-meter", profile="dlt645-2007-3phase",
                                          line="mains", address="000000000001")])
    site = SimulatedSite(config, port=0, clock=lambda: T0)
    assert [d.name for d in site.dlt645_devices] == ["dlt-meter"]
    assert set(site.rtu_lines) == {"rs485"} and set(site.dlt645_lines) == {"mains"}
    site.set_faults("dlt-meter", Faults(offline=True))  # the DL/T 645 line draws from it
    assert site.faults("dlt-meter").offline
    assert site.dlt645_lines["mains"].faults("000000000001").offline
    rs = RunningSite(site)
    try:
        assert rs.line.path is not None
        assert site.line_paths() == {"rs485": rs.line.path,
                                     "mains": site.dlt645_lines["mains"].device_path}
        m = RawRtu(rs.line.path)
        try:
            assert m.transact(RELAYS, struct.pack(">BHH", 1, 0, 1), 3) == bytes([1, 1, 1])
        finally:
            m.close()
    finally:
        rs.stop()


def test_lmt_sim_serves_rtu_lines_and_the_control_channel(tmp_path: Path) -> None:
    link = tmp_path / "ttyRS485"
    raw = tomllib.loads(DEMO_SITE.read_text())
    raw["server"]["port"] = 0
    raw["lines"] = [{"name": "rs485", "protocol": "modbus-rtu", "baud": 19200,
                     "parity": "E", "link": str(link)}]
    raw["devices"][0]["line"] = "rs485"  # the meter on the line, the relays over TCP
    (tmp_path / "site.toml").write_text(tomli_w.dumps(raw))
    ready = tmp_path / "sim.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmt.firmware_sim", str(tmp_path / "site.toml"),
         "--ready-file", str(ready), "--control-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "the ready file", 20)
        assert proc.poll() is None, proc.communicate()[1]
        info = json.loads((tmp_path / "sim.port.json").read_text())
        assert info["port"] == int(ready.read_text())
        assert info["lines"] == {"rs485": os.readlink(link)}
        port = info["control_port"]
        assert control_request(port, {"get": "lines"}) == {"ok": True, "lines": info["lines"]}
        m = RawRtu(str(link))
        try:
            assert m.transact(METER, struct.pack(">BHH", 4, 0x34, 2), 6)[:2] == bytes([4, 4])
            answer = control_request(port, {"device": "main-meter",
                                            "faults": {"exception_code": 4}})
            assert answer["ok"] is True and answer["faults"]["exception_code"] == 4
            assert m.transact(METER, struct.pack(">BHH", 4, 0x34, 2), 2) == bytes([0x84, 4])
        finally:
            m.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert lines[0].endswith(": relays (id 2, generic-relay-8)")
    assert lines[1].startswith("lmt sim: line rs485 (modbus-rtu 19200 8E1) on /dev/")
    assert lines[1].endswith(f" -> {link}: main-meter (id 1, eastron-sdm630)")
    assert lines[2].startswith("lmt sim: control channel on 127.0.0.1:")
    assert not link.is_symlink() and not ready.exists()
    assert not (tmp_path / "sim.port.json").exists()
