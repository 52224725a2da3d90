"""A pure test rig for the supervisor: a site model, a clock and a persisted state, no I/O.

Each :meth:`Rig.cycle` is one control cycle the way the agent runs it: the meter and the
relays are read from the model, ``step`` decides, its state is saved (as JSON, the way the
state store keeps it) *before* the actions are carried out on the model, then ``outcome``
folds the writes back in and the state is saved again. :meth:`Rig.crash` restarts from the
last saved state, as after a SIGKILL (the model — the relays — keeps its state).

The site model: ``base_kw`` plus the rated kW of every on/off load that is on and the rated kW
× setpoint of every adjustable load. Faults: ``fail`` (writes to these loads fail), ``dead``
(these loads switch but draw their rated kW whatever: a mis-wired relay), ``frozen`` (the
meter answers this value whatever the site draws).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmt.control.cap import LoadSpec
from lmt.control.supervisor import (
    Action,
    Done,
    Inputs,
    LoadConfig,
    OptOut,
    Record,
    Request,
    SupervisorConfig,
    SupervisorState,
    outcome,
    step,
)

WALL0 = 1_780_000_000.0  # 2026-05-28, a Thursday


def load(name: str, kw: float, priority: int, **kwargs: Any) -> LoadConfig:
    extra = {k: kwargs.pop(k) for k in ("full_scale", "round", "rewrite_s") if k in kwargs}
    return LoadConfig(LoadSpec(name, kw, priority, **kwargs), "relays", name, **extra)


# A small commercial site: 87 kW of loads, 15 of them critical.
SITE = (
    load("ev", 22.0, 10),
    load("heater", 12.0, 20),
    load("chiller", 30.0, 40),
    load("lighting", 8.0, 60),
    load("servers", 15.0, 100, critical=True),
)


def config(loads: Sequence[LoadConfig] = SITE, **kwargs: Any) -> SupervisorConfig:
    kw: dict[str, Any] = {"margin_kw": 1.0, "hysteresis_kw": 2.0, "min_off_s": 5.0,
                          "min_on_s": 5.0, "restore_step_kw": 50.0, "baseline_window_s": 30.0}
    kw.update(kwargs)
    return SupervisorConfig("rig-0001", tuple(loads), **kw)


@dataclass
class Log:
    """What one cycle did: the writes (``"shed ev"``, ``"restore ev"``, ``"set ev 50.0"``) and
    the records (events and results) of ``step`` and ``outcome`` together."""

    actions: list[Action]
    records: list[Record]
    site_kw: float | None

    @property
    def switches(self) -> list[str]:
        out = []
        for a in self.actions:
            name = a.reason.split()[1] if a.reason.split()[0] in ("shed", "restore") else ""
            out.append(f"{a.kind} {name}" if a.kind != "set" else f"set {a.pct:.1f}")
        return out

    def names(self, cfg: SupervisorConfig) -> list[str]:
        return [f"{a.kind} {cfg.loads[a.load].name}" + (f" {a.pct:.1f}" if a.kind == "set" else "")
                for a in self.actions if not a.quiet]

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        return [r.body for r in self.records if r.stream == "events"
                and (type_ is None or r.body["type"] == type_)]

    def results(self, status: str | None = None) -> list[dict[str, Any]]:
        return [r.body for r in self.records if r.stream == "results"
                and (status is None or r.body["status"] == status)]

    @property
    def kinds(self) -> list[str]:
        return [r.body["type"] if r.stream == "events" else r.body["status"] for r in self.records]


@dataclass
class Rig:
    cfg: SupervisorConfig
    base_kw: float = 100.0
    state: SupervisorState | None = None
    saved: str | None = None  # the last persisted state, as JSON text
    on: dict[str, bool] = field(default_factory=dict)
    pct: dict[str, float] = field(default_factory=dict)
    t: float = 0.0
    wall: float = WALL0
    session: int = 1
    fail: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    frozen: float | None = None
    history: list[Log] = field(default_factory=list)
    saves: int = 0

    def __post_init__(self) -> None:
        for lc in self.cfg.loads:
            self.on.setdefault(lc.name, True)
            if lc.spec.adjustable:
                self.pct.setdefault(lc.name, 100.0)

    # -- the model --
    def true_kw(self) -> float:
        kw = self.base_kw
        for lc in self.cfg.loads:
            if lc.spec.adjustable:
                kw += lc.spec.rated_kw * (100.0 if lc.name in self.dead
                                          else self.pct[lc.name]) / 100.0
            elif self.on[lc.name] or lc.name in self.dead:
                kw += lc.spec.rated_kw
        return kw

    def meter_kw(self) -> float:
        return self.true_kw() if self.frozen is None else self.frozen

    def read_loads(self) -> list[float | bool | None]:
        return [self.pct[lc.name] / 100.0 * lc.full_scale if lc.spec.adjustable
                else self.on[lc.name] for lc in self.cfg.loads]

    def carry_out(self, actions: Sequence[Action]) -> list[Done]:
        done = []
        for a in actions:
            name = self.cfg.loads[a.load].name
            if name in self.fail:
                done.append(Done(a, f"{name}: no answer within 1 s"))
                continue
            if a.kind == "set":
                assert a.pct is not None
                self.pct[name] = a.pct
            else:
                self.on[name] = a.kind == "restore"
            done.append(Done(a))
        return done

    # -- persistence, as the state store does it --
    def persist(self, state: SupervisorState) -> None:
        self.saved = json.dumps(state.to_dict(), separators=(",", ":"))
        self.saves += 1

    def crash(self) -> None:
        """SIGKILL and a restart: the state is the one last persisted; a new session."""
        self.state = None if self.saved is None else \
            SupervisorState.from_dict(json.loads(self.saved))
        self.session += 1

    # -- one cycle --
    def cycle(self, requests: Sequence[Request] = (), dt: float = 1.0, fresh: bool = True,
              optouts: Sequence[OptOut] = (), stopping: bool = False, contact: bool = True,
              crash_before_actuation: bool = False, wall_step: float = 0.0,
              import_kwh: float | None = None, loads_read: bool = True,
              loads: list[float | bool | None] | None = None,
              loads_age_s: list[float | None] | None = None) -> Log:
        self.t += dt
        self.wall += dt + wall_step
        site = self.meter_kw() if fresh else None
        inp = Inputs(now=self.wall, mono=self.t, session=f"s{self.session}", site_kw=site,
                     recent_kw=self.meter_kw(), import_kwh=import_kwh,
                     loads=loads if loads is not None else self.read_loads() if loads_read
                     else [None] * len(self.cfg.loads), loads_age_s=loads_age_s or (),
                     requests=tuple(requests), optouts=tuple(optouts), contact=contact,
                     stopping=stopping)
        before = None if self.state is None else json.dumps(self.state.to_dict())
        state, actions, records = step(self.cfg, self.state, inp)
        if self.state is not None:
            assert json.dumps(self.state.to_dict()) == before, "step changed its argument"
        self.persist(state)  # persist, then actuate
        if crash_before_actuation:
            self.crash()
            log = Log(list(actions), list(records), site)
            self.history.append(log)
            return log
        done = self.carry_out(actions)
        before = json.dumps(state.to_dict())
        stepped = state
        state, more = outcome(self.cfg, state, done, self.wall)
        assert json.dumps(stepped.to_dict()) == before, "outcome changed its argument"
        self.persist(state)
        self.state = state
        log = Log(list(actions), [*records, *more], site)
        self.history.append(log)
        return log

    def run(self, n: int, **kwargs: Any) -> list[Log]:
        return [self.cycle(**kwargs) for _ in range(n)]

    def held(self) -> list[str]:
        assert self.state is not None
        return sorted(n for n, ld in self.state.loads.items() if ld.held)

    def off(self) -> list[str]:
        return sorted(n for n, v in self.on.items() if not v)
