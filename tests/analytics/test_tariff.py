"""lmt.analytics.tariff: parsing and its errors, the holiday calendar, period lookup at the
boundaries, splitting an interval's energy, the tariff book."""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmt.analytics.tariff import (
    DAY_TYPES,
    PERIODS,
    HolidayCalendar,
    Tariff,
    TariffBook,
    TariffError,
    day_type,
    local_date,
    parse_calendar,
    parse_tariff,
    period_at,
    price_interval,
    price_of,
)

ROOT = Path(__file__).resolve().parents[2]
TARIFFS = ROOT / "config" / "tariffs"
CALENDAR = ROOT / "config" / "ledger_data" / "holidays-cn.toml"
CN = 8 * 3600  # China, UTC+8
BEIJING = timezone(timedelta(seconds=CN))


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def jiangsu() -> Tariff:
    return parse_tariff(load(TARIFFS / "jiangsu-2025-two-part.toml"))


@pytest.fixture(scope="module")
def calendar() -> HolidayCalendar:
    return parse_calendar(load(CALENDAR))


def at(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: float = 0.0) -> float:
    """Unix seconds of a Beijing wall-clock time."""
    return datetime(y, mo, d, h, mi, tzinfo=BEIJING).timestamp() + s


def minimal() -> dict[str, Any]:
    """A small valid tariff: valley at night, peak 08-12, flat otherwise; two seasons."""
    grid = ["valley"] * 16 + ["peak"] * 8 + ["flat"] * 24
    return {
        "id": "test-1", "name": "test", "province": "Nowhere", "notice": "测试〔2026〕1号",
        "source": "a test", "currency": "CNY", "effective_from": "2026-01-01",
        "customer_class": "two-part industrial, 1-10 kV", "structure": "two-part",
        "energy": {"base": 0.5, "ratios": {"peak": 1.5, "flat": 1.0, "valley": 0.5}},
        "demand": {"price": 30.0},
        "seasons": [{"name": "winter", "months": [1, 2, 3, 10, 11, 12], "grid": list(grid)},
                    {"name": "summer", "months": [4, 5, 6, 7, 8, 9], "grid": list(grid)}],
    }


# --- parsing ----------------------------------------------------------------------------------


def test_a_minimal_tariff_parses_and_round_trips() -> None:
    t = parse_tariff(minimal())
    assert t.effective_from == date(2026, 1, 1) and t.effective_to is None
    assert t.demand_price == 30.0
    assert [price_of(t, p) for p in ("peak", "flat", "valley")] == [0.75, 0.5, 0.25]
    assert parse_tariff(t.to_dict()) == t
    assert parse_tariff(json.loads(json.dumps(t.to_dict()))) == t


def test_every_shipped_tariff_round_trips_through_json(jiangsu: Tariff) -> None:
    for path in sorted(TARIFFS.glob("*.toml")):
        t = parse_tariff(load(path))
        body = json.loads(json.dumps(t.to_dict(), ensure_ascii=False))  # a command's body
        assert parse_tariff(body) == t, path.name


def test_stated_prices_and_rounding() -> None:
    data = minimal()
    data["energy"] = {"prices": {"peak": 1.1433, "flat": 0.6725, "valley": 0.2556}}
    t = parse_tariff(data)
    assert price_of(t, "peak") == 1.1433
    data = minimal()
    # 0.6725 × 1.7 = 1.14325 -> 1.1433 half up at 4 decimals (分/kWh to two places)
    data["energy"] = {"base": 0.6725, "ratios": {"peak": 1.7, "flat": 1.0, "valley": 0.38},
                      "decimals": 4}
    t = parse_tariff(data)
    assert price_of(t, "peak") == 1.1433
    assert price_of(t, "valley") == 0.2556  # 0.25555 -> 0.2556
    assert parse_tariff(t.to_dict()) == t


def test_price_of_a_period_without_a_price(jiangsu: Tariff) -> None:
    t = parse_tariff(minimal())
    with pytest.raises(TariffError, match="no price for period 'critical'"):
        price_of(t, "critical")
    with pytest.raises(TariffError, match="unknown period 'peek'"):
        price_of(t, "peek")


def _set(path: str, value: Any) -> dict[str, Any]:
    """minimal() with the value at a dotted path (``seasons.0.grid``) replaced or, for
    ``...``, deleted."""
    data = copy.deepcopy(minimal())
    node: Any = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last: Any = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


