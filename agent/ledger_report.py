"""`lmt ledger`: what the energy ledger holds, read from the buffer file (docs/field-tools.md).

A day's interval records per ledger meter (table ``ledger_intervals``), the day's and the
month's bills (``ledger_bills``; recomputed from the saved ledger state when a bill is not
there), the prepaid balance (the control supervisor's saved state), carbon, the loss groups'
figures and the recent loss, theft and balance events (the outbox's ``events`` stream).

Read-only and safe while the agent runs: the file is opened through a read-only SQLite
connection (``mode=ro``, or ``immutable`` when no agent has it open: no ``-wal`` or ``-shm``
next to it), all of it read in one snapshot. The agent's lock file is never opened, nothing is
written, and a stopped agent's folder is left without new side files.

:func:`build_report` makes the report (one JSON document, ``--json``); :func:`render_text`
prints it for people. Local time is the configuration's ``modes.utc_offset_s``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from lmt.config.agent import AgentConfig

REPORT_VERSION = 1
EVENT_TYPES = ("loss_exceeded", "loss_cleared", "theft_indicator", "theft_indicator_cleared",
               "balance_low")
DEFAULT_EVENTS = 10
PERIODS = ("critical", "peak", "flat", "valley", "deep_valley")
LEDGER_TABLES = ("ledger_intervals", "ledger_bills")  # as lmt.agent.ledger makes them
_DAY_S = 86400
_EPOCH = date(1970, 1, 1)


class ReportError(Exception):
    """What stops the report, with a ``kind`` for scripts and an exit code."""

    def __init__(self, kind: str, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


# -- local time ------------------------------------------------------------------------------
def local_day(t: float, offset_s: int) -> date:
    return _EPOCH + timedelta(days=math.floor((t + offset_s) / _DAY_S))


def day_bounds(day: date, offset_s: int) -> tuple[float, float]:
    start = float((day - _EPOCH).days * _DAY_S - offset_s)
    return start, start + _DAY_S


def month_bounds(day: date, offset_s: int) -> tuple[float, float]:
    first = day.replace(day=1)
    after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return day_bounds(first, offset_s)[0], day_bounds(after, offset_s)[0]


def offset_label(offset_s: int) -> str:
    sign = "+" if offset_s >= 0 else "-"
    h, m = divmod(abs(offset_s) // 60, 60)
    return f"UTC{sign}{h:02d}:{m:02d}"


def local_iso(t: float | None, offset_s: int) -> str | None:
    if t is None:
        return None
    zone = timezone(timedelta(seconds=offset_s))
    return datetime.fromtimestamp(t, zone).isoformat(timespec="seconds")


def _clock(t: float | None, offset_s: int, fmt: str) -> str:
    if t is None:
        return "?"
    return datetime.fromtimestamp(t + offset_s, UTC).strftime(fmt)


def parse_since(text: str, offset_s: int) -> float:
    """Unix seconds, or ISO 8601 (a date or a time; without a zone: the terminal's local time,
    ``modes.utc_offset_s``). ValueError when it is neither."""
    try:
        t = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(t):
            return t
        raise ValueError(f"--since: not a time: {text!r}")
    try:
        got = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: not a time: {text!r} (unix seconds, or ISO 8601 such as "
                         "2026-07-15 or 2026-07-15T08:00)") from None
    if got.tzinfo is None:
        got = got.replace(tzinfo=timezone(timedelta(seconds=offset_s)))
    return got.timestamp()


# -- the file ----------------------------------------------------------------------------------
def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that never writes the file, never checkpoints its WAL, never
    touches the agent's lock. A running agent keeps ``-wal`` and ``-shm`` next to the file:
    they are used as they are (``mode=ro``). Without them no agent has it open and the file
    alone is the database: it is read as ``immutable`` (no side files are made)."""
    if not path.exists():
        raise ReportError("no-buffer", f"no buffer file at {path} yet: the agent makes it when "
                                       "it first starts (has `lmt run` run with this "
                                       "configuration?)")
    if not path.is_file():
        raise ReportError("unreadable", f"{path} is not a file (check buffer.path)")
    uri = path.resolve().as_uri()
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    idle = not shm.exists() and (not wal.exists() or wal.stat().st_size == 0)
    try:
        if idle:
            con = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None)
        else:
            con = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None, timeout=5.0)
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise ReportError("unreadable", f"cannot read the buffer {path}: {exc} (the user "
                                        "running lmt ledger must be able to read the file and "
                                        "its -wal and -shm)") from None
    return con


