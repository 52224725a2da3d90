"""Golden bills, computed by hand: for every shipped tariff, one local day of 96 15-minute
intervals of a load shape simple enough to add up by hand — 100 kW all day, 200 kW from 14:00
to 16:00 (2600 kWh) — priced and billed, against the hours per period × kW × price written
out below. Also a month bill with its demand charge, a Jiangsu holiday (the deep valley), an
adjusted working day, fixed charges, and an accumulator that is persisted half-way."""

from __future__ import annotations

import json
import re
import tomllib
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from lmt.analytics.bill import Bill, BillLine, BillState, bill_of, period_bounds, price_line
from lmt.analytics.tariff import PERIODS, HolidayCalendar, Tariff, parse_calendar, parse_tariff

ROOT = Path(__file__).resolve().parents[2]
TARIFFS = ROOT / "config" / "tariffs"
CN = 8 * 3600
BEIJING = timezone(timedelta(seconds=CN))


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def tariff(name: str) -> Tariff:
    return parse_tariff(load(TARIFFS / f"{name}.toml"))


CALENDAR: HolidayCalendar = parse_calendar(load(ROOT / "config" / "ledger_data" / "holidays-cn.toml"))

# The notices the shipped files must name, and from when they apply.
SHIPPED = {
    "jiangsu-2025-two-part": ("苏发改价格发〔2025〕426号", date(2025, 6, 1)),
    "guangdong-2021-two-part": ("粤发改价格〔2021〕331号", date(2021, 10, 1)),
    "guangdong-2021-single-part-lt1kv": ("粤发改价格〔2021〕331号", date(2021, 10, 1)),
    "yunnan-2026-two-part": ("云发改价格〔2026〕51号", date(2026, 3, 1)),
}


def test_every_shipped_tariff_parses_names_its_notice_and_has_a_golden_day() -> None:
    files = sorted(TARIFFS.glob("*.toml"))
    assert {f.stem for f in files} == set(SHIPPED)  # a new file needs its golden day below
    for f in files:
        t = parse_tariff(load(f))
        notice, effective = SHIPPED[f.stem]
        assert t.id == f.stem
        assert t.notice == notice and notice in t.source
        assert re.fullmatch(r".+〔\d{4}〕\d+号", t.notice)
        assert t.effective_from == effective
        assert t.currency == "CNY" and t.customer_class


# --- the load shape ---------------------------------------------------------------------------


def kw_at(interval: int) -> float:
    """100 kW, 200 kW from 14:00 to 16:00 (intervals 56-63 of the day's 96)."""
    return 200.0 if 14 * 4 <= interval < 16 * 4 else 100.0


def day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=BEIJING).timestamp()


def day_lines(t: Tariff, day: date, *, kgco2_per_kwh: float = 0.0,
              export_kw: float = 0.0) -> list[BillLine]:
    """The day's 96 intervals; ``export_kw`` exported from 10:00 to 12:00 (intervals 40-47)."""
    start = day_start(day)
    lines = []
    for i in range(96):
        a = start + i * 900
        kwh = kw_at(i) * 0.25
        export = export_kw * 0.25 if 10 * 4 <= i < 12 * 4 else 0.0
        lines.append(price_line(t, CALENDAR, a, a + 900, kwh, CN, export_kwh=export,
                                kgco2=kwh * kgco2_per_kwh, export_kgco2=export * kgco2_per_kwh))
    return lines


def check_energy(bill: Bill, kwh: dict[str, float], price: dict[str, float]) -> None:
    """kWh and cost per period as worked out by hand; periods not listed have none."""
    assert bill.period_kwh == {p: float(kwh.get(p, 0.0)) for p in PERIODS}
    assert bill.period_cost == {p: round(kwh.get(p, 0.0) * price.get(p, 0.0), 2) for p in PERIODS}
    assert bill.energy_kwh == sum(kwh.values()) == 24 * 100 + 2 * 100  # the shape: 2600 kWh
    assert bill.intervals == 96 and bill.complete


# --- Jiangsu (苏发改价格发〔2025〕426号) ----------------------------------------------------------

