"""The ledger at the edge: feeds the meters' readings to :mod:`lmt.analytics.ledger`, keeps
what it returns.

Every cycle, each ledger meter read since the last cycle becomes a
:class:`~lmt.analytics.sample.Sample` (its points found by name in its profile, W and Wh
turned into kW and kWh) and goes through the pure ledger. What comes back is written in one
transaction with the ledger's state: the interval records into the table
``ledger_intervals`` (kept ``ledger.keep_days``, one row per meter and start: an interval is
never kept or published twice) and the outbox's ``intervals`` stream, bills into
``ledger_bills`` and the ``bills`` stream, events into ``events``. The state is saved with
every such write and at least every ``ledger.save_every_s`` (5 minutes), so a restart resumes
the open interval (its register energy exactly; its statistics since the last save are lost).

After an interval boundary the ledger meters' energy registers are read at once (they are
slow points): the interval closes within a cycle or two instead of a minute.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic_core

from lmt.analytics.carbon import SelectedFactor, parse_factors, select_factor
from lmt.analytics.intervals import IntervalConfig, MeterSpec
from lmt.analytics.ledger import (
    LedgerConfig,
    LedgerState,
    Record,
    feed_cycle,
    running_yuan,
    set_curve,
    set_tariff,
)
from lmt.analytics.losses import LossGroup
from lmt.analytics.sample import Sample
from lmt.analytics.tariff import HolidayCalendar, Tariff, parse_calendar, parse_tariff
from lmt.analytics.theft import TheftConfig
from lmt.config.agent import AgentConfig
from lmt.config.errors import ConfigError
from lmt.config.profiles import Profile

from .buffer import BufferFile
from .commands import LedgerRequest
from .messages import event_body, result_body, validate_body
from .outbox import Outbox
from .state_store import StateStore, dumps

log = logging.getLogger("lmt.agent.ledger")

PRUNE_EVERY_S = 3600.0

LEDGER_DDL = (
    "CREATE TABLE IF NOT EXISTS ledger_intervals (meter TEXT NOT NULL, start REAL NOT NULL, "
    "end REAL NOT NULL, quality TEXT NOT NULL, import_kwh REAL, body TEXT NOT NULL, "
    "PRIMARY KEY (meter, start)) STRICT, WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS ledger_bills (meter TEXT NOT NULL, kind TEXT NOT NULL, "
    "label TEXT NOT NULL, final INTEGER NOT NULL, body TEXT NOT NULL, "
    "PRIMARY KEY (meter, kind, label)) STRICT",
)
# The meters of ledger_intervals along its key, without reading the table (a skip-scan).
_METERS = ("WITH RECURSIVE m(meter) AS (SELECT MIN(meter) FROM ledger_intervals UNION ALL "
           "SELECT (SELECT MIN(meter) FROM ledger_intervals WHERE meter > m.meter) FROM m "
           "WHERE m.meter IS NOT NULL) SELECT meter FROM m WHERE meter IS NOT NULL")
#: Tables moved from memory into the file when a full disk has room again.
LEDGER_TABLES = ("ledger_intervals", "ledger_bills")

_ENERGY = {"kWh": 1.0, "Wh": 0.001}
_POWER = {"kW": 1.0, "W": 0.001}


@dataclass(frozen=True)
class Points:
    """Where a meter's ledger quantities are in its readings: (point, multiplier) each."""

    imports: tuple[tuple[str, float], ...]  # summed: the total, or the phases' registers
    exports: tuple[tuple[str, float], ...]
    power: tuple[tuple[str, float], ...]  # summed: the total, or the phases
    voltage: tuple[str | None, str | None, str | None]
    current: tuple[str | None, str | None, str | None]
    phase_power: tuple[tuple[str, float] | None, ...]
    power_factor: tuple[str, ...]  # the total, or the phases' (averaged)
    counters: tuple[tuple[str, str], ...]  # (counter name, point)

    @property
    def slow(self) -> tuple[str, ...]:
        """The energy points (read at once after a boundary)."""
        return tuple(p for p, _ in (*self.imports, *self.exports))


def _find(profile: Profile, base: str, units: Mapping[str, float]) -> tuple[str, float] | None:
    """The point ``base`` in one of ``units`` (the unit is in the name: ``power_w``), with the
    multiplier to kW or kWh."""
    for unit, k in units.items():
        name = f"{base}_{unit.lower()}"
        if profile.has_point(name):
            return name, k
    return None