GRID = ["valley"] * 16 + ["peak"] * 8 + ["flat"] * 24

BAD_TARIFFS = [
    # (what, the data, the error message up to what was got)
    ("a grid one short", _set("seasons.1.grid", GRID[:47]),
     "tariff.seasons[1].grid: expected 48 periods (one per half hour from 00:00), got 47"),
    ("an unknown period", _set("seasons.0.grid.5", "peek"),
     "tariff.seasons[0].grid[5]: unknown period 'peek'"),
    ("a grid that is not a list", _set("seasons.0.grid", "flat"),
     "tariff.seasons[0].grid: expected a list"),
    ("a rest grid one long", _set("seasons.0.rest_grid", [*GRID, "flat"]),
     "tariff.seasons[0].rest_grid: expected 48 periods"),
    ("a holiday grid with a bad period", _set("seasons.0.holiday_grid", [*GRID[:47], "night"]),
     "tariff.seasons[0].holiday_grid[47]: unknown period 'night'"),
    ("months not covered", _set("seasons.0.months", [1, 2, 3, 10, 11]),
     "tariff.seasons: month(s) 12 in no season (the seasons must cover months 1-12 exactly "
     "once)"),
    ("overlapping seasons", _set("seasons.1.months", [4, 5, 6, 7, 8, 9, 10]),
     "tariff.seasons[1].months[6]: month 10 is also in seasons[0] (seasons overlap)"),
    ("a month twice in a season", _set("seasons.0.months", [1, 2, 3, 10, 11, 12, 12]),
     "tariff.seasons[0].months[6]: month 12 is listed twice"),
    ("month 13", _set("seasons.0.months.0", 13),
     "tariff.seasons[0].months[0]: expected an integer 1..12, got 13"),
    ("a month as text", _set("seasons.0.months.0", "1"),
     "tariff.seasons[0].months[0]: expected an integer 1..12, got '1'"),
    ("no months", _set("seasons.0.months", []),
     "tariff.seasons[0].months: expected at least one month"),
    ("no seasons", _set("seasons", []), "tariff.seasons: expected at least one season"),
    ("a season without a name", _set("seasons.0.name", ...), "tariff.seasons[0].name: missing"),
    ("a season with an unknown key", _set("seasons.0.weekdays", [1]),
     "tariff.seasons[0]: unknown key(s) weekdays"),
    ("no notice", _set("notice", ...), "tariff.notice: missing"),
    ("an empty notice", _set("notice", " "),
     "tariff.notice: expected a non-empty string (e.g. 苏发改价格发〔2025〕426号)"),
    ("no source", _set("source", ...), "tariff.source: missing"),
    ("an unknown key", _set("colour", "red"), "tariff: unknown key(s) colour"),
    ("an id with a space", _set("id", "test 1"), "tariff.id: expected an id"),
    ("a currency", _set("currency", "USD"), "tariff.currency: expected one of CNY, got 'USD'"),
    ("a structure", _set("structure", "three-part"),
     "tariff.structure: expected one of single-part, two-part, got 'three-part'"),
    ("a date", _set("effective_from", "2026-13-01"),
     "tariff.effective_from: expected a date YYYY-MM-DD, got '2026-13-01'"),
    ("a date and time", _set("effective_from", datetime(2026, 1, 1)),
     "tariff.effective_from: expected a date YYYY-MM-DD"),
    ("an end before the start", _set("effective_to", "2025-12-31"),
     "tariff.effective_to: 2025-12-31 is before effective_from 2026-01-01"),
    ("no energy", _set("energy", ...), "tariff.energy: missing"),
    ("both ratios and prices", _set("energy.prices", {"flat": 0.5}),
     "tariff.energy: expected exactly one of 'prices'"),
    ("neither ratios nor prices", _set("energy.ratios", ...),
     "tariff.energy: expected exactly one of 'prices'"),
    ("ratios without a base", _set("energy.base", ...), "tariff.energy.base: missing"),
    ("a ratio as text", _set("energy.ratios.peak", "1.5"),
     "tariff.energy.ratios.peak: expected a number, got '1.5'"),
    ("a ratio as a bool", _set("energy.ratios.peak", True),
     "tariff.energy.ratios.peak: expected a number, got True"),
    ("a negative ratio", _set("energy.ratios.valley", -0.5),
     "tariff.energy.ratios.valley: expected a number >= 0, got -0.5"),
    ("an infinite base", _set("energy.base", math.inf),
     "tariff.energy.base: expected a number, got inf"),
    ("an unknown period's ratio", _set("energy.ratios.night", 0.3),
     "tariff.energy.ratios: unknown key(s) night"),
    ("a period used without a ratio", _set("energy.ratios.peak", ...),
     "tariff.energy.ratios: no ratio for period 'peak', used by seasons[0].grid[16]"),
    ("decimals out of range", _set("energy.decimals", 9),
     "tariff.energy.decimals: expected an integer 0..8, got 9"),
    ("a demand price as text", _set("demand.price", "30"),
     "tariff.demand.price: expected a number, got '30'"),
    ("a demand table with an unknown key", _set("demand.minimum_kw", 10),
     "tariff.demand: unknown key(s) minimum_kw"),
    ("a single-part tariff with a demand charge", _set("structure", "single-part"),
     "tariff.demand: a single-part tariff has no demand charge"),
    ("fixed charges with an unknown key", _set("fixed", {"per_year": 1.0}),
     "tariff.fixed: unknown key(s) per_year"),
    ("a negative fixed charge", _set("fixed", {"per_day": -1}),
     "tariff.fixed.per_day: expected a number >= 0, got -1"),
    ("verify as text", _set("verify", "all of it"), "tariff.verify: expected a list"),
    ("notes as a list", _set("notes", ["a"]), "tariff.notes: expected a string"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_TARIFFS],
                         ids=[w for w, _, _ in BAD_TARIFFS])