def _tables(con: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _check_buffer(con: sqlite3.Connection, path: Path) -> set[str]:
    tables = _tables(con)
    if not tables:
        raise ReportError("no-ledger", f"the buffer {path} is empty: the agent has not written "
                                       "anything yet")
    if "outbox" not in tables or "state" not in tables:
        raise ReportError("not-a-buffer", f"{path} is not an lmt-edge buffer (tables: "
                                          f"{', '.join(sorted(tables))}): check buffer.path")
    missing = [t for t in LEDGER_TABLES if t not in tables]
    if missing:
        raise ReportError("no-ledger", f"the buffer {path} has no ledger (no table "
                                       f"{', '.join(missing)}): it was written by an agent "
                                       "older than the energy ledger, or this version has not "
                                       "run on it yet (or ran with the ledger off); start the "
                                       "agent (lmt run) with this version and the intervals "
                                       "appear as they close")
    return tables


def _state(con: sqlite3.Connection, key: str) -> tuple[Any, float | None]:
    row = con.execute("SELECT value, saved_at FROM state WHERE key = ?", [key]).fetchone()
    if row is None:
        return None, None
    try:
        return json.loads(row[0]), float(row[1])
    except (ValueError, TypeError):
        return None, float(row[1])


# -- the parts -----------------------------------------------------------------------------------
def _r(x: Any, digits: int) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _obj(d: Any, key: str) -> dict[str, Any]:
    """``d[key]`` when both are JSON objects, else {}."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _sum(values: Iterable[Any], digits: int) -> float | None:
    got = [float(v) for v in values
           if not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)]
    return round(math.fsum(got), digits) if got else None


def _intervals(con: sqlite3.Connection, meter: str, start: float, end: float
               ) -> list[dict[str, Any]]:
    out = []
    for (body,) in con.execute("SELECT body FROM ledger_intervals WHERE meter = ? AND start >= ? "
                               "AND start < ? ORDER BY start", [meter, start, end]):
        rec = _loads(body)
        if rec is not None:
            out.append(rec)
    return out


def _interval_row(b: Mapping[str, Any], offset_s: int) -> dict[str, Any]:
    return {"start": b.get("start"), "end": b.get("end"), "local_start": local_iso(
        b.get("start"), offset_s), "minutes": b.get("minutes"),
        "import_kwh": b.get("import_kwh"), "export_kwh": b.get("export_kwh"),
        "mean_kw": b.get("mean_kw"), "max_kw": b.get("max_kw"), "period": b.get("period"),
        "cost": b.get("cost"), "kgco2": b.get("kgco2"), "quality": b.get("quality"),
        "flags": list(b.get("flags") or []), "coverage": b.get("coverage")}


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"intervals": len(rows),
            "import_kwh": _sum((r.get("import_kwh") for r in rows), 3),
            "export_kwh": _sum((r.get("export_kwh") for r in rows), 3),
            "cost": _sum((r.get("cost") for r in rows), 2),
            "kgco2": _sum((r.get("kgco2") for r in rows), 3),
            "export_kgco2": _sum((r.get("export_kgco2") for r in rows), 3),
            "not_complete": sum(1 for r in rows if r.get("quality") != "complete")}


_MONTH_SQL = (
    "SELECT COUNT(*), SUM(import_kwh), SUM(json_extract(body, '$.export_kwh')), "
    "SUM(json_extract(body, '$.cost')), SUM(json_extract(body, '$.kgco2')), "
    "SUM(json_extract(body, '$.export_kgco2')), SUM(quality != 'complete') "
    "FROM ledger_intervals WHERE meter = ? AND start >= ? AND start < ?")


def _month_totals(con: sqlite3.Connection, meter: str, start: float, end: float
                  ) -> dict[str, Any]:
    """The month's sums, added up by SQLite (a month of one-minute intervals is 44 640 rows:
    not parsed here one by one); in Python where SQLite has no JSON functions."""
    try:
        row = con.execute(_MONTH_SQL, [meter, start, end]).fetchone()
    except sqlite3.OperationalError:
        return _totals(_intervals(con, meter, start, end))
    n, imp, exp, cost, kg, exp_kg, bad = row
    return {"intervals": int(n), "import_kwh": _r(imp, 3), "export_kwh": _r(exp, 3),
            "cost": _r(cost, 2), "kgco2": _r(kg, 3), "export_kgco2": _r(exp_kg, 3),
            "not_complete": int(bad or 0)}


def _loads(text: Any) -> dict[str, Any] | None:
    try:
        got = json.loads(text)
    except (TypeError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def _meter_part(con: sqlite3.Connection, meter: str, billing: bool, day: date,
                offset_s: int) -> dict[str, Any]:
    d0, d1 = day_bounds(day, offset_s)
    m0, m1 = month_bounds(day, offset_s)
    today = _intervals(con, meter, d0, d1)
    day_totals = _totals(today)
    kws = [r.get("max_kw") for r in today]
    day_totals["max_kw"] = max((float(x) for x in kws if isinstance(x, int | float)),
                               default=None)
    month_totals = _month_totals(con, meter, m0, m1)
    row = con.execute("SELECT body FROM ledger_intervals WHERE meter = ? AND start >= ? AND "
                      "start < ? ORDER BY start DESC LIMIT 1", [meter, m0, m1]).fetchone()
    got = (_loads(row[0]) or {} if row else {}).get("month_max_demand")
    month_totals["max_demand"] = got if isinstance(got, dict) and \
        got.get("month") == day.isoformat()[:7] else None
    return {"meter": meter, "billing": billing,
            "intervals": [_interval_row(b, offset_s) for b in today],
            "day": day_totals, "month": month_totals,
            "factors_used": sorted({str(r["factor"]) for r in today if r.get("factor")})}


def _stored_bill(con: sqlite3.Connection, meter: str, kind: str, label: str
                 ) -> dict[str, Any] | None:
    row = con.execute("SELECT body FROM ledger_bills WHERE meter = ? AND kind = ? AND label = ?",
                      [meter, kind, label]).fetchone()
    if row is None:
        return None
    try:
        body = json.loads(row[0])
    except ValueError:
        return None
    bill = body.get("bill") if isinstance(body, dict) else None
    if not isinstance(bill, dict):
        return None
    return {**bill, "final": bool(body.get("final")), "as_of": body.get("ts"),
            "source": "ledger_bills"}


def _recomputed_bills(cfg: AgentConfig, ledger_state: Any, now: float) -> dict[str, Any]:
    """The bills so far from the saved ledger state (``bills_so_far``), by kind; {} when the
    state or the tariff is not there."""
    if not isinstance(ledger_state, dict):
        return {}
    from lmt.analytics.ledger import LedgerState, bills_so_far
    from lmt.config.errors import ConfigError
    from lmt.config.profiles import load_profile

    from .ledger import ledger_config

    try:
        profiles = {n: load_profile(cfg.device(n).profile) for n in cfg.ledger_meters()}
        lcfg, _ = ledger_config(cfg, profiles)
        state = LedgerState.from_dict(ledger_state)
        bills = bills_so_far(lcfg, state, now)
    except (ConfigError, KeyError, ValueError, TypeError):
        return {}
    return {b.kind: {**b.to_dict(), "final": False, "as_of": None, "source": "state"}
            for b in bills}


def _bills(con: sqlite3.Connection, cfg: AgentConfig, billing: str | None, day: date,
           ledger_state: Any, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {"meter": billing, "tariff": cfg.ledger.tariff, "day": None,
                           "month": None}
    if billing is None:
        return out
    labels = {"day": day.isoformat(), "month": day.isoformat()[:7]}
    for kind, label in labels.items():
        out[kind] = _stored_bill(con, billing, kind, label)
    if out["day"] is None or out["month"] is None:
        again = None
        for kind, label in labels.items():
            if out[kind] is None:
                if again is None:
                    again = _recomputed_bills(cfg, ledger_state, now)
                got = again.get(kind)
                if got is not None and got.get("period") == label:
                    out[kind] = got
    return out


def _balance(supervisor: Any, saved_at: float | None, ledger_state: Any,
             last_interval: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The prepaid balance as the control supervisor last saved it (its modes' report), or
    else as the billing meter's last interval carries it."""
    spent = None
    if isinstance(ledger_state, dict):
        spent = _r(ledger_state.get("running_yuan"), 2)
    sup: dict[str, Any] = supervisor if isinstance(supervisor, dict) else {}
    params, mstate = _obj(sup, "mode_params"), _obj(sup, "mode_state")
    report = _obj(sup, "report")
    modes = report["modes"] if isinstance(report.get("modes"), dict) else None
    purchase, monthly = _obj(params, "purchase"), _obj(params, "monthly")
    unit = str(purchase.get("unit") or "kwh")
    suffix = "yuan" if unit == "yuan" else "kwh"
    out: dict[str, Any] = {
        "enabled": bool(purchase.get("enabled")), "unit": unit, "left": None,
        "order_no": mstate.get("order_no") if isinstance(mstate.get("order_no"), int) else None,
        "alarm_at": _r(purchase.get(f"alarm_{suffix}"), 2) if purchase else None,
        "trip_at": _r(purchase.get(f"trip_{suffix}"), 2) if purchase else None,
        "alarm": bool(_obj(mstate, "purchase").get("alarm")),
        "month_used_kwh": None,
        "month_limit_kwh": _r(monthly.get("limit_kwh"), 3) if monthly.get("enabled") else None,
        "spent_yuan": spent, "as_of": None, "source": None}
    if modes is not None:
        out["unit"] = str(modes.get("purchase_unit") or unit)
        out["left"] = _r(modes.get("purchase_left_kwh"), 2)
        out["month_used_kwh"] = _r(modes.get("month_used_kwh"), 3)
        out["as_of"], out["source"] = saved_at, "supervisor"
    elif last_interval is not None and isinstance(last_interval.get("balance"), dict):
        b = last_interval["balance"]
        out["unit"] = str(b.get("unit") or unit)
        out["left"] = _r(b.get("left"), 2)
        out["month_used_kwh"] = _r(b.get("month_used_kwh"), 3)
        out["spent_yuan"] = _r(b.get("spent_yuan"), 2) if spent is None else spent
        out["as_of"], out["source"] = last_interval.get("end"), "interval"
    elif not sup:
        return None
    return out


