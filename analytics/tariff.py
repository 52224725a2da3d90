"""Time-of-use tariffs (分时电价) as dated data: parse, validate, look up, price an interval.

A tariff is never code. It is a TOML file (``config/tariffs/*.toml``, parsed by the caller with
:mod:`tomllib`) or the same dict as the body of a signed ``tariff`` command; :func:`parse_tariff`
turns it into a frozen :class:`Tariff` and refuses anything it does not understand with a
:class:`TariffError` naming the key and what was expected. ``parse_tariff(t.to_dict()) == t``.
The format, every key, is in ``docs/tariffs.md``.

The model:

- a half-hour **period grid** (48 slots, 00:00-00:30 is slot 0) of period names
  (:data:`PERIODS`) per **season** (a set of months; the seasons cover 1-12 exactly once) and
  **day type** (:data:`DAY_TYPES`): ``grid`` is the working-day grid, ``rest_grid`` (weekends
  and holidays, default ``grid``) and ``holiday_grid`` (statutory holidays, default the rest
  grid) override it;
- **energy prices** per period, 元/kWh: either stated (``prices``), or computed from the notice's
  ratios: ``price = base × ratio + adder`` (``base``: the price the ratios multiply, e.g. the
  month's purchase price; ``adder``: the parts that do not float, e.g. transmission and
  government funds), rounded to ``decimals`` places when given;
- a **demand price** per kW of the month's maximum demand (元/kW·month, two-part tariffs);
- **fixed charges** per month and per day.

Time is an input: unix seconds and the site's ``utc_offset_s`` (28800 for China). Which day is
a holiday comes from a :class:`HolidayCalendar` (``config/ledger_data/holidays-cn.toml``).
Which tariff is in force when comes from a :class:`TariffBook`; :func:`period_at` and
:func:`price_interval` price with the tariff they are given and do not look at its
``effective_from``/``effective_to`` (the book decides).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from lmt.control.jsonstate import Json

__all__ = [
    "DAY_TYPES",
    "PERIODS",
    "SLOTS",
    "SLOT_S",
    "Energy",
    "FixedCharges",
    "Holiday",
    "HolidayCalendar",
    "PeriodValues",
    "Piece",
    "Season",
    "Tariff",
    "TariffBook",
    "TariffError",
    "day_type",
    "local_date",
    "parse_calendar",
    "parse_tariff",
    "period_at",
    "price_interval",
    "price_of",
    "round_half_up",
]

PERIODS = ("critical", "peak", "flat", "valley", "deep_valley")  # 尖峰, 高峰, 平, 低谷, 深谷
DAY_TYPES = ("working", "rest", "holiday")
SLOTS = 48  # half-hour slots in a day
SLOT_S = 1800
DAY_S = 86400
MAX_UTC_OFFSET_S = 18 * 3600
STRUCTURES = ("single-part", "two-part")  # 单一制, 两部制
CURRENCIES = ("CNY",)
_EPOCH = date(1970, 1, 1)
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TariffError(ValueError):
    """A tariff, calendar or tariff book that cannot be used; the message names the key."""


# --------------------------------------------------------------------------------------------
# Strict readers: every error names the key and what was expected


def _fail(where: str, what: str) -> TariffError:
    return TariffError(f"{where}: {what}")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a table, got {value!r}")
    return value


def _check_keys(data: Mapping[str, Any], where: str, required: Iterable[str],
                optional: Iterable[str] = ()) -> None:
    required, optional = tuple(required), tuple(optional)
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if unknown:
        allowed = ", ".join((*required, *optional))
        raise _fail(where, f"unknown key(s) {', '.join(unknown)} (expected: {allowed})")
    missing = [k for k in required if k not in data]
    if missing:
        raise _fail(f"{where}.{missing[0]}", "missing")


def _text(value: Any, where: str, example: str = "") -> str:
    if not isinstance(value, str) or not value.strip():
        hint = f" (e.g. {example})" if example else ""
        raise _fail(where, f"expected a non-empty string{hint}, got {value!r}")
    return value


def _ident(value: Any, where: str) -> str:
    text = _text(value, where)
    if not _ID.fullmatch(text):
        raise _fail(where, f"expected an id of letters, digits, '.', '_' and '-', got {value!r}")
    return text


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"expected a number, got {value!r}")
    if value < minimum:
        raise _fail(where, f"expected a number >= {minimum:g}, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise _fail(where, f"expected an integer {lo}..{hi}, got {value!r}")
    return value


def _date(value: Any, where: str) -> date:
    """A TOML date (tomllib gives a ``date``) or an ISO string (the JSON form)."""
    if type(value) is date:  # a date, not a datetime
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise _fail(where, f"expected a date YYYY-MM-DD, got {value!r}")


def _list(value: Any, where: str) -> Sequence[Any]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _fail(where, f"expected a list, got {value!r}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


def _offset(utc_offset_s: Any) -> int:
    if isinstance(utc_offset_s, bool) or not isinstance(utc_offset_s, int) \
            or abs(utc_offset_s) > MAX_UTC_OFFSET_S:
        raise ValueError(f"utc_offset_s: expected whole seconds within ±{MAX_UTC_OFFSET_S}, "
                         f"got {utc_offset_s!r}")
    return utc_offset_s


def _time(t: Any, where: str) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError(f"{where}: expected unix seconds, got {t!r}")
    return float(t)


def round_half_up(value: float, decimals: int) -> float:
    """``value`` rounded half away from zero to ``decimals`` places, on its shortest decimal
    form (``round_half_up(0.125, 2) == 0.13``; the builtin ``round`` gives 0.12)."""
    quantum = Decimal(1).scaleb(-decimals)
    return float(Decimal(repr(value)).quantize(quantum, rounding=ROUND_HALF_UP))


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class PeriodValues:
    """One number per period (a ratio or a price); None = not stated."""

    critical: float | None = None
    peak: float | None = None
    flat: float | None = None
    valley: float | None = None
    deep_valley: float | None = None

    def get(self, period: str) -> float | None:
        if period not in PERIODS:
            raise TariffError(f"unknown period {period!r} (expected one of {', '.join(PERIODS)})")
        value: float | None = getattr(self, period)
        return value

    def to_dict(self) -> dict[str, float]:
        return {p: v for p in PERIODS if (v := getattr(self, p)) is not None}


@dataclass(frozen=True)
class Energy:
    """Energy prices, 元/kWh. Either ``prices`` (stated per period) or ``base`` × ``ratios`` +
    ``adder``, computed in decimal on the figures as written and rounded half up to
    ``decimals`` places when given (Guangdong's notice: to 0.01 分/kWh, ``decimals = 4``)."""

    prices: PeriodValues | None = None
    base: float | None = None
    ratios: PeriodValues | None = None
    adder: float = 0.0
    decimals: int | None = None

    def price(self, period: str) -> float | None:
        if self.prices is not None:
            return self.prices.get(period)
        assert self.ratios is not None and self.base is not None
        ratio = self.ratios.get(period)
        if ratio is None:
            return None
        # in decimal, on the figures as written (0.6725 × 1.7 is 1.14325, not 1.1432499...)
        value = Decimal(repr(self.base)) * Decimal(repr(ratio)) + Decimal(repr(self.adder))
        if self.decimals is not None:
            value = value.quantize(Decimal(1).scaleb(-self.decimals), rounding=ROUND_HALF_UP)
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        if self.prices is not None:
            return {"prices": self.prices.to_dict()}
        assert self.ratios is not None
        out: dict[str, Any] = {"base": self.base, "adder": self.adder,
                               "ratios": self.ratios.to_dict()}
        if self.decimals is not None:
            out["decimals"] = self.decimals
        return out


@dataclass(frozen=True)
class FixedCharges:
    """元 per billing month and 元 per day, whatever the consumption."""

    per_month: float = 0.0
    per_day: float = 0.0


@dataclass(frozen=True)
class Season:
    """The months a set of grids applies to. ``grid``: working days; ``rest_grid``: weekends
    (and holidays, unless ``holiday_grid``); None = the grid before it."""

    name: str
    months: tuple[int, ...]
    grid: tuple[str, ...]
    rest_grid: tuple[str, ...] | None = None
    holiday_grid: tuple[str, ...] | None = None

    def grid_for(self, day_type: str) -> tuple[str, ...]:
        if day_type == "working":
            return self.grid
        if day_type == "rest":
            return self.rest_grid or self.grid
        if day_type == "holiday":
            return self.holiday_grid or self.rest_grid or self.grid
        raise TariffError(f"unknown day type {day_type!r} (expected one of {', '.join(DAY_TYPES)})")


@dataclass(frozen=True)
class Tariff:
    """One customer class's time-of-use tariff, as its notice states it. Build it with
    :func:`parse_tariff`; ``to_dict`` gives the same dict back (JSON types only)."""

    id: str
    name: str
    province: str
    notice: str
    source: str
    currency: str
    effective_from: date
    effective_to: date | None
    customer_class: str
    structure: str
    seasons: tuple[Season, ...]
    energy: Energy
    demand_price: float | None = None
    fixed: FixedCharges = FixedCharges()
    verify: tuple[str, ...] = ()
    notes: str = ""
    _by_month: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_month = [0] * 13
        for i, season in enumerate(self.seasons):
            for m in season.months:
                by_month[m] = i
        object.__setattr__(self, "_by_month", tuple(by_month))

    def season_of(self, month: int) -> Season:
        return self.seasons[self._by_month[month]]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "name": self.name, "province": self.province, "notice": self.notice,
            "source": self.source, "currency": self.currency,
            "effective_from": self.effective_from.isoformat(),
        }
        if self.effective_to is not None:
            out["effective_to"] = self.effective_to.isoformat()
        out |= {"customer_class": self.customer_class, "structure": self.structure}
        if self.verify:
            out["verify"] = list(self.verify)
        if self.notes:
            out["notes"] = self.notes
        out["energy"] = self.energy.to_dict()
        if self.demand_price is not None:
            out["demand"] = {"price": self.demand_price}
        out["fixed"] = {"per_month": self.fixed.per_month, "per_day": self.fixed.per_day}
        seasons = []
        for s in self.seasons:
            d: dict[str, Any] = {"name": s.name, "months": list(s.months), "grid": list(s.grid)}
            if s.rest_grid is not None:
                d["rest_grid"] = list(s.rest_grid)
            if s.holiday_grid is not None:
                d["holiday_grid"] = list(s.holiday_grid)
            seasons.append(d)
        out["seasons"] = seasons
        return out


