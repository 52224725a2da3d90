"""Location-based carbon: dated grid emission factors, a pushed hourly curve, an interval's CO2.

**Factors** are data, never code: ``config/ledger_data/emission_factors.toml`` (package data
``lmt.config.ledger_data``) holds the average CO2 factors MEE and NBS publish per data year, each
keyed by (data year, scope, region) and naming its publication and source. The agent reads the
file (``tomllib``) and hands the dict to :func:`parse_factors`, which checks it strictly
(:class:`CarbonError` names the key and says what was expected).

Scopes: ``national`` (region ``CN``) and its two variants ``national_excl_market_nonfossil``
(national, without the market-traded non-fossil electricity) and ``fossil`` (fossil-fired
generation only), also region ``CN``; ``regional`` (one of the grids: ``north``,
``northeast``, ``east``, ``central``, ``northwest``, ``south``, ``southwest``) and
``provincial`` (a province, in pinyin: ``jiangsu``, ``inner_mongolia``, ``shaanxi``...).

:func:`select_factor` picks the factor of a (year, scope, region): the exact data year when
published, else the latest one before it, and says so (:class:`SelectedFactor` carries the
year used and a note). Every factor has a stable id, ``<publication>/<scope>/<region>`` (e.g.
``mee-2022/provincial/jiangsu``), that records and bills cite.

**Hourly curve**: no official hourly factor exists; the platform may push one by signed command
(:class:`HourlyCurve`, checked by :func:`parse_curve`). :func:`factor_at` gives the curve's
value where it covers a time and the configured table factor elsewhere; a curve's hours are
cited as ``curve/<id>``.

**An interval's carbon** (:func:`interval_carbon`): energy is taken as spread evenly over the
interval, so an interval inside one hour uses that hour's factor and one that crosses hours
is split by time. Exported energy (a site with PV) gets its own figure, never netted against
the import.

Pure: no clock, no I/O; times are unix seconds given by the caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, NoReturn

from lmt.control.jsonstate import Json

__all__ = [
    "CURVE_MAX_HOURS",
    "HOUR_S",
    "MAX_KG_PER_KWH",
    "NATIONAL_REGION",
    "NATIONAL_SCOPES",
    "SCOPES",
    "STATUSES",
    "UNIT",
    "CarbonError",
    "Factor",
    "FactorTable",
    "Grid",
    "HourlyCurve",
    "Publication",
    "SelectedFactor",
    "factor_at",
    "interval_carbon",
    "parse_curve",
    "parse_factors",
    "select_factor",
]

UNIT = "kgCO2/kWh"
NATIONAL_REGION = "CN"
#: The national factor and its variants: all three have the one region ``CN``.
NATIONAL_SCOPES = ("national", "national_excl_market_nonfossil", "fossil")
SCOPES = (*NATIONAL_SCOPES, "regional", "provincial")
#: ``confirmed``: the value is in the publication as reported by a second, independent source;
#: ``verify``: transcriptions agree but nobody here read it off the official attachment.
STATUSES = ("confirmed", "verify")
#: No grid is dirtier than ~1.2 kg/kWh (lignite); a larger value is a unit error (g/kWh?).
MAX_KG_PER_KWH = 2.0
HOUR_S = 3600
CURVE_MAX_HOURS = 31 * 24
CURVE_PREFIX = "curve/"

_KEY = re.compile(r"[a-z][a-z0-9_]*")
_PUBLICATION_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CURVE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class CarbonError(ValueError):
    """Bad factor data, an unknown scope or region, a bad curve or interval: the message names
    the key (``factors[3].kg_per_kwh: ...``) and says what was expected."""


# -- the factor table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Publication:
    """The notice a factor comes from: ``id`` (``mee-2022``) is the first part of its factors'
    ids; ``data_year`` the year the factors describe; ``published`` the notice's date."""

    id: str
    title: str
    issuer: str
    number: str
    published: date
    data_year: int
    url: str
    note: str = ""


@dataclass(frozen=True)
class Factor:
    """One published factor: kg CO2 per kWh consumed in ``region`` in data year ``year``."""

    year: int
    scope: str
    region: str
    kg_per_kwh: float
    publication: Publication
    source: str
    status: str = "confirmed"
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.publication.id}/{self.scope}/{self.region}"


@dataclass(frozen=True)
class Grid:
    """A regional grid and its provinces. ``partly``: provinces split between grids (Inner
    Mongolia's west is in the north grid, its east in the northeast one): a site there names
    its grid itself."""

    key: str
    name: str
    provinces: tuple[str, ...]
    partly: tuple[str, ...]
    source: str
    status: str = "confirmed"


