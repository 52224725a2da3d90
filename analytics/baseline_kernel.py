"""The numba kernel of :mod:`lmt.analytics.baseline`: one customer-baseline-load (CBL) algorithm.

Everything is passed as numpy arrays and small integer codes (the constants below); the typed
API (:func:`lmt.analytics.baseline.customer_baseline`) validates the input, turns a
:class:`~lmt.analytics.baseline.BaselineRule` into these arguments and the kernel's tuple into a
:class:`~lmt.analytics.baseline.Baseline`. The same algorithm, statement for statement, in plain
Python is :mod:`lmt.analytics.baseline_reference` (the tests' oracle). Keep the two in step.

Pure: no I/O, no clock, no state. Only numpy and numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["baseline_kernel"]

# Day types (the order of lmt.analytics.tariff.DAY_TYPES).
WORKING = 0
REST = 1
HOLIDAY = 2
# How the selected days are picked from the candidates, ranked by mean load over the event window.
HIGHEST = 0
MIDDLE = 1
ALL = 2
# What a holiday is among the candidate days.
HOLIDAY_EXCLUDE = 0
HOLIDAY_AS_REST = 1
# Same-day adjustment.
ADJ_NONE = 0
ADJ_ADDITIVE = 1
ADJ_MULTIPLICATIVE = 2
# Why a day in the look-back was not used (index into the counts the kernel returns).
R_UNLIKE = 0  # another day type
R_HOLIDAY = 1  # a holiday, holidays excluded
R_EVENT = 2  # an earlier event (or test) day
R_OUTAGE = 3  # flagged as an outage / abnormal day, or a NaN anywhere in the day
R_LOW_USAGE = 4  # mean over the event window below low_usage_frac x the reference mean
R_OLDER = 5  # a valid like day, but older than the y most recent
R_NOT_SELECTED = 6  # a candidate ranked out by the X-of-Y selection
N_REASONS = 7
# Kernel status codes.
OK = 0
TOO_FEW = -1
NAN_ACTUAL = -2


@njit(cache=True)
def _window_mean_nb(row: np.ndarray, first: int, last: int) -> float:
    s = 0.0
    for j in range(first, last + 1):
        s += row[j]
    return s / (last - first + 1)


@njit(cache=True)
def baseline_kernel(loads: np.ndarray, types: np.ndarray, event_flags: np.ndarray,
                    outage_flags: np.ndarray, event_day: int, ev_first: int, ev_last: int,
                    adj_first: int, adj_last: int, y: int, x: int, mode: int, holidays: int,
                    lookback: int, low_frac: float, adjust: int, lo: float, hi: float,
                    cap_frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float,
                                              np.ndarray, int, int]:
    """(unadjusted, adjusted, selected days ascending, adjustment, raw adjustment,
    exclusion counts, candidates found, status). The arguments are the caller's to check."""
    n_int = loads.shape[1]
    counts = np.zeros(N_REASONS, np.int64)
    empty = np.zeros(n_int, np.float64)
    target = types[event_day]
    if target == HOLIDAY:
        target = REST

    # 1. Walk back: the valid like days, most recent first, with their event-window means.
    pool = np.empty(lookback, np.int64)
    pool_mean = np.empty(lookback, np.float64)
    m = 0
    for k in range(1, lookback + 1):
        d = event_day - k
        if d < 0:
            break
        t = types[d]
        if t == HOLIDAY:
            if holidays == HOLIDAY_EXCLUDE:
                counts[R_HOLIDAY] += 1
                continue
            t = REST
        if t != target:
            counts[R_UNLIKE] += 1
            continue
        if event_flags[d]:
            counts[R_EVENT] += 1
            continue
        bad = outage_flags[d]
        if not bad:
            for j in range(n_int):
                if np.isnan(loads[d, j]):
                    bad = True
                    break
        if bad:
            counts[R_OUTAGE] += 1
            continue
        pool[m] = d
        pool_mean[m] = _window_mean_nb(loads[d], ev_first, ev_last)
        m += 1

    # 2. Low usage: below low_frac x the mean of the y most recent valid days; then the y most
    # recent of the rest.
    thresh = -np.inf
    ref_n = min(y, m)
    if low_frac > 0.0 and ref_n > 0:
        s = 0.0
        for p in range(ref_n):
            s += pool_mean[p]
        thresh = low_frac * (s / ref_n)
    cand = np.empty(y, np.int64)
    cand_mean = np.empty(y, np.float64)
    c = 0
    for p in range(m):
        if pool_mean[p] < thresh:
            counts[R_LOW_USAGE] += 1
            continue
        if c < y:
            cand[c] = pool[p]
            cand_mean[c] = pool_mean[p]
            c += 1
        else:
            counts[R_OLDER] += 1
    if c < x:
        return empty, empty, np.zeros(0, np.int64), 0.0, 0.0, counts, c, TOO_FEW

    # 3. Rank by event-window mean, highest first; ties: the more recent first (stable).
    order = np.empty(c, np.int64)
    for i in range(c):
        key = i
        j = i - 1
        while j >= 0 and cand_mean[order[j]] < cand_mean[key]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = key
    start = 0
    n_sel = c
    if mode == HIGHEST:
        n_sel = x
    elif mode == MIDDLE:
        start = (c - x) // 2
        n_sel = x
    counts[R_NOT_SELECTED] += c - n_sel
    chosen = np.zeros(c, np.bool_)
    for i in range(start, start + n_sel):
        chosen[order[i]] = True
    days = np.empty(n_sel, np.int64)
    q = 0
    for p in range(c - 1, -1, -1):  # candidates are most recent first: this is ascending
        if chosen[p]:
            days[q] = cand[p]
            q += 1

    # 4. The unadjusted CBL: per interval, the mean over the selected days (ascending order).
    unadj = np.empty(n_int, np.float64)
    for j in range(n_int):
        s = 0.0
        for i in range(n_sel):
            s += loads[days[i], j]
        unadj[j] = s / n_sel

    # 5. Same-day adjustment.
    adj = unadj.copy()
    value = 0.0
    raw = 0.0
    if adjust == ADJ_NONE:
        return unadj, adj, days, value, raw, counts, c, OK
    actual = _window_mean_nb(loads[event_day], adj_first, adj_last)
    if np.isnan(actual):
        return empty, empty, np.zeros(0, np.int64), 0.0, 0.0, counts, c, NAN_ACTUAL
    base = _window_mean_nb(unadj, adj_first, adj_last)
    if adjust == ADJ_ADDITIVE:
        raw = actual - base
        value = raw
        if cap_frac < np.inf:
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
    return unadj, adj, days, value, raw, counts, c, OK