JIANGSU = {  # 元/kWh = base 0.42 × ratio + adder 0.20
    "critical": 1.1072,      # 0.42 × 2.16 + 0.20
    "peak": 0.956,           # 0.42 × 1.8  + 0.20
    "flat": 0.62,            # 0.42 × 1.0  + 0.20
    "valley": 0.347,         # 0.42 × 0.35 + 0.20
    "deep_valley": 0.3176,   # 0.42 × 0.28 + 0.20
}

# July (the Jul-Aug grid), a working day:
#   valley    00-06, 11-13             8 h × 100 kW            =  800 kWh
#   flat      06-11, 13-14, 22-24      8 h × 100 kW            =  800 kWh
#   critical  14-15                    1 h × 200 kW            =  200 kWh
#             19:30-21:30              2 h × 100 kW            =  200 kWh
#   peak      15-16                    1 h × 200 kW            =  200 kWh
#             16-19:30, 21:30-22       4 h × 100 kW            =  400 kWh
JIANGSU_JULY_KWH = {"valley": 8 * 100, "flat": 8 * 100, "critical": 1 * 200 + 2 * 100,
                    "peak": 1 * 200 + 4 * 100}
# 800 × 0.347 + 800 × 0.62 + 400 × 1.1072 + 600 × 0.956 = 277.60 + 496.00 + 442.88 + 573.60
JIANGSU_JULY_COST = 1790.08


def test_jiangsu_a_working_day_in_july() -> None:
    t = tariff("jiangsu-2025-two-part")
    assert {p: t.energy.price(p) for p in PERIODS} == JIANGSU
    assert 800 * 0.347 + 800 * 0.62 + 400 * 1.1072 + 600 * 0.956 == pytest.approx(1790.08)
    # carbon at a round 0.5 kgCO2/kWh; 10 kW exported 10:00-12:00, reported beside the import
    lines = day_lines(t, date(2026, 7, 15), kgco2_per_kwh=0.5, export_kw=10.0)
    bill = bill_of("day", "2026-07-15", lines, t, CN)
    check_energy(bill, JIANGSU_JULY_KWH, JIANGSU)
    assert bill.energy_cost == JIANGSU_JULY_COST
    assert (bill.demand_charge, bill.fixed_charges) == (0.0, 0.0)  # no maximum demand given
    assert bill.total == JIANGSU_JULY_COST
    assert bill.kgco2 == 2600 * 0.5                        # 1300 kg
    assert bill.export_kwh == 2 * 10.0                     # 2 h × 10 kW = 20 kWh
    assert bill.export_kgco2 == 20 * 0.5                   # 10 kg
    assert (bill.kind, bill.period, bill.tariff_id) == ("day", "2026-07-15", t.id)
    assert bill.priced_by == (t.id,)
    assert (bill.start, bill.end) == (day_start(date(2026, 7, 15)), day_start(date(2026, 7, 16)))


def test_jiangsu_a_day_bill_carries_its_share_of_the_demand_charge() -> None:
    t = tariff("jiangsu-2025-two-part")
    peak_t = day_start(date(2026, 7, 15)) + 14 * 3600
    bill = bill_of("day", "2026-07-15", day_lines(t, date(2026, 7, 15)), t, CN,
                   max_demand_kw=200.0, max_demand_t=peak_t)
    # month-to-date maximum 200 kW × 40 元/kW·month / 31 days = 258.0645...
    assert bill.demand_charge == 258.06
    assert bill.days_in_month == 31 and bill.demand_price == 40.0
    assert bill.total == round(1790.08 + 200 * 40.0 / 31, 2) == 2048.14
    assert (bill.max_demand_kw, bill.max_demand_t) == (200.0, peak_t)