def _factor(cfg: AgentConfig) -> tuple[dict[str, Any] | None, str | None]:
    from lmt.config.errors import ConfigError

    from .ledger import load_factor

    try:
        f = load_factor(cfg)
    except ConfigError as exc:
        return None, str(exc)
    return {"id": f.id, "kg_per_kwh": f.kg_per_kwh, "year": f.year,
            "requested_year": f.requested_year, "region": f.requested_region,
            "scope": cfg.ledger.carbon.scope, "note": f.note}, None


def _carbon(meter: Mapping[str, Any], factor: dict[str, Any] | None, curve: bool
            ) -> dict[str, Any]:
    day, month = meter["day"], meter["month"]
    kg, kwh = day["kgco2"], day["import_kwh"]
    return {"meter": meter["meter"], "day_kgco2": kg, "month_kgco2": month["kgco2"],
            "day_export_kgco2": day["export_kgco2"], "month_export_kgco2": month["export_kgco2"],
            "day_kg_per_kwh": round(kg / kwh, 4) if kg is not None and kwh else None,
            "factor": factor, "factors_used": meter["factors_used"], "curve": curve}


def _losses(con: sqlite3.Connection, cfg: AgentConfig, day: date, offset_s: int,
            only: str | None) -> list[dict[str, Any]]:
    d0, d1 = day_bounds(day, offset_s)
    out = []
    for g in cfg.ledger.loss_groups:
        if only is not None and only != g.main and only not in g.subs:
            continue
        rows = _intervals(con, f"loss:{g.name}", d0, d1)
        judged = [r for r in rows if r.get("status") in ("over", "within")]
        main = _sum((r.get("main_kwh") for r in judged), 3)
        sub = _sum((r.get("sub_kwh") for r in judged), 3)
        loss = _sum((r.get("loss_kwh") for r in judged), 3)
        out.append({"group": g.name, "main": g.main, "subs": list(g.subs),
                    "intervals": len(rows), "judged": len(judged),
                    "over": sum(1 for r in rows if r.get("status") == "over"),
                    "main_kwh": main, "sub_kwh": sub, "loss_kwh": loss,
                    "loss_pct": round(100.0 * loss / main, 2) if loss is not None and main
                    else None,
                    "active": bool(rows[-1].get("active")) if rows else None})
    return out


