"""Energy-ledger signatures of the simulated site: metering scopes (main meter, sub-meters, an
unmetered load between them), tamper signatures (a shunted CT, a reversed CT, a stopped or
decreasing register, a register jump) and DL/T 645 event counters.

Each signature is read over the real wire: Modbus TCP through ``lmt.drivers.modbus`` and a
DL/T 645 line (a pseudo-terminal) through ``lmt.drivers.dlt645``, with the site on a fake clock
the tests advance, and set at runtime through the control channel. The register consistency
(every register integrates exactly what its meter reports) is checked on the model itself,
stepped through a simulated day.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from lmt.config import load_profile, load_site
from lmt.config.errors import ConfigError
from lmt.config.site import (
    EVENT_KEYS,
    WHOLE_SITE,
    CtShunt,
    Events,
    PtLoss,
    SiteConfig,
    Tamper,
    event_point,
)
from lmt.drivers.dlt645 import Dlt645Meter
from lmt.drivers.modbus import ModbusDevice, ModbusTcpBus
from lmt.drivers.serial_line import SerialLine, dlt645_silence_s
from lmt.firmware_sim import ControlServer, SimulatedSite, SitePhysics
from lmt.firmware_sim.control import request_async
from tests.conftest import EXAMPLES, SiteThread, lmt_argv

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
PHASES = ("l1", "l2", "l3")
ADDRESS = "202300000009"
BAUD = 9600
F32_KWH = 0.003  # three float32 steps of an energy register near 12345 kWh
F32_W = 0.5  # float32 rounding of a power of some 10 kW, with room


class Clock:
    """The site's only time source; tests move it."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def site_config(**changes: Any) -> SiteConfig:
    """A small site (under the DL/T 645 profile's 79.9999 kW): a main meter and two sub-meters
    that split it between them (0.6 + 0.4 of the base load, one load each), a single-phase
    check meter on the whole site, and a whole-site DL/T 645 meter. ``changes``: per-device
    tables (``{"utility": {"events": {...}}}``) and ``site`` keys."""
    site = {"name": "ledger", "seed": 5, "base_load_kw": 20.0, "noise_kw": 0.3,
            **changes.pop("site", {})}
    devices: list[dict[str, Any]] = [
        {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
        {"name": "relays", "profile": "generic-relay-8", "device_id": 2},
        {"name": "sub-a", "profile": "eastron-sdm630", "device_id": 3,
         "metering": {"loads": ["chiller"], "base_share": 0.6}},
        {"name": "sub-b", "profile": "eastron-sdm630", "device_id": 4,
         "metering": {"loads": ["heater"], "base_share": 0.4, "ev": True}},
        {"name": "check", "profile": "eastron-sdm120", "device_id": 5},
        {"name": "utility", "profile": "dlt645-2007-3phase", "line": "mains",
         "address": ADDRESS},
    ]
    for d in devices:
        d.update(changes.pop(d["name"], {}))
    assert not changes, changes
    return SiteConfig.model_validate({
        "site": site,
        "lines": [{"name": "mains", "protocol": "dlt645", "baud": BAUD}],
        "devices": devices,
        "loads": [{"name": "chiller", "relay": "relays.relay_1", "kw": 15.0},
                  {"name": "heater", "relay": "relays.relay_2", "kw": 10.0}]})


@dataclass
class Rig:
    site: SimulatedSite
    clock: Clock
    control_port: int
    modbus: dict[str, ModbusDevice]
    utility: Dlt645Meter

    async def control(self, message: dict[str, Any]) -> dict[str, Any]:
        answer = await request_async(self.control_port, message)
        assert answer["ok"], answer
        return answer

    async def read(self, name: str, points: list[str] | None = None) -> dict[str, float]:
        """Read a meter over the wire; every value a number."""
        device = self.utility if name == "utility" else self.modbus[name]
        values = await device.read_points(points)
        out: dict[str, float] = {}
        for k, v in values.items():
            assert isinstance(v, float | int) and not isinstance(v, bool), (k, v)
            out[k] = float(v)
        return out

    def truth(self, device: str | None = None) -> dict[str, float]:
        """What the model holds now: the whole site untampered (None), or a meter's view."""
        return self.site.physics.quantities(self.clock.t, device)


def with_rig(body: Callable[[Rig], Awaitable[Any]], config: SiteConfig | None = None) -> Any:
    async def main() -> Any:
        clock = Clock()
        site = SimulatedSite(config or site_config(), port=0, clock=clock, wire_time=False)
        port = await site.start()
        control = ControlServer(site, port=0)
        control_port = await control.start()
        tcp = ModbusTcpBus("127.0.0.1", port, timeout_s=2.0)
        line = SerialLine(site.line_paths()["mains"], baud_rate=BAUD, parity="E",
                          timeout_s=2.0, silence_s=dlt645_silence_s(BAUD), name="mains")
        modbus = {d.name: ModbusDevice(d.name, tcp, d.device_id, load_profile(d.profile))
                  for d in site.config.devices if d.line is None}
        utility = Dlt645Meter("utility", line, ADDRESS, load_profile("dlt645-2007-3phase"),
                              timeout_s=2.0)
        try:
            return await body(Rig(site, clock, control_port, modbus, utility))
        finally:
            tcp.close()
            line.close()
            await control.stop()
            await site.stop()
    return asyncio.run(main())


async def integrate(rig: Rig, name: str, seconds: float, step_s: float = 60.0,
                    point: str = "power_w", scale: float = 1e-3) -> float:
    """Advance the clock by ``seconds`` in steps, reading ``point`` of meter ``name`` at every
    step: the trapezoid integral (kWh) of what the meter reported."""
    kwh = 0.0
    last = (await rig.read(name, [point]))[point] * scale
    for _ in range(round(seconds / step_s)):
        rig.clock.t += step_s
        now = (await rig.read(name, [point]))[point] * scale
        kwh += (last + now) / 2 * step_s / 3600
        last = now
    return kwh


EVENT_POINTS = [event_point(k) for k in EVENT_KEYS]


# -- a clean site ------------------------------------------------------------------------------


def test_the_shipped_examples_are_clean() -> None:
    for example in ("field-site.toml", "demo-site.toml"):
        site = load_site(EXAMPLES / example)
        assert site.site.unmetered_kw == 0.0
        for d in site.devices:
            assert (d.metering, d.tamper, d.events) == (WHOLE_SITE, Tamper(), Events()), d.name


def test_the_field_examples_commented_sub_meters_split_the_site() -> None:
    """Uncommented, the field example's [devices.metering] tables (and [site] unmetered_kw)
    make a valid site whose sub-meters and unmetered load add up to the main meter."""
    text = (EXAMPLES / "field-site.toml").read_text()
    keys = r"\[devices\.(?:metering|tamper|events)\]|loads =|base_share =|ev =|ct_\w+ =|" \
           r"registers =|pt_loss =|cover_open =|unmetered_kw ="
    config = SiteConfig.model_validate(
        tomllib.loads(re.sub(rf"^# ({keys})", r"\1", text, flags=re.MULTILINE)))
    subs = [d.name for d in config.devices if d.metering != WHOLE_SITE]
    assert subs == ["workshop-meter", "meter-a", "meter-b"]
    scopes = [config.devices[[d.name for d in config.devices].index(n)].metering for n in subs]
    assert sum(m.base_share for m in scopes) == pytest.approx(1.0)
    assert sorted(load for m in scopes for load in m.loads) == sorted(
        load.name for load in config.loads)
    phys = SitePhysics(config.model_copy(update={"devices": [
        d.model_copy(update={"tamper": Tamper()}) for d in config.devices]}))
    main = phys.power_kw(T0, "main-meter")
    assert main == pytest.approx(sum(phys.power_kw(T0, n) for n in subs)
                                 + config.site.unmetered_kw, rel=1e-12)
    assert max(phys.power_kw(T0, n) for n in ("meter-a", "meter-b")) < 79.9999  # in XX.XXXX


def test_a_clean_site_shows_none_of_the_signatures() -> None:
    async def body(rig: Rig) -> None:
        answer = await rig.control({"get": "tamper"})
        assert set(answer["tamper"]) == {"main-meter", "sub-a", "sub-b", "check", "utility"}
        assert all(t == Tamper().model_dump(mode="json") for t in answer["tamper"].values())
        events = (await rig.control({"get": "events"}))["events"]
        assert all(set(e.values()) == {0} for e in events.values())
        assert (await rig.control({"get": "site"}))["site"] == {"unmetered_kw": 0.0}

        for name in ("main-meter", "sub-a", "sub-b"):
            q = await rig.read(name)
            for ph in PHASES:
                assert q[f"power_{ph}_w"] > 0 and q[f"current_{ph}_a"] > 0, (name, ph)
                assert q[f"power_factor_{ph}"] == pytest.approx(0.95, abs=1e-6)
            currents = [q[f"current_{ph}_a"] for ph in PHASES]
            assert max(currents) / min(currents) < 1.05  # balanced within the imbalance
            assert q["export_energy_kwh"] == 0.0
        utility = await rig.read("utility")
        assert all(utility[p] == 0 for p in EVENT_POINTS)
        assert min(utility[f"power_{ph}_kw"] for ph in PHASES) > 0
        assert utility["export_energy_kwh"] == 0.0
        check = await rig.read("check")
        assert check["power_l1_w"] > 0 and check["export_energy_l1_kwh"] == 0.0

        # the registers count what the meters show
        before = await rig.read("main-meter", ["import_energy_kwh"])
        kwh = await integrate(rig, "main-meter", 1800)
        after = await rig.read("main-meter", ["import_energy_kwh", "export_energy_kwh"])
        assert after["import_energy_kwh"] - before["import_energy_kwh"] == pytest.approx(
            kwh, abs=F32_KWH)
        assert after["export_energy_kwh"] == 0.0
    with_rig(body)


# -- metering scopes and the unmetered load ------------------------------------------------------


def test_sub_meters_measure_their_scope_and_sum_to_the_main_meter() -> None:
    async def body(rig: Rig) -> None:
        await rig.control({"site": {"unmetered_kw": 3.5}})
        names = ("main-meter", "sub-a", "sub-b")

        async def powers() -> dict[str, dict[str, float]]:
            return {n: await rig.read(n, ["power_w", "power_l1_w", "power_l2_w", "power_l3_w",
                                          "import_energy_kwh"]) for n in names}

        q = await powers()
        main, a, b = (q[n] for n in names)
        assert main["power_w"] == pytest.approx(a["power_w"] + b["power_w"] + 3500.0, abs=3 * F32_W)
        for ph in PHASES:  # the unmetered load is split over the phases like the others
            assert main[f"power_{ph}_w"] > a[f"power_{ph}_w"] + b[f"power_{ph}_w"] + 1000.0
        base = rig.site.physics.base_load_kw(rig.clock.t)
        assert a["power_w"] == pytest.approx((0.6 * base + 15.0) * 1000, rel=1e-6)
        assert b["power_w"] == pytest.approx((0.4 * base + 10.0) * 1000, rel=1e-6)

        # a relay switches its load off in its sub-meter only, and in the main meter
        await rig.modbus["relays"].write_coil("relay_1", False)
        switched = await powers()
        assert switched["sub-a"]["power_w"] == pytest.approx(a["power_w"] - 15000.0, abs=F32_W)
        assert switched["sub-b"]["power_w"] == pytest.approx(b["power_w"], abs=F32_W)
        assert switched["main-meter"]["power_w"] == pytest.approx(main["power_w"] - 15000.0,
                                                                  abs=F32_W)

        # over an hour, the register increments add up as the powers do
        await integrate(rig, "main-meter", 3600, step_s=120)
        later = await powers()
        gained = {n: later[n]["import_energy_kwh"] - switched[n]["import_energy_kwh"]
                  for n in names}
        assert gained["main-meter"] == pytest.approx(
            gained["sub-a"] + gained["sub-b"] + 3.5, abs=3 * F32_KWH)
        assert gained["sub-b"] > 0.4 * 17 and gained["sub-a"] > 0.6 * 17  # base load ~20 kW
    with_rig(body)


def test_the_unmetered_load_is_seen_by_the_main_meter_only() -> None:
    async def body(rig: Rig) -> None:
        names = ("main-meter", "sub-a", "sub-b", "check", "utility")
        points = {n: ["power_kw"] if n == "utility" else
                  ["power_l1_w"] if n == "check" else ["power_w"] for n in names}
        before = {n: await rig.read(n, points[n]) for n in names}
        answer = await rig.control({"site": {"unmetered_kw": 5.0}})
        assert answer["site"] == {"unmetered_kw": 5.0}
        after = {n: await rig.read(n, points[n]) for n in names}
        assert after["main-meter"]["power_w"] - before["main-meter"]["power_w"] == pytest.approx(
            5000.0, abs=F32_W)
        assert after["utility"]["power_kw"] - before["utility"]["power_kw"] == pytest.approx(
            5.0, abs=2e-4)  # every whole-site meter sees it
        share_l1 = after["check"]["power_l1_w"] - before["check"]["power_l1_w"]
        assert share_l1 == pytest.approx(5000.0 / 3, rel=0.03)
        for n in ("sub-a", "sub-b"):
            assert after[n] == before[n]
        await rig.control({"site": {"unmetered_kw": 0}})
        assert (await rig.read("main-meter", ["power_w"]))["power_w"] == pytest.approx(
            before["main-meter"]["power_w"], abs=F32_W)
    with_rig(body)


# -- tamper signatures -----------------------------------------------------------------------------


def test_a_shunted_ct_shows_a_fraction_of_its_phase_and_the_registers_count_it() -> None:
    async def body(rig: Rig) -> None:
        shunt = {"ct_shunt": {"phase": "l2", "seen": 0.02}}
        answer = await rig.control({"device": "main-meter", "tamper": shunt})
        assert answer["tamper"]["ct_shunt"] == {"phase": "l2", "seen": 0.02}
        q, true = await rig.read("main-meter"), rig.truth()
        assert q["current_l2_a"] == pytest.approx(0.02 * true["current_l2_a"], rel=1e-5)
        assert q["power_l2_w"] == pytest.approx(0.02 * true["power_l2_w"], rel=1e-5)
        assert q["voltage_l2_v"] == pytest.approx(true["voltage_l2_v"], rel=1e-6)  # voltage is there
        for ph in ("l1", "l3"):
            assert q[f"power_{ph}_w"] == pytest.approx(true[f"power_{ph}_w"], rel=1e-6)
        assert q["power_w"] == pytest.approx(true["power_w"] - 0.98 * true["power_l2_w"],
                                             rel=1e-6)
        # the register counts what the meter sees, not what flows
        start = (await rig.read("main-meter", ["import_energy_kwh"]))["import_energy_kwh"]
        seen = await integrate(rig, "main-meter", 1800)
        end = (await rig.read("main-meter", ["import_energy_kwh"]))["import_energy_kwh"]
        assert end - start == pytest.approx(seen, abs=F32_KWH)
        assert rig.site.physics.import_energy_kwh - start > seen + 2.5  # the site drew ~1/3 more

        # on the DL/T 645 meter the shunt starts a loss-of-current event on its phase
        await rig.control({"device": "utility", "tamper": shunt})
        u = await rig.read("utility")
        assert u["current_l2_a"] == pytest.approx(0.02 * rig.truth()["current_l2_a"], abs=1e-3)
        assert u["event_current_loss_l2_count"] == 1
        assert u["event_current_loss_l1_count"] == u["event_current_loss_l3_count"] == 0
        # the same shunt again is no new event; cleared and shunted again is
        await rig.control({"device": "utility", "tamper": shunt})
        await rig.control({"device": "utility", "tamper": {}})
        assert (await rig.read("utility", ["current_l2_a"]))["current_l2_a"] == pytest.approx(
            rig.truth()["current_l2_a"], abs=1e-3)
        await rig.control({"device": "utility", "tamper": shunt})
        assert (await rig.read("utility", ["event_current_loss_l2_count"])) == {
            "event_current_loss_l2_count": 2.0}
        # a partial shunt (half the current) is no loss of current
        await rig.control({"device": "utility",
                           "tamper": {"ct_shunt": {"phase": "l1", "seen": 0.5}}})
        assert (await rig.read("utility", ["event_current_loss_l1_count"])) == {
            "event_current_loss_l1_count": 0.0}
    with_rig(body)


def test_a_reversed_ct_reads_negative_and_counts_a_reverse_flow_event() -> None:
    async def body(rig: Rig) -> None:
        answer = await rig.control({"device": "utility", "tamper": {"ct_reversed": "l3"}})
        assert answer["events"]["reverse_flow_l3"] == 1
        u, true = await rig.read("utility"), rig.truth()
        assert u["power_l3_kw"] == pytest.approx(-true["power_l3_w"] / 1000, abs=1e-4)
        assert u["current_l3_a"] == pytest.approx(-true["current_l3_a"], abs=1e-3)
        assert u["power_l1_kw"] > 0 and u["power_l2_kw"] > 0
        # the total is the algebraic sum: about a third of what flows
        assert u["power_kw"] == pytest.approx(
            (true["power_l1_w"] + true["power_l2_w"] - true["power_l3_w"]) / 1000, abs=2e-4)
        assert u["power_factor"] < 0.95 * 0.5
        # reactive power reversed with it: the total is the algebraic sum too
        assert u["reactive_power_kvar"] == pytest.approx(
            rig.truth("utility")["reactive_power_var"] / 1000, abs=2e-4)
        assert u["reactive_power_kvar"] < 0.5 * true["reactive_power_var"] / 1000
        assert u["event_reverse_flow_l3_count"] == 1
        assert u["event_reverse_flow_l1_count"] == u["event_reverse_flow_l2_count"] == 0
        # the import register counts the algebraic sum; the total never went negative: no export
        start = u["import_energy_kwh"]
        seen = await integrate(rig, "utility", 3600, step_s=300, point="power_kw", scale=1.0)
        u2 = await rig.read("utility", ["import_energy_kwh", "export_energy_kwh"])
        assert u2["import_energy_kwh"] - start == pytest.approx(seen, abs=0.011)
        assert u2["export_energy_kwh"] == 0.0

        # a single-phase meter's reversed phase counts into its export register
        await rig.control({"device": "check", "tamper": {"ct_reversed": "l1"}})
        c0 = await rig.read("check")
        assert c0["power_l1_w"] < 0 and c0["current_l1_a"] < 0 and c0["power_factor_l1"] < 0
        exported = -await integrate(rig, "check", 1800, point="power_l1_w")
        c1 = await rig.read("check")
        assert c1["export_energy_l1_kwh"] - c0["export_energy_l1_kwh"] == pytest.approx(
            exported, abs=F32_KWH)
        assert c1["import_energy_l1_kwh"] == c0["import_energy_l1_kwh"]
    with_rig(body)


def test_a_lost_voltage_input_reads_a_fraction_of_its_voltage_and_power() -> None:
    async def body(rig: Rig) -> None:
        # 失压: main-meter's L1 voltage link opened half-way: half of L1's voltage, so of its
        # power (P = V I PF), while the current reads as it is
        lost = {"pt_loss": {"phase": "l1", "seen": 0.5}}
        answer = await rig.control({"device": "main-meter", "tamper": lost})
        assert answer["tamper"]["pt_loss"] == {"phase": "l1", "seen": 0.5}
        assert answer["tamper"]["phase_break"] is None
        q, true = await rig.read("main-meter"), rig.truth()
        assert q["voltage_l1_v"] == pytest.approx(0.5 * true["voltage_l1_v"], rel=1e-6)
        assert 114.0 < q["voltage_l1_v"] < 116.0
        assert q["current_l1_a"] == pytest.approx(true["current_l1_a"], rel=1e-6)
        assert q["power_l1_w"] == pytest.approx(0.5 * true["power_l1_w"], rel=1e-6)
        assert q["power_factor_l1"] == pytest.approx(0.95, abs=1e-6)
        for ph in ("l2", "l3"):
            for key in (f"voltage_{ph}_v", f"current_{ph}_a", f"power_{ph}_w"):
                assert q[key] == pytest.approx(true[key], rel=1e-6), key
        assert q["power_w"] == pytest.approx(true["power_w"] - 0.5 * true["power_l1_w"], rel=1e-6)
        seen = rig.truth("main-meter")  # reactive and apparent power follow (not in its profile)
        for key in ("reactive_power_l1_var", "apparent_power_l1_va"):
            assert seen[key] == pytest.approx(0.5 * true[key], rel=1e-9), key
        assert seen["voltage_l1_l2_v"] < true["voltage_l1_l2_v"] - 50.0  # the line voltages too
        # the register counts what the meter sees
        start = (await rig.read("main-meter", ["import_energy_kwh"]))["import_energy_kwh"]
        counted = await integrate(rig, "main-meter", 1800)
        end = (await rig.read("main-meter", ["import_energy_kwh"]))["import_energy_kwh"]
        assert end - start == pytest.approx(counted, abs=F32_KWH)
        assert rig.site.physics.import_energy_kwh - start > counted + 2.5  # a sixth not counted

        # the DL/T 645 meter: the voltage input gone (seen 0) counts a loss of voltage (10000001)
        await rig.control({"device": "utility", "tamper": {"pt_loss": {"phase": "l3"}}})
        u, true = await rig.read("utility"), rig.truth()
        assert u["voltage_l3_v"] == 0.0 and u["power_l3_kw"] == 0.0
        assert u["current_l3_a"] == pytest.approx(true["current_l3_a"], abs=1e-3) and \
            u["current_l3_a"] > 10.0
        assert u["voltage_l1_v"] == pytest.approx(true["voltage_l1_v"], abs=0.051)
        assert u["power_kw"] == pytest.approx((true["power_w"] - true["power_l3_w"]) / 1000,
                                              abs=2e-4)
        assert u["event_voltage_loss_count"] == 1
        # the same again, or a deeper one on its phase, is no new event; moved to another phase
        # is; a dip the meter does not count as a loss (seen >= 0.78) counts nothing
        for tamper, count in (({"phase": "l3"}, 1), ({"phase": "l3", "seen": 0.2}, 1),
                              ({"phase": "l2", "seen": 0.2}, 2), ({"phase": "l2", "seen": 0.8}, 2),
                              ({"phase": "l2", "seen": 0.5}, 3)):
            answer = await rig.control({"device": "utility", "tamper": {"pt_loss": tamper}})
            assert answer["events"]["voltage_loss"] == count, tamper
        assert (await rig.read("utility", ["event_voltage_loss_count"])) == {
            "event_voltage_loss_count": 3.0}
        assert set(rig.site.events("utility").values()) <= {0, 3}  # nothing else counted
        # and its registers count what it sees
        u0 = await rig.read("utility", ["import_energy_kwh"])
        drawn = await integrate(rig, "utility", 3600, step_s=300, point="power_kw", scale=1.0)
        u1 = await rig.read("utility", ["import_energy_kwh"])
        assert u1["import_energy_kwh"] - u0["import_energy_kwh"] == pytest.approx(drawn, abs=0.011)
    with_rig(body)


def test_a_broken_phase_reads_nothing_on_it() -> None:
    async def body(rig: Rig) -> None:
        # 断相 at sub-a: neither voltage nor current on L2; the site's load is as it was, so
        # the main meter (and the model's own view) still carries sub-a's L2
        main0 = await rig.read("main-meter", ["power_w"])
        answer = await rig.control({"device": "sub-a", "tamper": {"phase_break": "l2"}})
        assert answer["tamper"]["phase_break"] == "l2"
        a, true_a = await rig.read("sub-a"), rig.site.physics.quantities(rig.clock.t, "sub-a")
        assert rig.site.tamper("sub-a").phase_break == "l2"
        assert a["voltage_l2_v"] == a["current_l2_a"] == a["power_l2_w"] == 0.0
        for ph in ("l1", "l3"):
            assert a[f"voltage_{ph}_v"] == pytest.approx(230.0, rel=0.0031)
            assert a[f"current_{ph}_a"] > 10.0
            assert a[f"power_{ph}_w"] == pytest.approx(true_a[f"power_{ph}_w"], rel=1e-6)
        assert a["power_w"] == pytest.approx(true_a["power_l1_w"] + true_a["power_l3_w"], rel=1e-6)
        assert true_a["apparent_power_l2_va"] == true_a["reactive_power_l2_var"] == 0.0
        assert true_a["voltage_l1_l2_v"] == pytest.approx(true_a["voltage_l1_v"], rel=1e-12)
        assert (await rig.read("main-meter", ["power_w"]))["power_w"] == pytest.approx(
            main0["power_w"], abs=F32_W)
        # its registers count what it sees: L2's stands still
        start = await rig.read("sub-a", ["import_energy_kwh"])
        l2 = rig.site.physics.registers("sub-a")["import_energy_l2_kwh"]
        counted = await integrate(rig, "sub-a", 1800)
        end = await rig.read("sub-a", ["import_energy_kwh"])
        assert end["import_energy_kwh"] - start["import_energy_kwh"] == pytest.approx(
            counted, abs=F32_KWH)
        assert rig.site.physics.registers("sub-a")["import_energy_l2_kwh"] == l2
        # the DL/T 645 meter counts no event for it (its profile has no phase-break counter)
        answer = await rig.control({"device": "utility", "tamper": {"phase_break": "l1"}})
        assert set(answer["events"].values()) == {0}
        u = await rig.read("utility")
        assert u["voltage_l1_v"] == u["current_l1_a"] == u["power_l1_kw"] == 0.0
        assert all(u[p] == 0 for p in EVENT_POINTS)
        # cleared: the phase is back
        await rig.control({"device": "sub-a", "tamper": {}})
        a = await rig.read("sub-a", ["voltage_l2_v", "current_l2_a"])
        assert a["voltage_l2_v"] > 220.0 and a["current_l2_a"] > 10.0
    with_rig(body)


def test_a_stopped_register_a_decreasing_one_and_a_jump_back() -> None:
    async def body(rig: Rig) -> None:
        await rig.control({"device": "main-meter", "tamper": {"registers": "stopped"}})
        q0 = await rig.read("main-meter")
        assert q0["power_w"] == pytest.approx(rig.truth()["power_w"], rel=1e-6)  # power is normal
        drawn = await integrate(rig, "main-meter", 1800)
        q1 = await rig.read("main-meter")
        assert drawn > 10 and q1["current_l1_a"] > 10
        assert q1["import_energy_kwh"] == q0["import_energy_kwh"]  # stood still

        # counting down on the DL/T 645 meter
        await rig.control({"device": "utility", "tamper": {"registers": "decreasing"}})
        u0 = await rig.read("utility", ["import_energy_kwh"])
        drawn = await integrate(rig, "utility", 3600, step_s=300, point="power_kw", scale=1.0)
        u1 = await rig.read("utility", ["import_energy_kwh"])
        assert u1["import_energy_kwh"] - u0["import_energy_kwh"] == pytest.approx(-drawn, abs=0.011)

        # a one-off jump back of 500 kWh, then counting on from there
        await rig.control({"device": "utility", "tamper": {}})
        answer = await rig.control({"device": "utility", "register_jump_kwh": -500.0})
        u2 = await rig.read("utility", ["import_energy_kwh"])
        assert answer["import_energy_kwh"] == pytest.approx(u1["import_energy_kwh"] - 500.0,
                                                           abs=0.006)
        assert u2["import_energy_kwh"] == pytest.approx(u1["import_energy_kwh"] - 500.0, abs=0.006)
        drawn = await integrate(rig, "utility", 1800, step_s=300, point="power_kw", scale=1.0)
        u3 = await rig.read("utility", ["import_energy_kwh"])
        assert u3["import_energy_kwh"] - u2["import_energy_kwh"] == pytest.approx(drawn, abs=0.011)
        # the main meter is still stopped; the others were never touched
        assert (await rig.read("main-meter", ["import_energy_kwh"]))["import_energy_kwh"] \
            == q0["import_energy_kwh"]
    with_rig(body)


# -- DL/T 645 event counters ---------------------------------------------------------------------


def test_event_counts_from_the_site_file_and_the_cover_opened_at_runtime() -> None:
    config = site_config(utility={"events": {"cover_open": 3, "magnetic_field": 1,
                                             "voltage_loss": 12}})

    async def body(rig: Rig) -> None:
        u = await rig.read("utility", EVENT_POINTS)
        assert u["event_cover_open_count"] == 3 and u["event_magnetic_field_count"] == 1
        assert u["event_voltage_loss_count"] == 12 and u["event_terminal_cover_open_count"] == 0
        answer = await rig.control({"device": "utility", "event": "cover_open"})
        assert answer["events"]["cover_open"] == 4
        await rig.control({"device": "utility", "event": "terminal_cover_open"})
        u = await rig.read("utility", EVENT_POINTS)
        assert u["event_cover_open_count"] == 4 and u["event_terminal_cover_open_count"] == 1
        # every DL/T 645 event point is a 3-byte BCD count: six digits, none after the point
        profile = load_profile("dlt645-2007-3phase")
        for name in EVENT_POINTS:
            p = profile.point(name)
            assert (p.format, p.poll, p.signed) == ("XXXXXX", "slow", False), name
    with_rig(body, config)


def test_a_signature_in_the_site_file_shows_from_the_start() -> None:
    config = site_config(
        site={"unmetered_kw": 2.0},
        utility={"tamper": {"ct_reversed": "l1", "ct_shunt": {"phase": "l2", "seen": 0.0},
                            "pt_loss": {"phase": "l3", "seen": 0.5}},
                 "events": {"reverse_flow_l1": 4, "voltage_loss": 2}},
        **{"sub-a": {"tamper": {"registers": "stopped"}}})

    async def body(rig: Rig) -> None:
        u = await rig.read("utility")
        assert u["power_l1_kw"] < 0 and u["current_l2_a"] == 0.0 and u["power_l2_kw"] == 0.0
        assert u["event_reverse_flow_l1_count"] == 5  # the site file's 4, and it started now
        assert u["event_current_loss_l2_count"] == 1
        assert 114.0 < u["voltage_l3_v"] < 116.0 and u["event_voltage_loss_count"] == 3
        assert (await rig.control({"get": "site"}))["site"] == {"unmetered_kw": 2.0}
        a0 = await rig.read("sub-a", ["import_energy_kwh"])
        await integrate(rig, "sub-a", 600)
        assert await rig.read("sub-a", ["import_energy_kwh"]) == a0
    with_rig(body, config)


def test_lmt_read_reads_the_event_counters() -> None:
    config = site_config(utility={"events": {"cover_open": 7}, "tamper": {"ct_reversed": "l2"}})
    with SiteThread(config, wire_time=False) as running:
        res = subprocess.run(lmt_argv("read", "--dlt645", running.paths["mains"], "--baud",
                                      str(BAUD), "--address", ADDRESS, "--json",
                                      "event_cover_open_count", "event_reverse_flow_l2_count",
                                      "event_magnetic_field_count", "power_l2_kw"),
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    values = json.loads(res.stdout)["values"]
    assert values["event_cover_open_count"] == 7 and values["event_reverse_flow_l2_count"] == 1
    assert values["event_magnetic_field_count"] == 0 and values["power_l2_kw"] < 0


# -- the control channel and the site file: strict ------------------------------------------------


@pytest.mark.parametrize("message,error", [
    ({"device": "utility", "tamper": {"ct_reversed": "l4"}}, "tamper.ct_reversed: Input should be"),
    ({"device": "utility", "tamper": {"ct_shunt": {"phase": "l1", "seen": 1.5}}},
     "tamper.ct_shunt.seen"),
    ({"device": "utility", "tamper": {"registers": "backwards"}}, "tamper.registers"),
    ({"device": "utility", "tamper": {"pt_loss": {"phase": "l1", "seen": 1.0}}},
     "tamper.pt_loss.seen: Input should be less than 1"),
    ({"device": "utility", "tamper": {"pt_loss": {"phase": "l1", "seen": -0.1}}},
     "tamper.pt_loss.seen: Input should be greater than or equal to 0"),
    ({"device": "utility", "tamper": {"pt_loss": {"seen": 0.5}}}, "tamper.pt_loss.phase: Field"),
    ({"device": "utility", "tamper": {"pt_loss": "l1"}}, "tamper.pt_loss: Input should be"),
    ({"device": "utility", "tamper": {"phase_break": "n"}}, "tamper.phase_break: Input should be"),
    ({"device": "utility", "tamper": {"phase_break": ["l1", "l2"]}}, "tamper.phase_break"),
    ({"device": "utility", "tamper": {"ct_bypass": "l1"}}, "tamper.ct_bypass: Extra inputs"),
    ({"device": "utility", "tamper": []}, "tamper must be a JSON object"),
    ({"device": "relays", "tamper": {}}, "'relays' is not a meter"),
    ({"device": "utility", "event": "lid_lifted"}, "no event 'lid_lifted'"),
    ({"device": "main-meter", "event": "cover_open"}, "has no point event_cover_open_count"),
    ({"device": "utility", "event": 1}, "event must be a string"),
    ({"device": "utility", "register_jump_kwh": "lots"}, "register_jump_kwh: a number"),
    ({"device": "utility", "register_jump_kwh": True}, "register_jump_kwh: a number"),
    ({"device": "ghost", "tamper": {}}, "no device named 'ghost'"),
    ({"device": "utility", "tamper": {}, "event": "cover_open"}, "expected {"),
    ({"site": {"unmetered_kw": -1}}, "site.unmetered_kw: a number of kW >= 0"),
    ({"site": {"unmetered": 1}}, 'site: expected {"unmetered_kw"'),
])
def test_control_channel_refuses_bad_signatures(message: dict[str, Any], error: str) -> None:
    async def body(rig: Rig) -> None:
        answer = await request_async(rig.control_port, message)
        assert answer["ok"] is False
        assert error in answer["error"]
        # nothing changed
        assert rig.site.tamper("utility") == Tamper()
        assert rig.site.events("utility") == dict.fromkeys(EVENT_KEYS, 0)
        assert rig.site.physics.unmetered_kw == 0.0
    with_rig(body)


@pytest.mark.parametrize("changes,error", [
    ({"sub-a": {"metering": {"loads": ["freezer"]}}}, "no load named 'freezer'"),
    ({"sub-a": {"metering": {"whole_site": True, "base_share": 0.5}}}, "leave out loads"),
    ({"sub-a": {"metering": {"base_share": 1.5}}}, "metering.base_share"),
    ({"sub-a": {"metering": {"loads": ["chiller", "chiller"]}}}, "a load is named twice"),
    ({"relays": {"tamper": {"ct_reversed": "l1"}}}, "'relays' is not a meter"),
    ({"relays": {"metering": {"loads": ["chiller"]}}}, "'relays' is not a meter"),
    ({"utility": {"tamper": {"ct_shunt": {"phase": "l2"}, "magnet": True}}}, "tamper.magnet"),
    ({"utility": {"tamper": {"ct_shunt": {"seen": 0.01}}}}, "tamper.ct_shunt.phase"),
    ({"utility": {"tamper": {"pt_loss": {"phase": "l4"}}}}, "tamper.pt_loss.phase"),
    ({"utility": {"tamper": {"pt_loss": {"phase": "l1", "seen": 1}}}}, "tamper.pt_loss.seen"),
    ({"utility": {"tamper": {"pt_loss": {"phase": "l1", "volts": 115}}}}, "tamper.pt_loss.volts"),
    ({"utility": {"tamper": {"phase_break": "L2"}}}, "tamper.phase_break"),
    ({"relays": {"tamper": {"phase_break": "l2"}}}, "'relays' is not a meter"),
    ({"utility": {"events": {"cover_open": 1_000_000}}}, "events.cover_open"),
    ({"main-meter": {"events": {"cover_open": 1}}}, "has no point event_cover_open_count"),
    ({"site": {"unmetered_kw": -2.0}}, "site.unmetered_kw"),
])
def test_the_site_file_is_checked_strictly(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        site_config(**changes)


def test_a_bad_signature_in_a_site_file_names_the_key(tmp_path: Any) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[[devices]]\nname = "m"\nprofile = "dlt645-2007-3phase"\n'
                    '[devices.tamper]\nct_reversed = "l5"\n')
    with pytest.raises(ConfigError, match=r"devices\[0\]\.tamper\.ct_reversed"):
        load_site(path)


# -- the model: every register integrates exactly what its meter reports ---------------------------


def _model_config() -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"seed": 8, "base_load_kw": 60.0, "daily_swing": 0.3, "noise_kw": 2.0},
        "devices": [
            {"name": "main", "profile": "eastron-sdm630", "device_id": 1},
            {"name": "relays", "profile": "generic-relay-8", "device_id": 2},
            {"name": "a", "profile": "eastron-sdm630", "device_id": 3,
             "metering": {"loads": ["chiller", "pump"], "base_share": 0.7}},
            {"name": "b", "profile": "eastron-sdm630", "device_id": 4,
             "metering": {"loads": ["heater"], "base_share": 0.3, "ev": True,
                          "import_energy_kwh": 500.0}},
            {"name": "shunted", "profile": "eastron-sdm630", "device_id": 5},
            {"name": "reversed", "profile": "eastron-sdm630", "device_id": 6},
            {"name": "stopped", "profile": "eastron-sdm630", "device_id": 7},
            {"name": "falling", "profile": "eastron-sdm630", "device_id": 8},
            {"name": "lost", "profile": "eastron-sdm630", "device_id": 9},
            {"name": "broken", "profile": "eastron-sdm630", "device_id": 10,
             "metering": {"loads": ["chiller"], "base_share": 0.5}},
        ],
        "loads": [{"name": "chiller", "relay": "relays.relay_1", "kw": 30.0},
                  {"name": "pump", "relay": "relays.relay_2", "kw": 7.5, "on": False},
                  {"name": "heater", "relay": "relays.relay_3", "kw": 12.0}]})