def test_jiangsu_a_month_bill_with_its_demand_charge() -> None:
    t = tariff("jiangsu-2025-two-part")
    state = BillState.new("month", "2026-07", CN)
    for d in range(31):  # July 2026 has no holiday; Jiangsu prices weekends as working days
        for line in day_lines(t, date(2026, 7, 1) + timedelta(days=d)):
            state = state.add(line)
    bill = state.bill(t, max_demand_kw=200.0, max_demand_t=day_start(date(2026, 7, 15)) + 50400)
    assert bill.period_kwh == {p: 31.0 * JIANGSU_JULY_KWH.get(p, 0) for p in PERIODS}
    assert bill.energy_cost == 55492.48           # 31 days × 1790.08
    assert bill.demand_charge == 8000.00          # 200 kW × 40 元/kW·month
    assert bill.fixed_charges == 0.0
    assert bill.total == 63492.48                 # 55492.48 + 8000.00
    assert bill.intervals == 31 * 96 and bill.complete
    assert (bill.start, bill.end) == period_bounds("month", "2026-07", CN)


def test_jiangsu_a_holiday_has_its_deep_valley() -> None:
    t = tariff("jiangsu-2025-two-part")
    # National Day, Thursday 2026-10-01 (the spring-autumn grid, its holiday form):
    #   flat         00-02, 06-10, 22-24   8 h × 100 kW = 800;  14-15  1 h × 200 kW = 200
    #   valley       02-06                 4 h × 100 kW = 400
    #   deep valley  10-14                 4 h × 100 kW = 400
    #   peak         15-16  1 h × 200 kW = 200;  16-22  6 h × 100 kW = 600
    kwh = {"flat": 8 * 100 + 1 * 200, "valley": 4 * 100, "deep_valley": 4 * 100,
           "peak": 1 * 200 + 6 * 100}
    # 1000 × 0.62 + 400 × 0.347 + 400 × 0.3176 + 800 × 0.956 = 620 + 138.80 + 127.04 + 764.80
    assert 1000 * 0.62 + 400 * 0.347 + 400 * 0.3176 + 800 * 0.956 == pytest.approx(1650.64)
    bill = bill_of("day", "2026-10-01", day_lines(t, date(2026, 10, 1)), t, CN)
    check_energy(bill, kwh, JIANGSU)
    assert bill.energy_cost == bill.total == 1650.64


@pytest.mark.parametrize("day", [date(2026, 10, 10), date(2026, 10, 17), date(2026, 10, 9)],
                         ids=["adjusted-working-saturday", "saturday", "friday"])
def test_jiangsu_days_off_are_not_holidays(day: date) -> None:
    t = tariff("jiangsu-2025-two-part")
    # the same grid without the deep valley: 10-14 is valley again
    #   flat    00-02, 06-10, 22-24  8 h × 100 kW = 800;  14-15  1 h × 200 kW = 200
    #   valley  02-06, 10-14         8 h × 100 kW = 800
    #   peak    15-16  1 h × 200 kW = 200;  16-22  6 h × 100 kW = 600
    kwh = {"flat": 8 * 100 + 1 * 200, "valley": 8 * 100, "peak": 1 * 200 + 6 * 100}
    # 1000 × 0.62 + 800 × 0.347 + 800 × 0.956 = 620 + 277.60 + 764.80
    bill = bill_of("day", day.isoformat(), day_lines(t, day), t, CN)
    check_energy(bill, kwh, JIANGSU)
    assert bill.energy_cost == 1662.40


# --- Guangdong (粤发改价格〔2021〕331号) ----------------------------------------------------------


def test_guangdong_two_part_a_july_day() -> None:
    t = tariff("guangdong-2021-two-part")
    price = {"critical": 1.275,  # 0.60 × 2.125 (peak × 1.25)
             "peak": 1.02,       # 0.60 × 1.7
             "flat": 0.60,
             "valley": 0.228}    # 0.60 × 0.38
    assert {p: t.energy.price(p) for p in price} == price
    # July: every day the same grid
    #   valley    00-08                  8 h × 100 kW                          =  800
    #   flat      08-10, 12-14, 19-24    9 h × 100 kW                          =  900
    #   peak      10-11 1 h × 100 + 14-15 1 h × 200 + 17-19 2 h × 100          =  500
    #   critical  11-12 1 h × 100 + 15-16 1 h × 200 + 16-17 1 h × 100          =  400
    kwh = {"valley": 8 * 100, "flat": 9 * 100, "peak": 1 * 100 + 1 * 200 + 2 * 100,
           "critical": 1 * 100 + 1 * 200 + 1 * 100}
    # 800 × 0.228 + 900 × 0.60 + 500 × 1.02 + 400 × 1.275 = 182.40 + 540 + 510 + 510
    assert 800 * 0.228 + 900 * 0.60 + 500 * 1.02 + 400 * 1.275 == pytest.approx(1742.40)
    bill = bill_of("day", "2026-07-15", day_lines(t, date(2026, 7, 15)), t, CN)
    check_energy(bill, kwh, price)
    assert bill.energy_cost == bill.total == 1742.40