# --------------------------------------------------------------------------------------------
# Parsing a tariff

_TARIFF_REQUIRED = ("id", "name", "province", "notice", "source", "currency", "effective_from",
                    "customer_class", "structure", "energy", "seasons")
_TARIFF_OPTIONAL = ("effective_to", "demand", "fixed", "verify", "notes")


def _grid(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    if len(items) != SLOTS:
        raise _fail(where, f"expected {SLOTS} periods (one per half hour from 00:00), "
                           f"got {len(items)}")
    for i, p in enumerate(items):
        if p not in PERIODS:
            raise _fail(f"{where}[{i}]", f"unknown period {p!r} "
                                         f"(expected one of {', '.join(PERIODS)})")
    return tuple(items)


def _season(value: Any, where: str) -> Season:
    data = _table(value, where)
    _check_keys(data, where, ("name", "months", "grid"), ("rest_grid", "holiday_grid"))
    months = tuple(_integer(m, f"{where}.months[{i}]", 1, 12)
                   for i, m in enumerate(_list(data["months"], f"{where}.months")))
    if not months:
        raise _fail(f"{where}.months", "expected at least one month 1..12")
    for i, m in enumerate(months):
        if m in months[:i]:
            raise _fail(f"{where}.months[{i}]", f"month {m} is listed twice")
    grids = {k: _grid(data[k], f"{where}.{k}") if k in data else None
             for k in ("rest_grid", "holiday_grid")}
    return Season(_text(data["name"], f"{where}.name"), months,
                  _grid(data["grid"], f"{where}.grid"), grids["rest_grid"],
                  grids["holiday_grid"])


def _seasons(value: Any, where: str) -> tuple[Season, ...]:
    items = _list(value, where)
    if not items:
        raise _fail(where, "expected at least one season")
    seasons = tuple(_season(s, f"{where}[{i}]") for i, s in enumerate(items))
    owner: dict[int, int] = {}
    for i, s in enumerate(seasons):
        for j, m in enumerate(s.months):
            if m in owner:
                raise _fail(f"{where}[{i}].months[{j}]",
                            f"month {m} is also in seasons[{owner[m]}] (seasons overlap)")
            owner[m] = i
    missing = [m for m in range(1, 13) if m not in owner]
    if missing:
        raise _fail(where, f"month(s) {', '.join(map(str, missing))} in no season "
                           "(the seasons must cover months 1-12 exactly once)")
    return seasons


def _period_values(value: Any, where: str) -> PeriodValues:
    data = _table(value, where)
    _check_keys(data, where, (), PERIODS)
    if not data:
        raise _fail(where, f"expected at least one of {', '.join(PERIODS)}")
    return PeriodValues(**{p: _number(v, f"{where}.{p}") for p, v in data.items()})


def _energy(value: Any, where: str) -> Energy:
    data = _table(value, where)
    if ("prices" in data) == ("ratios" in data):
        raise _fail(where, "expected exactly one of 'prices' (元/kWh per period) or "
                           "'ratios' (with 'base', optional 'adder' and 'decimals')")
    if "prices" in data:
        _check_keys(data, where, ("prices",))
        return Energy(prices=_period_values(data["prices"], f"{where}.prices"))
    _check_keys(data, where, ("base", "ratios"), ("adder", "decimals"))
    decimals = data.get("decimals")
    return Energy(base=_number(data["base"], f"{where}.base"),
                  ratios=_period_values(data["ratios"], f"{where}.ratios"),
                  adder=_number(data.get("adder", 0.0), f"{where}.adder"),
                  decimals=None if decimals is None else _integer(decimals, f"{where}.decimals",
                                                                  0, 8))


def parse_tariff(data: Mapping[str, Any], where: str = "tariff") -> Tariff:
    """A :class:`Tariff` from its TOML (or JSON) dict; :class:`TariffError` names the first
    key that is wrong and what was expected."""
    data = _table(data, where)
    _check_keys(data, where, _TARIFF_REQUIRED, _TARIFF_OPTIONAL)
    currency = data["currency"]
    if currency not in CURRENCIES:
        raise _fail(f"{where}.currency", f"expected one of {', '.join(CURRENCIES)}, "
                                         f"got {currency!r}")
    structure = data["structure"]
    if structure not in STRUCTURES:
        raise _fail(f"{where}.structure", f"expected one of {', '.join(STRUCTURES)}, "
                                          f"got {structure!r}")
    effective_from = _date(data["effective_from"], f"{where}.effective_from")
    effective_to = None
    if "effective_to" in data:
        effective_to = _date(data["effective_to"], f"{where}.effective_to")
        if effective_to < effective_from:
            raise _fail(f"{where}.effective_to", f"{effective_to} is before effective_from "
                                                 f"{effective_from}")
    demand_price = None
    if "demand" in data:
        demand = _table(data["demand"], f"{where}.demand")
        _check_keys(demand, f"{where}.demand", ("price",))
        demand_price = _number(demand["price"], f"{where}.demand.price")
        if structure == "single-part":
            raise _fail(f"{where}.demand", "a single-part tariff has no demand charge "
                                           "(structure = \"two-part\"?)")
    fixed = FixedCharges()
    if "fixed" in data:
        f = _table(data["fixed"], f"{where}.fixed")
        _check_keys(f, f"{where}.fixed", (), ("per_month", "per_day"))
        fixed = FixedCharges(_number(f.get("per_month", 0.0), f"{where}.fixed.per_month"),
                             _number(f.get("per_day", 0.0), f"{where}.fixed.per_day"))
    seasons = _seasons(data["seasons"], f"{where}.seasons")
    energy = _energy(data["energy"], f"{where}.energy")
    stated = "prices" if energy.prices is not None else "ratios"
    for i, s in enumerate(seasons):
        for key in ("grid", "rest_grid", "holiday_grid"):
            grid: tuple[str, ...] | None = getattr(s, key)
            for j, p in enumerate(grid or ()):
                if energy.price(p) is None:
                    raise _fail(f"{where}.energy.{stated}",
                                f"no {stated[:-1]} for period {p!r}, used by "
                                f"seasons[{i}].{key}[{j}]")
    notes = data.get("notes", "")
    if not isinstance(notes, str):
        raise _fail(f"{where}.notes", f"expected a string, got {notes!r}")
    return Tariff(
        id=_ident(data["id"], f"{where}.id"),
        name=_text(data["name"], f"{where}.name"),
        province=_text(data["province"], f"{where}.province"),
        notice=_text(data["notice"], f"{where}.notice", "苏发改价格发〔2025〕426号"),
        source=_text(data["source"], f"{where}.source", "the notice's URL"),
        currency=currency,
        effective_from=effective_from,
        effective_to=effective_to,
        customer_class=_text(data["customer_class"], f"{where}.customer_class",
                             "two-part industrial, 1-10 kV"),
        structure=structure,
        seasons=seasons,
        energy=energy,
        demand_price=demand_price,
        fixed=fixed,
        verify=_strings(data.get("verify", ()), f"{where}.verify"),
        notes=notes,
    )


def price_of(tariff: Tariff, period: str) -> float:
    """The energy price of ``period`` in ``tariff``, 元/kWh."""
    price = tariff.energy.price(period)
    if price is None:
        raise TariffError(f"tariff {tariff.id}: no price for period {period!r}")
    return price


# --------------------------------------------------------------------------------------------
# The holiday calendar


@dataclass(frozen=True)
class Holiday:
    """One holiday of a notice: the days off ``first``..``last`` (inclusive) and the weekend
    days worked for it (调休上班)."""

    name: str
    first: date
    last: date
    workdays: tuple[date, ...] = ()


@dataclass(frozen=True)
class HolidayCalendar:
    """Statutory holidays and adjusted working days for ``years``. Outside ``years`` a day is
    what its weekday says (Monday-Friday working, Saturday-Sunday rest): check
    :meth:`covers` before trusting a holiday-dependent price there."""

    name: str
    source: str
    notices: tuple[str, ...]
    years: tuple[int, ...]
    holidays: tuple[Holiday, ...]
    _off: frozenset[date] = field(default=frozenset(), init=False, repr=False, compare=False)
    _worked: frozenset[date] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        off = {h.first + timedelta(days=i) for h in self.holidays
               for i in range((h.last - h.first).days + 1)}
        object.__setattr__(self, "_off", frozenset(off))
        object.__setattr__(self, "_worked", frozenset(d for h in self.holidays for d in h.workdays))

    def covers(self, day: date) -> bool:
        return day.year in self.years

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "notices": list(self.notices),
                "years": list(self.years),
                "holidays": [{"name": h.name, "first": h.first.isoformat(),
                              "last": h.last.isoformat(),
                              "workdays": [d.isoformat() for d in h.workdays]}
                             for h in self.holidays]}


