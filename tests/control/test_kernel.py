"""Tests of the cap-site-import kernel, written as cycle tables.

Each table steps one simulated site through time. A row is
``(site_kw, now_s, expected shed names, expected restore names)``: the site model
(``site_kw = base(now_s) + sum of rated_kw of the loads that are on``) must produce
the row's ``site_kw`` from the state left by the previous rows, then the decision
for that cycle must match, and it is applied to the state before the next row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
import pytest

from lmt.control import (
    CapParams,
    Decision,
    LoadSpec,
    LoadState,
    decide_cap,
    decide_release,
    warmup,
)
from lmt.control.kernel import KEEP, RESTORE, SHED, cap_step, release_step

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
        apply(d, states, now_s)
    return states


# --------------------------------------------------------------------------- tables


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


def test_shed_by_priority_then_min_off_then_restore_what_fits() -> None:
    states = run(
        [
            # need 39: ev 22 + heater 12 = 34 < 39, + chiller 30 = 64 >= 39; lighting stays
            (167.0, 0.0, ("ev-chargers", "water-heater", "chiller-1"), ()),
            # headroom 25 but min_off (5 s) not elapsed yet
            (103.0, 1.0, (), ()),
            (103.0, 4.9, (), ()),
            # chiller (priority 40) needs 32 > 25; heater needs 14: the smaller one goes back
            (103.0, 5.0, (), ("water-heater",)),
            # headroom 13: ev needs 24
            (115.0, 6.0, (), ()),
            # base drops: headroom 53, chiller first (highest priority), one per cycle
            (75.0, 10.0, (), ("chiller-1",)),
            # headroom 23: ev 22 would fit without hysteresis, not with it
            (105.0, 11.0, (), ()),
            # headroom 25 >= 22 + 2
            (103.0, 12.0, (), ("ev-chargers",)),
            (125.0, 13.0, (), ()),
        ],
        base=[(0, 80.0), (10, 40.0), (12, 38.0)],
    )
    assert all(st.is_on and not st.shed_by_us for st in states)


def test_critical_never_shed_and_best_effort() -> None:
    states = run(
        [
            # need 109 but only 72 kW is controllable: shed it all, never the servers
            (237.0, 0.0, ("ev-chargers", "water-heater", "chiller-1", "lighting"), ()),
            # still above: nothing left to shed, and nothing restored while above
            (165.0, 1.0, (), ()),
            (165.0, 10.0, (), ()),
        ],
        base=[(0, 150.0)],
    )
    assert states[4].is_on and not states[4].shed_by_us


def test_min_on_protects_recently_switched_on_loads() -> None:
    states = all_on()
    states[0].last_switch_s = 0.0  # ev chargers were switched on at t=0
    run(
        [
            # need 9: ev would do, but it has been on only 2 s -> heater
            (137.0, 2.0, ("water-heater",), ()),
            # need 17: ev still protected -> chiller
            (145.0, 3.0, ("chiller-1",), ()),
            # need 7: ev on for 5 s now, eligible
            (135.0, 5.0, ("ev-chargers",), ()),
        ],
        base=[(0, 50.0), (3, 70.0), (5, 90.0)],
        states=states,
    )


def test_staggered_restore_one_per_cycle_highest_priority_first() -> None:
    run(
        [
            (167.0, 0.0, ("ev-chargers", "water-heater", "chiller-1"), ()),
            # plenty of headroom from t=10: still one load per cycle, by priority
            (23.0, 10.0, (), ("chiller-1",)),
            (53.0, 11.0, (), ("water-heater",)),
            (65.0, 12.0, (), ("ev-chargers",)),
            (87.0, 13.0, (), ()),
            # spike right after: the loads restored at 10, 11 and 12 are protected by
            # min_on, so need 1 sheds the lighting although its priority is highest
            (129.0, 14.0, ("lighting",), ()),
        ],
        base=[(0, 80.0), (10, 0.0), (14, 42.0)],
    )


def test_restore_tie_break_smaller_first_and_shed_tie_break_larger_first() -> None:
    loads = (
        LoadSpec("a", 10.0, 50, critical=False),
        LoadSpec("b", 20.0, 50, critical=False),
        LoadSpec("c", 20.0, 50, critical=False),
    )
    params = CapParams(cap_kw=100.0, margin_kw=0.0, hysteresis_kw=0.0)
    run(
        [
            # need 5: equal priority -> larger first, lower index on a full tie
            (105.0, 0.0, ("b",), ()),
            # need 25: c (20 kW) first, then a
            (125.0, 1.0, ("c", "a"), ()),
            # headroom 100: equal priority -> smaller first, then lower index
            (0.0, 10.0, (), ("a",)),
            (10.0, 11.0, (), ("b",)),
            (30.0, 12.0, (), ("c",)),
            (50.0, 13.0, (), ()),
        ],
        base=[(0, 55.0), (1, 95.0), (10, 0.0)],
        loads=loads,
        params=params,
    )


def test_release_restores_only_what_we_shed() -> None:
    states = run(
        [(167.0, 0.0, ("ev-chargers", "water-heater", "chiller-1"), ())],
        base=[(0, 80.0)],
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


def test_reasons() -> None:
    states = all_on()
    d = decide_cap(186.3, 0.0, LOADS, states, PARAMS)
    assert d.reasons[0] == (
        "shed ev-chargers (22.0 kW, priority 10): site 186.3 kW > cap 130.0 - margin 2.0"
    )
    apply(d, states, 0.0)
    d = decide_cap(92.8, 10.0, LOADS, states, PARAMS)
    assert d.reasons == ("restore chiller-1 (30.0 kW, priority 40): headroom 35.2 kW",)


def test_length_mismatch() -> None:
    with pytest.raises(ValueError):
        decide_cap(0.0, 0.0, LOADS, all_on()[:-1], PARAMS)
    with pytest.raises(ValueError):
        decide_release(LOADS[:1], [])


def test_no_loads() -> None:
    assert decide_cap(500.0, 0.0, [], [], PARAMS) == Decision((), (), ())
    assert decide_release([], []) == Decision((), (), ())
    f = np.zeros(0, dtype=np.float64)
    i = np.zeros(0, dtype=np.int64)
    b = np.zeros(0, dtype=np.bool_)
    for site_kw in (500.0, 0.0):
        out = cap_step(site_kw, 100.0, 1.0, 2.0, f, i, b, b, b, f, 0.0, 5.0, 5.0)
        assert out.dtype == np.int8 and out.shape == (0,)
    out = release_step(b, b)
    assert out.dtype == np.int8 and out.shape == (0,)


def test_nan_site_is_no_action() -> None:
    states = all_on()
    states[0] = LoadState(is_on=False, shed_by_us=True)
    assert decide_cap(math.nan, 0.0, LOADS, states, PARAMS) == Decision((), (), ())


# --------------------------------------------------------------------------- numba


def test_kernels_are_compiled() -> None:
    warmup()
    for fn in (cap_step, release_step):
        assert isinstance(fn, numba.core.registry.CPUDispatcher)
        assert fn.signatures, "warmup() should have compiled the kernel"


def random_case(rng: np.random.Generator) -> tuple:
    n = int(rng.integers(0, 13))
    rated = rng.choice([0.0, 1.5, 5.0, 7.5, 10.0, 22.0, 30.0], size=n)
    priority = rng.integers(1, 6, size=n).astype(np.int64)  # few values: many ties
    controllable = rng.random(n) < 0.8
    is_on = rng.random(n) < 0.6
    shed_by_us = ~is_on & (rng.random(n) < 0.7)
    last_switch = rng.choice([-np.inf, 0.0, 3.0, 6.0, 9.0], size=n)
    cap = float(rng.uniform(20.0, 120.0))
    site = float(rng.uniform(0.0, 160.0))
    margin = float(rng.choice([0.0, 1.0, 2.5]))
    hyst = float(rng.choice([0.0, 2.0]))
    now = float(rng.choice([5.0, 10.0, 20.0]))
    scalars = (site, cap, margin, hyst)
    return (*scalars, rated, priority, controllable, is_on, shed_by_us, last_switch, now, 5.0, 5.0)


def test_python_fallback_matches_compiled() -> None:
    rng = np.random.default_rng(20240601)
    kinds = set()
    for _ in range(400):
        args = random_case(rng)
        got = cap_step(*args)
        want = cap_step.py_func(*args)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want)
        rel = release_step(args[8], args[7])
        np.testing.assert_array_equal(rel, release_step.py_func(args[8], args[7]))

        # invariants
        site, cap, margin, _, rated, _, controllable, is_on, shed_by_us, last, now = args[:11]
        min_off, min_on = args[11:]
        shed = got == SHED
        restore = got == RESTORE
        assert not (shed.any() and restore.any())
        assert restore.sum() <= 1
        assert np.all(controllable[shed] & is_on[shed] & (now - last[shed] >= min_on))
        assert np.all(shed_by_us[restore] & ~is_on[restore] & (now - last[restore] >= min_off))
        if shed.any():
            eligible = controllable & is_on & (now - last >= min_on)
            need = site - (cap - margin)
            # covered, or everything eligible was shed
            assert rated[shed].sum() >= need or np.array_equal(shed, eligible)
        kinds.add("shed" if shed.any() else "restore" if restore.any() else "keep")
        assert set(np.unique(got)) <= {KEEP, SHED, RESTORE}
    assert kinds == {"shed", "restore", "keep"}