def _event_meters(ev: Mapping[str, Any]) -> set[str]:
    data = _obj(ev, "data")
    if ev.get("type") in ("loss_exceeded", "loss_cleared"):
        subs = data.get("subs")
        return {str(data.get("main")), *(map(str, subs) if isinstance(subs, dict) else ())}
    if ev.get("type", "").startswith("theft_indicator"):
        return {str(data.get("meter"))}
    return set()  # the balance: every meter's


def _events(con: sqlite3.Connection, limit: int | None, since: float | None,
            only: str | None, offset_s: int) -> list[dict[str, Any]]:
    """The newest ``limit`` (None: every one) events of EVENT_TYPES since ``since``, oldest
    first; with ``only``, not those about other meters."""
    if limit is not None and limit <= 0:
        return []
    like = " OR ".join(["body LIKE ?"] * len(EVENT_TYPES))
    sql = f"SELECT seq, ts, body FROM outbox WHERE stream = 'events' AND ({like})"
    params: list[Any] = [f'%"type":"{t}"%' for t in EVENT_TYPES]
    if since is not None:
        sql += " AND ts >= ?"
        params.append(since)
    out: list[dict[str, Any]] = []
    for seq, ts, body in con.execute(sql + " ORDER BY seq DESC", params):
        try:
            ev = json.loads(body)
        except ValueError:
            continue
        if not isinstance(ev, dict) or ev.get("type") not in EVENT_TYPES:
            continue
        meters = _event_meters(ev)
        if only is not None and meters and only not in meters:
            continue
        out.append({"seq": int(seq), "ts": float(ts), "local": local_iso(float(ts), offset_s),
                    "type": ev["type"], "data": ev.get("data") or {}})
        if limit is not None and len(out) >= limit:
            break
    out.reverse()
    return out


