"""Tests of the cap-site-import decision (``lmt.control.cap``), written as cycle tables.

Each table steps one simulated site through time. A row is
``(site_kw, now_s, expected shed names, expected restore names)``: the site model
(``site_kw = base(now_s) + sum of rated_kw of the loads that are on``) must produce
the row's ``site_kw`` from the state left by the previous rows, then the decision
for that cycle must match, and it is applied to the state before the next row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace

import numba
import numpy as np
import pytest

import lmt.control.cap
from lmt.control import (
    CapParams,
    Decision,
    LoadSpec,
    LoadState,
    decide_cap,
    decide_release,
    warmup,
)
from lmt.control.select import restore_kernel, shed_kernel
from lmt.control.select_reference import select_restore_py, select_shed_py

# A small commercial site. Together the loads draw 87 kW.
LOADS = (
    LoadSpec("ev-chargers", 22.0, 10, critical=False),
    LoadSpec("water-heater", 12.0, 20, critical=False),
    LoadSpec("chiller-1", 30.0, 40, critical=False),
    LoadSpec("lighting", 8.0, 60, critical=False),
    LoadSpec("servers", 15.0, 100, critical=True),
)
# target = cap - margin = 128 kW; a restore needs rated + 2 kW of headroom.
PARAMS = CapParams(cap_kw=130.0, margin_kw=2.0, hysteresis_kw=2.0, min_off_s=5.0, min_on_s=5.0)

Row = tuple[float, float, tuple[str, ...], tuple[str, ...]]
Base = Sequence[tuple[float, float]]  # steps of (from now_s, base_kw)


def all_on() -> list[LoadState]:
    return [LoadState(is_on=True) for _ in LOADS]


def base_at(base: Base, now_s: float) -> float:
    value = math.nan
    for t, kw in base:
        if now_s >= t:
            value = kw
    return value


def site_model(base_kw: float, loads: Sequence[LoadSpec], states: Sequence[LoadState]) -> float:
    return base_kw + sum(ld.rated_kw for ld, st in zip(loads, states, strict=True) if st.is_on)


def apply(decision: Decision, states: list[LoadState], now_s: float) -> None:
    for i in decision.shed:
        states[i].is_on, states[i].shed_by_us, states[i].last_switch_s = False, True, now_s
    for i in decision.restore:
        states[i].is_on, states[i].shed_by_us, states[i].last_switch_s = True, False, now_s


def run(
    rows: Sequence[Row],
    base: Base,
    states: list[LoadState] | None = None,
    loads: Sequence[LoadSpec] = LOADS,
    params: CapParams = PARAMS,
    log: list[Decision] | None = None,
) -> list[LoadState]:
    states = [LoadState(is_on=True) for _ in loads] if states is None else states
    for n, (site_kw, now_s, want_shed, want_restore) in enumerate(rows):
        model_kw = site_model(base_at(base, now_s), loads, states)
        assert model_kw == pytest.approx(site_kw), f"row {n}: site model gives {model_kw}"
        d = decide_cap(site_kw, now_s, loads, states, params)
        got_shed = tuple(loads[i].name for i in d.shed)
        got_restore = tuple(loads[i].name for i in d.restore)
        assert (got_shed, got_restore) == (want_shed, want_restore), f"row {n} at t={now_s}"
        assert len(d.reasons) == len(d.shed) + len(d.restore)
        assert (d.method == "") == (not d.shed and not d.restore), f"row {n}: {d.method!r}"
        if log is not None:
            log.append(d)
        apply(d, states, now_s)
    return states


# --------------------------------------------------------------------------- tables: priority order


def test_no_action_under_cap() -> None:
    run(
        [
            (127.0, 0.0, (), ()),
            (127.0, 1.0, (), ()),
            (128.0, 2.0, (), ()),  # exactly at cap - margin: still fine
            (125.0, 3.0, (), ()),
        ],
        base=[(0, 40.0), (2, 41.0), (3, 38.0)],
    )


def test_release_restores_only_what_we_shed() -> None:
    states = run(
        [(186.3, 0.0, ("ev-chargers", "water-heater", "chiller-1"), ())],
        base=[(0, 99.3)],
    )
    states[3].is_on = False  # lighting switched off by someone else
    states[1].is_on = True  # heater closed by hand meanwhile: nothing to do for it
    d = decide_release(LOADS, states)
    assert d.shed == ()
    # most important first; timers do not delay a release
    assert [LOADS[i].name for i in d.restore] == ["chiller-1", "ev-chargers"]
    assert d.reasons == (
        "restore chiller-1 (30.0 kW, priority 40): command ended",
        "restore ev-chargers (22.0 kW, priority 10): command ended",
    )


def test_length_mismatch() -> None:
    with pytest.raises(ValueError):
        decide_cap(0.0, 0.0, LOADS, all_on()[:-1], PARAMS)
    with pytest.raises(ValueError):
        decide_release(LOADS[:1], [])


def test_no_loads() -> None:
    assert decide_cap(500.0, 0.0, [], [], PARAMS) == Decision((), (), ())
    assert decide_release([], []) == Decision((), (), ())


def test_nan_site_is_no_action() -> None:
    states = all_on()
    states[0] = LoadState(is_on=False, shed_by_us=True)
    # a faulty reading (NaN, +-inf) is no measurement
    for site_kw in (math.nan, math.inf, -math.inf):
        assert decide_cap(site_kw, 0.0, LOADS, states, PARAMS) == Decision((), (), ())


# --------------------------------------------------------------------------- tables: optimal


def test_optimal_sheds_fewer_cheaper_loads_than_priority_order() -> None:
    log: list[Decision] = []
    states = run(
        [
            # need 39. Priority order sheds ev 22 + heater 12 + chiller 30 = 64 kW, cost
            # 10 + 20 + 40 = 70; the optimum is ev + chiller: 52 kW, cost 50, two loads
            (167.0, 0.0, ("ev-chargers", "chiller-1"), ()),
            # headroom 128 - 115 - 2 = 11: nothing fits; then min_off (5 s) holds
            (115.0, 1.0, (), ()),
            (75.0, 4.9, (), ()),
            # headroom 51: both together (52 kW) do not fit; chiller (value 40) beats ev (10)
            (75.0, 5.0, (), ("chiller-1",)),
            # headroom 21: ev needs 22
            (105.0, 6.0, (), ()),
            (103.0, 12.0, (), ("ev-chargers",)),
            (125.0, 13.0, (), ()),
        ],
        base=[(0, 80.0), (4, 40.0), (12, 38.0)],
        log=log,
    )
    assert all(st.is_on and not st.shed_by_us for st in states)
    assert [d.method for d in log] == ["exact", "", "", "exact", "", "exact", ""]


def test_optimal_reasons() -> None:
    states = all_on()
    d = decide_cap(186.3, 0.0, LOADS, states, PARAMS)
    assert d.method == "exact"
    # need 58.3: ev + heater + chiller (64 kW, cost 70) is the cheapest cover
    assert d.reasons == tuple(
        f"shed {name}: site 186.3 kW > cap 130.0 - margin 2.0, need 58.3 kW;"
        " exact selection, cost 70, overshoot 5.7 kW"
        for name in (
            "ev-chargers (22.0 kW, priority 10)",
            "water-heater (12.0 kW, priority 20)",
            "chiller-1 (30.0 kW, priority 40)",
        )
    )
    apply(d, states, 0.0)
    d = decide_cap(92.8, 10.0, LOADS, states, PARAMS)
    assert d.reasons == (
        "restore chiller-1 (30.0 kW, priority 40): headroom 35.2 kW - hysteresis 2.0;"
        " exact selection of 1 load(s), 30.0 kW, value 40",
    )


def test_optimal_restore_maximises_value_one_per_cycle() -> None:
    loads = (
        LoadSpec("a", 30.0, 40, critical=False),
        LoadSpec("b", 15.0, 25, critical=False),
        LoadSpec("c", 15.0, 25, critical=False),
    )
    params = CapParams(cap_kw=100.0, margin_kw=0.0, hysteresis_kw=0.0)
    log: list[Decision] = []
    run(
        [
            # headroom 30: b + c (value 50) beats a (40); the most important of the set
            # (tie: smaller, then lower index) goes first, the rest is chosen again next cycle
            (70.0, 0.0, (), ("b",)),
            (85.0, 1.0, (), ("c",)),
            (100.0, 2.0, (), ()),
            # headroom 40: a fits now
            (60.0, 3.0, (), ("a",)),
        ],
        base=[(0, 70.0), (3, 30.0)],
        states=[LoadState(is_on=False, shed_by_us=True) for _ in loads],
        loads=loads,
        params=params,
        log=log,
    )
    assert [d.method for d in log] == ["exact", "exact", "", "exact"]


def test_optimal_critical_never_and_best_effort() -> None:
    log: list[Decision] = []
    states = run(
        [
            # need 109 but only 72 kW is controllable: shed it all, never the servers
            (237.0, 0.0, ("ev-chargers", "water-heater", "chiller-1", "lighting"), ()),
            (165.0, 1.0, (), ()),
            (165.0, 10.0, (), ()),
        ],
        base=[(0, 150.0)],
        log=log,
    )
    assert states[4].is_on and not states[4].shed_by_us
    assert log[0].method == "none"
    assert all("do not cover" in r for r in log[0].reasons)


def test_optimal_unavailable_never_shed() -> None:
    states = all_on()
    states[2].available = False  # chiller relay failing
    # need 39 without the chiller: ev + heater + lighting = 42 kW
    run([(167.0, 0.0, ("ev-chargers", "water-heater", "lighting"), ())], base=[(0, 80.0)],
        states=states)
    assert states[2].is_on


def test_optimal_min_on_protects_recently_switched_on_loads() -> None:
    states = all_on()
    states[0].last_switch_s = 0.0  # ev chargers were switched on at t=0
    run(
        [
            # need 9: ev would be cheapest, but it has been on only 2 s -> heater
            (137.0, 2.0, ("water-heater",), ()),
            # need 17: ev still protected; lighting 8 does not cover -> chiller
            (145.0, 3.0, ("chiller-1",), ()),
            # need 7: ev on for 5 s now, eligible
            (135.0, 5.0, ("ev-chargers",), ()),
        ],
        base=[(0, 50.0), (3, 70.0), (5, 90.0)],
        states=states,
    )


def test_optimal_greedy_method_reported() -> None:
    d = decide_cap(167.0, 0.0, LOADS, all_on(), replace(PARAMS, max_cells=0))
    assert d.method == "greedy"
    assert sum(LOADS[i].rated_kw for i in d.shed) >= 39.0
    assert all("greedy selection" in r for r in d.reasons)
    assert 4 not in d.shed


def test_optimal_release_after_optimal_shed() -> None:
    states = run([(167.0, 0.0, ("ev-chargers", "chiller-1"), ())], base=[(0, 80.0)])
    d = decide_release(LOADS, states)
    assert [LOADS[i].name for i in d.restore] == ["chiller-1", "ev-chargers"]
    assert d.method == "release"


def random_site(rng: np.random.Generator) -> tuple:
    n = int(rng.integers(0, 9))
    loads = tuple(
        LoadSpec(f"l{i}", float(rng.choice([0.0, 1.5, 5.0, 7.5, 10.0, 12.0, 22.0, 30.0])),
                 int(rng.integers(1, 6)), critical=bool(rng.random() < 0.15))
        for i in range(n)
    )
    states = []
    for _ in range(n):
        on = bool(rng.random() < 0.6)
        states.append(LoadState(is_on=on, shed_by_us=not on and bool(rng.random() < 0.7),
                                last_switch_s=float(rng.choice([-np.inf, 0.0, 3.0, 6.0, 9.0])),
                                available=bool(rng.random() < 0.9)))
    params = CapParams(cap_kw=round(float(rng.uniform(20.0, 120.0)), 1),
                       margin_kw=float(rng.choice([0.0, 1.0, 2.5])),
                       hysteresis_kw=float(rng.choice([0.0, 2.0])))
    site = round(float(rng.uniform(0.0, 160.0)), 1)
    return site, float(rng.choice([5.0, 10.0, 20.0])), loads, states, params


def test_optimal_python_fallback_matches_and_is_optimal(monkeypatch: pytest.MonkeyPatch) -> None:
    """decide_cap over the numba selectors and over their plain-Python twins agree, and
    the sheds are an optimum found by brute force (kW and site in 0.1 kW steps: exact)."""
    rng = np.random.default_rng(20261126)
    cases = [random_site(rng) for _ in range(300)]
    compiled = [decide_cap(*c) for c in cases]
    monkeypatch.setattr(lmt.control.cap, "select_shed", select_shed_py)
    monkeypatch.setattr(lmt.control.cap, "select_restore", select_restore_py)
    kinds = set()
    for (site, now, loads, states, params), d in zip(cases, compiled, strict=True):
        assert decide_cap(site, now, loads, states, params) == d
        assert not (d.shed and d.restore) and len(d.restore) <= 1
        target = params.cap_kw - params.margin_kw
        ok = [not ld.critical and st.available and st.is_on and now - st.last_switch_s >= 5.0
              for ld, st in zip(loads, states, strict=True)]
        assert all(ok[i] for i in d.shed)
        for i in d.restore:
            st = states[i]
            assert st.shed_by_us and not st.is_on and now - st.last_switch_s >= 5.0
            assert loads[i].rated_kw + params.hysteresis_kw <= target - site + 1e-9
        if d.shed:
            need = site - target
            pool = [i for i in range(len(loads)) if ok[i] and loads[i].rated_kw > 0]
            covers = [c for r in range(len(pool) + 1) for c in itertools.combinations(pool, r)
                      if sum(loads[i].rated_kw for i in c) >= need - 1e-9]
            if not covers:
                assert d.method == "none" and sorted(d.shed) == pool
            else:
                assert d.method == "exact"
                best = min((sum(loads[i].priority for i in c),
                            round(sum(loads[i].rated_kw for i in c) - need, 6)) for c in covers)
                got = (sum(loads[i].priority for i in d.shed),
                       round(sum(loads[i].rated_kw for i in d.shed) - need, 6))
                assert got == best
        kinds.add("shed" if d.shed else "restore" if d.restore else "keep")
    assert kinds == {"shed", "restore", "keep"}


# --------------------------------------------------------------------------- numba


def test_kernels_are_compiled() -> None:
    warmup()
    for fn in (shed_kernel, restore_kernel):
        assert isinstance(fn, numba.core.registry.CPUDispatcher)
        assert fn.signatures, "warmup() should have compiled the kernel"