def test_every_validation_error_names_its_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TariffError) as err:
        parse_tariff(data)
    assert str(err.value).startswith(message), str(err.value)


def test_a_tariff_that_is_not_a_table() -> None:
    with pytest.raises(TariffError, match=r"^tariff: expected a table"):
        parse_tariff([])  # type: ignore[arg-type]


# --- the holiday calendar ---------------------------------------------------------------------


def test_the_shipped_calendar(calendar: HolidayCalendar) -> None:
    assert calendar.notices == ("国办发明电〔2024〕12号", "国办发明电〔2025〕7号")
    assert calendar.years == (2025, 2026)
    assert parse_calendar(calendar.to_dict()) == calendar
    assert parse_calendar(json.loads(json.dumps(calendar.to_dict()))) == calendar
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(730)]
    off = [d for d in days if day_type(calendar, d) == "holiday"]
    worked = [d for d in days if d.weekday() >= 5 and day_type(calendar, d) == "working"]
    # 2025: 1 + 8 + 3 + 5 + 3 + 8 days off; 2026: 3 + 9 + 3 + 5 + 3 + 3 + 7
    assert sum(d.year == 2025 for d in off) == 1 + 8 + 3 + 5 + 3 + 8
    assert sum(d.year == 2026 for d in off) == 3 + 9 + 3 + 5 + 3 + 3 + 7
    assert worked == [date(2025, 1, 26), date(2025, 2, 8), date(2025, 4, 27), date(2025, 9, 28),
                      date(2025, 10, 11), date(2026, 1, 4), date(2026, 2, 14), date(2026, 2, 28),
                      date(2026, 5, 9), date(2026, 9, 20), date(2026, 10, 10)]


@pytest.mark.parametrize(("day", "expected"), [
    (date(2026, 10, 1), "holiday"),   # Thursday, National Day
    (date(2026, 10, 3), "holiday"),   # Saturday inside the holiday: a holiday
    (date(2026, 10, 9), "working"),   # Friday
    (date(2026, 10, 10), "working"),  # Saturday worked for National Day (调休)
    (date(2026, 10, 17), "rest"),     # Saturday
    (date(2025, 1, 26), "working"),   # Sunday worked for the Spring Festival
    (date(2025, 1, 28), "holiday"),   # Tuesday, New Year's Eve
    (date(2027, 10, 1), "working"),   # a Friday outside the calendar's years: its weekday
])
def test_day_type(calendar: HolidayCalendar, day: date, expected: str) -> None:
    assert expected in DAY_TYPES
    assert day_type(calendar, day) == expected


def test_the_calendar_says_which_years_it_covers(calendar: HolidayCalendar) -> None:
    assert calendar.covers(date(2026, 12, 31)) and not calendar.covers(date(2027, 1, 1))


def small_calendar() -> dict[str, Any]:
    return {"name": "test", "source": "a test", "notices": ["测试〔2026〕1号"], "years": [2026],
            "holidays": [{"name": "National Day", "first": "2026-10-01", "last": "2026-10-07",
                          "workdays": ["2026-09-20", "2026-10-10"]}]}


