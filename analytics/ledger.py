"""The ledger of a site: every meter's intervals, and what is made of them.

One pure call per meter reading, :func:`feed`; it returns the new state and the records to
keep and publish (:class:`Record`): interval records and loss figures (``intervals``), bills
(``bills``) and events (``events``). The agent persists the state and the records in one
transaction. Commands change the ledger through :func:`set_tariff` and :func:`set_curve`.

What a reading goes through:

1. the meter's intervals (:mod:`lmt.analytics.intervals`);
2. each completed interval is priced (:mod:`lmt.analytics.tariff`: its period, price and
   cost) and given its carbon (:mod:`lmt.analytics.carbon`: kgCO2 and the factor used;
   exported energy separately);
3. the billing meter's intervals go into the day's and the month's bill
   (:mod:`lmt.analytics.bill`): the bill so far is kept (``publish=False``) with every
   interval, and published when its day or month ends;
4. the loss groups compare their members' intervals once every member has the interval, or
   a later one (:mod:`lmt.analytics.losses`): the figures go out with the intervals, the
   limit's crossing as events;
5. the reading itself goes through the theft and tamper detectors
   (:mod:`lmt.analytics.theft`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lmt.control.jsonstate import Json

from .bill import Bill, BillLine, BillState, period_label
from .carbon import HourlyCurve, SelectedFactor, interval_carbon, parse_curve
from .intervals import IntervalConfig, MeterLedger, MeterSpec
from .intervals import feed as feed_intervals
from .losses import LossGroup, LossInterval, LossState
from .losses import step as step_losses
from .sample import Sample
from .tariff import (
    HolidayCalendar,
    Piece,
    Tariff,
    TariffBook,
    period_at,
    price_interval,
    price_of,
)
from .theft import TheftConfig, TheftState
from .theft import step as step_theft

__all__ = ["LedgerConfig", "LedgerState", "Record", "bills_so_far", "feed", "feed_cycle",
           "running_yuan",
           "set_curve", "set_tariff", "tariff_book"]

Stream = Literal["intervals", "bills", "events"]
LOSS_WAIT_S = 2 * 86400.0  # a loss group's interval waits this long for a silent member


@dataclass(frozen=True)
class Record:
    """An interval, a bill or an event to keep and (unless ``publish`` is false: a bill so
    far, kept for local reading) publish; the body without its seq."""

    stream: Stream
    body: dict[str, Any]
    publish: bool = True


@dataclass(frozen=True)
class LedgerConfig:
    intervals: IntervalConfig
    meters: tuple[MeterSpec, ...]
    billing_meter: str | None = None  # whose intervals make the bills (the main meter)
    tariff: Tariff | None = None  # the configured tariff (a command may replace it)
    calendar: HolidayCalendar | None = None
    factor: SelectedFactor | None = None
    theft: TheftConfig | None = None
    loss_groups: tuple[LossGroup, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.meters})
        object.__setattr__(self, "_book", None if self.tariff is None
                           else TariffBook(((0.0, self.tariff),)))
        object.__setattr__(self, "_prices", {})  # the price of a half-hour slot, by tariff
        # each meter's detectors know its register's range (a rollover is not a decrease) and
        # its digit (a register of 0.1 kWh steps by 0.1 at once: neither runaway nor stopped)
        object.__setattr__(self, "_theft", {} if self.theft is None else {
            m.name: replace(self.theft, register_rollover_kwh=m.register_max_kwh,
                            register_resolution_kwh=max(self.theft.register_resolution_kwh,
                                                        m.resolution_kwh))
            for m in self.meters})

    def meter(self, name: str) -> MeterSpec:
        by_name: dict[str, MeterSpec] = self.__dict__["_by_name"]
        return by_name[name]

    @property
    def utc_offset_s(self) -> int:
        return self.intervals.utc_offset_s


@dataclass
class LedgerState(Json):
    meters: dict[str, MeterLedger] = field(default_factory=dict)
    theft: TheftState = field(default_factory=TheftState)
    losses: dict[str, LossState] = field(default_factory=dict)
    # per group, per interval start: the members' (kWh, quality) so far
    loss_wait: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    day: BillState | None = None
    month: BillState | None = None
    tariffs: Any = None  # a TariffBook's dict once a command replaced the configured tariff
    curve: Any = None  # the pushed hourly emission factors (HourlyCurve's dict)
    spent_yuan: float = 0.0  # the billing meter's priced intervals: what their import cost
    running_yuan: float = 0.0  # ... and with the energy since, at today's price (only grows)
    # the billing meter's month_max_demand as of its last billed interval: what the final bill
    # of a day or month charges (it is made at the next period's first interval, which carries
    # the next month's maximum once a month has ended)
    demand: Any = None


# -- commands ---------------------------------------------------------------------------------

def tariff_book(cfg: LedgerConfig, state: LedgerState) -> TariffBook | None:
    if state.tariffs is not None:
        return _book(state.tariffs)
    book: TariffBook | None = cfg.__dict__["_book"]
    return book


# Decoded books, by the identity of the state's dict: the same object from cycle to cycle (a
# command or a restart makes a new one, decoded once), not decoded per reading. The entry
# keeps its dict alive, so an id is never reused for another.
_BOOKS: dict[int, tuple[Any, TariffBook]] = {}


def _book(data: Any) -> TariffBook:
    got = _BOOKS.get(id(data))
    if got is not None and got[0] is data:
        return got[1]
    if len(_BOOKS) > 16:
        _BOOKS.clear()
    book = TariffBook.from_dict(data)
    _BOOKS[id(data)] = (data, book)
    return book


def set_tariff(cfg: LedgerConfig, state: LedgerState, tariff: Tariff, from_t: float
               ) -> LedgerState:
    """A signed ``tariff`` command: ``tariff`` prices every interval that starts at or after
    ``from_t`` (the configured or earlier tariffs the ones before)."""
    book = tariff_book(cfg, state) or TariffBook(())
    new = book.replaced_from(from_t, tariff)
    return _with(state, tariffs=new.to_dict())


def set_curve(state: LedgerState, data: Any) -> LedgerState:
    """A signed ``carbon_curve`` command: hourly factors that replace the configured factor
    where they apply. ``CarbonError`` when malformed (nothing changes)."""
    curve = parse_curve(data)
    return _with(state, curve=curve.to_dict())


def _with(state: LedgerState, **changes: Any) -> LedgerState:
    """A shallow copy of ``state`` with ``changes``."""
    new = LedgerState.__new__(LedgerState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


# -- readings ----------------------------------------------------------------------------------

def feed(cfg: LedgerConfig, state: LedgerState, meter: str, sample: Sample, session: str
         ) -> tuple[LedgerState, list[Record]]:
    """A reading of ``meter`` in: the new state (the input is not changed) and the records."""
    return feed_cycle(cfg, state, ((meter, sample),), session)


def feed_cycle(cfg: LedgerConfig, state: LedgerState, readings: Sequence[tuple[str, Sample]],
               session: str) -> tuple[LedgerState, list[Record]]:
    """A cycle's readings (meter, sample), in order: the new state (the input is not changed)
    and the records. The same as feeding them one by one, with the state copied once."""
    new = _with(state, meters=dict(state.meters))
    theft_meters = dict(state.theft.meters)
    records: list[Record] = []
    thefts: dict[str, TheftConfig] = cfg.__dict__["_theft"]
    for meter, sample in readings:
        spec = cfg.meter(meter)
        ml, bodies = feed_intervals(cfg.intervals, spec, new.meters.get(meter) or MeterLedger(),
                                    sample, session)
        new.meters[meter] = ml
        for body in bodies:
            _price(cfg, new, body)
            records.append(Record("intervals", body))
            if meter == cfg.billing_meter:
                records += _bill(cfg, new, body)
            records += _losses(cfg, new, meter, body)
        if meter == cfg.billing_meter:
            new.running_yuan = max(new.running_yuan, _running(cfg, new, sample.t))
        tc = thefts.get(meter)
        if tc is not None:
            old = theft_meters.get(meter)
            one, events = step_theft(tc, TheftState({} if old is None else {meter: old}), meter,
                                     sample)
            theft_meters[meter] = one.meters[meter]
            records += [Record("events", {"ts": sample.t, "type": e["type"], "data": e["data"]})
                        for e in events]
    new.theft = TheftState(theft_meters)
    return new, records


def _running(cfg: LedgerConfig, state: LedgerState, t: float) -> float:
    """What the billing meter's import has cost: the priced intervals, and the energy since
    the last of them at the price of ``t``."""
    ml = state.meters.get(cfg.billing_meter or "")
    book = tariff_book(cfg, state)
    tariff = None if book is None else book.tariff_at(t)
    if ml is None or tariff is None or cfg.calendar is None:
        return state.spent_yuan
    since = max(0.0, ml.e_imp - ml.imp.anchor_e)
    return state.spent_yuan + since * _price_at(cfg, tariff, t)


def _price_at(cfg: LedgerConfig, tariff: Tariff, t: float) -> float:
    """The price of ``t``'s half-hour slot (remembered per slot: asked every reading)."""
    assert cfg.calendar is not None
    cache: dict[tuple[int, int], tuple[Tariff, float]] = cfg.__dict__["_prices"]
    key = (id(tariff), int((t + cfg.utc_offset_s) // 1800))
    got = cache.get(key)
    if got is not None and got[0] is tariff:  # (the entry keeps its tariff: no id reused)
        return got[1]
    if len(cache) > 64:
        cache.clear()
    price = price_of(tariff, period_at(tariff, cfg.calendar, t, cfg.utc_offset_s))
    cache[key] = (tariff, price)
    return price


def running_yuan(state: LedgerState) -> float:
    """The running cost a purchase order in money counts down with (never goes down)."""
    return state.running_yuan


def _curve(state: LedgerState) -> HourlyCurve | None:
    return None if state.curve is None else HourlyCurve.from_dict(state.curve)


def _price(cfg: LedgerConfig, state: LedgerState, body: dict[str, Any]) -> None:
    """The interval's period, price and cost, and its carbon, into its record."""
    imp, exp = body["import_kwh"], body["export_kwh"]
    book = tariff_book(cfg, state)
    tariff = None if book is None else book.tariff_at(body["start"])
    if tariff is not None and cfg.calendar is not None and imp is not None:
        pieces = price_interval(tariff, cfg.calendar, body["start"], body["end"], imp,
                                cfg.utc_offset_s)
        body["tariff"] = tariff.id
        body["pieces"] = [{"period": p.period, "kwh": round(p.kwh, 6), "price": p.price,
                           "cost": round(p.cost, 6)} for p in pieces]
        body["period"] = pieces[0].period if len(pieces) == 1 else "mixed"
        body["cost"] = round(sum(p.cost for p in pieces), 6)
        if body["meter"] == cfg.billing_meter:
            state.spent_yuan += sum(p.cost for p in pieces)
    if cfg.factor is not None and (imp is not None or exp is not None):
        kg, export_kg, factor_id = interval_carbon(imp, exp, body["start"], body["end"],
                                                   cfg.factor, _curve(state))
        body["kgco2"] = None if kg is None else round(kg, 6)
        body["export_kgco2"] = None if export_kg is None else round(export_kg, 6)
        body["factor"] = factor_id


def _bill(cfg: LedgerConfig, state: LedgerState, body: dict[str, Any]) -> list[Record]:
    """The billing meter's interval into the day's and the month's bills: the bill so far
    (kept), and, when the interval is the first of a new day or month, the last one's final
    bill (published)."""
    md = body.get("month_max_demand")
    last_md, state.demand = state.demand, md
    closing_md = md if last_md is None else last_md  # (None: a state saved before it was kept)
    book = tariff_book(cfg, state)
    tariff = None if book is None else book.tariff_at(body["start"])
    if tariff is None:
        return []
    out: list[Record] = []
    off = cfg.utc_offset_s
    for kind in ("day", "month"):
        bs: BillState | None = getattr(state, kind)
        label = period_label(kind, body["start"], off)
        if bs is not None and bs.period != label:
            # the tariff in force at its last line charges its demand and fixed charges
            closing = (None if bs.last_end is None or book is None
                       else book.tariff_at(bs.last_end - 1.0)) or tariff
            out.append(_bill_record(cfg, bs, closing, body, final=True,
                                    md=_demand_of(bs, closing_md)))
            bs = None
        if bs is None:
            bs = BillState.new(kind, label, off)
        if body["import_kwh"] is not None and "pieces" in body:
            line = BillLine(body["start"], body["end"], body["import_kwh"],
                            body["export_kwh"] or 0.0,
                            tuple(Piece(p["period"], p["kwh"], p["price"], p["cost"])
                                  for p in body["pieces"]),
                            body.get("kgco2") or 0.0, body.get("export_kgco2") or 0.0,
                            body.get("tariff") or "")
            try:
                bs = bs.add(line)
            except ValueError:  # not after the last line (a clock stepped back): not twice
                pass
        setattr(state, kind, bs)
        out.append(_bill_record(cfg, bs, tariff, body, final=False, md=_demand_of(bs, md)))
    return out


def _demand_of(bs: BillState, md: dict[str, Any] | None) -> tuple[float | None, float | None]:
    if md is None or md.get("month") != bs.period[:7]:
        return None, None
    return md["kw"], md["at"]


def _bill_record(cfg: LedgerConfig, bs: BillState, tariff: Tariff, body: dict[str, Any],
                 final: bool, md: tuple[float | None, float | None]) -> Record:
    kw, at = md
    if at is not None:
        start, end = bs.bounds
        at = min(max(at, start), end - 1.0) if bs.kind == "month" else at
    try:
        bill = bs.bill(tariff, kw, at)
    except ValueError:  # a demand time outside the month (a clock step): no demand charge
        bill = bs.bill(tariff, None, None)
    return Record("bills", {"ts": body["end"], "meter": cfg.billing_meter or "", "kind": bs.kind,
                            "label": bs.period, "final": final, "bill": bill.to_dict()},
                  publish=final)


def bills_so_far(cfg: LedgerConfig, state: LedgerState, now: float) -> list[Bill]:
    """The day's and the month's bills as they stand (for ``lmt ledger``)."""
    book = tariff_book(cfg, state)
    tariff = None if book is None else book.tariff_at(now)
    if tariff is None:
        return []
    out = []
    ml = state.meters.get(cfg.billing_meter or "")
    md = (None if ml is None or ml.month_max_kw is None else round(ml.month_max_kw, 4),
          None if ml is None else ml.month_max_at, "" if ml is None else ml.month)
    for bs in (state.day, state.month):
        if bs is not None:
            kw, at = (md[0], md[1]) if md[2] == bs.period[:7] else (None, None)
            try:
                out.append(bs.bill(tariff, kw, at))
            except ValueError:
                out.append(bs.bill(tariff, None, None))
    return out


def _losses(cfg: LedgerConfig, state: LedgerState, meter: str, body: dict[str, Any]
            ) -> list[Record]:
    out: list[Record] = []
    for group in cfg.loss_groups:
        members = (group.main, *group.subs)
        if meter not in members:
            continue
        waiting = {k: dict(v) for k, v in state.loss_wait.get(group.name, {}).items()}
        key = repr(float(body["start"]))
        got = waiting.setdefault(key, {})
        got[meter] = [body["import_kwh"], body["quality"], body["end"]]
        # judge, in order, every interval all members have, and those a member skipped
        # (a later one of it is in) or that waited too long
        newest = {m: max((float(k) for k, v in waiting.items() if m in v), default=None)
                  for m in members}
        gs = state.losses.get(group.name) or LossState()
        for k in sorted(waiting, key=float):
            have = waiting[k]
            start = float(k)
            end = float(next(iter(have.values()))[2])
            done = all(m in have or (newest[m] is not None and newest[m] > start)  # type: ignore[operator]
                       for m in members)
            if not done and body["end"] - end < LOSS_WAIT_S:
                break
            interval = LossInterval(start, end, {m: have[m][0] if m in have else None
                                                 for m in members},
                                    {m: have[m][1] for m in members if m in have})
            gs, recs = step_losses(group, gs, interval)
            del waiting[k]
            for r in recs:
                if r["type"] == "loss_interval":
                    out.append(Record("intervals", {"ts": r["ts"], "kind": "loss",
                                                    "group": group.name, "start": start,
                                                    "end": end, **r["data"]}))
                else:
                    out.append(Record("events", {"ts": r["ts"], "type": r["type"],
                                                 "data": r["data"]}))
        state.losses = {**state.losses, group.name: gs}
        state.loss_wait = {**state.loss_wait, group.name: waiting}
    return out
