"""Tests of load selection: exact against brute force, numba against plain Python, edges."""

from __future__ import annotations

import itertools
import math
import random

import numba
import numpy as np
import pytest

from lmt.control import Selection, select_restore, select_shed, warmup
from lmt.control.select import (
    DEFAULT_MAX_CELLS,
    SNAP_UNITS,
    restore_kernel,
    shed_kernel,
)
from lmt.control.select_reference import select_restore_py, select_shed_py

RES = 0.1
SUB = 0.04  # a load smaller than the resolution


def shed_units(required: float, kw: list[float]) -> tuple[int, list[int]]:
    """The documented rounding for shedding: requirement up, loads down."""
    req = max(1, math.ceil(required / RES - SNAP_UNITS))
    return req, [math.floor(k / RES + SNAP_UNITS) for k in kw]


def restore_units(headroom: float, kw: list[float]) -> tuple[int, list[int]]:
    """The documented rounding for restoring: headroom down, loads up (at least one unit)."""
    cap = math.floor(headroom / RES + SNAP_UNITS)
    return cap, [max(1, math.ceil(k / RES - SNAP_UNITS)) for k in kw]


def subsets(idx: list[int]) -> itertools.chain[tuple[int, ...]]:
    return itertools.chain.from_iterable(itertools.combinations(idx, r) for r in range(len(idx) + 1))


def brute_shed(required: float, kw: list[float], cost: list[float], avail: list[bool]
               ) -> tuple[float, int] | None:
    """Least (cost, units) over every covering subset, in units; None if none covers."""
    req, w = shed_units(required, kw)
    idx = [i for i in range(len(kw)) if avail[i] and w[i] > 0]
    best = None
    for sub in subsets(idx):
        units = sum(w[i] for i in sub)
        if units >= req:
            key = (sum(cost[i] for i in sub), units)
            best = key if best is None or key < best else best
    return best


def brute_restore(headroom: float, kw: list[float], value: list[float], cand: list[bool]
                  ) -> tuple[float, int]:
    """Greatest value, then least units, over every fitting subset of the non-zero loads."""
    cap, w = restore_units(headroom, kw)
    idx = [i for i in range(len(kw)) if cand[i] and kw[i] > 0 and value[i] > 0]
    best = (0.0, 0)
    for sub in subsets(idx):
        units = sum(w[i] for i in sub)
        if units <= cap:
            key = (sum(value[i] for i in sub), -units)
            best = max(best, key)
    return best[0], -best[1]


def small_case(rng: random.Random) -> tuple[list[float], list[float], list[bool]]:
    n = rng.randint(0, 10)
    kw = [rng.choice([0.0, SUB, 0.1, 0.3, 1.0, 2.5, 5.0, 7.5, 12.3, 22.0]) for _ in range(n)]
    cost = [float(rng.randint(0, 6)) for _ in range(n)]  # few values: many ties
    avail = [rng.random() < 0.8 for _ in range(n)]
    return kw, cost, avail


def both_shed(required: float, kw: list[float], cost: list[float], avail: list[bool],
              **kw_args: float) -> Selection:
    got = select_shed(required, np.array(kw), np.array(cost), np.array(avail, dtype=bool), **kw_args)
    assert select_shed_py(required, kw, cost, avail, **kw_args) == got
    return got


def both_restore(headroom: float, kw: list[float], value: list[float], cand: list[bool],
                 **kw_args: float) -> Selection:
    got = select_restore(headroom, np.array(kw), np.array(value), np.array(cand, dtype=bool),
                         **kw_args)
    assert select_restore_py(headroom, kw, value, cand, **kw_args) == got
    return got


# --------------------------------------------------------------------------- exactness


