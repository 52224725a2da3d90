"""The plain-Python twin of :func:`lmt.analytics.baseline_kernel.baseline_kernel`.

The same algorithm, statement for statement, on lists and loops: the tests' oracle
(``tests/analytics/test_baseline.py``: both return the same :class:`Baseline` for the same
input). Keep the two in step. Nothing in the agent calls this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lmt.analytics import baseline_kernel as K
from lmt.analytics.baseline import Baseline, BaselineRule, prepare, result

__all__ = ["baseline_py", "customer_baseline_py"]


def _window_mean_py(row: Sequence[float], first: int, last: int) -> float:
    s = 0.0
    for j in range(first, last + 1):
        s += row[j]
    return s / (last - first + 1)


def baseline_py(loads: Sequence[Sequence[float]], types: Sequence[int], event_flags: Sequence[bool],
                outage_flags: Sequence[bool], event_day: int, ev_first: int, ev_last: int,
                adj_first: int, adj_last: int, y: int, x: int, mode: int, holidays: int,
                lookback: int, low_frac: float, adjust: int, lo: float, hi: float,
                cap_frac: float) -> tuple[list[float], list[float], list[int], float, float,
                                          list[int], int, int]:
    n_int = len(loads[0])
    counts = [0] * K.N_REASONS
    empty = [0.0] * n_int
    target = types[event_day]
    if target == K.HOLIDAY:
        target = K.REST

    pool: list[int] = []
    pool_mean: list[float] = []
    for k in range(1, lookback + 1):
        d = event_day - k
        if d < 0:
            break
        t = types[d]
        if t == K.HOLIDAY:
            if holidays == K.HOLIDAY_EXCLUDE:
                counts[K.R_HOLIDAY] += 1
                continue
            t = K.REST
        if t != target:
            counts[K.R_UNLIKE] += 1
            continue
        if event_flags[d]:
            counts[K.R_EVENT] += 1
            continue
        bad = bool(outage_flags[d])
        if not bad:
            for j in range(n_int):
                if math.isnan(loads[d][j]):
                    bad = True
                    break
        if bad:
            counts[K.R_OUTAGE] += 1
            continue
        pool.append(d)
        pool_mean.append(_window_mean_py(loads[d], ev_first, ev_last))
    m = len(pool)

    thresh = -math.inf
    ref_n = min(y, m)
    if low_frac > 0.0 and ref_n > 0:
        s = 0.0
        for p in range(ref_n):
            s += pool_mean[p]
        thresh = low_frac * (s / ref_n)
    cand: list[int] = []
    cand_mean: list[float] = []
    for p in range(m):
        if pool_mean[p] < thresh:
            counts[K.R_LOW_USAGE] += 1
            continue
        if len(cand) < y:
            cand.append(pool[p])
            cand_mean.append(pool_mean[p])
        else:
            counts[K.R_OLDER] += 1
    c = len(cand)
    if c < x:
        return empty, empty, [], 0.0, 0.0, counts, c, K.TOO_FEW

    order = [0] * c
    for i in range(c):
        key = i
        j = i - 1
        while j >= 0 and cand_mean[order[j]] < cand_mean[key]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = key
    start = 0
    n_sel = c
    if mode == K.HIGHEST:
        n_sel = x
    elif mode == K.MIDDLE:
        start = (c - x) // 2
        n_sel = x
    counts[K.R_NOT_SELECTED] += c - n_sel
    chosen = [False] * c
    for i in range(start, start + n_sel):
        chosen[order[i]] = True
    days = [cand[p] for p in range(c - 1, -1, -1) if chosen[p]]

    unadj = [0.0] * n_int
    for j in range(n_int):
        s = 0.0
        for i in range(n_sel):
            s += loads[days[i]][j]
        unadj[j] = s / n_sel

    adj = list(unadj)
    value = 0.0
    raw = 0.0
    if adjust == K.ADJ_NONE:
        return unadj, adj, days, value, raw, counts, c, K.OK
    actual = _window_mean_py(loads[event_day], adj_first, adj_last)
    if math.isnan(actual):
        return empty, empty, [], 0.0, 0.0, counts, c, K.NAN_ACTUAL
    base = _window_mean_py(unadj, adj_first, adj_last)
    if adjust == K.ADJ_ADDITIVE:
        raw = actual - base
        value = raw
        if cap_frac < math.inf:
            limit = cap_frac * abs(base)
            if value > limit:
                value = limit
            elif value < -limit:
                value = -limit
        for j in range(n_int):
            adj[j] = unadj[j] + value
    else:
        raw = 1.0
        if base > 0.0:
            raw = actual / base
        value = min(hi, max(lo, raw))
        for j in range(n_int):
            adj[j] = unadj[j] * value
    return unadj, adj, days, value, raw, counts, c, K.OK


def customer_baseline_py(loads: Any, day_types: Any, event_day: int, event_window: Sequence[int],
                         rule: BaselineRule, *, event_days: Any = None, outage_days: Any = None,
                         adjust_window: Sequence[int] | None = None) -> Baseline:
    """:func:`lmt.analytics.baseline.customer_baseline`, through :func:`baseline_py`."""
    args = prepare(loads, day_types, event_day, event_window, rule, event_days, outage_days,
                   adjust_window)
    arr, types, ev, out = args[:4]
    pick = rule.working if types[args[4]] == K.WORKING else rule.rest
    py_args = (arr.tolist(), types.tolist(), ev.tolist(), out.tolist(), *args[4:])
    return result(baseline_py(*py_args), rule, pick)