def parse_calendar(data: Mapping[str, Any], where: str = "calendar") -> HolidayCalendar:
    """A :class:`HolidayCalendar` from its TOML (or JSON) dict; strict like
    :func:`parse_tariff`."""
    data = _table(data, where)
    _check_keys(data, where, ("name", "source", "notices", "years", "holidays"))
    years = tuple(_integer(y, f"{where}.years[{i}]", 1900, 2999)
                  for i, y in enumerate(_list(data["years"], f"{where}.years")))
    if not years or len(set(years)) != len(years):
        raise _fail(f"{where}.years", f"expected distinct years, got {list(years)!r}")
    holidays: list[Holiday] = []
    taken: dict[date, str] = {}
    worked: dict[date, str] = {}
    for i, raw in enumerate(_list(data["holidays"], f"{where}.holidays")):
        at = f"{where}.holidays[{i}]"
        h = _table(raw, at)
        _check_keys(h, at, ("name", "first", "last"), ("workdays",))
        name = _text(h["name"], f"{at}.name")
        first, last = _date(h["first"], f"{at}.first"), _date(h["last"], f"{at}.last")
        if last < first:
            raise _fail(f"{at}.last", f"{last} is before first {first}")
        days = [first + timedelta(days=k) for k in range((last - first).days + 1)]
        for d in days:
            if d.year not in years:
                raise _fail(at, f"{d} is outside the calendar's years {list(years)}")
            if d in taken:
                raise _fail(at, f"{d} is already a day of {taken[d]}")
            taken[d] = name
        workdays = []
        for k, raw_day in enumerate(_list(h.get("workdays", ()), f"{at}.workdays")):
            d = _date(raw_day, f"{at}.workdays[{k}]")
            if d.weekday() < 5:
                raise _fail(f"{at}.workdays[{k}]", f"{d} is a {d.strftime('%A')}: an adjusted "
                                                   "working day (调休) is a Saturday or Sunday")
            if d in worked:
                raise _fail(f"{at}.workdays[{k}]", f"{d} is already a workday of {worked[d]}")
            worked[d] = name
            workdays.append(d)
        holidays.append(Holiday(name, first, last, tuple(workdays)))
    for d, name in worked.items():
        if d in taken:
            raise _fail(f"{where}.holidays", f"{d} is both a workday of {name} and a day off "
                                             f"of {taken[d]}")
    return HolidayCalendar(
        name=_text(data["name"], f"{where}.name"),
        source=_text(data["source"], f"{where}.source"),
        notices=_strings(data["notices"], f"{where}.notices"),
        years=years, holidays=tuple(holidays))