def test_shed_exact_equals_brute_force() -> None:
    methods = set()
    for seed in range(600):
        rng = random.Random(seed)
        kw, cost, avail = small_case(rng)
        total = sum(k for k, a in zip(kw, avail, strict=True) if a)
        required = rng.choice([0.0, -1.0, SUB, 0.1, 0.3, 0.1 + 0.2]) if seed % 5 == 0 else \
            round(rng.uniform(0.0, 1.1 * total + 0.5), rng.choice([1, 3]))
        sel = both_shed(required, kw, cost, avail)
        methods.add(sel.method)
        assert all(avail[i] and kw[i] > 0 for i in sel.indices), f"seed {seed}"
        assert list(sel.indices) == sorted(set(sel.indices))
        if required <= 0:
            assert sel == Selection((), 0.0, 0.0, -required, "exact", True, 0)
            continue
        if total < required - 1e-6:
            assert sel.method == "none" and not sel.covered, f"seed {seed}"
            assert sel.indices == tuple(i for i in range(len(kw)) if avail[i] and kw[i] > 0)
            continue
        assert sel.covered and sel.total_kw >= required - 1e-6, f"seed {seed}"
        assert sel.slack_kw == pytest.approx(sel.total_kw - required)
        best = brute_shed(required, kw, cost, avail)
        if best is None:  # only loads below the resolution can cover: greedy on real kW
            assert sel.method == "greedy", f"seed {seed}"
            continue
        assert sel.method == "exact", f"seed {seed}"
        _, w = shed_units(required, kw)
        assert (sel.total_weight, sum(w[i] for i in sel.indices)) == best, f"seed {seed}"
    assert methods == {"exact", "greedy", "none"}


def test_shed_exact_is_optimal_in_real_kw() -> None:
    """With loads and requirement on the 0.1 kW grid, units lose nothing: the exact result
    is the least cost, then least overshoot, over every covering subset in real kW."""
    for seed in range(300):
        rng = random.Random(1000 + seed)
        n = rng.randint(1, 10)
        kw = [rng.randint(1, 300) / 10 for _ in range(n)]
        cost = [float(rng.randint(1, 5)) for _ in range(n)]
        required = rng.randint(1, int(sum(kw) * 10)) / 10
        sel = both_shed(required, kw, cost, [True] * n)
        best = min((sum(cost[i] for i in s), round(sum(kw[i] for i in s) - required, 6))
                   for s in subsets(list(range(n))) if sum(kw[i] for i in s) >= required - 1e-9)
        assert sel.method == "exact"
        assert (sel.total_weight, round(sel.slack_kw, 6)) == best, f"seed {seed}"


def test_restore_exact_equals_brute_force() -> None:
    for seed in range(600):
        rng = random.Random(5000 + seed)
        kw, value, cand = small_case(rng)
        total = sum(kw)
        headroom = rng.choice([-1.0, 0.0, SUB, 0.3, 0.1 + 0.2]) if seed % 5 == 0 else \
            round(rng.uniform(0.0, 1.1 * total + 0.5), rng.choice([1, 3]))
        sel = both_restore(headroom, kw, value, cand)
        assert sel.method == "exact" and sel.covered, f"seed {seed}"
        assert all(cand[i] and value[i] > 0 for i in sel.indices), f"seed {seed}"
        if headroom < 0:
            assert sel.indices == ()
            continue
        # loads of 0 kW are always restored; the rest fit in the headroom
        assert {i for i in range(len(kw)) if cand[i] and kw[i] == 0 and value[i] > 0} <= set(sel.indices)
        assert sel.total_kw <= headroom + 1e-6
        assert sel.slack_kw == pytest.approx(headroom - sel.total_kw)
        _, w = restore_units(headroom, kw)
        zero_value = sum(value[i] for i in sel.indices if kw[i] == 0)
        got = (sel.total_weight - zero_value, sum(w[i] for i in sel.indices if kw[i] > 0))
        assert got == brute_restore(headroom, kw, value, cand), f"seed {seed}"


def dp_shed(required: float, kw: list[float], cost: list[float], avail: list[bool]) -> tuple[float, int]:
    """Unreduced DP over every sum of units (numpy): an oracle independent of the reduction."""
    req, w = shed_units(required, kw)
    size = sum(w[i] for i in range(len(kw)) if avail[i]) + 1
    dp = np.full(size, np.inf)
    dp[0] = 0.0
    for i in range(len(kw)):
        if avail[i] and w[i] > 0:
            dp[w[i]:] = np.minimum(dp[w[i]:], dp[:-w[i]] + cost[i])
    s = req + int(np.argmin(dp[req:]))
    return float(dp[s]), s