def test_guangdong_single_part_an_october_2021_day() -> None:
    t = tariff("guangdong-2021-single-part-lt1kv")
    price = {"peak": 1.1433, "flat": 0.6725, "valley": 0.2556}  # the table, stated
    # Tuesday 2021-10-12, no critical peak in October:
    #   valley  00-08                 8 h × 100 kW                              =  800
    #   flat    08-10, 12-14, 19-24   9 h × 100 kW                              =  900
    #   peak    10-12 2 h × 100 + 14-16 2 h × 200 + 16-19 3 h × 100               =  900
    kwh = {"valley": 8 * 100, "flat": 9 * 100, "peak": 2 * 100 + 2 * 200 + 3 * 100}
    # 800 × 0.2556 + 900 × 0.6725 + 900 × 1.1433 = 204.48 + 605.25 + 1028.97
    assert 800 * 0.2556 + 900 * 0.6725 + 900 * 1.1433 == pytest.approx(1838.70)
    bill = bill_of("day", "2021-10-12", day_lines(t, date(2021, 10, 12)), t, CN,
                   max_demand_kw=200.0)
    check_energy(bill, kwh, price)
    assert bill.energy_cost == bill.total == 1838.70
    assert bill.demand_price is None and bill.demand_charge == 0.0  # single-part


# --- Yunnan (云发改价格〔2026〕51号) --------------------------------------------------------------

YUNNAN = {"peak": 0.675,   # 0.35 × 1.5 + 0.15
          "flat": 0.50,    # 0.35 × 1.0 + 0.15
          "valley": 0.325}  # 0.35 × 0.5 + 0.15
# every day the same grid:
#   valley  02-06 4 h × 100 + 12-14 2 h × 100 + 14-16 2 h × 200            = 1000
#   flat    00-02, 06-07, 09-12, 16-18   8 h × 100 kW                       =  800
#   peak    07-09, 18-24                 8 h × 100 kW                       =  800
YUNNAN_KWH = {"valley": 4 * 100 + 2 * 100 + 2 * 200, "flat": 8 * 100, "peak": 8 * 100}
# 1000 × 0.325 + 800 × 0.50 + 800 × 0.675 = 325 + 400 + 540
YUNNAN_DAY_COST = 1265.00


def yunnan_with_fixed_charges() -> Tariff:
    data = tariff("yunnan-2026-two-part").to_dict()
    data["fixed"] = {"per_month": 100.0, "per_day": 2.0}
    return parse_tariff(data)


def test_yunnan_a_july_day() -> None:
    t = tariff("yunnan-2026-two-part")
    assert {p: t.energy.price(p) for p in YUNNAN} == YUNNAN
    assert 1000 * 0.325 + 800 * 0.50 + 800 * 0.675 == pytest.approx(YUNNAN_DAY_COST)
    bill = bill_of("day", "2026-07-15", day_lines(t, date(2026, 7, 15)), t, CN)
    check_energy(bill, YUNNAN_KWH, YUNNAN)
    assert bill.energy_cost == bill.total == YUNNAN_DAY_COST


def test_yunnan_a_month_so_far_with_demand_and_fixed_charges() -> None:
    t = yunnan_with_fixed_charges()
    lines = [line for d in range(10) for line in day_lines(t, date(2026, 3, 1) + timedelta(d))]
    bill = bill_of("month", "2026-03", lines, t, CN, max_demand_kw=200.0)
    assert bill.energy_cost == 12650.00       # 10 days × 1265.00
    assert bill.demand_charge == 6800.00      # 200 kW × 34 元/kW·month
    assert bill.fixed_charges == 162.00       # 100 per month + 2 per day × 31 days
    assert bill.total == 19612.00             # 12650 + 6800 + 162
    assert bill.intervals == 10 * 96 and not bill.complete  # 10 of March's 31 days