# -- the report ----------------------------------------------------------------------------------
def build_report(cfg: AgentConfig, *, day: date | None = None, meter: str | None = None,
                 events: int | None = None, since: float | None = None,
                 now: float | None = None) -> dict[str, Any]:
    """Everything ``lmt ledger`` shows, as JSON types (the ``--json`` document). ReportError
    when there is nothing to read or nothing configured."""
    now = time.time() if now is None else now
    offset = cfg.modes.utc_offset_s
    meters = cfg.ledger_meters()
    if not meters:
        raise ReportError("no-ledger-meters", "the ledger is off in this configuration "
                                              "([ledger] enabled = false): no meter has "
                                              "intervals", code=2)
    if meter is not None and meter not in meters:
        raise ReportError("unknown-meter", f"--meter {meter!r} is not one of the ledger's "
                                           f"meters ({', '.join(meters)}; [ledger] meters)",
                          code=2)
    shown = [meter] if meter is not None else meters
    billing = cfg.control.main_meter if cfg.control.main_meter in meters else None
    day = local_day(now, offset) if day is None else day
    limit = (DEFAULT_EVENTS if since is None else None) if events is None else events
    path = Path(cfg.buffer.path)
    con = open_read_only(path)
    try:
        con.execute("BEGIN")  # one snapshot for all of it
        _check_buffer(con, path)
        ledger_state, ledger_saved = _state(con, "ledger")
        supervisor, supervisor_saved = _state(con, "supervisor")
        parts = [_meter_part(con, m, m == billing, day, offset) for m in shown]
        bills = _bills(con, cfg, billing, day, ledger_state, now)
        last = None
        if billing is not None:
            row = con.execute("SELECT body FROM ledger_intervals WHERE meter = ? ORDER BY start "
                              "DESC LIMIT 1", [billing]).fetchone()
            last = _loads(row[0]) if row else None
        balance = _balance(supervisor, supervisor_saved, ledger_state, last)
        losses = _losses(con, cfg, day, offset, meter)
        recent = _events(con, limit, since, meter, offset)
        con.execute("COMMIT")
    except sqlite3.Error as exc:
        raise ReportError("unreadable", f"cannot read the buffer {path}: {exc}") from None
    finally:
        con.close()
    factor, factor_problem = _factor(cfg)
    carbon_of = next((p for p in parts if p["billing"]), parts[0])
    curve = isinstance(ledger_state, dict) and ledger_state.get("curve") is not None
    d0, d1 = day_bounds(day, offset)
    return {
        "version": REPORT_VERSION, "terminal": cfg.terminal.id, "buffer": str(path),
        "generated_at": now, "utc_offset_s": offset, "day": day.isoformat(),
        "day_start": d0, "day_end": d1, "month": day.isoformat()[:7],
        "billing_meter": billing, "ledger_saved_at": ledger_saved,
        "interval_minutes": cfg.ledger.interval_minutes,
        "meters": parts, "bills": bills, "balance": balance,
        "carbon": {**_carbon(carbon_of, factor, curve), "factor_problem": factor_problem},
        "losses": losses,
        "events": {"types": list(EVENT_TYPES), "since": since, "limit": limit,
                   "kept_h": cfg.buffer.keep_delivered_h, "records": recent},
    }