def dp_restore(headroom: float, kw: list[float], value: list[float], cand: list[bool]
               ) -> tuple[float, int]:
    cap, w = restore_units(headroom, kw)
    dp = np.full(cap + 1, -np.inf)
    dp[0] = 0.0
    for i in range(len(kw)):
        if cand[i] and kw[i] > 0 and value[i] > 0 and w[i] <= cap:
            dp[w[i]:] = np.maximum(dp[w[i]:], dp[:-w[i]] + value[i])
    s = int(np.argmax(dp))
    return float(dp[s]), s


def test_reduction_keeps_the_optimum() -> None:
    """Medium instances, where the bound fixes most loads: same optimum as the full DP."""
    for seed in range(40):
        rng = random.Random(7000 + seed)
        n = rng.choice([30, 100, 200])
        if seed % 2:
            kw = [rng.randint(10, 500) / 10 for _ in range(n)]
            cost = [float(rng.randint(1, 100)) for _ in range(n)]
        else:
            kw = [rng.choice([1.5, 3.0, 5.5, 7.5, 11.0, 22.0]) for _ in range(n)]
            cost = [float(rng.randint(1, 10) * 10) for _ in range(n)]
        avail = [rng.random() < 0.9 for _ in range(n)]
        target = rng.choice([0.05, 0.3, 0.6]) * sum(kw)
        sel = both_shed(target, kw, cost, avail, max_cells=10**9)
        _, w = shed_units(target, kw)
        assert sel.method == "exact"
        assert (sel.total_weight, sum(w[i] for i in sel.indices)) == dp_shed(target, kw, cost, avail)
        fit = both_restore(target, kw, cost, avail, max_cells=10**9)
        _, w = restore_units(target, kw)
        assert fit.method == "exact"
        assert (fit.total_weight, sum(w[i] for i in fit.indices)) == dp_restore(target, kw, cost, avail)


# --------------------------------------------------------------------------- numba = Python


def large_case(rng: random.Random, n: int) -> tuple[list[float], list[float], list[bool]]:
    if rng.random() < 0.5:  # real-valued kW and costs
        kw = [rng.uniform(0.0, 60.0) for _ in range(n)]
        cost = [rng.uniform(0.0, 100.0) for _ in range(n)]
    else:  # standard sizes and ten priority levels: many equally efficient loads
        kw = [rng.choice([0.0, 1.5, 3.0, 5.5, 7.5, 11.0, 22.0, 45.0]) for _ in range(n)]
        cost = [float(rng.randint(1, 10) * 10) for _ in range(n)]
    avail = [rng.random() < 0.85 for _ in range(n)]
    return kw, cost, avail


def test_numba_and_python_agree() -> None:
    methods: dict[str, set[str]] = {"shed": set(), "restore": set()}
    for seed in range(150):
        rng = random.Random(9000 + seed)
        n = rng.choice([1, 5, 20, 60, 150])
        kw, cost, avail = large_case(rng, n)
        frac = rng.choice([0.01, 0.1, 0.3, 0.7, 1.2])
        cells = rng.choice([0, 1000, DEFAULT_MAX_CELLS])
        target = frac * sum(kw)
        shed = both_shed(target, kw, cost, avail, max_cells=cells)
        restore = both_restore(target, kw, cost, avail, max_cells=cells)
        methods["shed"].add(shed.method)
        methods["restore"].add(restore.method)
        assert all(avail[i] for i in shed.indices + restore.indices)
        assert shed.covered == (shed.method != "none")
        assert restore.covered
    assert methods == {"shed": {"exact", "greedy", "none"}, "restore": {"exact", "greedy"}}


# --------------------------------------------------------------------------- greedy, none


def typical(n: int, seed: int) -> tuple[list[float], list[float], list[bool]]:
    """Loads of 1-50 kW in 0.1 kW steps, priorities 1-100, 10 % unavailable."""
    rng = random.Random(seed)
    kw = [rng.randint(10, 500) / 10 for _ in range(n)]
    priority = [float(rng.randint(1, 100)) for _ in range(n)]
    avail = [rng.random() < 0.9 for _ in range(n)]
    return kw, priority, avail


