"""`lmt scan --dlt645` and `lmt read --dlt645` against simulated meters on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator

import pytest

from lmt.config import load_site
from lmt.config.site import SimLine
from lmt.firmware_sim.dlt645 import Dlt645Line
from lmt.firmware_sim.physics import SitePhysics
from tests.conftest import EXAMPLES, lmt_argv, wait_until

# two meters share the low byte 01, so the search must go one byte deeper for them
METERS = ["000000000101", "000000000201", "123456789012"]
T0 = 1_750_000_000.0


@pytest.fixture
def line() -> Iterator[str]:
    """Three DL/T 645 meters on one simulated line, served from a background loop."""
    physics = SitePhysics(load_site(EXAMPLES / "demo-site.toml"))
    ready = threading.Event()
    box: dict[str, object] = {}

    def serve() -> None:
        async def main() -> None:
            sim = Dlt645Line(dict.fromkeys(METERS), physics.quantities, clock=lambda: T0,
                             line_settings=SimLine(name="rs485", protocol="dlt645", baud=9600),
                             response_delay_s=0.002)
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
    yield str(box["path"])
    loop = box["loop"]
    loop.call_soon_threadsafe(box["stop"].set)  # type: ignore[attr-defined]
    t.join(10)


def test_scan_finds_every_meter_by_abbreviated_addressing(line: str) -> None:
    res = subprocess.run(lmt_argv("scan", "--dlt645", line, "--baud", "9600", "--timeout", "0.06",
                                  "--json"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)["found"]
    assert [f["address"] for f in found] == sorted(METERS)
    assert {f["profile"] for f in found} == {"dlt645-2007-3phase"}


def test_read_points_and_a_single_di(line: str) -> None:
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", "9600", "--address",
                                  METERS[2], "--json", "power_kw", "voltage_l1_v"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    values = json.loads(res.stdout)["values"]
    assert 100 < values["voltage_l1_v"] < 300 and values["power_kw"] > 0
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", "9600", "--address",
                                  METERS[2], "--di", "02010100", "--format", "XXX.X"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "value" and 100 < float(res.stdout.split()[1]) < 300


def test_read_errors(line: str) -> None:
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--baud", "9600", "--timeout", "0.2",
                                  "--address", "999999999999"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no answer within" in res.stderr
    res = subprocess.run(lmt_argv("read", "--dlt645", "/dev/ttyNOPE", "--address", METERS[0]),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "/dev/ttyNOPE" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(lmt_argv("read", "--dlt645", line, "--address", "12"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "12-digit" in res.stderr
