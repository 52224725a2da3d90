"""Bills per local day and per local month, from priced intervals. Pure: time is an input.

The agent prices each interval as it closes (:func:`price_line`: the tariff in force at the
interval's start, from the :class:`~lmt.analytics.tariff.TariffBook`) and folds it into a
:class:`BillState` for the day and one for the month (``state = state.add(line)``, persisted
as JSON between intervals); ``state.bill(tariff, max_demand_kw, max_demand_t)`` is the bill so
far at any time. :func:`bill_of` does the same for a finished sequence of lines.

What a bill charges:

- **energy**: the sum of the pieces' costs (each ``kwh × price``) per period;
- **demand** (two-part tariffs): month bill ``demand price × the month's maximum demand``; day
  bill the day's share of that at the month-to-date maximum: ``demand price × month-to-date
  maximum demand / days in the month``. The maximum demand (kW, and when) is the caller's:
  the meter's register or the interval ledger's, for the month so far;
- **fixed**: month bill ``per_month + per_day × days in the month``; day bill
  ``per_month / days in the month + per_day``. A month bill carries the whole month's fixed
  and demand charges however much of the month is in it (``complete`` says).

Money is summed unrounded (floats, 元) in the state and rounded half up to 0.01 元 only when a
:class:`Bill` is made: each figure on its own, ``total`` from the unrounded parts, so the
rounded parts can differ from the total by a cent. kWh and kgCO2 are rounded to 0.001.
Export energy and its kgCO2 are reported beside, never netted against the import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta

from lmt.analytics.tariff import (
    DAY_S,
    PERIODS,
    HolidayCalendar,
    Piece,
    Tariff,
    local_date,
    price_interval,
    round_half_up,
)
from lmt.control.jsonstate import Json

__all__ = ["KINDS", "Bill", "BillLine", "BillState", "bill_of", "days_in_month",
           "period_bounds", "period_label", "price_line"]

KINDS = ("day", "month")
_EPOCH = date(1970, 1, 1)
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")
_KWH_TOLERANCE = 1e-9


def _finite(where: str, value: float, minimum: float | None = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: expected a number >= {minimum:g}, got {value!r}")


def _money(value: float) -> float:
    return round_half_up(value, 2)


def _kwh(value: float) -> float:
    return round_half_up(value, 3)


def _zeros() -> dict[str, float]:
    return dict.fromkeys(PERIODS, 0.0)


def days_in_month(year: int, month: int) -> int:
    following = date(year + month // 12, month % 12 + 1, 1)
    return (following - date(year, month, 1)).days


def _first_days(kind: str, period: str) -> tuple[date, date]:
    """The first local day of the period and the first day after it."""
    if kind == "day":
        if not _DAY.fullmatch(period):
            raise ValueError(f"day bill: expected a local date YYYY-MM-DD, got {period!r}")
        day = date.fromisoformat(period)
        return day, day + timedelta(days=1)
    if kind == "month":
        m = _MONTH.fullmatch(period)
        if not m or not 1 <= int(m.group(2)) <= 12:
            raise ValueError(f"month bill: expected a month YYYY-MM, got {period!r}")
        year, month = int(m.group(1)), int(m.group(2))
        return date(year, month, 1), date(year + month // 12, month % 12 + 1, 1)
    raise ValueError(f"bill kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def period_bounds(kind: str, period: str, utc_offset_s: int) -> tuple[float, float]:
    """``[start, end)`` in unix seconds of local day ``"2026-07-15"`` or month ``"2026-07"``."""
    first, after = _first_days(kind, period)
    return (float((first - _EPOCH).days * DAY_S - utc_offset_s),
            float((after - _EPOCH).days * DAY_S - utc_offset_s))


def period_label(kind: str, t: float, utc_offset_s: int) -> str:
    """The local day (``"2026-07-15"``) or month (``"2026-07"``) containing ``t``."""
    day = local_date(t, utc_offset_s)
    if kind == "day":
        return day.isoformat()
    if kind == "month":
        return day.isoformat()[:7]
    raise ValueError(f"bill kind: expected one of {', '.join(KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class BillLine(Json):
    """One closed interval ``[start, end)`` (unix s): its import energy priced in ``pieces``
    (their kWh add up to ``import_kwh``), its export energy (not priced here), the kgCO2 of
    each, and the id of the tariff that priced it."""

    start: float
    end: float
    import_kwh: float
    export_kwh: float
    pieces: tuple[Piece, ...]
    kgco2: float = 0.0
    export_kgco2: float = 0.0
    tariff_id: str = ""

    def __post_init__(self) -> None:
        _finite("BillLine.start", self.start, None)
        _finite("BillLine.end", self.end, None)
        if self.end <= self.start:
            raise ValueError(f"BillLine: end {self.end!r} is not after start {self.start!r}")
        for name in ("import_kwh", "export_kwh", "kgco2", "export_kgco2"):
            _finite(f"BillLine.{name}", getattr(self, name))
        priced = math.fsum(p.kwh for p in self.pieces)
        if not math.isclose(priced, self.import_kwh, rel_tol=_KWH_TOLERANCE,
                            abs_tol=_KWH_TOLERANCE):
            raise ValueError(f"BillLine.pieces: {priced!r} kWh priced, but import_kwh is "
                             f"{self.import_kwh!r}")


def price_line(tariff: Tariff, calendar: HolidayCalendar, start: float, end: float,
               import_kwh: float, utc_offset_s: int, *, export_kwh: float = 0.0,
               kgco2: float = 0.0, export_kgco2: float = 0.0) -> BillLine:
    """A :class:`BillLine` for ``[start, end)``, its import priced by ``tariff``
    (:func:`~lmt.analytics.tariff.price_interval`)."""
    pieces = price_interval(tariff, calendar, start, end, import_kwh, utc_offset_s)
    return BillLine(float(start), float(end), float(import_kwh), float(export_kwh), pieces,
                    float(kgco2), float(export_kgco2), tariff.id)


@dataclass(frozen=True)
class Bill(Json):
    """A day's or a month's bill (money in ``currency``, rounded to 0.01; kWh and kgCO2 to
    0.001). ``period_kwh``/``period_cost``: per period, all five always present;
    ``energy_cost``: their unrounded sum, rounded. ``demand_charge``, ``fixed_charges``: see the
    module docstring (a day bill's are its share of the month's). ``complete``: every second of
    the day or month is in an interval; ``intervals``: how many. ``priced_by``: the tariffs
    that priced the energy; ``tariff_id``: the one whose demand and fixed charges apply."""

    kind: str
    period: str
    start: float
    end: float
    tariff_id: str
    currency: str
    period_kwh: dict[str, float]
    period_cost: dict[str, float]
    energy_kwh: float
    energy_cost: float
    max_demand_kw: float | None
    max_demand_t: float | None
    demand_price: float | None
    days_in_month: int
    demand_charge: float
    fixed_charges: float
    total: float
    kgco2: float
    export_kwh: float
    export_kgco2: float
    intervals: int
    complete: bool
    priced_by: tuple[str, ...]


@dataclass(frozen=True)
class BillState(Json):
    """A day's or a month's bill so far: unrounded sums of the lines added. Start one with
    :meth:`new` or :meth:`containing`; ``add`` takes lines in time order, each inside the
    period and starting at or after the previous one's end (gaps allowed: the bill is then
    incomplete; an overlap would count energy twice and is refused)."""

    kind: str
    period: str
    utc_offset_s: int
    intervals: int = 0
    covered_s: float = 0.0
    last_end: float | None = None
    import_kwh: float = 0.0
    export_kwh: float = 0.0
    kgco2: float = 0.0
    export_kgco2: float = 0.0
    period_kwh: dict[str, float] = field(default_factory=_zeros)
    period_cost: dict[str, float] = field(default_factory=_zeros)
    priced_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.utc_offset_s, bool) or not isinstance(self.utc_offset_s, int):
            raise ValueError(f"BillState.utc_offset_s: expected an integer, "
                             f"got {self.utc_offset_s!r}")
        _first_days(self.kind, self.period)
        if self.intervals < 0:
            raise ValueError(f"BillState.intervals: expected >= 0, got {self.intervals!r}")
        for name in ("covered_s", "import_kwh", "export_kwh", "kgco2", "export_kgco2"):
            _finite(f"BillState.{name}", getattr(self, name))
        for name in ("period_kwh", "period_cost"):
            values = getattr(self, name)
            if set(values) != set(PERIODS):
                raise ValueError(f"BillState.{name}: expected the periods "
                                 f"{', '.join(PERIODS)}, got {', '.join(map(str, values))}")
            for p, v in values.items():
                _finite(f"BillState.{name}.{p}", v)

    @classmethod
    def new(cls, kind: str, period: str, utc_offset_s: int) -> BillState:
        """An empty bill for local day ``"2026-07-15"`` (``kind="day"``) or month
        ``"2026-07"`` (``kind="month"``)."""
        return cls(kind, period, utc_offset_s)

    @classmethod
    def containing(cls, kind: str, t: float, utc_offset_s: int) -> BillState:
        """An empty bill for the local day or month containing ``t``."""
        return cls(kind, period_label(kind, t, utc_offset_s), utc_offset_s)

    @property
    def bounds(self) -> tuple[float, float]:
        return period_bounds(self.kind, self.period, self.utc_offset_s)

    @property
    def complete(self) -> bool:
        start, end = self.bounds
        return abs(self.covered_s - (end - start)) <= 1e-6

    def add(self, line: BillLine) -> BillState:
        start, end = self.bounds
        if line.start < start or line.end > end:
            raise ValueError(f"BillLine [{line.start!r}, {line.end!r}) is not inside "
                             f"{self.kind} {self.period} [{start!r}, {end!r})")
        if self.last_end is not None and line.start < self.last_end:
            raise ValueError(f"BillLine [{line.start!r}, {line.end!r}) starts before the end "
                             f"of the last line added ({self.last_end!r}): lines go in time "
                             "order, without overlap")
        kwh, cost = dict(self.period_kwh), dict(self.period_cost)
        for piece in line.pieces:
            kwh[piece.period] += piece.kwh
            cost[piece.period] += piece.cost
        priced_by = self.priced_by
        if line.tariff_id and line.tariff_id not in priced_by:
            priced_by = (*priced_by, line.tariff_id)
        return replace(
            self, intervals=self.intervals + 1,
            covered_s=self.covered_s + (line.end - line.start), last_end=line.end,
            import_kwh=self.import_kwh + line.import_kwh,
            export_kwh=self.export_kwh + line.export_kwh, kgco2=self.kgco2 + line.kgco2,
            export_kgco2=self.export_kgco2 + line.export_kgco2, period_kwh=kwh,
            period_cost=cost, priced_by=priced_by)

    def bill(self, tariff: Tariff, max_demand_kw: float | None = None,
             max_demand_t: float | None = None) -> Bill:
        """The bill so far. ``max_demand_kw`` (and when, ``max_demand_t``): the month's maximum
        demand (a month bill), or the month's so far (a day bill); None = no demand charge."""
        start, end = self.bounds
        first, _ = _first_days(self.kind, self.period)
        days = days_in_month(first.year, first.month)
        if max_demand_kw is not None:
            _finite("max_demand_kw", max_demand_kw)
        if max_demand_t is not None:
            _finite("max_demand_t", max_demand_t, None)
            month_start, month_end = period_bounds("month", self.period[:7], self.utc_offset_s)
            if not month_start <= max_demand_t < month_end:
                raise ValueError(f"max_demand_t {max_demand_t!r} is not in month "
                                 f"{self.period[:7]}")
        share = 1.0 if self.kind == "month" else 1.0 / days
        demand = 0.0
        if tariff.demand_price is not None and max_demand_kw is not None:
            demand = tariff.demand_price * max_demand_kw * share
        if self.kind == "month":
            fixed = tariff.fixed.per_month + tariff.fixed.per_day * days
        else:
            fixed = tariff.fixed.per_month / days + tariff.fixed.per_day
        energy = math.fsum(self.period_cost.values())
        return Bill(
            kind=self.kind, period=self.period, start=start, end=end, tariff_id=tariff.id,
            currency=tariff.currency,
            period_kwh={p: _kwh(self.period_kwh[p]) for p in PERIODS},
            period_cost={p: _money(self.period_cost[p]) for p in PERIODS},
            energy_kwh=_kwh(self.import_kwh), energy_cost=_money(energy),
            max_demand_kw=max_demand_kw, max_demand_t=max_demand_t,
            demand_price=tariff.demand_price, days_in_month=days,
            demand_charge=_money(demand), fixed_charges=_money(fixed),
            total=_money(energy + demand + fixed), kgco2=_kwh(self.kgco2),
            export_kwh=_kwh(self.export_kwh), export_kgco2=_kwh(self.export_kgco2),
            intervals=self.intervals, complete=self.complete, priced_by=self.priced_by)


def bill_of(kind: str, period: str, lines: Iterable[BillLine], tariff: Tariff,
            utc_offset_s: int, max_demand_kw: float | None = None,
            max_demand_t: float | None = None) -> Bill:
    """The bill of ``lines`` (in time order) for local day or month ``period``: a
    :class:`BillState` folded over them."""
    state = BillState.new(kind, period, utc_offset_s)
    for line in lines:
        state = state.add(line)
    return state.bill(tariff, max_demand_kw, max_demand_t)