def _cal(path: str, value: Any) -> dict[str, Any]:
    data = small_calendar()
    node: Any = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return data


BAD_CALENDARS = [
    ("a workday on a weekday", _cal("holidays.0.workdays.0", "2026-09-21"),
     "calendar.holidays[0].workdays[0]: 2026-09-21 is a Monday: an adjusted working day (调休) "
     "is a Saturday or Sunday"),
    ("a last day before the first", _cal("holidays.0.last", "2026-09-30"),
     "calendar.holidays[0].last: 2026-09-30 is before first 2026-10-01"),
    ("a day outside the years", _cal("holidays.0.last", "2027-01-01"),
     "calendar.holidays[0]: 2027-01-01 is outside the calendar's years [2026]"),
    ("a workday that is a day off", _cal("holidays.0.workdays.0", "2026-10-03"),
     "calendar.holidays: 2026-10-03 is both a workday of National Day and a day off"),
    ("overlapping holidays", _cal("holidays", [
        {"name": "A", "first": "2026-10-01", "last": "2026-10-03"},
        {"name": "B", "first": "2026-10-03", "last": "2026-10-04"}]),
     "calendar.holidays[1]: 2026-10-03 is already a day of A"),
    ("a bad date", _cal("holidays.0.first", "1 October"),
     "calendar.holidays[0].first: expected a date YYYY-MM-DD, got '1 October'"),
    ("an unknown key", _cal("holidays.0.kind", "statutory"),
     "calendar.holidays[0]: unknown key(s) kind"),
    ("years twice", _cal("years", [2026, 2026]), "calendar.years: expected distinct years"),
    ("no notices", _cal("notices", "测试"), "calendar.notices: expected a list"),
]


@pytest.mark.parametrize(("data", "message"), [(d, m) for _, d, m in BAD_CALENDARS],
                         ids=[w for w, _, _ in BAD_CALENDARS])
def test_every_calendar_error_names_its_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TariffError) as err:
        parse_calendar(data)
    assert str(err.value).startswith(message), str(err.value)


# --- period lookup ----------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "expected"), [
    # Jiangsu, July, a working day (Wednesday 2026-07-15)
    (at(2026, 7, 15, 0, 0), "valley"),            # local midnight: the day's first slot
    (at(2026, 7, 15, 0, 0, -0.001), "flat"),      # the evening before, 23:59:59.999: 22-24 flat
    (at(2026, 7, 15, 13, 59, 59.999), "flat"),    # a slot excludes its end ...
    (at(2026, 7, 15, 14, 0), "critical"),         # ... and includes its start
    (at(2026, 7, 15, 15, 0), "peak"),
    (at(2026, 7, 15, 19, 29, 59), "peak"),
    (at(2026, 7, 15, 19, 30), "critical"),        # the half-hour boundary of the critical peak
    (at(2026, 7, 15, 21, 29, 59), "critical"),
    (at(2026, 7, 15, 21, 30), "peak"),
    (at(2026, 7, 15, 22, 0), "flat"),
    (at(2026, 7, 15, 23, 59, 59), "flat"),
    # the season changes with the local month: 14:00 is critical in August, flat in September
    (at(2026, 8, 31, 14, 0), "critical"),
    (at(2026, 9, 1, 14, 0), "flat"),
    # a holiday: National Day 2026-10-01, deep valley 10-14
    (at(2026, 10, 1, 9, 59, 59), "flat"),
    (at(2026, 10, 1, 10, 0), "deep_valley"),
    (at(2026, 10, 1, 13, 59, 59), "deep_valley"),
    (at(2026, 10, 1, 14, 0), "flat"),
    (at(2026, 10, 1, 0, 0), "flat"),              # local midnight of the holiday: 0-2 flat
    (at(2026, 10, 1, 2, 0), "valley"),
    # the day after the holiday is a working day again; Saturday 10-10 is worked (调休)
    (at(2026, 10, 9, 10, 0), "valley"),
    (at(2026, 10, 10, 10, 0), "valley"),
])
def test_period_at(jiangsu: Tariff, calendar: HolidayCalendar, t: float, expected: str) -> None:
    assert period_at(jiangsu, calendar, t, CN) == expected