# -- text ---------------------------------------------------------------------------------------
def _n(x: Any, digits: int, width: int = 0) -> str:
    s = "-" if x is None else f"{x:.{digits}f}"
    return s.rjust(width)


def _money_unit(currency: str | None) -> str:
    return "元" if currency in (None, "CNY") else str(currency)


def _render_meter(p: Mapping[str, Any], report: Mapping[str, Any], out: list[str]) -> None:
    off = report["utc_offset_s"]
    rows = p["intervals"]
    role = " (billing meter)" if p["billing"] else ""
    minutes = rows[0]["minutes"] if rows else report["interval_minutes"]
    out.append(f"{p['meter']}{role}: {len(rows)} interval(s) of {minutes} min on "
               f"{report['day']}")
    if not rows:
        out.append("  no intervals on this day (an interval is kept once it has closed and its "
                   "energy register has been read)")
        return
    out.append("  start     import kWh  mean kW   max kW  period        cost    kgCO2  quality")
    for r in rows:
        period = r["period"] or "-"
        out.append(f"  {_clock(r['start'], off, '%H:%M')}  {_n(r['import_kwh'], 3, 12)}"
                   f" {_n(r['mean_kw'], 2, 8)} {_n(r['max_kw'], 2, 8)}  {period:<11s}"
                   f" {_n(r['cost'], 2, 7)} {_n(r['kgco2'], 3, 8)}  {r['quality']}")
    d = p["day"]
    note = f"  ({d['not_complete']} not complete)" if d["not_complete"] else ""
    out.append(f"  day     {_n(d['import_kwh'], 3, 12)}          {_n(d['max_kw'], 2, 8)}"
               f"  {'':11s} {_n(d['cost'], 2, 7)} {_n(d['kgco2'], 3, 8)}{note}")


def _render_bills(bills: Mapping[str, Any], off: int, out: list[str]) -> None:
    day, month = bills["day"], bills["month"]
    if bills["meter"] is None:
        out.append("bill: none (the main meter, control.main_meter, is not a ledger meter)")
        return
    if bills["tariff"] is None and day is None and month is None:
        out.append("bill: none (no tariff configured: [ledger] tariff; intervals carry no cost)")
        return
    any_bill = day or month
    if any_bill is None:
        out.append(f"bill, {bills['meter']}: none yet for this day or month (a bill starts "
                   "with the day's first closed interval)")
        return
    cur = _money_unit(any_bill.get("currency"))
    out.append(f"bill so far, {bills['meter']} (tariff {any_bill.get('tariff_id')}, "
               f"money in {cur}):")

    def head(b: Mapping[str, Any] | None, kind: str) -> str:
        if b is None:
            return f"{kind}: none".rjust(22)
        state = "final" if b.get("final") else "so far"
        return f"{b['period']} {state}".rjust(22)

    out.append(f"  {'':16s}{head(day, 'day')}  {head(month, 'month')}")
    out.append(f"  {'':16s}{'kWh':>11s}{'cost':>11s}  {'kWh':>11s}{'cost':>11s}")

    def pair(b: Mapping[str, Any] | None, kwh: Any, cost: Any) -> str:
        if b is None:
            return " " * 22
        return f"{_n(kwh, 3, 11)}{_n(cost, 2, 11)}"

    for period in PERIODS:
        dk = (day or {}).get("period_kwh", {}).get(period)
        mk = (month or {}).get("period_kwh", {}).get(period)
        if not dk and not mk:
            continue
        out.append(f"  {period:16s}{pair(day, dk, (day or {}).get('period_cost', {}).get(period))}"
                   f"  {pair(month, mk, (month or {}).get('period_cost', {}).get(period))}")
    for label, key, kwh in (("energy", "energy_cost", "energy_kwh"),
                            ("demand charge", "demand_charge", None),
                            ("fixed charges", "fixed_charges", None),
                            ("total", "total", None)):
        def cell(b: Mapping[str, Any] | None, key: str = key, kwh: str | None = kwh) -> str:
            if b is None:
                return " " * 22
            return (_n(b.get(kwh), 3, 11) if kwh else " " * 11) + _n(b.get(key), 2, 11)
        out.append(f"  {label:16s}{cell(day)}  {cell(month)}")

    def kg(b: Mapping[str, Any] | None) -> str:
        return " " * 22 if b is None else _n(b.get("kgco2"), 3, 11) + " " * 11
    out.append(f"  {'kgCO2':16s}{kg(day)}  {kg(month)}")
    for b in (day, month):
        if b is None:
            continue
        md, price = b.get("max_demand_kw"), b.get("demand_price")
        demand = ""
        if isinstance(md, int | float):
            when = _clock(b.get("max_demand_t"), off, "%m-%d %H:%M")
            demand = f"; max demand {md:.1f} kW (window ending {when})"
            if isinstance(price, int | float):
                share = (f" (a day carries 1/{b.get('days_in_month')})" if b["kind"] == "day"
                         else "")
                demand += f" × {price:g} {cur}/kW a month{share}"
        full = "complete" if b.get("complete") else "not complete"
        src = "" if b.get("source") == "ledger_bills" else ", recomputed from the saved state"
        out.append(f"  {b['kind']} {b['period']}: {b.get('intervals')} interval(s), {full}"
                   f"{demand}{src}")