def _total(profile: Profile, base: str, units: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """The total point (``import_energy_kwh``), or else the phases' (``import_energy_l1_kwh``,
    a single-phase meter's only register), summed."""
    total = _find(profile, base, units)
    if total is not None:
        return (total,)
    phases = (_find(profile, f"{base}_l{i}", units) for i in (1, 2, 3))
    return tuple(p for p in phases if p is not None)


def meter_points(profile: Profile) -> Points:
    def named(name: str) -> str | None:
        return name if profile.has_point(name) else None

    phase_power = tuple(_find(profile, f"power_l{i}", _POWER) for i in (1, 2, 3))
    return Points(
        imports=_total(profile, "import_energy", _ENERGY),
        exports=_total(profile, "export_energy", _ENERGY),
        power=_total(profile, "power", _POWER),
        voltage=(named("voltage_l1_v"), named("voltage_l2_v"), named("voltage_l3_v")),
        current=(named("current_l1_a"), named("current_l2_a"), named("current_l3_a")),
        phase_power=phase_power,
        power_factor=("power_factor",) if profile.has_point("power_factor") else tuple(
            n for i in (1, 2, 3) if profile.has_point(n := f"power_factor_l{i}")),
        counters=tuple((p.name.removeprefix("event_").removesuffix("_count"), p.name)
                       for p in profile.points
                       if p.name.startswith("event_") and p.name.endswith("_count")),
    )


def _num(values: Mapping[str, Any], name: str | None, k: float = 1.0) -> float | None:
    """The point's value × ``k`` as a finite float, or None (missing, not a number, a bool)."""
    if name is None:
        return None
    v = values.get(name)
    if v.__class__ is not float:  # the usual case first: a decoded float
        if v is None or isinstance(v, bool) or not isinstance(v, int | float):
            return None
        v = float(v)
    x = v * k
    return x if x - x == 0.0 else None  # NaN and infinities are not


def _sum(values: Mapping[str, Any], points: tuple[tuple[str, float], ...]) -> float | None:
    if not points:
        return None
    total = 0.0
    for name, k in points:
        x = _num(values, name, k)
        if x is None:
            return None
        total += x
    return total


def _mean(values: Mapping[str, Any], names: tuple[str, ...]) -> float | None:
    got = [x for n in names if (x := _num(values, n)) is not None]
    return sum(got) / len(got) if got else None


_NONE: Mapping[str, int] = {}


def _phases(values: Mapping[str, Any], points: tuple[tuple[str, float] | None, ...]
            ) -> tuple[float | None, float | None, float | None]:
    p0, p1, p2 = points
    return (None if p0 is None else _num(values, p0[0], p0[1]),
            None if p1 is None else _num(values, p1[0], p1[1]),
            None if p2 is None else _num(values, p2[0], p2[1]))


def to_sample(points: Points, values: Mapping[str, Any], t: float, mono: float) -> Sample:
    return Sample(
        t=t, mono=mono,
        import_kwh=_sum(values, points.imports), export_kwh=_sum(values, points.exports),
        power_kw=_sum(values, points.power),
        voltage_v=(_num(values, points.voltage[0]), _num(values, points.voltage[1]),
                   _num(values, points.voltage[2])),
        current_a=(_num(values, points.current[0]), _num(values, points.current[1]),
                   _num(values, points.current[2])),
        phase_kw=_phases(values, points.phase_power),
        power_factor=_mean(values, points.power_factor),
        counters={c: int(x) for c, name in points.counters
                  if (x := _num(values, name)) is not None} if points.counters else _NONE)


TARIFFS = Path(__file__).resolve().parent.parent / "config" / "tariffs"
LEDGER_DATA = Path(__file__).resolve().parent.parent / "config" / "ledger_data"


def _shipped(package: str, folder: Path, name: str) -> Path:
    """A shipped data file by id (``lmt.config.tariffs``: ``jiangsu-2025-two-part``) or the
    file ``name`` names (a ``.toml`` path, resolved by the configuration)."""
    if name.endswith(".toml"):
        return Path(name)
    try:
        found = Path(str(resources.files(package).joinpath(f"{name}.toml")))
    except (ModuleNotFoundError, TypeError):
        found = folder / f"{name}.toml"
    return found


def shipped_ids(package: str) -> list[str]:
    try:
        files = resources.files(package).iterdir()
        return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))
    except (ModuleNotFoundError, TypeError):
        return []


