"""The field example, ``config/examples/field-site.toml``, served in-process: every device on
every bus — the Modbus TCP gateway, the Modbus RTU line and the DL/T 645 line — answers through
the drivers with what the model holds; a DL/T 645 meter trips and closes its relay; faults set
at runtime through the control channel reach a DL/T 645 meter and an RTU device, and clear.
Last, ``lmt sim`` runs the example as shipped.

The drivers (``lmt.drivers``) are the masters here: the simulator's wire formats are checked
against hand-written frames in test_sim.py, test_rtu.py and tests/drivers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmt.config import load_profile, load_site
from lmt.config.site import Faults, SiteConfig
from lmt.drivers.dlt645 import Dlt645Meter
from lmt.drivers.errors import DeviceException, DeviceUnavailable
from lmt.drivers.modbus import ModbusDevice, ModbusTcpBus
from lmt.drivers.modbus_rtu import ModbusRtuBus
from lmt.drivers.serial_line import SerialLine, dlt645_silence_s
from lmt.firmware_sim import ControlServer, MeterRelayChange, SimulatedSite
from lmt.firmware_sim.control import request_async
from lmt.firmware_sim.physics import mode3_code
from tests.conftest import EXAMPLES

FIELD_SITE = EXAMPLES / "field-site.toml"
T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
DLT645_MAX_KW = 79.9999  # the largest total power the DL/T 645 profile's XX.XXXX can show


def test_the_example_is_healthy_and_has_no_machine_paths() -> None:
    site = load_site(FIELD_SITE)
    assert all(d.faults == Faults() for d in site.devices)
    assert all(ln.link is None for ln in site.lines)
    lines = {ln.name: ln for ln in site.lines}
    assert (lines["rs485"].protocol, lines["rs485"].baud, lines["rs485"].parity) \
        == ("modbus-rtu", 9600, "N")
    assert (lines["mains"].protocol, lines["mains"].baud) == ("dlt645", 2400)
    on = {where: sorted(d.profile for d in site.devices if d.line == where)
          for where in (None, "rs485", "mains")}
    assert on == {None: ["eastron-sdm630", "generic-relay-8"],
                  "rs485": ["alfen-ng9xx", "carlo-gavazzi-em24", "eastron-sdm120"],
                  "mains": ["dlt645-2007-3phase", "dlt645-2007-3phase"]}
    demo = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    assert [load.model_dump() for load in site.loads] \
        == [{"on": True, **load} for load in demo["loads"]]


# -- the site served in-process ------------------------------------------------------------------


@dataclass
class Field:
    site: SimulatedSite
    control_port: int
    modbus: dict[str, ModbusDevice]
    meters: dict[str, Dlt645Meter]


def with_field(body: Callable[[Field], Awaitable[Any]]) -> Any:
    """Serve the field site (free TCP port, fixed clock), connect a driver to every device and
    the control channel, run ``body``, tear everything down."""
    async def main() -> Any:
        config: SiteConfig = load_site(FIELD_SITE)
        site = SimulatedSite(config, port=0, clock=lambda: T0)
        port = await site.start()
        control = ControlServer(site, port=0)
        control_port = await control.start()
        paths = site.line_paths()
        assert list(paths) == ["rs485", "mains"]
        tcp = ModbusTcpBus("127.0.0.1", port, timeout_s=1.0)
        rtu = ModbusRtuBus(paths["rs485"], baud=9600, timeout_s=0.5, name="rs485")
        # a pty has no parity bit: SerialLine falls back to none on a pty by itself
        dlt = SerialLine(paths["mains"], baud_rate=2400, parity="E", timeout_s=1.0,
                         silence_s=dlt645_silence_s(2400), name="mains")
        modbus: dict[str, ModbusDevice] = {}
        meters: dict[str, Dlt645Meter] = {}
        for d in config.devices:
            profile = load_profile(d.profile)
            if d.line == "mains":
                assert d.address is not None
                meters[d.name] = Dlt645Meter(d.name, dlt, d.address, profile, timeout_s=1.0,
                                             settle_s=1.0)
            else:
                modbus[d.name] = ModbusDevice(d.name, rtu if d.line else tcp, d.device_id,
                                              profile)
        try:
            return await body(Field(site, control_port, modbus, meters))
        finally:
            tcp.close()
            rtu.close()
            dlt.close()
            await control.stop()
            await site.stop()
    return asyncio.run(main())


def test_every_device_on_every_line_answers() -> None:
    async def body(f: Field) -> None:
        values = {name: await dev.read_points() for name, dev in f.modbus.items()}
        dlt_points = ["voltage_l1_v", "current_l2_a", "power_l1_kw", "power_kw", "frequency_hz"]
        for name, meter in f.meters.items():
            values[name] = await meter.read_points(dlt_points)
        q = f.site.physics.quantities(T0)

        # the TCP gateway
        assert values["main-meter"]["power_w"] == pytest.approx(q["power_w"], rel=1e-6)
        assert q["power_w"] > 150_000  # 45 kW base load + 126.5 kW of loads, all on
        assert values["relays"] == {**{f"relay_{i}": True for i in range(1, 8)},
                                    "relay_8": False}
        # the Modbus RTU line
        office = values["office-meter"]
        assert office["voltage_l1_v"] == pytest.approx(q["voltage_l1_v"], rel=1e-6)
        assert office["power_l1_w"] == pytest.approx(q["power_l1_w"], rel=1e-6)
        workshop = values["workshop-meter"]
        assert workshop["voltage_l1_l2_v"] == pytest.approx(q["voltage_l1_l2_v"], abs=0.05)
        assert workshop["voltage_l1_l2_v"] == pytest.approx(400, rel=0.01)
        charger = values["ev-charger"]
        assert charger["ev_available"] == 1
        assert charger["ev_mode3_state"] == mode3_code("B1")  # connected, waiting for current
        assert charger["ev_meter_initialised"] is True
        assert charger["ev_power_factor"] is None  # no current flows
        # the DL/T 645 line: both meters measure the whole site
        for name in f.meters:
            got = values[name]
            assert got["voltage_l1_v"] == pytest.approx(q["voltage_l1_v"], abs=0.05), name
            assert got["current_l2_a"] == pytest.approx(q["current_l2_a"], abs=0.0005), name
            assert got["power_l1_kw"] == pytest.approx(q["power_l1_w"] / 1000, abs=5e-5), name
            assert got["frequency_hz"] == pytest.approx(q["frequency_hz"], abs=0.005), name
            assert got["power_kw"] == DLT645_MAX_KW  # the register saturates
            assert not (await f.meters[name].read_status_word3()).relay_open
    with_field(body)


def test_ev_charging_and_a_meter_relay_trip() -> None:
    async def body(f: Field) -> None:
        charger, main = f.modbus["ev-charger"], f.modbus["main-meter"]
        before = (await main.read_points(["power_w"]))["power_w"]
        await charger.write_point("ev_setpoint_a", 16.0)  # over the RTU line, verified
        state = await charger.read_points(["ev_mode3_state", "ev_current_l1_a"])
        assert state == {"ev_mode3_state": mode3_code("C2"), "ev_current_l1_a": 16.0}
        after = (await main.read_points(["power_w"]))["power_w"]
        assert isinstance(before, float) and isinstance(after, float)
        assert after - before == pytest.approx(3 * 230 * 16 * 0.95, rel=0.01)

        changes: list[MeterRelayChange] = []
        f.site.add_meter_relay_listener(changes.append)
        status = await f.meters["meter-b"].trip()
        assert status is not None and status.relay_open
        assert not f.site.meter_relay_closed("meter-b")
        assert f.site.meter_relay_closed("meter-a")
        assert [c.describe() for c in changes] == ["meter-b relay -> OPEN"]
        assert (changes[0].address, changes[0].time) == ("202300000002", T0)
        await f.meters["meter-b"].allow_close()
        assert f.site.meter_relay_closed("meter-b")
        assert [c.describe() for c in f.site.meter_relay_changes] \
            == ["meter-b relay -> OPEN", "meter-b relay -> CLOSED"]
    with_field(body)


def test_faults_set_through_the_control_channel_reach_every_kind_of_device() -> None:
    async def body(f: Field) -> None:
        async def control(message: dict[str, Any]) -> dict[str, Any]:
            answer = await request_async(f.control_port, message)
            assert answer["ok"], answer
            return answer

        meter_a, meter_b = f.meters["meter-a"], f.meters["meter-b"]
        office, workshop = f.modbus["office-meter"], f.modbus["workshop-meter"]
        await control({"device": "meter-b", "faults": {"offline": True}})
        await control({"device": "workshop-meter", "faults": {"exception_code": 4}})
        faults = (await control({"get": "faults"}))["faults"]
        assert faults["meter-b"]["offline"] is True
        assert faults["workshop-meter"]["exception_code"] == 4
        assert faults["meter-a"] == faults["office-meter"] == Faults().model_dump()

        # the DL/T 645 meter is gone, and a trip sent to it does nothing; its neighbour answers
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await meter_b.read_points(["voltage_l1_v"])
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await meter_b.trip(verify=False)
        assert f.site.meter_relay_closed("meter-b")
        assert (await meter_a.read_points(["voltage_l1_v"]))["voltage_l1_v"] is not None
        # the RTU device answers exception 04; its neighbour on the line answers
        with pytest.raises(DeviceException, match="exception 4") as ei:
            await workshop.read_points(["voltage_l1_v"])
        assert ei.value.code == 4
        assert (await office.read_points(["voltage_l1_v"]))["voltage_l1_v"] is not None

        stats = await control({"get": "stats"})
        assert stats["devices"]["meter-b"]["silent"] == 2
        assert stats["devices"]["workshop-meter"]["exception"] >= 1
        assert stats["lines"]["mains"]["protocol"] == "dlt645"
        assert stats["lines"]["mains"]["frames"] == 3
        assert stats["lines"]["rs485"]["protocol"] == "modbus-rtu"

        # cleared: both answer again
        await control({"device": "meter-b", "faults": {}})
        await control({"device": "workshop-meter", "faults": {}})
        assert f.site.faults("meter-b") == f.site.faults("workshop-meter") == Faults()
        assert (await meter_b.read_points(["voltage_l1_v"]))["voltage_l1_v"] is not None
        assert (await workshop.read_points(["voltage_l1_v"]))["voltage_l1_v"] is not None
    with_field(body)


def test_a_dlt645_fault_set_on_the_site_takes_effect_at_once() -> None:
    async def body(f: Field) -> None:
        f.site.set_faults("meter-a", Faults(exception_code=4))
        with pytest.raises(DeviceException, match="refused"):
            await f.meters["meter-a"].read_points(["frequency_hz"])
        f.site.set_faults("meter-a", Faults())
        assert (await f.meters["meter-a"].read_points(["frequency_hz"]))["frequency_hz"]
    with_field(body)


# -- `lmt sim` -----------------------------------------------------------------------------------


def _wait(cond: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def test_lmt_sim_runs_the_field_example(tmp_path: Path) -> None:
    ready = tmp_path / "field.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmt.firmware_sim", str(FIELD_SITE), "--port", "0",
         "--ready-file", str(ready), "--control-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: ready.exists() or proc.poll() is not None, "the ready file")
        assert proc.poll() is None, proc.communicate()[1]
        info = json.loads((tmp_path / "field.port.json").read_text())
        assert info["port"] == int(ready.read_text())
        paths = info["lines"]
        assert list(paths) == ["rs485", "mains"]
        assert all(stat.S_ISCHR(os.stat(p).st_mode) for p in paths.values())

        async def trip_and_close() -> None:
            line = SerialLine(paths["mains"], baud_rate=2400, parity="E", timeout_s=1.0,
                              silence_s=dlt645_silence_s(2400), name="mains")
            meter = Dlt645Meter("meter-b", line, "202300000002",
                                load_profile("dlt645-2007-3phase"), settle_s=2.0)
            try:
                await meter.trip()
                await meter.allow_close()
            finally:
                line.close()
        asyncio.run(trip_and_close())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"line rs485 (modbus-rtu 9600 8N1) on {paths['rs485']}: office-meter (id 1, " \
           "eastron-sdm120)" in err
    assert f"line mains (dlt645 2400 8E1) on {paths['mains']}: meter-a (202300000001, " \
           "dlt645-2007-3phase), meter-b (202300000002, dlt645-2007-3phase)" in err
    assert "meter-b relay -> OPEN" in err and "meter-b relay -> CLOSED" in err
    assert not ready.exists() and not (tmp_path / "field.port.json").exists()