def _render_balance(b: Mapping[str, Any] | None, off: int, out: list[str]) -> None:
    if b is None:
        out.append("prepaid balance: not known (the agent has not saved its control state yet)")
        return
    unit = "元" if b["unit"] == "yuan" else "kWh"
    if b["left"] is not None:
        line = f"prepaid balance: {b['left']:.2f} {unit} left"
        extra = []
        if b["order_no"]:
            extra.append(f"order {b['order_no']}")
        if b["alarm_at"] is not None and b["enabled"]:
            extra.append(f"alarm at {b['alarm_at']:.2f}")
        if b["trip_at"] is not None and b["enabled"]:
            extra.append(f"trip at {b['trip_at']:.2f}")
        if b["alarm"]:
            extra.append("ALARM ON")
        line += f" ({', '.join(extra)})" if extra else ""
    elif b["enabled"]:
        line = ("prepaid balance: purchase control is on but nothing is counted yet (no order "
                "applied, or the meter not read)")
    else:
        line = "prepaid balance: no purchase control (modes purchase not enabled)"
    out.append(line)
    bits = []
    if b["month_used_kwh"] is not None:
        limit = (f" of {b['month_limit_kwh']:.3f}" if b["month_limit_kwh"] is not None else "")
        bits.append(f"month used {b['month_used_kwh']:.3f}{limit} kWh")
    if b["spent_yuan"] is not None:
        bits.append(f"spent {b['spent_yuan']:.2f} 元 (the ledger's running cost)")
    if b["as_of"] is not None:
        bits.append(f"as of {_clock(b['as_of'], off, '%Y-%m-%d %H:%M:%S')}")
    if bits:
        out.append("  " + "; ".join(bits))


def _render_carbon(c: Mapping[str, Any], out: list[str]) -> None:
    f = c["factor"]
    out.append(f"carbon, {c['meter']}: day {_n(c['day_kgco2'], 3)} kgCO2, month "
               f"{_n(c['month_kgco2'], 3)} kgCO2 (summed from the kept intervals)")
    if f is not None:
        note = f"; {f['note']}" if f.get("note") else ""
        out.append(f"  factor {f['id']}: {f['kg_per_kwh']:g} kgCO2/kWh (data year {f['year']}"
                   f"{note})")
    elif c.get("factor_problem"):
        out.append(f"  factor: cannot be read ({c['factor_problem']})")
    used = [u for u in c["factors_used"] if f is None or u != f["id"]]
    if used or c["curve"]:
        out.append(f"  the day's intervals used {', '.join(c['factors_used']) or '-'}"
                   + (" (an hourly curve pushed by the platform)" if c["curve"] else ""))
    if c["day_kg_per_kwh"] is not None:
        out.append(f"  the day's mean: {c['day_kg_per_kwh']:g} kgCO2/kWh")