def test_yunnan_a_day_bill_with_its_share_of_the_month() -> None:
    t = yunnan_with_fixed_charges()
    bill = bill_of("day", "2026-03-05", day_lines(t, date(2026, 3, 5)), t, CN,
                   max_demand_kw=200.0)
    assert bill.demand_charge == 219.35       # 200 kW × 34 / 31 days = 219.3548...
    assert bill.fixed_charges == 5.23         # 100 / 31 days + 2 = 5.2258...
    # the total from the unrounded parts: 1265 + 219.3548... + 5.2258... = 1489.5806...
    assert bill.total == round(1265.00 + 200 * 34 / 31 + 100 / 31 + 2, 2) == 1489.58


# --- the accumulator --------------------------------------------------------------------------


def test_a_persisted_state_bills_the_same() -> None:
    t = tariff("jiangsu-2025-two-part")
    lines = day_lines(t, date(2026, 10, 1), kgco2_per_kwh=0.5703, export_kw=3.0)
    state = BillState.containing("day", lines[0].start, CN)
    for line in lines[:37]:
        state = state.add(line)
    resumed = BillState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert resumed == state
    for line in lines[37:]:
        state, resumed = state.add(line), resumed.add(line)
    assert resumed.bill(t) == state.bill(t) == bill_of("day", "2026-10-01", lines, t, CN)
    assert Bill.from_dict(json.loads(json.dumps(state.bill(t).to_dict()))) == state.bill(t)
    line = BillLine.from_dict(json.loads(json.dumps(lines[0].to_dict())))
    assert line == lines[0]


def test_the_bill_so_far_is_incomplete_and_gaps_are_allowed() -> None:
    t = tariff("yunnan-2026-two-part")
    lines = day_lines(t, date(2026, 7, 15))
    so_far = bill_of("day", "2026-07-15", lines[:48], t, CN)  # 00:00-12:00
    # 00-02 flat, 02-06 valley, 06-07 flat, 07-09 peak, 09-12 flat, all at 100 kW
    assert so_far.period_kwh["flat"] == (2 + 1 + 3) * 100
    assert so_far.period_kwh["valley"] == 4 * 100 and so_far.period_kwh["peak"] == 2 * 100
    assert so_far.intervals == 48 and not so_far.complete
    gap = bill_of("day", "2026-07-15", lines[:10] + lines[11:], t, CN)  # 02:30-02:45 missing
    assert gap.intervals == 95 and not gap.complete
    assert gap.period_kwh["valley"] == YUNNAN_KWH["valley"] - 25.0


def test_lines_out_of_order_overlapping_or_outside_are_refused() -> None:
    t = tariff("yunnan-2026-two-part")
    lines = day_lines(t, date(2026, 7, 15))
    state = BillState.new("day", "2026-07-15", CN).add(lines[1])
    with pytest.raises(ValueError, match="starts before the end of the last line"):
        state.add(lines[0])
    with pytest.raises(ValueError, match="starts before the end of the last line"):
        state.add(lines[1])
    with pytest.raises(ValueError, match="is not inside day 2026-07-16"):
        BillState.new("day", "2026-07-16", CN).add(lines[0])
    with pytest.raises(ValueError, match="expected a month YYYY-MM"):
        BillState.new("month", "2026-13", CN)
    with pytest.raises(ValueError, match="expected a local date YYYY-MM-DD"):
        BillState.new("day", "2026-07", CN)
    with pytest.raises(ValueError, match=r"1000\.0 kWh priced, but import_kwh is 999\.0"):
        BillLine(0.0, 900.0, 999.0, 0.0, lines[0].pieces * 40)
    with pytest.raises(ValueError, match=r"BillState\.period_kwh: expected the periods"):
        BillState.from_dict(dict(state.to_dict(), period_kwh={"peak": 1.0}))
    with pytest.raises(ValueError, match=r"max_demand_t .* is not in month 2026-07"):
        state.bill(t, 100.0, day_start(date(2026, 8, 1)))
