"""`lmt scan --dlt645` and `lmt read --dlt645` against simulated meters on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import subprocess
import termios
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmt.agent.fieldtools import Target, make_serial_line
from lmt.config import load_site
from lmt.config.site import Faults, SimLine
from lmt.drivers import dlt645
from lmt.drivers.serial_line import dlt645_silence_s, modbus_rtu_silence_s
from lmt.firmware_sim.dlt645 import Dlt645Line
from lmt.firmware_sim.physics import SitePhysics
from tests.conftest import EXAMPLES, lmt_argv, wait_until

# two meters share the low byte 01, so the search must go one byte deeper for them
METERS = ["000000000101", "000000000201", "123456789012"]
T0 = 1_750_000_000.0
# A fast simulated line: a meter's reply is on the wire ~5 ms after the request (2 ms to think,
# 26 bytes at 115200 bit/s), so a 0.15 s answer timeout leaves a loaded machine ~145 ms of slack
# (0.06 s at 9600 bit/s left 28 ms and was flaky). A scan waits out the timeout on every silent
# address, about 100 per level of the search, so the timeout sets the test's duration.
BAUD = "115200"
SCAN_TIMEOUT = "0.15"


@contextlib.contextmanager
def serve_line(meters: list[str], faults: dict[str, Faults] | None = None) -> Iterator[str]:
    """DL/T 645 meters on one simulated line, served from a background loop; yields its path."""
    physics = SitePhysics(load_site(EXAMPLES / "demo-site.toml"))
    ready = threading.Event()
    box: dict[str, object] = {}

    def serve() -> None:
        async def main() -> None:
            sim = Dlt645Line(dict.fromkeys(meters), physics.quantities, clock=lambda: T0,
                             line_settings=SimLine(name="rs485", protocol="dlt645",
                                                   baud=int(BAUD)),
                             response_delay_s=0.002, faults=faults)
            await sim.start()
            stop = asyncio.Event()
            box.update(path=sim.device_path, stop=stop, loop=asyncio.get_running_loop())
            ready.set()
            await stop.wait()
            await sim.stop()
        asyncio.run(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    wait_until(ready.is_set, 10, "the simulated line")
    try:
        yield str(box["path"])
    finally:
        loop = box["loop"]
        loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
        t.join(10)


@pytest.fixture
def line() -> Iterator[str]:
    """Three DL/T 645 meters on one simulated line."""
    with serve_line(METERS) as path:
        yield path


def test_read_points_and_a_single_di(line: str) -> None:
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", BAUD, "--address",
                                  METERS[2], "--json", "power_kw", "voltage_l1_v"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    values = json.loads(res.stdout)["values"]
    assert 100 < values["voltage_l1_v"] < 300 and values["power_kw"] > 0
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", BAUD, "--address",
                                  METERS[2], "--di", "02010100", "--format", "XXX.X"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "value" and 100 < float(res.stdout.split()[1]) < 300


def test_read_errors(line: str) -> None:
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", BAUD, "--timeout", "0.2",
                                  "--address", "999999999999"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no answer within" in res.stderr
    res = subprocess.run(lmt_argv("read", "--dlt645", "/dev/ttyNOPE", "--address", METERS[0]),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "/dev/ttyNOPE" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--address", "12"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "12-digit" in res.stderr


def test_read_errors_as_json(line: str) -> None:
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", BAUD, "--timeout", "0.2",
                                  "--address", "999999999999", "--json"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no answer within 0.2 s" in res.stderr
    err = json.loads(res.stdout)["error"]
    assert err["kind"] == "no-answer" and "no answer within 0.2 s" in err["message"]
    res = subprocess.run(lmt_argv("scan", "--dlt645", "/dev/ttyNOPE", "--json"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no such serial port /dev/ttyNOPE" in res.stderr
    assert json.loads(res.stdout)["error"]["kind"] == "no-such-port"


def test_a_refusing_meter_says_what_its_error_byte_means() -> None:
    with serve_line([METERS[2]], faults={METERS[2]: Faults(exception_code=4)}) as path:
        res = subprocess.run(lmt_argv("read", "--dlt645", path, "--baud", BAUD, "--address",
                                      METERS[2], "power_kw"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert "meter refused function 11 (abnormal reply, error byte 04: " in res.stderr
        res = subprocess.run(lmt_argv("read", "--dlt645", path, "--baud", BAUD, "--address",
                                      METERS[2], "--json", "power_kw"),
                             capture_output=True, text=True, timeout=60)
    err = json.loads(res.stdout)["error"]
    assert (err["kind"], err["function"], err["code"]) == ("refused", "11", 4)
    assert err["meanings"] and err["device"] == METERS[2]


# -- an RS-485 adapter that echoes what it sends --------------------------------------------------


class EchoingLine:
    """Meters behind an RS-485 adapter that hears its own transmitter: every byte the master
    sends comes back first, then the meter's reply. A small fake (the simulator has no echo):
    it answers read data of the address DI (04000401) from every meter the request reaches."""

    def __init__(self, meters: list[str], broken: bool = False) -> None:
        self.meters = meters
        self.broken = broken  # answer every read with a frame whose checksum is off
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave, termios.TCSANOW)
        self.path = os.ttyname(self._slave)
        os.set_blocking(self.master, False)
        self.echoed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rx = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                continue
            os.write(self.master, chunk)  # the echo
            self.echoed += len(chunk)
            rx += chunk
            while True:
                try:
                    frame, used = dlt645.find_frame(rx)
                except dlt645.FrameError:
                    rx.clear()
                    break
                del rx[:used]
                if frame is None:
                    break
                self._answer(frame)

    def _answer(self, frame: dlt645.Frame) -> None:
        if frame.function != dlt645.Function.READ_DATA or dlt645.di_text(frame.data) != "04000401":
            return
        if self.broken:  # what overlapping answers look like
            bad = bytearray(dlt645.encode_frame("000000000001", 0x91, frame.data[:4]))
            bad[-2] ^= 0x01
            os.write(self.master, bad)
            return
        reached = [m for m in self.meters
                   if all(frame.address[i:i + 2] in ("AA", m[i:i + 2]) for i in range(0, 12, 2))]
        if len(reached) == 1:  # (no collisions here: the meters' low bytes differ)
            m = reached[0]
            os.write(self.master, dlt645.encode_frame(
                m, 0x91, dlt645.di_bytes("04000401") + dlt645.address_bytes(m)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        os.close(self.master)
        os.close(self._slave)


def test_the_field_tools_keep_each_protocols_idle_gap() -> None:
    dlt = make_serial_line(Target(serial="/dev/ttyX", protocol="dlt645"))
    assert (dlt.baud_rate, dlt.parity) == (2400, "E")
    # DL/T 645 keeps at least 20 ms idle (3.5 characters of 8E1 at 2400 bit/s are only 16 ms)
    assert dlt.silence_s == pytest.approx(dlt645_silence_s(2400, 8, "E", 1)) == 0.02
    fast = make_serial_line(Target(serial="/dev/ttyX", protocol="dlt645", baud=9600))
    assert fast.silence_s == pytest.approx(0.02)
    rtu = make_serial_line(Target(serial="/dev/ttyX", baud=19200))
    assert rtu.silence_s == pytest.approx(modbus_rtu_silence_s(19200, 8, "N", 1))


# -- the scans, run side by side ------------------------------------------------------------------
# A scan waits out the answer timeout on every silent address (0.15 s x ~200 here): most of its
# time is spent waiting. So the three scans of this module start together, each on its own
# line, as soon as the module's first test runs, and each scan test waits for its own result
# while the other tests of the module run.


class Background:
    """A command started now, its output kept in files; ``result()`` waits for it."""

    def __init__(self, argv: list[str], out: Path, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._out, self._err = out.with_suffix(".out"), out.with_suffix(".err")
        with open(self._out, "wb") as so, open(self._err, "wb") as se:
            self.proc = subprocess.Popen(argv, stdout=so, stderr=se, stdin=subprocess.DEVNULL)

    def result(self) -> subprocess.CompletedProcess[str]:
        rc = self.proc.wait(self.timeout_s)
        return subprocess.CompletedProcess(self.proc.args, rc, self._out.read_text(),
                                           self._err.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Scans:
    def __init__(self, tmp: Path, stack: contextlib.ExitStack) -> None:
        def scan(name: str, path: str, timeout_s: float) -> Background:
            job = Background(lmt_argv("scan", "--dlt645", path, "--baud", BAUD, "--timeout",
                                      SCAN_TIMEOUT, "--json"), tmp / name, timeout_s)
            stack.callback(job.stop)
            return job

        self.echo = EchoingLine(["000000000007", "123456789012"])
        stack.callback(self.echo.close)
        self.broken = EchoingLine([], broken=True)
        stack.callback(self.broken.close)
        self.meters = scan("meters", stack.enter_context(serve_line(METERS)), 300)
        self.echoing = scan("echo", self.echo.path, 300)
        self.noise = scan("noise", self.broken.path, 120)


@pytest.fixture(scope="module", autouse=True)
def scans(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scans]:
    with contextlib.ExitStack() as stack:
        yield Scans(tmp_path_factory.mktemp("scans"), stack)


def test_a_line_where_every_address_collides_is_noise_not_meters(scans: Scans) -> None:
    """Going one byte deeper under 100 colliding patterns would take 100 times as long (and so
    on, five levels down): a line that answers everything with broken frames is reported."""
    res = scans.noise.result()
    assert res.returncode == 1
    assert "every address pattern AAAAAAAAAAxx got noise or a broken frame" in res.stderr
    assert json.loads(res.stdout)["error"]["kind"] == "noise"


def test_scan_ignores_the_adapters_echo_of_its_own_request(scans: Scans) -> None:
    res = scans.echoing.result()
    assert res.returncode == 0, res.stderr
    assert [f["address"] for f in json.loads(res.stdout)["found"]] == scans.echo.meters
    assert scans.echo.echoed >= 100 * 16  # every probe was echoed back


def test_scan_finds_every_meter_by_abbreviated_addressing(scans: Scans) -> None:
    res = scans.meters.result()
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)["found"]
    assert [f["address"] for f in found] == sorted(METERS)
    assert {f["profile"] for f in found} == {"dlt645-2007-3phase"}