def _describe_event(ev: Mapping[str, Any]) -> str:
    d = _obj(ev, "data")
    t = ev["type"]
    if t in ("loss_exceeded", "loss_cleared"):
        pct = d.get("loss_pct")
        limits = _obj(d, "limits")
        lim = (f", limit {limits.get('relative_pct')} %" if limits.get("method") == "relative"
               else f", limit {limits.get('absolute_kwh')} kWh" if limits else "")
        return (f"group {d.get('group')}: loss {_n(d.get('loss_kwh'), 3)} kWh"
                f" ({_n(pct, 2)} %) of {_n(d.get('main_kwh'), 3)} kWh on {d.get('main')}{lim}")
    if t.startswith("theft_indicator"):
        phase = f" on {d['phase']}" if d.get("phase") else ""
        erc = f" ({d['erc']})" if d.get("erc") else ""
        dur = (f", lasted {d['duration_s']:.0f} s" if isinstance(d.get("duration_s"), int | float)
               else "")
        return f"{d.get('meter')}: {d.get('indicator')}{phase}{erc}{dur}"
    if t == "balance_low":
        unit = "元" if d.get("unit") == "yuan" else "kWh"
        return f"{_n(d.get('left'), 2)} {unit} left (alarm {d.get('alarm')}, trip {d.get('trip')})"
    return str(d.get("detail", ""))


def render_text(report: Mapping[str, Any]) -> str:
    off = report["utc_offset_s"]
    out = [f"{report['terminal']}: ledger of {report['day']} ({offset_label(off)}), buffer "
           f"{report['buffer']}",
           f"  as of {_clock(report['generated_at'], off, '%Y-%m-%d %H:%M:%S')}; ledger saved "
           f"{_clock(report['ledger_saved_at'], off, '%Y-%m-%d %H:%M:%S')}", ""]
    for p in report["meters"]:
        _render_meter(p, report, out)
        out.append("")
    _render_bills(report["bills"], off, out)
    out.append("")
    _render_balance(report["balance"], off, out)
    out.append("")
    _render_carbon(report["carbon"], out)
    if report["losses"]:
        out.append("")
    for g in report["losses"]:
        state = {True: "alarm on", False: "no alarm", None: "not judged yet"}[g["active"]]
        out.append(f"losses, group {g['group']} ({g['main']} against "
                   f"{', '.join(g['subs'])}): {g['judged']} of {g['intervals']} interval(s) "
                   f"judged, {g['over']} over the limit; loss {_n(g['loss_kwh'], 3)} kWh "
                   f"({_n(g['loss_pct'], 2)} %) of {_n(g['main_kwh'], 3)} kWh; {state}")
    out.append("")
    ev = report["events"]
    recs = ev["records"]
    since = f" since {_clock(ev['since'], off, '%Y-%m-%d %H:%M:%S')}" if ev["since"] else ""
    if ev["limit"] == 0:
        out.append("loss, theft and balance events: not shown (--events 0)")
    elif not recs:
        out.append(f"loss, theft and balance events{since}: none in the buffer (it keeps "
                   f"delivered events {ev['kept_h']:g} h: buffer.keep_delivered_h)")
    else:
        which = f"the last {len(recs)}" if ev["limit"] is not None else str(len(recs))
        out.append(f"loss, theft and balance events{since} ({which}):")
        width = max(len(r["type"]) for r in recs)
        for r in recs:
            out.append(f"  {_clock(r['ts'], off, '%Y-%m-%d %H:%M:%S')}  {r['type']:<{width}s}  "
                       f"{_describe_event(r)}")
    return "\n".join(line.rstrip() for line in out).rstrip() + "\n"


# -- the command ----------------------------------------------------------------------------------
def run_cli(args: Any) -> int:
    from lmt.config import ConfigError, load_agent_config

    def fail(kind: str, message: str, code: int) -> int:
        print(f"lmt ledger: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"kind": kind, "message": message}}))
        return code

    try:
        cfg = load_agent_config(args.config)
    except ConfigError as exc:
        return fail("config", f"configuration error\n{exc}", 2)
    try:
        since = None if args.since is None else parse_since(args.since, cfg.modes.utc_offset_s)
        report = build_report(cfg, day=args.day, meter=args.meter, events=args.events,
                              since=since)
    except ValueError as exc:
        return fail("usage", str(exc), 2)
    except ReportError as exc:
        return fail(exc.kind, str(exc), exc.code)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        sys.stdout.write(render_text(report))
    return 0
