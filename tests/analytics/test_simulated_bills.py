"""Golden bills through the simulator: for every shipped tariff, a simulated day of a flat,
noise-free load run through the ledger gives the day bill worked out by hand below.

The site: 60 kW of base load (no daily swing, no noise) and a 40 kW oven always on: exactly
100 kW, split over three phases, read by its SDM630 main meter (float32 registers) every 10 s
and its energy register every minute and after each boundary, as the agent reads it
(``tests/analytics/simsite.py``), into the ledger configured with the tariff as the agent
configures it (``[ledger] tariff = "<id>"``, the shipped holiday calendar, China's UTC+8).
Each day runs from local midnight to the end of the next day's first interval, whose arrival
publishes the day's final bill (and, on the 1st of a month, the month's).

By hand: kWh per period = 100 kW × the hours the tariff file's grid gives the period that day;
cost = kWh × the period's price as the tariff file documents it (``base × ratio + adder``,
or stated). A day bill of a two-part tariff carries its share of the demand charge: demand
price × the month's maximum demand so far (100 kW, flat) / days in the month; the month bill
the whole demand charge. Within the register's resolution: a float32 register near 14 MWh
counts in 1/1024 kWh, so each period's kWh within 0.005 kWh and each figure within a cent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from lmt.agent.ledger import load_tariff_file
from lmt.analytics.ledger import set_tariff
from lmt.analytics.tariff import PERIODS
from lmt.config.site import SiteConfig
from tests.analytics.simsite import SimLedger, local_midnight

ROOT = Path(__file__).resolve().parents[2]
KW = 100.0
STEP_S = 10.0
DAY_S = 86400.0
KWH_TOL = 0.005  # a few float32 digits of a register near 14 MWh (1/1024 kWh each)
YUAN_TOL = 0.01


def flat_site() -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"name": "flat", "seed": 3, "base_load_kw": 60.0, "daily_swing": 0.0,
                 "noise_kw": 0.0},
        "devices": [{"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
                    {"name": "relays", "profile": "generic-relay-8", "device_id": 2}],
        "loads": [{"name": "oven", "relay": "relays.relay_1", "kw": 40.0, "on": True}]})


@dataclass(frozen=True)
class Day:
    day: dict[str, Any]  # the day's final bill (its record's "bill")
    month: dict[str, Any] | None  # the month's final bill, when the day was a month's last
    intervals: list[dict[str, Any]]  # the day's 96
    register_kwh: float  # what the meter's import register counted over the day


@functools.cache
def simulate(tariff: str, day: date) -> Day:
    t0 = local_midnight(day)
    sim = SimLedger(flat_site(), main="main-meter", t0=t0, step_s=STEP_S,
                    ledger={"tariff": tariff})
    sim.run_until(t0)
    start = sim.register("main-meter")
    sim.run_until(t0 + DAY_S)
    end = sim.register("main-meter")
    sim.run_until(t0 + DAY_S + 900.0)
    assert sim.events() == []
    (bill,) = sim.bills("day")
    months = sim.bills("month")
    assert len(months) <= 1
    intervals = [x for x in sim.intervals("main-meter") if t0 <= x["start"] < t0 + DAY_S]
    return Day(bill["bill"], months[0]["bill"] if months else None, intervals, end - start)


def check_day(got: Day, tariff: str, label: str, kwh: dict[str, float], price: dict[str, float],
              energy_cost: float, demand_charge: float, total: float) -> None:
    """The day bill against the figures worked out by hand (periods not listed: none)."""
    t = load_tariff_file(tariff)  # the prices as the tariff file gives them
    assert {p: t.energy.price(p) for p in price} == price
    bill = got.day
    assert (bill["tariff_id"], bill["period"], bill["kind"]) == (tariff, label, "day")
    assert bill["complete"] and bill["intervals"] == 96
    for p in PERIODS:
        assert bill["period_kwh"][p] == pytest.approx(kwh.get(p, 0.0), abs=KWH_TOL), p
        assert bill["period_cost"][p] == pytest.approx(kwh.get(p, 0.0) * price.get(p, 0.0),
                                                       abs=YUAN_TOL), p
    assert sum(kwh.values()) == 24 * KW  # the hand-made split covers the day
    assert bill["energy_kwh"] == pytest.approx(24 * KW, abs=KWH_TOL)
    assert bill["energy_cost"] == pytest.approx(energy_cost, abs=YUAN_TOL)
    assert bill["demand_charge"] == pytest.approx(demand_charge, abs=YUAN_TOL)
    assert bill["fixed_charges"] == 0.0
    assert bill["total"] == pytest.approx(total, abs=YUAN_TOL)
    # the day's interval energies add up to the register difference (each boundary's value
    # is used once as an end and once as a start), and to 100 kW × 24 h
    assert len(got.intervals) == 96 and {x["quality"] for x in got.intervals} == {"complete"}
    assert sum(x["import_kwh"] for x in got.intervals) == pytest.approx(got.register_kwh, abs=0.002)
    assert got.register_kwh == pytest.approx(24 * KW, abs=0.002)
    for x in got.intervals:
        assert x["import_kwh"] == pytest.approx(KW / 4, abs=KWH_TOL)
    # the maximum demand, from the second block on (the first is not measured throughout:
    # the readings start at its first second)
    assert [x["month_max_demand"]["kw"] for x in got.intervals[1:]] == [pytest.approx(KW)] * 95


SIMULATED = {"jiangsu-2025-two-part", "guangdong-2021-two-part",
             "guangdong-2021-single-part-lt1kv", "yunnan-2026-two-part"}


def test_every_shipped_tariff_has_a_simulated_golden_day() -> None:
    assert {f.stem for f in (ROOT / "config" / "tariffs").glob("*.toml")} == SIMULATED


# --- Jiangsu (苏发改价格发〔2025〕426号): base 0.42 × ratio + adder 0.20 元/kWh -----------------

JIANGSU = {"critical": 1.1072,     # 0.42 × 2.16 + 0.20
           "peak": 0.956,          # 0.42 × 1.8  + 0.20
           "flat": 0.62,           # 0.42 × 1.0  + 0.20
           "valley": 0.347,        # 0.42 × 0.35 + 0.20
           "deep_valley": 0.3176}  # 0.42 × 0.28 + 0.20
JIANGSU_DEMAND = 40.0  # 元/kW·month


def test_jiangsu_the_last_day_of_july_and_the_month_bill_with_its_demand_charge() -> None:
    # Friday 2026-07-31, the Jul-Aug grid (with critical peak):
    #   valley    00-06, 11-13                 8 h × 100 kW = 800 kWh
    #   flat      06-11, 13-14, 22-24          8 h × 100 kW = 800 kWh
    #   critical  14-15, 19:30-21:30           3 h × 100 kW = 300 kWh
    #   peak      15-19:30, 21:30-22           5 h × 100 kW = 500 kWh
    kwh = {"valley": 8 * KW, "flat": 8 * KW, "critical": 3 * KW, "peak": 5 * KW}
    # 800 × 0.347 + 800 × 0.62 + 300 × 1.1072 + 500 × 0.956
    #   = 277.60 + 496.00 + 332.16 + 478.00 = 1583.76
    assert 800 * 0.347 + 800 * 0.62 + 300 * 1.1072 + 500 * 0.956 == pytest.approx(1583.76)
    # the day's share of the demand charge: 40 元/kW·month × 100 kW / 31 days = 129.03
    got = simulate("jiangsu-2025-two-part", date(2026, 7, 31))
    check_day(got, "jiangsu-2025-two-part", "2026-07-31", kwh, JIANGSU, energy_cost=1583.76,
              demand_charge=129.03, total=1712.79)  # 1583.76 + 129.032...
    assert got.day["max_demand_kw"] == pytest.approx(KW, abs=0.01)
    assert got.day["days_in_month"] == 31 and got.day["demand_price"] == JIANGSU_DEMAND
    # the month bill, published when August's first interval arrives: the only simulated day
    # of July, with the whole month's demand charge: 40 元/kW·month × 100 kW = 4000.00
    month = got.month
    assert month is not None and (month["period"], month["tariff_id"]) == ("2026-07", got.day["tariff_id"])
    assert month["energy_cost"] == pytest.approx(1583.76, abs=YUAN_TOL)
    assert month["max_demand_kw"] == pytest.approx(KW, abs=0.01)
    assert month["demand_charge"] == pytest.approx(4000.00, abs=YUAN_TOL)
    assert month["total"] == pytest.approx(5583.76, abs=YUAN_TOL)  # 1583.76 + 4000.00
    assert month["intervals"] == 96 and not month["complete"]  # one day of 31


def test_jiangsu_national_day_has_its_deep_valley() -> None:
    # Thursday 2026-10-01, National Day (a statutory holiday of the shipped calendar): the
    # spring-autumn grid's holiday form:
    #   flat         00-02, 06-10, 14-15, 22-24   9 h × 100 kW = 900 kWh
    #   valley       02-06                        4 h × 100 kW = 400 kWh
    #   deep valley  10-14                        4 h × 100 kW = 400 kWh
    #   peak         15-22                        7 h × 100 kW = 700 kWh
    kwh = {"flat": 9 * KW, "valley": 4 * KW, "deep_valley": 4 * KW, "peak": 7 * KW}
    # 900 × 0.62 + 400 × 0.347 + 400 × 0.3176 + 700 × 0.956
    #   = 558.00 + 138.80 + 127.04 + 669.20 = 1493.04
    assert 900 * 0.62 + 400 * 0.347 + 400 * 0.3176 + 700 * 0.956 == pytest.approx(1493.04)
    # demand share: 40 × 100 / 31 days (October) = 129.03
    check_day(simulate("jiangsu-2025-two-part", date(2026, 10, 1)), "jiangsu-2025-two-part",
              "2026-10-01", kwh, JIANGSU, energy_cost=1493.04, demand_charge=129.03,
              total=1622.07)  # 1493.04 + 129.032...


def test_jiangsu_a_tariff_changed_at_the_months_end_leaves_july_its_demand_price() -> None:
    # a signed tariff command: Yunnan's tariff from 2026-08-01 00:00 local. July's final
    # bills (made when August's first interval arrives) charge July's tariff's demand price
    t0 = local_midnight(date(2026, 7, 31)) + 23 * 3600.0
    sim = SimLedger(flat_site(), main="main-meter", t0=t0, step_s=STEP_S,
                    ledger={"tariff": "jiangsu-2025-two-part"})
    sim.state = set_tariff(sim.config, sim.state, load_tariff_file("yunnan-2026-two-part"),
                           local_midnight(date(2026, 8, 1)))
    sim.run_until(t0 + 3600.0 + 900.0)
    (month,) = (b["bill"] for b in sim.bills("month"))
    # 23:00-24:00 flat: 100 kWh × 0.62 = 62.00; demand 40 × 100 kW = 4000.00
    assert (month["period"], month["tariff_id"], month["demand_price"]) == (
        "2026-07", "jiangsu-2025-two-part", JIANGSU_DEMAND)
    assert month["energy_cost"] == pytest.approx(62.00, abs=YUAN_TOL)
    assert month["total"] == pytest.approx(4062.00, abs=YUAN_TOL)
    (day,) = (b["bill"] for b in sim.bills("day"))
    assert (day["tariff_id"], day["demand_charge"]) == ("jiangsu-2025-two-part", 129.03)
    august = [b["bill"] for b in sim.bills("month", final=False) if b["label"] == "2026-08"]
    # August's first interval, 00:00-00:15 flat at Yunnan's 0.50: 25 kWh × 0.50 = 12.50;
    # its demand price 34 元/kW·month
    assert (august[-1]["tariff_id"], august[-1]["demand_price"]) == ("yunnan-2026-two-part", 34.0)
    assert august[-1]["energy_cost"] == pytest.approx(12.50, abs=YUAN_TOL)


# --- Guangdong (粤发改价格〔2021〕331号) --------------------------------------------------------


def test_guangdong_two_part_a_july_day() -> None:
    # prices: base 0.60 × ratio, to 4 decimals
    price = {"critical": 1.275,  # 0.60 × 2.125 (peak × 1.25)
             "peak": 1.02,       # 0.60 × 1.7
             "flat": 0.60,       # 0.60 × 1.0
             "valley": 0.228}    # 0.60 × 0.38
    # Wednesday 2026-07-15, the Jul-Sep grid (every day the same):
    #   valley    00-08                   8 h × 100 kW = 800 kWh
    #   flat      08-10, 12-14, 19-24     9 h × 100 kW = 900 kWh
    #   peak      10-11, 14-15, 17-19     4 h × 100 kW = 400 kWh
    #   critical  11-12, 15-17            3 h × 100 kW = 300 kWh
    kwh = {"valley": 8 * KW, "flat": 9 * KW, "peak": 4 * KW, "critical": 3 * KW}
    # 800 × 0.228 + 900 × 0.60 + 400 × 1.02 + 300 × 1.275
    #   = 182.40 + 540.00 + 408.00 + 382.50 = 1512.90
    assert 800 * 0.228 + 900 * 0.60 + 400 * 1.02 + 300 * 1.275 == pytest.approx(1512.90)
    # demand share: 32 元/kW·month × 100 kW / 31 days = 103.2258... = 103.23
    check_day(simulate("guangdong-2021-two-part", date(2026, 7, 15)), "guangdong-2021-two-part",
              "2026-07-15", kwh, price, energy_cost=1512.90, demand_charge=103.23,
              total=1616.13)  # 1512.90 + 103.2258...


def test_guangdong_single_part_an_october_2021_day() -> None:
    price = {"peak": 1.1433, "flat": 0.6725, "valley": 0.2556}  # the five-city table, stated
    # Tuesday 2021-10-12, the Oct-Jun grid (no critical peak):
    #   valley  00-08                 8 h × 100 kW = 800 kWh
    #   flat    08-10, 12-14, 19-24   9 h × 100 kW = 900 kWh
    #   peak    10-12, 14-19          7 h × 100 kW = 700 kWh
    kwh = {"valley": 8 * KW, "flat": 9 * KW, "peak": 7 * KW}
    # 800 × 0.2556 + 900 × 0.6725 + 700 × 1.1433 = 204.48 + 605.25 + 800.31 = 1610.04
    assert 800 * 0.2556 + 900 * 0.6725 + 700 * 1.1433 == pytest.approx(1610.04)
    got = simulate("guangdong-2021-single-part-lt1kv", date(2021, 10, 12))
    check_day(got, "guangdong-2021-single-part-lt1kv", "2021-10-12", kwh, price,
              energy_cost=1610.04, demand_charge=0.0, total=1610.04)
    assert got.day["demand_price"] is None  # single-part: no demand charge


# --- Yunnan (云发改价格〔2026〕51号): base 0.35 × ratio + adder 0.15 元/kWh --------------------


def test_yunnan_a_july_day() -> None:
    price = {"peak": 0.675,    # 0.35 × 1.5 + 0.15
             "flat": 0.50,     # 0.35 × 1.0 + 0.15
             "valley": 0.325}  # 0.35 × 0.5 + 0.15
    # Wednesday 2026-07-15, the all-year grid:
    #   flat    00-02, 06-07, 09-12, 16-18   8 h × 100 kW = 800 kWh
    #   valley  02-06, 12-16                 8 h × 100 kW = 800 kWh
    #   peak    07-09, 18-24                 8 h × 100 kW = 800 kWh
    kwh = {"flat": 8 * KW, "valley": 8 * KW, "peak": 8 * KW}
    # 800 × 0.50 + 800 × 0.325 + 800 × 0.675 = 400.00 + 260.00 + 540.00 = 1200.00
    assert 800 * 0.50 + 800 * 0.325 + 800 * 0.675 == pytest.approx(1200.00)
    # demand share: 34 元/kW·month × 100 kW / 31 days = 109.677... = 109.68
    check_day(simulate("yunnan-2026-two-part", date(2026, 7, 15)), "yunnan-2026-two-part",
              "2026-07-15", kwh, price, energy_cost=1200.00, demand_charge=109.68,
              total=1309.68)  # 1200.00 + 109.677...