def test_period_at_uses_the_local_day_not_utc(jiangsu: Tariff, calendar: HolidayCalendar) -> None:
    t = at(2026, 10, 1, 10, 0)  # 02:00 UTC on 2026-10-01
    assert period_at(jiangsu, calendar, t, CN) == "deep_valley"
    assert period_at(jiangsu, calendar, t, 0) == "valley"  # 02:00 of the same day in UTC
    # 00:30 Beijing on 10-01 is still 09-30 in UTC: a working day's 16:00-17:00 (peak)
    t = at(2026, 10, 1, 0, 30)
    assert local_date(t, CN) == date(2026, 10, 1) and local_date(t, 0) == date(2026, 9, 30)
    assert period_at(jiangsu, calendar, t, 0) == "peak"


def test_period_at_refuses_a_bad_offset_or_time(jiangsu: Tariff, calendar: HolidayCalendar) -> None:
    with pytest.raises(ValueError, match="utc_offset_s"):
        period_at(jiangsu, calendar, 0.0, 8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="utc_offset_s"):
        period_at(jiangsu, calendar, 0.0, 86400)
    with pytest.raises(ValueError, match="t: expected unix seconds"):
        period_at(jiangsu, calendar, math.nan, CN)


def test_rest_and_holiday_grids_fall_back() -> None:
    data = minimal()
    data["seasons"][0]["rest_grid"] = ["flat"] * 48
    t = parse_tariff(data)
    winter = t.season_of(1)
    assert winter.grid_for("rest") == ("flat",) * 48
    assert winter.grid_for("holiday") == ("flat",) * 48  # a holiday is a rest day
    assert winter.grid_for("working") == tuple(GRID)
    assert t.season_of(7).grid_for("holiday") == tuple(GRID)


# --- pricing an interval ----------------------------------------------------------------------


def test_an_interval_within_one_slot_is_one_piece(jiangsu: Tariff,
                                                   calendar: HolidayCalendar) -> None:
    start = at(2026, 7, 15, 14, 0)
    (piece,) = price_interval(jiangsu, calendar, start, start + 900, 12.5, CN)
    # critical = base × 2.16 + adder = 0.42 × 2.16 + 0.20 = 0.9072 + 0.20
    assert (piece.period, piece.kwh, piece.price) == ("critical", 12.5, 1.1072)
    assert piece.cost == 12.5 * 1.1072


def test_an_hour_across_two_periods_is_split_by_time(jiangsu: Tariff,
                                                      calendar: HolidayCalendar) -> None:
    start = at(2026, 7, 15, 13, 30)  # 13:30-14:00 flat, 14:00-14:30 critical
    flat, critical = price_interval(jiangsu, calendar, start, start + 3600, 10.0, CN)
    assert (flat.period, flat.kwh, flat.price) == ("flat", 5.0, 0.62)
    assert (critical.period, critical.kwh) == ("critical", 5.0)
    start = at(2026, 7, 15, 13, 45)  # 15 min flat, 30 min critical: 1/3 and 2/3
    flat, critical = price_interval(jiangsu, calendar, start, start + 2700, 9.0, CN)
    assert (flat.kwh, critical.kwh) == (3.0, 6.0)


def test_slots_of_one_period_make_one_piece(jiangsu: Tariff, calendar: HolidayCalendar) -> None:
    start = at(2026, 7, 15, 15, 0)  # 15:00-18:00: six peak slots
    (piece,) = price_interval(jiangsu, calendar, start, start + 3 * 3600, 30.0, CN)
    assert (piece.period, piece.kwh) == ("peak", 30.0)


def test_an_interval_into_a_holiday(jiangsu: Tariff, calendar: HolidayCalendar) -> None:
    start = at(2026, 10, 1, 9, 30)  # 09:30-10:00 flat, 10:00-10:30 deep valley (holiday)
    flat, deep = price_interval(jiangsu, calendar, start, start + 3600, 4.0, CN)
    assert (flat.period, flat.kwh, deep.period, deep.kwh) == ("flat", 2.0, "deep_valley", 2.0)
    assert deep.price == 0.3176  # deep valley = base × 0.28 + adder = 0.42 × 0.28 + 0.20


def test_an_interval_across_local_midnight(jiangsu: Tariff, calendar: HolidayCalendar) -> None:
    start = at(2026, 7, 14, 23, 0)  # 23:00-24:00 flat, 00:00-01:00 valley next day
    flat, valley = price_interval(jiangsu, calendar, start, start + 7200, 2.0, CN)
    assert (flat.period, flat.kwh, valley.period, valley.kwh) == ("flat", 1.0, "valley", 1.0)


