"""A clean simulated day raises nothing: no theft or tamper indicator, no loss.

Through ``tests/analytics/simsite.py`` (the site's physics on a synthetic clock stepped every
10 s, each ledger meter read as the agent reads it, over the wire's encoding, into the pure
ledger as the agent configures it): 24 hours of a site with a main meter and three
sub-meters of different makes whose scopes add up to it (float32, scaled-integer, 64-bit Wh
and DL/T 645 BCD registers), with noise, the daily cycle, relays switching and the EV
charging a while; and 24 hours of the demo site (``config/examples/demo-site.toml``).

And a false alarm found on the way, with what fixes it: a register coarser than the theft
detectors' default digit of 0.01 kWh — the EM24's 0.1 kWh — at a low load steps by a whole
0.1 kWh within one minute's read (``register_runaway``: more than 1.5 × the measured energy
+ 2 digits) and then stands for a quarter of an hour (``register_stopped``). The ledger now
gives each meter's detectors its register's digit (``MeterSpec.resolution_kwh``); the
agent's ``ledger_config`` does not set it yet (it leaves every meter at 0.01 kWh).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from lmt.config import load_site
from lmt.config.site import SiteConfig
from tests.analytics.simsite import SimLedger, indicators, local_midnight

ROOT = Path(__file__).resolve().parents[2]
T0 = local_midnight(date(2026, 7, 15))  # a Wednesday
DAY_S = 86400.0
STEP_S = 10.0
HOUR = 3600.0


def clean_site() -> SiteConfig:
    """30 kW of base load (the default noise 0.5 kW and daily swing ± 15 %), three loads and
    the EV charging point: a main meter (SDM630) and three sub-meters splitting the site
    exactly (base shares 0.5 + 0.3 + 0.2, each load behind one of them): an EM24 and an
    iEM3255 on an RS-485 line and a DL/T 645 meter (under its 79.9999 kW) that has recorded
    events before (its counters' first read is their baseline)."""
    return SiteConfig.model_validate({
        "site": {"name": "clean", "seed": 11, "base_load_kw": 30.0},
        "lines": [{"name": "rs485", "protocol": "modbus-rtu"},
                  {"name": "mains", "protocol": "dlt645"}],
        "devices": [
            {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
            {"name": "relays", "profile": "generic-relay-8", "device_id": 2},
            {"name": "sub-a", "profile": "carlo-gavazzi-em24", "device_id": 1, "line": "rs485",
             "metering": {"loads": ["chiller"], "base_share": 0.5}},
            {"name": "sub-b", "profile": "dlt645-2007-3phase", "line": "mains",
             "address": "202300000001",
             "metering": {"loads": ["heater"], "base_share": 0.3, "ev": True,
                          "import_energy_kwh": 5000.0},
             "events": {"cover_open": 3, "voltage_loss": 7, "current_loss_l2": 1,
                        "reverse_flow_l3": 2}},
            {"name": "sub-c", "profile": "schneider-iem3255", "device_id": 2, "line": "rs485",
             "metering": {"loads": ["lights"], "base_share": 0.2, "import_energy_kwh": 800.0}},
        ],
        "loads": [{"name": "chiller", "relay": "relays.relay_1", "kw": 15.0},
                  {"name": "heater", "relay": "relays.relay_2", "kw": 10.0},
                  {"name": "lights", "relay": "relays.relay_3", "kw": 4.0}]})


SUBS = ("sub-a", "sub-b", "sub-c")
DIGIT_KWH = {"main-meter": 0.002, "sub-a": 0.1, "sub-b": 0.01, "sub-c": 0.001}  # the registers'


def test_a_clean_day_with_sub_meters_raises_nothing() -> None:
    sim = SimLedger(clean_site(), main="main-meter", meters=("main-meter", *SUBS), t0=T0,
                    step_s=STEP_S, ledger={"tariff": "jiangsu-2025-two-part", "loss_groups": [
                        {"name": "site", "main": "main-meter", "subs": list(SUBS)}]})
    p = sim.physics
    sim.run_until(T0)
    start = {m: sim.register(m) for m in sim.readers}
    # the day: lights off 06-19, the EV charging 08-13 at 16 A, the chiller off 12-13
    for hour, change in ((6, lambda t: p.set_relay("relays.relay_3", False, t)),
                         (8, lambda t: p.write_point("ev_setpoint_a", 16.0, t)),
                         (12, lambda t: p.set_relay("relays.relay_1", False, t)),
                         (13, lambda t: (p.set_relay("relays.relay_1", True, t),
                                         p.write_point("ev_setpoint_a", 0.0, t))),
                         (19, lambda t: p.set_relay("relays.relay_3", True, t))):
        sim.run_until(T0 + hour * HOUR + 7.0 * hour)  # (not on a boundary)
        change(sim.t)
    sim.run_until(T0 + DAY_S)
    end = {m: sim.register(m) for m in sim.readers}
    sim.run_until(T0 + DAY_S + 900.0)  # the next day's first interval: the day's final bill

    assert indicators(sim.events()) == []
    for m in sim.readers:
        day = [x for x in sim.intervals(m) if T0 <= x["start"] < T0 + DAY_S]
        assert len(day) == 96 and {x["quality"] for x in day} == {"complete"}, m
        # the day's intervals add up to what its register counted, to its digit
        assert sum(x["import_kwh"] for x in day) == pytest.approx(end[m] - start[m],
                                                                  abs=DIGIT_KWH[m]), m
    # the sub-meters' scopes add up to the main meter: every interval within the limit, the
    # loss no more than the registers' digits (the EM24's 0.1 kWh at each end of an interval)
    losses = [x for x in sim.losses("site") if T0 <= x["start"] < T0 + DAY_S]
    assert len(losses) == 96 and {x["status"] for x in losses} == {"within"}
    assert max(abs(x["loss_kwh"]) for x in losses) <= 2 * 0.1 + 0.01
    assert sum(x["loss_kwh"] for x in losses) == pytest.approx(0.0, abs=0.2)
    assert sum(end[m] - start[m] for m in SUBS) == pytest.approx(
        end["main-meter"] - start["main-meter"], abs=0.2)
    (bill,) = sim.bills("day")
    assert bill["label"] == "2026-07-15" and bill["bill"]["complete"]
    assert bill["bill"]["energy_kwh"] == pytest.approx(end["main-meter"] - start["main-meter"],
                                                       abs=0.002)


def test_the_demo_site_over_a_day_raises_nothing() -> None:
    site = load_site(ROOT / "config" / "examples" / "demo-site.toml")
    sim = SimLedger(site, main="main-meter", t0=T0, step_s=STEP_S,
                    ledger={"tariff": "jiangsu-2025-two-part"})
    sim.run_until(T0)
    start = sim.register("main-meter")
    sim.run_until(T0 + DAY_S)
    end = sim.register("main-meter")
    sim.run_until(T0 + DAY_S + 60.0)
    assert indicators(sim.events()) == []
    day = [x for x in sim.intervals("main-meter") if T0 <= x["start"] < T0 + DAY_S]
    assert len(day) == 96 and {x["quality"] for x in day} == {"complete"}
    assert sum(x["import_kwh"] for x in day) == pytest.approx(end - start, abs=0.002)
    # every load on: 60 kW ± 10 % and 126.5 kW of loads, about 4.5 MWh
    assert 180 * 24 < end - start < 193 * 24
    assert all(180 * 0.25 < x["import_kwh"] < 193 * 0.25 for x in day)


# -- a coarse register at a low load -----------------------------------------------------------


def small_loads() -> SiteConfig:
    """A main meter and two EM24 sub-meters (0.1 kWh registers) on small loads: 1 % (0.3 kW)
    and 6 % (about 1.8 kW) of the base load; a third sub-meter has the rest."""
    return SiteConfig.model_validate({
        "site": {"name": "small", "seed": 11, "base_load_kw": 30.0},
        "lines": [{"name": "rs485", "protocol": "modbus-rtu"}],
        "devices": [
            {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
            {"name": "office", "profile": "carlo-gavazzi-em24", "device_id": 1, "line": "rs485",
             "metering": {"base_share": 0.01}},
            {"name": "workshop", "profile": "carlo-gavazzi-em24", "device_id": 2, "line": "rs485",
             "metering": {"base_share": 0.06}},
            {"name": "hall", "profile": "eastron-sdm630", "device_id": 3,
             "metering": {"base_share": 0.93}},
        ]})


SMALL = ("main-meter", "office", "workshop", "hall")


def test_a_coarse_register_at_a_low_load_with_its_digit_raises_nothing() -> None:
    # the EM24's import register counts in 0.1 kWh (kWh × 10, profile multiplier 0.1)
    sim = SimLedger(small_loads(), main="main-meter", meters=SMALL, t0=T0, step_s=STEP_S,
                    resolution_kwh={"office": 0.1, "workshop": 0.1})
    sim.run_until(T0 + 4 * HOUR)
    assert indicators(sim.events()) == []
    office = [x for x in sim.intervals("office") if x["end"] <= T0 + 4 * HOUR]
    # 0.3 kW: 0.075 kWh an interval, counted in steps of 0.1 (each boundary between reads)
    assert sum(x["import_kwh"] for x in office) == pytest.approx(0.3 * 4, abs=0.15)


def test_a_coarse_register_at_a_low_load_as_the_agent_configures_it_raises_nothing() -> None:
    sim = SimLedger(small_loads(), main="main-meter", meters=SMALL, t0=T0, step_s=STEP_S)
    sim.run_until(T0 + 4 * HOUR)
    assert indicators(sim.events()) == []
