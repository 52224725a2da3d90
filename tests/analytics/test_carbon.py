"""lmt.analytics.carbon: the shipped factor file, factor selection, the pushed hourly curve,
an interval's carbon."""

from __future__ import annotations

import copy
import math
import tomllib
from datetime import date
from importlib.resources import files
from typing import Any

import pytest

from lmt.analytics.carbon import (
    CURVE_MAX_HOURS,
    HOUR_S,
    NATIONAL_SCOPES,
    SCOPES,
    STATUSES,
    CarbonError,
    FactorTable,
    HourlyCurve,
    factor_at,
    interval_carbon,
    parse_curve,
    parse_factors,
    select_factor,
)


def shipped_data() -> dict[str, Any]:
    return tomllib.loads(files("lmt.config.ledger_data").joinpath("emission_factors.toml")
                         .read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def shipped() -> FactorTable:
    return parse_factors(shipped_data())


# -- the shipped file ------------------------------------------------------------------------------

# the domain notes on the energy ledger, "Grid emission factors" (MEE/NBS, 2022 data, published 2024-12-20)
LEDGER = [
    (2022, "national", "CN", 0.5366), (2021, "national", "CN", 0.5568),
    (2022, "national_excl_market_nonfossil", "CN", 0.5856), (2022, "fossil", "CN", 0.8325),
    (2022, "regional", "north", 0.6776), (2022, "regional", "northwest", 0.5857),
    (2022, "regional", "east", 0.5617), (2022, "regional", "northeast", 0.5564),
    (2022, "regional", "central", 0.5395), (2022, "regional", "south", 0.3869),
    (2022, "regional", "southwest", 0.2268),
    (2022, "provincial", "hebei", 0.7252), (2022, "provincial", "shanxi", 0.7096),
    (2022, "provincial", "tianjin", 0.7041), (2022, "provincial", "fujian", 0.4092),
    (2022, "provincial", "guangxi", 0.4044), (2022, "provincial", "qinghai", 0.1567),
    (2022, "provincial", "sichuan", 0.1404), (2022, "provincial", "yunnan", 0.1073),
]


def test_the_shipped_file_parses_and_every_entry_names_its_source(shipped: FactorTable) -> None:
    assert shipped.factors
    for f in shipped.factors:
        assert f.source.strip(), f.id
        assert f.status in STATUSES, f.id
        assert f.publication.url.startswith("https://www.mee.gov.cn/"), f.id
        assert f.publication.number.startswith("公告"), f.id
        assert f.publication.data_year == f.year, f.id
    for g in shipped.grids.values():
        assert g.source.strip(), g.key


@pytest.mark.parametrize(("year", "scope", "region", "kg"), LEDGER)
def test_the_shipped_file_has_the_ledger_values_as_confirmed(shipped: FactorTable, year: int,
                                                             scope: str, region: str,
                                                             kg: float) -> None:
    found = [f for f in shipped.factors if (f.year, f.scope, f.region) == (year, scope, region)]
    assert len(found) == 1
    assert found[0].kg_per_kwh == kg
    assert found[0].status == "confirmed"


def test_the_2022_notice_is_the_one_of_2024_12_20(shipped: FactorTable) -> None:
    pub = shipped.publications["mee-2022"]
    assert pub.published == date(2024, 12, 20)
    assert pub.number == "公告2024年第33号"
    assert "生态环境部" in pub.issuer and "国家统计局" in pub.issuer


def test_every_grid_and_grid_province_of_the_shipped_file_has_a_2022_factor(
        shipped: FactorTable) -> None:
    have = {(f.scope, f.region) for f in shipped.factors if f.year == 2022}
    for g in shipped.grids.values():
        assert ("regional", g.key) in have
        for p in (*g.provinces, *g.partly):
            assert ("provincial", p) in have, p
    provincial = {f.region for f in shipped.factors if f.scope == "provincial"}
    assert len(provincial) == 30  # the notice's table: every province but Tibet


def test_a_fresh_parse_of_the_shipped_file_gives_ids_records_cite(shipped: FactorTable) -> None:
    ids = [f.id for f in shipped.factors]
    assert len(ids) == len(set(ids))
    assert "mee-2022/provincial/jiangsu" in ids
    assert "mee-2022/national/CN" in ids


# -- parse errors name the key -----------------------------------------------------------------


def minimal() -> dict[str, Any]:
    return {
        "schema": 1, "unit": "kgCO2/kWh",
        "publications": {"mee-2022": {"title": "t", "issuer": "MEE, NBS", "number": "公告2024年第33号",
                                      "published": date(2024, 12, 20), "data_year": 2022,
                                      "url": "https://www.mee.gov.cn/x"},
                         "mee-2021": {"title": "t", "issuer": "MEE, NBS", "number": "公告2024年第12号",
                                      "published": "2024-04-12", "data_year": 2021,
                                      "url": "https://www.mee.gov.cn/y"}},
        "grids": {"east": {"name": "华东", "provinces": ["jiangsu", "zhejiang"], "source": "s"},
                  "north": {"name": "华北", "provinces": ["hebei"], "partly": ["inner_mongolia"],
                            "source": "s"},
                  "northeast": {"name": "东北", "provinces": [], "partly": ["inner_mongolia"],
                                "source": "s"}},
        "factors": [
            {"year": 2022, "scope": "national", "region": "CN", "kg_per_kwh": 0.5366,
             "publication": "mee-2022", "source": "s"},
            {"year": 2021, "scope": "national", "region": "CN", "kg_per_kwh": 0.5568,
             "publication": "mee-2021", "source": "s"},
            {"year": 2022, "scope": "regional", "region": "east", "kg_per_kwh": 0.5617,
             "publication": "mee-2022", "source": "s"},
            {"year": 2022, "scope": "regional", "region": "north", "kg_per_kwh": 0.6776,
             "publication": "mee-2022", "source": "s"},
            {"year": 2022, "scope": "provincial", "region": "jiangsu", "kg_per_kwh": 0.5978,
             "publication": "mee-2022", "source": "s", "status": "verify"},
            {"year": 2021, "scope": "provincial", "region": "zhejiang", "kg_per_kwh": 0.5422,
             "publication": "mee-2021", "source": "s", "status": "verify"},
        ],
    }


def test_a_minimal_table_parses() -> None:
    t = parse_factors(minimal())
    assert len(t.factors) == 6
    assert t.publications["mee-2021"].published == date(2024, 4, 12)  # ISO strings work too
    assert t.grid_of("jiangsu") == "east"


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        node: Any = d
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


BAD_TABLES = [
    (_set(("schema",), 2), "schema: expected 1"),
    (_set(("unit",), "gCO2/kWh"), "unit: expected"),
    (_set(("extra",), 1), "factor file: unknown key(s) extra"),
    (_set(("factors", 0, "kg_per_kwh"), "0.5"), "factors[0].kg_per_kwh: expected a number"),
    (_set(("factors", 0, "kg_per_kwh"), 536.6), "factors[0].kg_per_kwh: expected kgCO2/kWh in 0..2"),
    (_set(("factors", 0, "kg_per_kwh"), -0.1), "factors[0].kg_per_kwh"),
    (_set(("factors", 0, "kg_per_kwh"), math.nan), "factors[0].kg_per_kwh"),
    (_set(("factors", 0, "kg_per_kwh"), True), "factors[0].kg_per_kwh: expected a number"),
    (_set(("factors", 1, "source"), KeyError), "factors[1].source: missing"),
    (_set(("factors", 1, "source"), " "), "factors[1].source: expected a non-empty string"),
    (_set(("factors", 1, "colour"), "red"), "factors[1]: unknown key(s) colour"),
    (_set(("factors", 2, "scope"), "continental"), "factors[2].scope: expected one of"),
    (_set(("factors", 0, "region"), "jiangsu"), "factors[0].region: a national factor is for region 'CN'"),
    (_set(("factors", 2, "region"), "eest"), "factors[2].region: 'eest' is not a grid of [grids]"),
    (_set(("factors", 4, "region"), "east"), "factors[4].region: 'east' is a grid"),
    (_set(("factors", 4, "region"), "Jiangsu"), "factors[4].region: expected a lowercase key"),
    (_set(("factors", 4, "publication"), "mee-2023"), "factors[4].publication: 'mee-2023' is not in"),
    (_set(("factors", 4, "year"), 2021), "factors[4].year: 2021 but publication 'mee-2022'"),
    (_set(("factors", 4, "year"), "2022"), "factors[4].year: expected an integer"),
    (_set(("factors", 4, "status"), "maybe"), "factors[4].status: expected one of confirmed, verify"),
    (_set(("factors", 3, "region"), "east"), "factors[3]: 2022 regional east is already factors[2]"),
    (_set(("factors",), []), "factors: expected a list of factors"),
    (_set(("publications", "mee-2022", "published"), "20.12.2024"),
     "publications.mee-2022.published: expected a date YYYY-MM-DD"),
    (_set(("publications", "mee-2022", "url"), KeyError), "publications.mee-2022.url: missing"),
    (_set(("grids", "east", "provinces"), ["jiangsu", "hebei"]),
     "grids.north.provinces: 'hebei' is already in grids.east"),
    (_set(("grids", "east", "provinces"), "jiangsu"), "grids.east.provinces: expected a list"),
    (_set(("grids", "east", "provinces"), KeyError), "grids.east.provinces: missing"),
    (_set(("grids", "east", "partly"), ["hebei"]), "grids.east.partly: 'hebei' is wholly in grids.north"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_TABLES)
def test_a_bad_table_is_refused_naming_the_key(mutate: Any, message: str) -> None:
    data = copy.deepcopy(minimal())
    mutate(data)
    with pytest.raises(CarbonError) as err:
        parse_factors(data)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_the_parser_catches_a_bad_entry_in_the_shipped_file() -> None:
    data = shipped_data()
    i = next(i for i, f in enumerate(data["factors"]) if f["region"] == "yunnan")
    del data["factors"][i]["source"]
    with pytest.raises(CarbonError, match=rf"factors\[{i}\]\.source: missing"):
        parse_factors(data)


# -- selecting a factor -------------------------------------------------------------------------


@pytest.fixture
def table() -> FactorTable:
    return parse_factors(minimal())


def test_the_exact_year_is_used_when_published(table: FactorTable) -> None:
    s = select_factor(table, 2022, "provincial", "jiangsu")
    assert (s.id, s.kg_per_kwh, s.year, s.exact, s.note) == (
        "mee-2022/provincial/jiangsu", 0.5978, 2022, True, "")
    assert select_factor(table, 2021, "national", "CN").id == "mee-2021/national/CN"


def test_a_missing_year_takes_the_latest_before_it_and_says_so(table: FactorTable) -> None:
    s = select_factor(table, 2025, "national", "CN")
    assert s.id == "mee-2022/national/CN"
    assert (s.year, s.requested_year, s.exact) == (2022, 2025, False)
    assert "no 2025 factor published; used the 2022 data year" in s.note
    rec = s.to_record()
    assert (rec["factor_id"], rec["data_year"], rec["requested_year"], rec["exact"]) == (
        "mee-2022/national/CN", 2022, 2025, False)
    assert rec["published"] == "2024-12-20" and rec["source"] == "s"
    # zhejiang has only a 2021 factor: 2022 falls back to it, never forward
    z = select_factor(table, 2022, "provincial", "zhejiang")
    assert (z.id, z.year) == ("mee-2021/provincial/zhejiang", 2021)


def test_nothing_published_for_the_year_or_before_is_an_error(table: FactorTable) -> None:
    with pytest.raises(CarbonError, match=r"for data year 2020 or before \(the earliest is 2021\)"):
        select_factor(table, 2020, "national", "CN")


def test_the_national_factor_applies_to_any_known_region(table: FactorTable) -> None:
    assert select_factor(table, 2022, "national", "jiangsu").id == "mee-2022/national/CN"
    assert select_factor(table, 2022, "national", "east").id == "mee-2022/national/CN"
    with pytest.raises(CarbonError, match="region: unknown 'atlantis'"):
        select_factor(table, 2022, "national", "atlantis")


def test_a_province_takes_its_grid_for_the_regional_scope(table: FactorTable) -> None:
    s = select_factor(table, 2022, "regional", "jiangsu")
    assert s.id == "mee-2022/regional/east"
    assert s.requested_region == "jiangsu"
    assert "jiangsu is in the east grid" in s.note


def test_a_split_province_must_name_its_grid(table: FactorTable) -> None:
    with pytest.raises(CarbonError, match="'inner_mongolia' is split between the north and northeast"):
        select_factor(table, 2022, "regional", "inner_mongolia")
    assert select_factor(table, 2022, "regional", "north").id == "mee-2022/regional/north"


@pytest.mark.parametrize(("year", "scope", "region", "message"), [
    (2022, "continental", "CN", "scope: unknown 'continental'"),
    (2022, "provincial", "atlantis", "region: unknown province 'atlantis'"),
    (2022, "provincial", "east", "'east' is a grid: use scope 'regional'"),
    (2022, "regional", "atlantis", "region: unknown 'atlantis'"),
    (2022, "regional", "northeast", "no regional factor for 'northeast'"),
    (2022, "fossil", "CN", "no fossil factor for 'CN'"),
    ("2022", "national", "CN", "year: expected an integer"),
])
def test_unknown_scopes_and_regions_are_clear_errors(table: FactorTable, year: Any, scope: str,
                                                     region: str, message: str) -> None:
    with pytest.raises(CarbonError, match=message):
        select_factor(table, year, scope, region)


def test_every_scope_of_the_shipped_file_is_selectable(shipped: FactorTable) -> None:
    for scope in SCOPES:
        region = "CN" if scope in NATIONAL_SCOPES else "jiangsu"
        s = select_factor(shipped, 2024, scope, region)
        assert s.year == 2022 and s.factor.scope == scope


# -- the hourly curve ----------------------------------------------------------------------------

T0 = 1_717_200_000 - 1_717_200_000 % HOUR_S  # an hour boundary (2024-06-01 00:00 UTC)


def curve_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "east-20240601", "source": "platform: east grid marginal mix",
                            "start": T0, "kg_per_kwh": [0.5, 0.6, 0.7]}
    body.update(changes)
    return body


def test_a_curve_parses_and_survives_a_round_trip() -> None:
    c = parse_curve(curve_body())
    assert c.kg_per_kwh == (0.5, 0.6, 0.7)
    assert c.end == T0 + 3 * HOUR_S
    assert HourlyCurve.from_dict(c.to_dict()) == c
    assert c.to_dict()["kg_per_kwh"] == [0.5, 0.6, 0.7]


@pytest.mark.parametrize(("changes", "message"), [
    ({"start": T0 + 60}, "HourlyCurve.start: expected a time on the hour"),
    ({"start": float(T0)}, "HourlyCurve.start: expected an integer"),
    ({"start": True}, "HourlyCurve.start: expected an integer"),
    ({"kg_per_kwh": [0.5, -0.1]}, r"HourlyCurve.kg_per_kwh\[1\]: expected a finite"),
    ({"kg_per_kwh": [math.nan]}, r"HourlyCurve.kg_per_kwh\[0\]: expected a finite"),
    ({"kg_per_kwh": [0.5, 0.5, math.inf]}, r"HourlyCurve.kg_per_kwh\[2\]: expected a finite"),
    ({"kg_per_kwh": [600.0]}, r"HourlyCurve.kg_per_kwh\[0\]: expected a finite kgCO2/kWh in 0..2"),
    ({"kg_per_kwh": ["0.5"]}, r"HourlyCurve.kg_per_kwh\[0\]: expected a number"),
    ({"kg_per_kwh": []}, "HourlyCurve.kg_per_kwh: expected 1 to 744 hourly values"),
    ({"kg_per_kwh": [0.5] * (CURVE_MAX_HOURS + 1)}, "HourlyCurve.kg_per_kwh: expected 1 to 744"),
    ({"kg_per_kwh": 0.5}, "HourlyCurve.kg_per_kwh: expected a list"),
    ({"id": ""}, "HourlyCurve.id: expected 1-128 letters"),
    ({"id": "a b"}, "HourlyCurve.id: expected 1-128 letters"),
    ({"source": ""}, "HourlyCurve.source: expected a non-empty string"),
    ({"unit": "g/kWh"}, "HourlyCurve: unknown field.s. unit"),
])
def test_a_bad_curve_is_refused_naming_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(CarbonError, match=message):
        parse_curve(curve_body(**changes))


def test_a_curve_without_a_field_is_refused() -> None:
    body = curve_body()
    del body["start"]
    with pytest.raises(CarbonError, match=r"HourlyCurve: .*start"):
        parse_curve(body)
    with pytest.raises(CarbonError, match="HourlyCurve: expected an object"):
        parse_curve([1, 2])  # type: ignore[arg-type]


def test_factor_at_uses_the_curve_where_it_covers_the_time(table: FactorTable) -> None:
    c = parse_curve(curve_body())
    f = select_factor(table, 2022, "provincial", "jiangsu")
    assert factor_at(c, f, T0) == (0.5, "curve/east-20240601")
    assert factor_at(c, f, T0 + HOUR_S + 1799.5) == (0.6, "curve/east-20240601")
    assert factor_at(c, f, c.end - 0.001) == (0.7, "curve/east-20240601")
    for t in (T0 - 1, c.end, c.end + 10 * HOUR_S):  # [start, end): the end is not covered
        assert factor_at(c, f, t) == (f.kg_per_kwh, f.id)
    assert factor_at(None, f, T0) == (f.kg_per_kwh, f.id)


# -- an interval's carbon ------------------------------------------------------------------------


def test_an_interval_inside_one_hour_uses_that_hour(table: FactorTable) -> None:
    c = parse_curve(curve_body())
    f = select_factor(table, 2022, "provincial", "jiangsu")
    start = T0 + HOUR_S + 15 * 60  # 01:15-01:30, the curve's second hour
    kg, export, fid = interval_carbon(12.5, None, start, start + 900, f, c)
    assert kg == 12.5 * c.kg_per_kwh[1]
    assert export is None
    assert fid == "curve/east-20240601"


def test_an_interval_across_two_hours_of_the_curve_is_split_by_time(table: FactorTable) -> None:
    c = parse_curve(curve_body())
    f = select_factor(table, 2022, "provincial", "jiangsu")
    start, end = T0 + HOUR_S - 600, T0 + HOUR_S + 300  # 00:50-01:05: 10 min, then 5 min
    kg, export, fid = interval_carbon(30.0, 6.0, start, end, f, c)
    mean = (600 * c.kg_per_kwh[0] + 300 * c.kg_per_kwh[1]) / 900
    assert kg == pytest.approx(30.0 * mean, rel=1e-12)
    assert export == pytest.approx(6.0 * mean, rel=1e-12)
    assert c.kg_per_kwh[0] < mean < c.kg_per_kwh[1]
    assert fid == "curve/east-20240601"
    assert kg == pytest.approx(16.0, rel=1e-12)  # the example of docs/carbon-and-losses.md


def test_an_interval_across_the_curve_end_mixes_curve_and_table(table: FactorTable) -> None:
    c = parse_curve(curve_body())
    f = select_factor(table, 2022, "provincial", "jiangsu")
    start, end = c.end - 900, c.end + 900  # the curve's last quarter hour, then the table's
    kg, _, fid = interval_carbon(10.0, None, start, end, f, c)
    assert kg == pytest.approx(10.0 * (c.kg_per_kwh[-1] + f.kg_per_kwh) / 2, rel=1e-12)
    assert fid == f"curve/east-20240601+{f.id}"


def test_without_a_curve_the_table_factor_is_used(table: FactorTable) -> None:
    f = select_factor(table, 2022, "national", "CN")
    kg, export, fid = interval_carbon(8.0, 0.0, T0, T0 + 2 * HOUR_S + 60, f)
    assert kg == pytest.approx(8.0 * 0.5366, rel=1e-12)
    assert export == 0.0
    assert fid == "mee-2022/national/CN"


def test_export_is_reported_separately_never_netted(table: FactorTable) -> None:
    f = select_factor(table, 2022, "provincial", "jiangsu")
    kg, export, _ = interval_carbon(10.0, 4.0, T0, T0 + 900, f)
    assert kg == 10.0 * f.kg_per_kwh  # the import's carbon, whatever was exported
    assert export == 4.0 * f.kg_per_kwh
    kg_alone, _, _ = interval_carbon(10.0, None, T0, T0 + 900, f)
    assert kg == kg_alone
    assert kg is not None and export is not None and kg - export != kg


@pytest.mark.parametrize(("imp", "exp", "start", "end", "message"), [
    (1.0, None, T0, T0, "end: must be after start"),
    (1.0, None, T0 + 900, T0, "end: must be after start"),
    (-1.0, None, T0, T0 + 900, "import_kwh: expected kWh"),
    (1.0, math.nan, T0, T0 + 900, "export_kwh: expected kWh"),
    (1.0, None, math.inf, T0 + 900, "start: expected unix seconds"),
])
def test_a_bad_interval_is_refused(table: FactorTable, imp: Any, exp: Any, start: float,
                                   end: float, message: str) -> None:
    f = select_factor(table, 2022, "national", "CN")
    with pytest.raises(CarbonError, match=message):
        interval_carbon(imp, exp, start, end, f)