def test_greedy_beyond_max_cells_still_covers() -> None:
    for seed in range(10):
        kw, cost, avail = typical(300, seed)
        required = 0.3 * sum(k for k, a in zip(kw, avail, strict=True) if a)
        exact = both_shed(required, kw, cost, avail)
        greedy = both_shed(required, kw, cost, avail, max_cells=0)
        assert exact.method == "exact" and greedy.method == "greedy"
        assert 0 < exact.cells == greedy.cells <= DEFAULT_MAX_CELLS  # the size that was too big
        assert greedy.covered and all(avail[i] for i in greedy.indices)
        assert exact.total_weight <= greedy.total_weight
        r_exact = both_restore(required, kw, cost, avail)
        r_greedy = both_restore(required, kw, cost, avail, max_cells=0)
        assert r_exact.method == "exact" and r_greedy.method == "greedy"
        assert r_greedy.total_kw <= required and all(avail[i] for i in r_greedy.indices)
        assert r_exact.total_weight >= r_greedy.total_weight


def test_typical_thousand_loads_solve_exactly_by_default() -> None:
    kw, cost, avail = typical(1000, 7)
    required = 0.3 * sum(k for k, a in zip(kw, avail, strict=True) if a)
    assert both_shed(required, kw, cost, avail).method == "exact"
    assert both_restore(required, kw, cost, avail).method == "exact"


def test_none_when_all_available_loads_do_not_cover() -> None:
    kw = [10.0, 0.0, 5.0, 20.0]
    sel = both_shed(25.1, kw, [1.0, 1.0, 1.0, 1.0], [True, True, True, False])
    assert sel == Selection((0, 2), 15.0, 2.0, 15.0 - 25.1, "none", False, 0)
    assert both_shed(1.0, [], [], []).method == "none"


def test_nothing_required_or_no_headroom() -> None:
    for required in (0.0, -3.0):
        assert both_shed(required, [1.0], [1.0], [True]).indices == ()
    assert both_restore(-0.5, [0.0, 1.0], [1.0, 1.0], [True, True]).indices == ()
    assert both_restore(0.0, [0.0, 1.0], [1.0, 1.0], [True, True]).indices == (0,)


# --------------------------------------------------------------------------- rounding


def test_requirement_exactly_equal_to_a_load() -> None:
    # 0.3 / 0.1 is 2.9999999999999996 and 0.1 + 0.2 is 0.30000000000000004: both 3 units
    for required, load in ((0.3, 0.3), (0.1 + 0.2, 0.3), (0.3, 0.1 + 0.2), (22.0, 22.0)):
        sel = both_shed(required, [load, 100.0], [1.0, 1.0], [True, True])
        assert sel.indices == (0,) and sel.method == "exact" and sel.covered
        assert sel.slack_kw == pytest.approx(0.0, abs=1e-9)
        fit = both_restore(required, [100.0, load], [1.0, 1.0], [True, True])
        assert fit.indices == (1,) and fit.method == "exact"


def test_loads_below_the_resolution() -> None:
    # In units they are worth nothing: only the greedy on real kW can use them.
    sel = both_shed(0.1, [SUB] * 5, [1.0] * 5, [True] * 5)
    assert sel.method == "greedy" and sel.covered and len(sel.indices) == 3
    # With a load on the grid available, the exact method takes it (0.04 kW counts as 0).
    sel = both_shed(0.1, [SUB, SUB, SUB, 0.5], [1.0, 1.0, 1.0, 5.0], [True] * 4)
    assert sel.method == "exact" and sel.indices == (3,)
    # Restoring rounds them up to one unit: two fit in 0.2 kW, not three.
    fit = both_restore(0.2, [SUB] * 3, [1.0] * 3, [True] * 3)
    assert fit.method == "exact" and fit.indices == (0, 1)


def test_restore_is_conservative() -> None:
    # 0.31 kW is 4 units, 0.35 kW of headroom 3 units: it fits only inside the rounding.
    assert both_restore(0.35, [0.31], [5.0], [True]).indices == ()
    assert both_restore(0.4, [0.31], [5.0], [True]).indices == (0,)