@dataclass(frozen=True)
class FactorTable:
    """Everything the factor file holds, checked (:func:`parse_factors`)."""

    publications: Mapping[str, Publication]
    factors: tuple[Factor, ...]
    grids: Mapping[str, Grid] = field(default_factory=dict)
    unit: str = UNIT

    def provinces(self) -> frozenset[str]:
        """Every province the table knows: with a provincial factor, or in a grid."""
        named = {f.region for f in self.factors if f.scope == "provincial"}
        for g in self.grids.values():
            named.update(g.provinces, g.partly)
        return frozenset(named)

    def grid_of(self, province: str) -> str:
        """The grid a province belongs to; :class:`CarbonError` when it is in none, or split."""
        split = sorted(g.key for g in self.grids.values() if province in g.partly)
        if split:
            raise CarbonError(f"region: {province!r} is split between the {' and '.join(split)} "
                              "grids: give the grid (scope 'regional', region one of them)")
        for g in self.grids.values():
            if province in g.provinces:
                return g.key
        raise CarbonError(f"region: {province!r} is in no grid of the factor table (grids: "
                          f"{', '.join(sorted(self.grids)) or 'none'})")


@dataclass(frozen=True)
class SelectedFactor:
    """The factor :func:`select_factor` chose for ``requested_year`` / ``requested_region``:
    ``year`` is the data year actually used; ``note`` says what was substituted ('' when the
    exact year and region were there)."""

    factor: Factor
    requested_year: int
    requested_region: str
    note: str = ""

    @property
    def id(self) -> str:
        return self.factor.id

    @property
    def kg_per_kwh(self) -> float:
        return self.factor.kg_per_kwh

    @property
    def year(self) -> int:
        return self.factor.year

    @property
    def exact(self) -> bool:
        return self.factor.year == self.requested_year

    def to_record(self) -> dict[str, Any]:
        """What a record or a bill cites (JSON types)."""
        f = self.factor
        return {"factor_id": f.id, "kg_per_kwh": f.kg_per_kwh, "unit": UNIT, "scope": f.scope,
                "region": f.region, "data_year": f.year, "requested_year": self.requested_year,
                "requested_region": self.requested_region, "exact": self.exact,
                "publication": f.publication.number, "published": f.publication.published.isoformat(),
                "source": f.source, "status": f.status, "note": self.note}