def test_every_register_integrates_exactly_what_its_meter_reports_over_a_day() -> None:
    """A simulated day in 60 s steps, with relays, the EV, the unmetered load and signatures
    changing on the way: each meter's register difference is the trapezoid integral of the
    powers it reported (per phase by direction, the total by the sign of the sum), the
    sub-meters and the unmetered load add up to the main meter, and a stopped or decreasing
    register does what it says."""
    phys = SitePhysics(_model_config())
    meters = ["main", "a", "b", "shunted", "reversed", "stopped", "falling", "lost", "broken"]
    keys = ("import_energy_kwh", "export_energy_kwh",
            *(f"{d}_energy_{ph}_kwh" for d in ("import", "export") for ph in PHASES))
    step, t = 60.0, T0
    at_change: dict[str, tuple[float, float]] = {}  # register, integral when its mode changed

    def mode(name: str, tamper: Tamper, t: float) -> None:
        phys.set_tamper(name, tamper, t)
        at_change[name] = (phys.registers(name)["import_energy_kwh"],
                           integral[name]["import_energy_kwh"])

    l1_at_break: list[float] = []

    def broke(t: float) -> None:
        phys.set_tamper("broken", Tamper(phase_break="l1"), t)
        l1_at_break.append(phys.registers("broken")["import_energy_l1_kwh"])

    changes: dict[int, Callable[[float], None]] = {
        60: lambda t: phys.set_relay("relays.relay_2", True, t),
        200: lambda t: phys.write_point("ev_setpoint_a", 16.0, t),
        300: lambda t: phys.set_tamper("shunted", Tamper(ct_shunt=CtShunt(phase="l1", seen=0.03)), t),
        350: lambda t: phys.set_tamper("lost", Tamper(pt_loss=PtLoss(phase="l3", seen=0.5)), t),
        400: lambda t: phys.set_unmetered_kw(7.5, t),
        500: lambda t: phys.set_tamper("reversed", Tamper(ct_reversed="l2"), t),
        600: lambda t: mode("stopped", Tamper(registers="stopped"), t),
        700: lambda t: mode("falling", Tamper(registers="decreasing"), t),
        800: lambda t: phys.set_relay("relays.relay_1", False, t),
        900: lambda t: broke(t),
        1000: lambda t: phys.set_tamper("reversed", Tamper(ct_reversed="l2",
                                                          ct_shunt=CtShunt(phase="l1", seen=0.0)), t),
        1050: lambda t: phys.set_tamper("lost", Tamper(pt_loss=PtLoss(phase="l3"),
                                                      ct_reversed="l3"), t),
        1100: lambda t: phys.set_unmetered_kw(0.0, t),
        1200: lambda t: phys.write_point("ev_setpoint_a", 0.0, t),
    }

    def reported(name: str) -> tuple[float, ...]:
        q = phys.quantities(t, name)
        return tuple(q[f"power_{ph}_w"] / 1000 for ph in PHASES)

    start = {m: phys.sample(t, m) for m in meters}
    last = {m: reported(m) for m in meters}
    integral = {m: dict.fromkeys(keys, 0.0) for m in meters}
    unmetered_kwh = 0.0

    def accumulate(m: str, now: tuple[float, ...], hours: float) -> None:
        before, acc = last[m], integral[m]
        for i, ph in enumerate(PHASES):
            acc[f"import_energy_{ph}_kwh"] += (max(before[i], 0) + max(now[i], 0)) / 2 * hours
            acc[f"export_energy_{ph}_kwh"] += (max(-before[i], 0) + max(-now[i], 0)) / 2 * hours
        p0, p1 = sum(before), sum(now)
        acc["import_energy_kwh"] += (max(p0, 0) + max(p1, 0)) / 2 * hours
        acc["export_energy_kwh"] += (max(-p0, 0) + max(-p1, 0)) / 2 * hours
        last[m] = now

    for k in range(1, 1441):  # one day
        t += step
        unmetered_kwh += phys.unmetered_kw * step / 3600
        for m in meters:
            phys.sample(t, m)
            accumulate(m, reported(m), step / 3600)
        if k in changes:  # a change lands at t: the meters report their new power from t on
            changes[k](t)
            last.update({m: reported(m) for m in meters})
    end = {m: phys.quantities(t, m) for m in meters}

    for m in ("main", "a", "b", "shunted", "reversed", "lost", "broken"):
        for key in keys:
            assert end[m][key] - start[m][key] == pytest.approx(integral[m][key], rel=1e-9,
                                                               abs=1e-9), (m, key)
    assert integral["reversed"]["export_energy_l2_kwh"] > 100  # the reversed phase exported
    assert integral["shunted"]["import_energy_l1_kwh"] < integral["main"]["import_energy_l1_kwh"]
    # the sub-meters and the unmetered load make the main meter, register by register
    gained = {m: end[m]["import_energy_kwh"] - start[m]["import_energy_kwh"] for m in meters}
    assert gained["main"] == pytest.approx(gained["a"] + gained["b"] + unmetered_kwh, rel=1e-10)
    assert unmetered_kwh == pytest.approx(7.5 * 700 / 60)
    assert start["b"]["import_energy_kwh"] == 500.0  # its own start reading
    # stopped: stood still from its change on; decreasing: down by what it reported since
    register, _ = at_change["stopped"]
    assert end["stopped"]["import_energy_kwh"] == register > start["stopped"]["import_energy_kwh"]
    register, counted = at_change["falling"]
    since = integral["falling"]["import_energy_kwh"] - counted
    assert since > 100
    assert end["falling"]["import_energy_kwh"] - register == pytest.approx(-since, rel=1e-9)
    # the site's own view is the whole site untampered: a clean whole-site meter reads it
    assert end["main"]["import_energy_kwh"] == phys.import_energy_kwh
    assert phys.events("shunted")["current_loss_l1"] == 1
    assert phys.events("reversed") == {**dict.fromkeys(EVENT_KEYS, 0), "reverse_flow_l2": 1,
                                       "current_loss_l1": 1}
    # a lost voltage input counts what it sees: L3 in full, at half from step 350, nothing from
    # 1050 (seen 0, reversed too: -0); its other phases as the main meter's
    lost, main = integral["lost"], integral["main"]
    assert 0.3 * main["import_energy_l3_kwh"] < lost["import_energy_l3_kwh"] < \
        0.7 * main["import_energy_l3_kwh"]
    assert lost["import_energy_l1_kwh"] == pytest.approx(main["import_energy_l1_kwh"], rel=1e-12)
    assert integral["lost"]["export_energy_l3_kwh"] == 0.0
    assert phys.events("lost") == {**dict.fromkeys(EVENT_KEYS, 0), "voltage_loss": 1,
                                   "reverse_flow_l3": 1}
    # a broken phase's register stands from the break on; the others count on; no event
    assert end["broken"]["import_energy_l1_kwh"] == l1_at_break[0] > start["broken"][
        "import_energy_l1_kwh"]
    assert end["broken"]["import_energy_l3_kwh"] > start["broken"]["import_energy_l3_kwh"] + 100
    assert phys.events("broken") == dict.fromkeys(EVENT_KEYS, 0)


def test_stopped_and_decreasing_registers_on_the_model() -> None:
    phys = SitePhysics(_model_config())
    phys.sample(T0)
    phys.set_tamper("stopped", Tamper(registers="stopped"), T0)
    phys.set_tamper("falling", Tamper(registers="decreasing"), T0)
    before = {m: phys.registers(m) for m in ("main", "stopped", "falling")}
    for k in range(1, 61):
        phys.sample(T0 + 60 * k)
    after = {m: phys.registers(m) for m in ("main", "stopped", "falling")}
    assert after["stopped"] == before["stopped"]
    for key in ("import_energy_kwh", "import_energy_l1_kwh"):
        counted = after["main"][key] - before["main"][key]
        assert counted > 0
        assert after["falling"][key] - before["falling"][key] == pytest.approx(-counted, rel=1e-9)
    # a register never goes below zero
    assert phys.jump_register("falling", -1e9, T0 + 3600) == 0.0
    phys.sample(T0 + 7200)
    assert phys.registers("falling")["import_energy_kwh"] == 0.0