def day_type(calendar: HolidayCalendar, day: date) -> str:
    """"holiday" (a statutory day off) > "working" (an adjusted working day, 调休) > the
    weekday: Monday-Friday "working", Saturday-Sunday "rest"."""
    if day in calendar._off:
        return "holiday"
    if day in calendar._worked or day.weekday() < 5:
        return "working"
    return "rest"


# --------------------------------------------------------------------------------------------
# Looking up and pricing


def local_date(t: float, utc_offset_s: int) -> date:
    """The local calendar date of unix time ``t``."""
    return _EPOCH + timedelta(days=math.floor((_time(t, "t") + _offset(utc_offset_s)) / DAY_S))


def _slot(t: float, utc_offset_s: int) -> tuple[date, int]:
    local = t + utc_offset_s
    days = math.floor(local / DAY_S)
    slot = min(int((local - days * DAY_S) // SLOT_S), SLOTS - 1)
    return _EPOCH + timedelta(days=days), slot


def period_at(tariff: Tariff, calendar: HolidayCalendar, t: float, utc_offset_s: int) -> str:
    """The period of the half-hour slot containing ``t`` in local time (a slot includes its
    start and excludes its end: 14:00:00 is in 14:00-14:30)."""
    day, slot = _slot(_time(t, "t"), _offset(utc_offset_s))
    return tariff.season_of(day.month).grid_for(day_type(calendar, day))[slot]


@dataclass(frozen=True)
class Piece(Json):
    """The part of an interval's energy in one period: ``kwh`` at ``price`` (元/kWh) costs
    ``cost`` (元, unrounded)."""

    period: str
    kwh: float
    price: float
    cost: float

    def __post_init__(self) -> None:
        if self.period not in PERIODS:
            raise ValueError(f"Piece.period: unknown period {self.period!r}")
        for name in ("kwh", "price", "cost"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Piece.{name}: expected a finite number >= 0, got {value!r}")


def _split(total: float, weights: Sequence[float]) -> list[float]:
    """``total`` shared in proportion to ``weights``, so that the shares add up to ``total``
    exactly, in any order: each share is an integer multiple of ``total``'s last bit (largest
    remainder), so no sum of them rounds."""
    if total == 0.0:
        return [0.0] * len(weights)
    quantum = max(math.frexp(total)[1] - 53, -1074)  # the last bit (subnormals: the least)
    units = int(math.ldexp(total, -quantum))  # total == units * 2**quantum, exactly
    fractions = [Fraction(w) for w in weights]
    whole = sum(fractions, Fraction(0))
    exact = [units * f / whole for f in fractions]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[:units - sum(shares)]:
        shares[i] += 1
    return [math.ldexp(s, quantum) for s in shares]


def price_interval(tariff: Tariff, calendar: HolidayCalendar, start: float, end: float,
                   kwh: float, utc_offset_s: int) -> tuple[Piece, ...]:
    """The pieces of ``kwh`` consumed over ``[start, end)``: one per period the interval
    touches, in the order first touched. The energy is shared by time: an interval within one
    half-hour slot (or several slots of one period) is one piece; a 60-minute interval over a
    flat and a peak slot is two pieces of half the energy each. The pieces' energy adds up to
    ``kwh`` exactly; ``cost = kwh × price``, unrounded."""
    start, end = _time(start, "start"), _time(end, "end")
    off = _offset(utc_offset_s)
    if end <= start:
        raise ValueError(f"price_interval: end {end!r} is not after start {start!r}")
    if isinstance(kwh, bool) or not isinstance(kwh, int | float) or not math.isfinite(kwh) \
            or kwh < 0:
        raise ValueError(f"price_interval: expected kwh >= 0, got {kwh!r}")
    seconds: dict[str, float] = {}
    t = start
    while t < end:
        boundary = (math.floor((t + off) / SLOT_S) + 1) * SLOT_S - off
        if boundary <= t:  # float rounding at a slot boundary
            boundary += SLOT_S
        upto = min(end, boundary)
        period = period_at(tariff, calendar, t, off)
        seconds[period] = seconds.get(period, 0.0) + (upto - t)
        t = upto
    periods = list(seconds)
    shares = _split(float(kwh), [seconds[p] for p in periods])
    return tuple(Piece(p, e, price_of(tariff, p), e * price_of(tariff, p))
                 for p, e in zip(periods, shares, strict=True))


# --------------------------------------------------------------------------------------------
# Which tariff when


@dataclass(frozen=True)
class TariffBook:
    """The tariffs in force, each from its ``valid_from`` (unix s) to the next one's."""

    entries: tuple[tuple[float, Tariff], ...] = ()

    def __post_init__(self) -> None:
        for i, (t, tariff) in enumerate(self.entries):
            _time(t, f"TariffBook.entries[{i}].valid_from")
            if not isinstance(tariff, Tariff):
                raise TariffError(f"TariffBook.entries[{i}]: expected a Tariff, got {tariff!r}")
            if i and t <= self.entries[i - 1][0]:
                raise TariffError(f"TariffBook.entries[{i}].valid_from: {t!r} is not after "
                                  f"the previous entry's {self.entries[i - 1][0]!r}")

    def tariff_at(self, t: float) -> Tariff | None:
        """The tariff in force at ``t``; None before the first entry."""
        i = bisect.bisect_right([e[0] for e in self.entries], _time(t, "t"))
        return self.entries[i - 1][1] if i else None

    def replaced_from(self, t: float, tariff: Tariff) -> TariffBook:
        """A new book in which ``tariff`` applies from ``t`` on: entries from ``t`` on are
        dropped, the ones before are kept (a signed ``tariff`` command)."""
        t = _time(t, "t")
        return TariffBook((*(e for e in self.entries if e[0] < t), (t, tariff)))

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [{"valid_from": t, "tariff": tariff.to_dict()}
                            for t, tariff in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TariffBook:
        data = _table(data, "book")
        _check_keys(data, "book", ("entries",))
        entries = []
        for i, raw in enumerate(_list(data["entries"], "book.entries")):
            at = f"book.entries[{i}]"
            e = _table(raw, at)
            _check_keys(e, at, ("valid_from", "tariff"))
            t = e["valid_from"]
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
                raise _fail(f"{at}.valid_from", f"expected unix seconds, got {t!r}")
            entries.append((float(t), parse_tariff(e["tariff"], f"{at}.tariff")))
        return cls(tuple(entries))