class _Reader:
    """Strict reads of one table of the data file; errors name ``where.key``."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise CarbonError(f"{where}: expected a table, got {data!r}")
        self.data, self.where, self.seen = data, where, set[str]()

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise CarbonError(f"{self.at(key)}: missing")
            return default
        return self.data[key]

    def string(self, key: str, default: str | None = None) -> str:
        if default is not None and key not in self.data:
            self.seen.add(key)
            return default
        v = self.raw(key)
        if not isinstance(v, str) or not v.strip():
            raise CarbonError(f"{self.at(key)}: expected a non-empty string, got {v!r}")
        return v

    def integer(self, key: str, lo: int, hi: int) -> int:
        v = self.raw(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise CarbonError(f"{self.at(key)}: expected an integer in {lo}..{hi}, got {v!r}")
        return v

    def day(self, key: str) -> date:
        v = self.raw(key)
        if type(v) is date:  # a TOML local date (not a datetime)
            return v
        if isinstance(v, str):
            try:
                return date.fromisoformat(v)
            except ValueError:
                pass
        raise CarbonError(f"{self.at(key)}: expected a date YYYY-MM-DD, got {v!r}")

    def keys(self, key: str, required: bool = False) -> tuple[str, ...]:
        v = self.raw(key) if required else self.raw(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and _KEY.fullmatch(x) for x in v):
            raise CarbonError(f"{self.at(key)}: expected a list of lowercase keys, got {v!r}")
        if len(set(v)) != len(v):
            raise CarbonError(f"{self.at(key)}: listed twice: {sorted({x for x in v if v.count(x) > 1})}")
        return tuple(v)

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.seen)
        if unknown:
            raise CarbonError(f"{self.where or 'factor file'}: unknown key(s) {', '.join(unknown)}")


def _kg_per_kwh(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CarbonError(f"{where}: expected a number ({UNIT}), got {value!r}")
    x = float(value)
    if not math.isfinite(x) or not 0.0 <= x <= MAX_KG_PER_KWH:
        raise CarbonError(f"{where}: expected {UNIT} in 0..{MAX_KG_PER_KWH:g} (finite; "
                          f"is it g/kWh?), got {value!r}")
    return x


def parse_factors(data: Mapping[str, Any]) -> FactorTable:
    """The factor table from the data file's dict (``tomllib`` output), checked strictly:
    unknown and missing keys, wrong types, a factor whose publication is missing or of another
    data year, a region that does not fit its scope, a (year, scope, region) given twice."""
    top = _Reader(data, "")
    schema = top.raw("schema")
    if schema != 1:
        raise CarbonError(f"schema: expected 1, got {schema!r}")
    unit = top.raw("unit")
    if unit != UNIT:
        raise CarbonError(f"unit: expected {UNIT!r}, got {unit!r}")

    pubs_raw = top.raw("publications")
    if not isinstance(pubs_raw, Mapping) or not pubs_raw:
        raise CarbonError(f"publications: expected a table of publications, got {pubs_raw!r}")
    publications: dict[str, Publication] = {}
    for pid, body in pubs_raw.items():
        where = f"publications.{pid}"
        if not isinstance(pid, str) or not _PUBLICATION_ID.fullmatch(pid):
            raise CarbonError(f"{where}: expected an id of lowercase letters, digits, '.', '_', '-'")
        r = _Reader(body, where)
        publications[pid] = Publication(
            id=pid, title=r.string("title"), issuer=r.string("issuer"), number=r.string("number"),
            published=r.day("published"), data_year=r.integer("data_year", 1990, 2200),
            url=r.string("url"), note=r.string("note", ""))
        r.done()

    grids: dict[str, Grid] = {}
    grids_raw = top.raw("grids", {})
    if not isinstance(grids_raw, Mapping):
        raise CarbonError(f"grids: expected a table of grids, got {grids_raw!r}")
    owner: dict[str, str] = {}
    for key, body in grids_raw.items():
        where = f"grids.{key}"
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise CarbonError(f"{where}: expected a lowercase key")
        r = _Reader(body, where)
        grid = Grid(key=key, name=r.string("name"), provinces=r.keys("provinces", required=True),
                    partly=r.keys("partly"), source=r.string("source"),
                    status=r.string("status", "confirmed"))
        if grid.status not in STATUSES:
            raise CarbonError(f"{where}.status: expected one of {', '.join(STATUSES)}, got "
                              f"{grid.status!r}")
        r.done()
        for p in grid.provinces:
            if p in owner:
                raise CarbonError(f"{where}.provinces: {p!r} is already in grids.{owner[p]}")
            owner[p] = key
        grids[key] = grid
    for g in grids.values():
        for p in g.partly:
            if p in owner:
                raise CarbonError(f"grids.{g.key}.partly: {p!r} is wholly in grids.{owner[p]}")

    factors_raw = top.raw("factors")
    if not isinstance(factors_raw, list) or not factors_raw:
        raise CarbonError(f"factors: expected a list of factors ([[factors]]), got {factors_raw!r}")
    factors: list[Factor] = []
    seen: dict[tuple[int, str, str], int] = {}
    for i, body in enumerate(factors_raw):
        where = f"factors[{i}]"
        r = _Reader(body, where)
        year = r.integer("year", 1990, 2200)
        scope = r.string("scope")
        if scope not in SCOPES:
            raise CarbonError(f"{where}.scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
        region = r.string("region")
        if scope in NATIONAL_SCOPES:
            if region != NATIONAL_REGION:
                raise CarbonError(f"{where}.region: a {scope} factor is for region "
                                  f"{NATIONAL_REGION!r}, got {region!r}")
        elif not _KEY.fullmatch(region):
            raise CarbonError(f"{where}.region: expected a lowercase key (pinyin), got {region!r}")
        elif scope == "regional" and region not in grids:
            raise CarbonError(f"{where}.region: {region!r} is not a grid of [grids] "
                              f"({', '.join(sorted(grids)) or 'none defined'})")
        elif scope == "provincial" and region in grids:
            raise CarbonError(f"{where}.region: {region!r} is a grid: its factor is 'regional'")
        kg = _kg_per_kwh(r.raw("kg_per_kwh"), f"{where}.kg_per_kwh")
        pid = r.string("publication")
        if pid not in publications:
            raise CarbonError(f"{where}.publication: {pid!r} is not in [publications] "
                              f"({', '.join(sorted(publications))})")
        pub = publications[pid]
        if pub.data_year != year:
            raise CarbonError(f"{where}.year: {year} but publication {pid!r} is for data year "
                              f"{pub.data_year}")
        source = r.string("source")
        status = r.string("status", "confirmed")
        if status not in STATUSES:
            raise CarbonError(f"{where}.status: expected one of {', '.join(STATUSES)}, got {status!r}")
        note = r.string("note", "")
        r.done()
        key = (year, scope, region)
        if key in seen:
            raise CarbonError(f"{where}: {year} {scope} {region} is already factors[{seen[key]}]")
        seen[key] = i
        factors.append(Factor(year=year, scope=scope, region=region, kg_per_kwh=kg,
                              publication=pub, source=source, status=status, note=note))
    top.done()
    return FactorTable(publications=publications, factors=tuple(factors), grids=grids, unit=unit)


def select_factor(table: FactorTable, year: int, scope: str, region: str) -> SelectedFactor:
    """The factor for accounting year ``year``: that data year's when published, otherwise the
    latest data year before it (the note says so; ``year`` of the result is the one used).

    ``region``: ``CN`` or any known province or grid for the national scopes (the national
    factor applies everywhere); a grid, or a province wholly in one grid (the grid is used, and
    the note says so), for ``regional``; a province for ``provincial``. An unknown scope or
    region, or nothing published for the year or before, raises :class:`CarbonError`."""
    if isinstance(year, bool) or not isinstance(year, int):
        raise CarbonError(f"year: expected an integer, got {year!r}")
    if scope not in SCOPES:
        raise CarbonError(f"scope: unknown {scope!r}; expected one of {', '.join(SCOPES)}")
    provinces = table.provinces()
    notes: list[str] = []
    if scope in NATIONAL_SCOPES:
        if region != NATIONAL_REGION and region not in provinces and region not in table.grids:
            raise CarbonError(f"region: unknown {region!r}; expected {NATIONAL_REGION!r}, a province "
                              "or a grid of the factor table")
        key_region = NATIONAL_REGION
    elif scope == "regional":
        if region in table.grids:
            key_region = region
        elif region in provinces:
            key_region = table.grid_of(region)
            notes.append(f"{region} is in the {key_region} grid")
        else:
            raise CarbonError(f"region: unknown {region!r}; expected a grid "
                              f"({', '.join(sorted(table.grids))}) or a province")
    else:
        if region in table.grids:
            raise CarbonError(f"region: {region!r} is a grid: use scope 'regional'")
        if region not in provinces:
            raise CarbonError(f"region: unknown province {region!r}; the factor table has "
                              f"{', '.join(sorted(provinces))}")
        key_region = region
    candidates = [f for f in table.factors if f.scope == scope and f.region == key_region]
    if not candidates:
        raise CarbonError(f"no {scope} factor for {key_region!r} in the factor table")
    usable = [f for f in candidates if f.year <= year]
    if not usable:
        first = min(f.year for f in candidates)
        raise CarbonError(f"no {scope} factor for {key_region!r} for data year {year} or before "
                          f"(the earliest is {first})")
    chosen = max(usable, key=lambda f: f.year)
    if chosen.year != year:
        notes.append(f"no {year} factor published; used the {chosen.year} data year")
    return SelectedFactor(chosen, year, region, "; ".join(notes))


# -- the hourly curve ----------------------------------------------------------------------------


def _curve_fail(key: str, message: str) -> NoReturn:
    raise CarbonError(f"HourlyCurve.{key}: {message}")


@dataclass(frozen=True)
class HourlyCurve(Json):
    """An hourly factor curve the platform pushes (the body of its signed command):
    ``kg_per_kwh[i]`` applies from ``start + i * 3600`` for an hour. ``start``: unix seconds
    on an hour; 1 to :data:`CURVE_MAX_HOURS` values, each finite, in 0..:data:`MAX_KG_PER_KWH`.
    ``id`` (letters, digits, ``._:-``) is cited as ``curve/<id>``; ``source`` says where the
    values come from."""

    id: str
    source: str
    start: int
    kg_per_kwh: tuple[float, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _CURVE_ID.fullmatch(self.id):
            _curve_fail("id", "expected 1-128 letters, digits or ._:- (starting with a letter or "
                        f"digit), got {self.id!r}")
        if not isinstance(self.source, str) or not self.source.strip():
            _curve_fail("source", f"expected a non-empty string, got {self.source!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int):
            _curve_fail("start", f"expected unix seconds (an integer), got {self.start!r}")
        if self.start % HOUR_S:
            _curve_fail("start", f"expected a time on the hour (a multiple of {HOUR_S} s), got "
                        f"{self.start} ({self.start % HOUR_S} s past the hour)")
        values = self.kg_per_kwh
        if not isinstance(values, Sequence) or isinstance(values, str):
            _curve_fail("kg_per_kwh", f"expected a list of numbers, got {values!r}")
        if not 1 <= len(values) <= CURVE_MAX_HOURS:
            _curve_fail("kg_per_kwh", f"expected 1 to {CURVE_MAX_HOURS} hourly values (31 days), "
                        f"got {len(values)}")
        checked = []
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int | float):
                _curve_fail(f"kg_per_kwh[{i}]", f"expected a number, got {v!r}")
            x = float(v)
            if not math.isfinite(x) or not 0.0 <= x <= MAX_KG_PER_KWH:
                _curve_fail(f"kg_per_kwh[{i}]", f"expected a finite {UNIT} in "
                            f"0..{MAX_KG_PER_KWH:g}, got {v!r}")
            checked.append(x)
        object.__setattr__(self, "kg_per_kwh", tuple(checked))

    @property
    def end(self) -> int:
        """The end of the last hour covered."""
        return self.start + HOUR_S * len(self.kg_per_kwh)

    @property
    def factor_id(self) -> str:
        return CURVE_PREFIX + self.id

    def value_at(self, t: float) -> float | None:
        """The hour's value at ``t``, None outside ``[start, end)``."""
        if not self.start <= t < self.end:
            return None
        return self.kg_per_kwh[int((t - self.start) // HOUR_S)]


def parse_curve(data: Mapping[str, Any]) -> HourlyCurve:
    """A curve from a command's body (JSON types), strictly: unknown or missing fields, wrong
    types and bad values raise :class:`CarbonError` naming the field."""
    if not isinstance(data, Mapping):
        raise CarbonError(f"HourlyCurve: expected an object, got {data!r}")
    try:
        return HourlyCurve.from_dict(data)
    except CarbonError:
        raise
    except ValueError as exc:
        raise CarbonError(str(exc)) from None


# -- an interval's carbon ------------------------------------------------------------------------

FactorLike = Factor | SelectedFactor


def _finite_time(name: str, t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise CarbonError(f"{name}: expected unix seconds (a finite number), got {t!r}")
    return float(t)


def factor_at(curve: HourlyCurve | None, table_factor: FactorLike, t: float) -> tuple[float, str]:
    """(kg CO2/kWh, factor id) at time ``t``: the curve's hour where the curve covers ``t``,
    otherwise the configured table factor."""
    t = _finite_time("t", t)
    if curve is not None:
        v = curve.value_at(t)
        if v is not None:
            return v, curve.factor_id
    return table_factor.kg_per_kwh, table_factor.id


def _energy(name: str, kwh: Any) -> float | None:
    if kwh is None:
        return None
    if isinstance(kwh, bool) or not isinstance(kwh, int | float) or not math.isfinite(kwh) or kwh < 0:
        raise CarbonError(f"{name}: expected kWh (a finite number ≥ 0) or None, got {kwh!r}")
    return float(kwh)


def interval_carbon(import_kwh: float | None, export_kwh: float | None, start: float, end: float,
                    table_factor: FactorLike, curve: HourlyCurve | None = None
                    ) -> tuple[float | None, float | None, str]:
    """(kg CO2 of the import, kg CO2 of the export, factor id) for the interval ``[start, end)``.

    The energy is taken as spread evenly over the interval: each part of it inside one hour
    gets that hour's factor (:func:`factor_at`), weighted by its share of the interval's
    duration. The export's figure is reported on its own, never subtracted from the import's
    (what a site exports is not what it imported). None in, None out (a meter without that
    register). ``factor id``: the one factor used, or the ids used in time order joined by
    ``+`` (an interval across the curve's edge: ``curve/x+mee-2022/provincial/jiangsu``)."""
    imp = _energy("import_kwh", import_kwh)
    exp = _energy("export_kwh", export_kwh)
    a, b = _finite_time("start", start), _finite_time("end", end)
    if b <= a:
        raise CarbonError(f"end: must be after start ({a:g}), got {b:g}")
    parts: list[tuple[float, float]] = []  # (kg/kWh, seconds) of each hour the interval touches
    ids: list[str] = []
    t = a
    while t < b:
        nxt = min(b, (math.floor(t / HOUR_S) + 1) * HOUR_S)
        kg, fid = factor_at(curve, table_factor, t)
        parts.append((kg, nxt - t))
        if fid not in ids:
            ids.append(fid)
        t = nxt
    mean = parts[0][0] if len(parts) == 1 else sum(kg * s for kg, s in parts) / (b - a)
    return (None if imp is None else imp * mean, None if exp is None else exp * mean, "+".join(ids))