@given(start=st.floats(1.7e9, 1.8e9), length=st.floats(1.0, 3 * 86400.0),
       kwh=st.floats(0.0, 1e6) | st.sampled_from([0.1, 0.3, 1 / 3, 2.675, 1e-300, 5e-324]))
def test_the_pieces_add_up_to_the_energy_exactly(start: float, length: float, kwh: float) -> None:
    tariff = parse_tariff(load(TARIFFS / "jiangsu-2025-two-part.toml"))
    cal = parse_calendar(load(CALENDAR))
    pieces = price_interval(tariff, cal, start, start + length, kwh, CN)
    assert sum(p.kwh for p in pieces) == kwh
    assert sum(p.kwh for p in reversed(pieces)) == kwh
    assert len({p.period for p in pieces}) == len(pieces)
    assert all(p.cost == p.kwh * p.price for p in pieces)


def test_price_interval_refuses_bad_input(jiangsu: Tariff, calendar: HolidayCalendar) -> None:
    start = at(2026, 7, 15)
    with pytest.raises(ValueError, match="is not after start"):
        price_interval(jiangsu, calendar, start, start, 1.0, CN)
    with pytest.raises(ValueError, match="expected kwh >= 0"):
        price_interval(jiangsu, calendar, start, start + 900, -1.0, CN)
    with pytest.raises(ValueError, match="expected kwh >= 0"):
        price_interval(jiangsu, calendar, start, start + 900, math.nan, CN)


# --- the tariff book --------------------------------------------------------------------------


def test_the_book_gives_the_tariff_in_force(jiangsu: Tariff) -> None:
    other = parse_tariff(minimal())
    t0, t1 = at(2025, 6, 1), at(2026, 1, 1)
    book = TariffBook(((t0, jiangsu), (t1, other)))
    assert book.tariff_at(t0 - 1) is None
    assert book.tariff_at(t0) is jiangsu
    assert book.tariff_at(t1 - 0.001) is jiangsu
    assert book.tariff_at(t1) is other
    assert book.tariff_at(t1 + 1e9) is other
    assert TariffBook().tariff_at(t0) is None


def test_a_replacement_applies_from_its_time_on(jiangsu: Tariff) -> None:
    other = parse_tariff(minimal())
    third = parse_tariff(minimal() | {"id": "test-3"})
    t0, t1, t2 = at(2025, 6, 1), at(2026, 1, 1), at(2026, 3, 1)
    book = TariffBook(((t0, jiangsu), (t2, third)))
    replaced = book.replaced_from(t1, other)
    # everything from t1 on uses `other`: the later entry (t2) is gone, the earlier one stays
    assert replaced.entries == ((t0, jiangsu), (t1, other))
    assert replaced.tariff_at(t1 - 1) is jiangsu and replaced.tariff_at(t2 + 1) is other
    assert book.entries == ((t0, jiangsu), (t2, third))  # pure: the old book is unchanged
    # a replacement at an entry's own time replaces that entry
    assert book.replaced_from(t0, other).entries == ((t0, other),)
    assert TariffBook().replaced_from(t1, other).entries == ((t1, other),)


def test_the_book_round_trips_and_is_strict(jiangsu: Tariff) -> None:
    book = TariffBook(((at(2025, 6, 1), jiangsu), (at(2026, 1, 1), parse_tariff(minimal()))))
    assert TariffBook.from_dict(json.loads(json.dumps(book.to_dict()))) == book
    with pytest.raises(TariffError, match=r"entries\[1\]\.valid_from: .* is not after"):
        TariffBook(((1.0, jiangsu), (1.0, jiangsu)))
    body = book.to_dict()
    body["entries"][1]["tariff"]["seasons"][0]["grid"].pop()
    with pytest.raises(TariffError, match=re.escape(
            "book.entries[1].tariff.seasons[0].grid: expected 48 periods")):
        TariffBook.from_dict(body)
    with pytest.raises(TariffError, match=re.escape("book.entries[0].valid_from: expected unix")):
        TariffBook.from_dict({"entries": [{"valid_from": "2026-01-01", "tariff": {}}]})
    with pytest.raises(TariffError, match=re.escape("book: unknown key(s) tariffs")):
        TariffBook.from_dict({"tariffs": []})


def test_periods_are_named_as_the_notices_name_them() -> None:
    assert PERIODS == ("critical", "peak", "flat", "valley", "deep_valley")
    assert DAY_TYPES == ("working", "rest", "holiday")