def test_zero_kw_loads() -> None:
    # Shedding a 0 kW load gains nothing, even at no cost; restoring one always fits.
    sel = both_shed(1.0, [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [True] * 3)
    assert sel.indices == (1,)
    fit = both_restore(0.0, [0.0, 1.0, 0.0], [2.0, 3.0, 0.0], [True] * 3)
    assert fit.indices == (0,)


def test_unavailable_never_chosen() -> None:
    kw, cost = [5.0, 5.0, 5.0], [1.0, 50.0, 100.0]
    assert both_shed(5.0, kw, cost, [False, True, True]).indices == (1,)
    assert both_restore(5.0, kw, cost, [True, True, False]).indices == (1,)
    assert both_shed(5.0, kw, cost, [False] * 3).method == "none"


def test_least_cost_then_least_overshoot() -> None:
    kw = [6.0, 5.0, 12.0, 4.5]
    priority = [10.0, 10.0, 30.0, 10.0]
    # The 12 kW load alone costs 30; any two priority-10 loads cost 20, and of those
    # 5 + 4.5 meets 9.5 kW exactly (6 + 4.5 and 6 + 5 overshoot).
    sel = both_shed(9.5, kw, priority, [True] * 4)
    assert sel.indices == (1, 3) and sel.total_weight == 20.0 and sel.total_kw == 9.5
    assert sel.slack_kw == 0.0 and sel.method == "exact"
    # Restoring into 10.5 kW: value 20 at most; 5 + 4.5 leaves more headroom than 6 + 4.5.
    fit = both_restore(10.5, kw, priority, [True] * 4)
    assert fit.indices == (1, 3) and fit.total_weight == 20.0 and fit.slack_kw == 1.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "args",
    [
        (math.nan, [1.0], [1.0]),
        (math.inf, [1.0], [1.0]),
        (1.0, [math.nan], [1.0]),
        (1.0, [-1.0], [1.0]),
        (1.0, [math.inf], [1.0]),
        (1.0, [1.0], [math.nan]),
        (1.0, [1.0], [-1.0]),
        (1.0, [1.0, 2.0], [1.0]),
        (1.0, [1e300], [1.0]),
    ],
)
def test_bad_input_rejected(args: tuple[float, list[float], list[float]]) -> None:
    for fn in (select_shed, select_shed_py, select_restore, select_restore_py):
        with pytest.raises(ValueError):
            fn(*args)


def test_bad_settings_rejected() -> None:
    for fn in (select_shed, select_shed_py, select_restore, select_restore_py):
        for bad in ({"resolution_kw": 0.0}, {"resolution_kw": math.nan}, {"max_cells": -1},
                    {"max_cells": 1.5}):
            with pytest.raises(ValueError):
                fn(1.0, [1.0], [1.0], **bad)
        with pytest.raises(ValueError):
            fn(1.0, [1.0, 2.0], [1.0, 1.0], [True])


def test_other_resolution() -> None:
    sel = both_shed(1.2, [1.0, 1.4, 0.9], [1.0, 1.0, 1.0], [True] * 3, resolution_kw=1.0)
    # in 1 kW units: requirement 2, loads 1, 1, 0 -> both 1 kW-unit loads (real 2.4 kW)
    assert sel.indices == (0, 1) and sel.method == "exact"


# --------------------------------------------------------------------------- numba


def test_kernels_compiled_by_warmup_for_the_api_types() -> None:
    warmup()
    for fn in (shed_kernel, restore_kernel):
        assert isinstance(fn, numba.core.registry.CPUDispatcher)
        assert fn.signatures, "warmup() should have compiled the kernel"
    before = (len(shed_kernel.signatures), len(restore_kernel.signatures))
    select_shed(1.0, [1.0, 2.0], [1, 2], [True, False])
    select_restore(1.0, np.array([1.0]), np.array([3], dtype=np.int64))
    select_shed(1.0, (2.0,), (1.0,), None, 0.5, 10)
    frozen = np.array([1.0, 2.0])
    frozen.flags.writeable = False
    select_shed(np.float64(1.0), frozen, np.array([1, 2], dtype=np.int32), frozen > 1.0)
    select_restore(1, np.array([1.0], dtype=np.float32), [2.0], [1])
    assert (len(shed_kernel.signatures), len(restore_kernel.signatures)) == before