def _read_toml(path: Path, key: str, known: list[str]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(path, [(key, "no such file" + (f" (shipped: {', '.join(known)})"
                                                         if known else ""))])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(path, [("", f"not a readable TOML file: {exc}")]) from None


def load_tariff_file(name: str) -> Tariff:
    """A tariff by shipped id or file; ``ConfigError`` naming the file and the key."""
    path = _shipped("lmt.config.tariffs", TARIFFS, name)
    data = _read_toml(path, "ledger.tariff", shipped_ids("lmt.config.tariffs"))
    try:
        return parse_tariff(data)
    except ValueError as exc:
        raise ConfigError(path, [("", str(exc))]) from None


def load_calendar_file(name: str) -> HolidayCalendar:
    path = _shipped("lmt.config.ledger_data", LEDGER_DATA, name)
    data = _read_toml(path, "ledger.holidays", [])
    try:
        return parse_calendar(data)
    except ValueError as exc:
        raise ConfigError(path, [("", str(exc))]) from None


def load_factor(cfg: AgentConfig) -> SelectedFactor:
    c = cfg.ledger.carbon
    path = c.factors_file or _shipped("lmt.config.ledger_data", LEDGER_DATA, "emission_factors")
    data = _read_toml(path, "ledger.carbon.factors_file", [])
    try:
        table = parse_factors(data)
    except ValueError as exc:
        raise ConfigError(path, [("", str(exc))]) from None
    try:
        return select_factor(table, c.year, c.scope, c.region)
    except ValueError as exc:
        raise ConfigError("[ledger.carbon]", [("ledger.carbon", str(exc))]) from None


def theft_config(cfg: AgentConfig) -> TheftConfig | None:
    th = cfg.ledger.theft
    if not th.enabled:
        return None
    base = TheftConfig(nominal_voltage_v=th.nominal_voltage_v, base_current_a=th.base_current_a,
                       registered_generation=th.generation, rated_max_kw=th.rated_max_kw).to_dict()
    for name, overrides in th.detectors.items():
        if name not in base or not isinstance(base[name], dict):
            known = sorted(k for k, v in base.items() if isinstance(v, dict))
            raise ConfigError("[ledger.theft]", [(f"ledger.theft.detectors.{name}",
                                                  f"no such detector (known: {', '.join(known)})")])
        base[name] = {**base[name], **overrides}
    try:
        return TheftConfig.from_dict(base)
    except ValueError as exc:
        raise ConfigError("[ledger.theft]", [("ledger.theft.detectors", str(exc))]) from None


def ledger_config(cfg: AgentConfig, profiles: Mapping[str, Profile]) -> tuple[LedgerConfig,
                                                                              dict[str, Points]]:
    """The pure ledger's configuration, with its data files read; ``ConfigError`` naming the
    file and key of a bad one."""
    lg = cfg.ledger
    points = {name: meter_points(profiles[name]) for name in cfg.ledger_meters()}
    specs = tuple(MeterSpec(name, has_import=bool(p.imports), has_export=bool(p.exports),
                            register_max_kwh=_register_range(profiles[name]),
                            resolution_kwh=register_digit(profiles[name], p))
                  for name, p in points.items())
    intervals = IntervalConfig(minutes=lg.interval_minutes, demand_minutes=lg.demand_minutes,
                               demand_mode=lg.demand_mode, utc_offset_s=cfg.modes.utc_offset_s,
                               register_wait_s=lg.register_wait_s,
                               cover_gap_s=max(10.0, 3.0 * cfg.poll.interval_s))
    groups = tuple(LossGroup(name=g.name, main=g.main, subs=tuple(g.subs), method=g.method,
                             relative_limit_pct=g.relative_limit_pct,
                             absolute_limit_kwh=g.absolute_limit_kwh,
                             min_main_kwh=g.min_main_kwh, raise_after=g.raise_after,
                             clear_after=g.clear_after) for g in lg.loss_groups)
    billing = cfg.control.main_meter if cfg.control.main_meter in points else None
    return LedgerConfig(
        intervals=intervals, meters=specs, billing_meter=billing,
        tariff=load_tariff_file(lg.tariff) if lg.tariff else None,
        calendar=load_calendar_file(lg.holidays), factor=load_factor(cfg),
        theft=theft_config(cfg), loss_groups=groups), points


def register_digit(profile: Profile, points: Points) -> float:
    """The import register's step in kWh: a DL/T 645 ``XXXXXX.XX`` counts in 0.01, an integer
    register in its multiplier (an EM24's kWh × 10: 0.1; Wh: 0.001), a float32 (an SDM630)
    finer than a watt-hour until far beyond a site's yearly energy (0.001 here)."""
    digit = 0.001
    for name, k in points.imports:
        pt = profile.point(name)
        if profile.protocol == "dlt645":
            step = 10.0 ** -pt.dlt_decimals * pt.multiplier * k
        elif pt.type is not None and pt.type.value.startswith("float"):
            step = 0.001
        else:
            step = abs(pt.multiplier) * k
        digit = max(digit, step)
    return digit


def _register_range(profile: Profile) -> float:
    """Where the import register rolls over: a DL/T 645 XXXXXX.XX register at 10^6 kWh; a
    float or 32-bit register practically never (10^9)."""
    return 1_000_000.0 if profile.protocol == "dlt645" else 1_000_000_000.0


def _json(value: Any) -> str:
    """Compact JSON of the ledger's state (pydantic's encoder: a quarter of ``json.dumps``'s
    time for the state of 50 meters)."""
    return pydantic_core.to_json(value).decode()


class LedgerSize:
    """About how many bytes of the buffer file the ledger's interval table takes: the
    outbox's disk cap leaves them out (the ledger's size is ``keep_days`` × its meters, not
    a backlog). Kept in the file (the ``state`` row ``ledger_bytes``) in the transactions that
    change the table: a start reads one row, not the table. Measured from the table only when
    the row is missing (a file from an older agent) or ``remeasure`` asks for it."""

    OVERHEAD = 1.25  # file bytes per body byte: keys, columns, B-tree pages
    KEY = "ledger_bytes"

    def __init__(self, file: BufferFile, remeasure: bool = False) -> None:
        self.file = file
        row = file.db.execute("SELECT value FROM state WHERE key = ?", [self.KEY]).fetchone()
        self.bytes = 0.0
        if row is None or remeasure:
            self.measure()
        else:
            try:
                self.bytes = float(row[0])
            except ValueError:
                self.measure()

    def measure(self) -> None:
        """From the table itself (reads all of it), and kept."""
        db = self.file.db
        self.bytes = 0.0
        if db.table("ledger_intervals").exists():
            row = db.execute("SELECT COALESCE(SUM(length(body)), 0) FROM ledger_intervals"
                             ).fetchone()
            self.bytes = float(row[0]) * self.OVERHEAD
        self.save()

    def add(self, body_bytes: int) -> None:
        self.bytes = max(0.0, self.bytes + body_bytes * self.OVERHEAD)

    def save(self) -> None:
        """Keep the figure (in the caller's transaction, if there is one)."""
        with self.file.atomic():
            self.file.db.execute("INSERT OR REPLACE INTO state(key, value, saved_at) "
                                 "VALUES (?, ?, 0)", [self.KEY, repr(self.bytes)])

    def __call__(self) -> int:
        return int(self.bytes)


class LedgerRunner:
    """Feeds the ledger every cycle and keeps what it returns."""

    def __init__(self, cfg: AgentConfig, profiles: Mapping[str, Profile], file: BufferFile,
                 outbox: Outbox, store: StateStore, session: str,
                 append: Callable[[str, list[dict[str, Any]]], None],
                 size: LedgerSize | None = None) -> None:
        self.size = size
        self.cfg = cfg
        self.config, self.points = ledger_config(cfg, profiles)
        self.session = session
        self.append = append
        self.bind(file, outbox, store)
        self.state = self._load()
        self._fed: dict[str, float] = {}  # the monotonic time of each meter's reading fed last
        self._values: dict[str, Mapping[str, Any]] = {}  # each meter's values as fed last
        self._asked: dict[str, float] = {}  # the interval whose end had its registers read
        self._asking: set[str] = set()  # meters whose registers were asked for since fed
        self._saved_at = -math.inf
        self._pruned_at = -math.inf
        self._dirty = False

    def bind(self, file: BufferFile, outbox: Outbox, store: StateStore) -> None:
        """Use this buffer (at start, and when a full disk has room again)."""
        self.file, self.outbox, self.store = file, outbox, store
        with file.atomic():
            for ddl in LEDGER_DDL:
                file.db.execute(ddl)

    def _load(self) -> LedgerState:
        try:
            raw = self.store.load("ledger")
            if raw is None:
                return LedgerState()
            state = LedgerState.from_dict(raw)
        except ValueError as exc:
            log.error("ledger state unreadable (%s): the open intervals start afresh", exc)
            return LedgerState()
        known = {m.name for m in self.config.meters}
        # the meters no longer configured go; the rest (bills so far, loss groups, theft
        # conditions, the tariff commands, the running cost) carries on
        return replace(state, meters={k: v for k, v in state.meters.items() if k in known})

    @property
    def meters(self) -> list[str]:
        return list(self.points)

    def energy_points(self) -> dict[str, tuple[str, ...]]:
        """Per meter, the energy points to read now: an interval ended and waits for them
        (asked once per interval end)."""
        due: dict[str, tuple[str, ...]] = {}
        for name, ml in self.state.meters.items():
            if ml.pending and name in self.points and self._asked.get(name) != ml.pending[-1].start:
                self._asked[name] = ml.pending[-1].start
                self._asking.add(name)
                due[name] = self.points[name].slow
        return due

    @property
    def spent_yuan(self) -> float | None:
        """What the billing meter's import has cost so far (None without a tariff): a purchase
        order in money counts down with it."""
        if self.config.tariff is None and self.state.tariffs is None:
            return None
        return running_yuan(self.state)

    def on_cycle(self, latest: Mapping[str, tuple[float, Mapping[str, Any]]], now: float,
                 mono: float, balance: Mapping[str, Any] | None = None) -> list[Record]:
        """Feed every ledger meter read since the last cycle; keep and publish what comes.
        ``balance``: the prepaid balance as control has it, put into the billing meter's
        interval records."""
        readings: list[tuple[str, Sample]] = []
        for name, points in self.points.items():
            got = latest.get(name)
            if got is None or got[0] == self._fed.get(name):
                continue
            at, values = got
            self._fed[name] = at
            readings.append((name, to_sample(points, self._read_now(name, points, values),
                                             now - (mono - at), at)))
        if not readings:
            return []
        state, records = feed_cycle(self.config, self.state, readings, self.session)
        if balance is not None:
            for r in records:
                if r.stream == "intervals" and r.body.get("meter") == self.config.billing_meter:
                    r.body["balance"] = dict(balance)
        if state is not self.state:
            self._dirty = True
        self.state = state
        if records or (self._dirty and mono - self._saved_at >= self.cfg.ledger.save_every_s):
            self._commit(records, now, mono)
        if mono - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = mono
            self.prune(now)
        return records

    def _read_now(self, name: str, points: Points, values: Mapping[str, Any]
                  ) -> Mapping[str, Any]:
        """The reading without the energy registers it did not read itself.

        The poller's latest values merge each read into the ones before, so a slow point not
        read this time (energy registers: once a minute) still has the value read then: fed
        with every later reading's time, a register would seem to stand still and then jump,
        each boundary would take it at the wrong moment, and the theft detectors would see a
        register that stops and races. A point not read again is the very object it was
        (a read decodes new ones); a register asked for after a boundary is read in the next
        reading."""
        prev = self._values.get(name)
        self._values[name] = values
        asked = name in self._asking
        self._asking.discard(name)
        if prev is None or asked:
            return values
        stale = {p for p in points.slow if p in values and values[p] is prev.get(p)}
        return {k: v for k, v in values.items() if k not in stale} if stale else values

    def _commit(self, records: list[Record], now: float, mono: float) -> None:
        db = self.file.db
        by_stream: dict[str, list[dict[str, Any]]] = {}
        with self.outbox.transaction():
            self.store.save_text("ledger", _json(self.state.to_dict()), now)
            for r in records:
                body = validate_body(r.stream, r.body)
                if r.stream == "intervals" and body.get("kind") == "meter":
                    text = dumps(body)
                    cur = db.execute(
                        "INSERT OR IGNORE INTO ledger_intervals(meter, start, end, quality, "
                        "import_kwh, body) VALUES (?, ?, ?, ?, ?, ?)",
                        [body["meter"], body["start"], body["end"], body["quality"],
                         body["import_kwh"], text])
                    if self.size is not None and cur.rowcount:
                        self.size.add(len(text))
                    if cur.rowcount == 0:
                        log.warning("interval %s %s already kept: not published again",
                                    body["meter"], body["start"])
                        continue
                elif r.stream == "intervals":  # a loss group's figures
                    db.execute("INSERT OR REPLACE INTO ledger_intervals(meter, start, end, "
                               "quality, import_kwh, body) VALUES (?, ?, ?, ?, ?, ?)",
                               [f"loss:{body['group']}", body["start"], body["end"],
                                body["status"], body.get("loss_kwh"), dumps(body)])
                elif r.stream == "bills":
                    db.execute("INSERT OR REPLACE INTO ledger_bills(meter, kind, label, final, "
                               "body) VALUES (?, ?, ?, ?, ?)",
                               [body["meter"], body["kind"], body["label"],
                                int(bool(body.get("final"))), dumps(body)])
                if r.publish:
                    by_stream.setdefault(r.stream, []).append(body)
            for stream, bodies in by_stream.items():
                self.append(stream, bodies)
            if self.size is not None and "intervals" in by_stream:
                self.size.save()
        self._saved_at, self._dirty = mono, False

    def command(self, req: LedgerRequest, now: float, mono: float,
                seen: list[tuple[str, float, float]]) -> None:
        """A verified ``tariff`` or ``carbon_curve`` command: applied and answered (accepted,
        completed; or rejected ``invalid`` with the reason, changing nothing), its id
        remembered, in one transaction with the ledger's state."""
        results: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        try:
            if req.kind == "tariff":
                tariff = parse_tariff(req.payload)
                at = float(req.effective_from or now)
                state = set_tariff(self.config, self.state, tariff, at)
                detail = f"tariff {tariff.id} ({tariff.notice}) prices the intervals from {at:.0f}"
                events.append(event_body("tariff_changed", now, {
                    "command_id": req.id, "tariff": tariff.id, "notice": tariff.notice,
                    "effective_from": at}))
            else:
                state = set_curve(self.state, req.payload)
                curve = state.curve
                detail = (f"carbon curve {curve['id']}: {len(curve['kg_per_kwh'])} hours from "
                          f"{curve['start']}")
                events.append(event_body("carbon_curve_changed", now, {
                    "command_id": req.id, "curve": curve["id"], "start": curve["start"],
                    "hours": len(curve["kg_per_kwh"])}))
        except ValueError as exc:
            log.info("command %s: rejected (invalid): %s", req.id, exc)
            results.append(result_body(req.id, "rejected", now, "invalid", str(exc)))
            state = self.state
        else:
            log.info("command %s: %s", req.id, detail)
            results += [result_body(req.id, "accepted", now, detail=detail),
                        result_body(req.id, "completed", now, detail=detail)]
        self.state = state
        with self.outbox.transaction():
            self.store.save_text("ledger", _json(self.state.to_dict()), now)
            self.store.remember_commands(seen)
            self.append("results", results)
            if events:
                self.append("events", events)
        self._saved_at, self._dirty = mono, False

    def save(self, now: float, mono: float) -> None:
        """Save the state now (the agent stops)."""
        if self._dirty:
            self._commit([], now, mono)

    def prune(self, now: float) -> int:
        """Remove the intervals older than ``ledger.keep_days`` (meter by meter: the primary
        key's order, no scan of the table)."""
        cutoff = now - self.cfg.ledger.keep_days * 86400.0 - 3600.0
        db = self.file.db
        n = 0
        with self.file.atomic():
            for (meter,) in db.execute(_METERS).fetchall():  # also one no longer configured
                if self.size is not None:
                    gone = db.execute("SELECT COALESCE(SUM(length(body)), 0) FROM "
                                      "ledger_intervals WHERE meter = ? AND start < ?",
                                      [meter, cutoff]).fetchone()[0]
                    self.size.add(-int(gone))
                n += db.execute("DELETE FROM ledger_intervals WHERE meter = ? AND start < ?",
                                [meter, cutoff]).rowcount
            if n and self.size is not None:
                self.size.save()
        if n:
            log.info("ledger: %d intervals older than %d days removed", n,
                     self.cfg.ledger.keep_days)
        return int(n)
