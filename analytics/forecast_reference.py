"""The plain-Python twins of the numba kernels of :mod:`lmt.analytics.forecast`.

The same algorithm, statement for statement, on lists and loops: the tests' oracle
(``tests/analytics/test_forecast.py``: each kernel and its twin return the same values for
the same input). Keep the two in step. Nothing in the agent calls these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmt.analytics.forecast import (
    SCALE_FLOOR,
    SEASONAL_NAIVE_DAILY,
    SEASONAL_NAIVE_WEEKLY,
    WEEKDAY_MEAN,
)

__all__ = ["backtest_py", "forecast_py", "hw_grid_py"]


def _finite_mean_py(y: Sequence[float], lo: int, hi: int) -> tuple[float, int]:
    s = 0.0
    c = 0
    for i in range(lo, hi):
        v = y[i]
        if not math.isnan(v):
            s += v
            c += 1
    if c == 0:
        return math.nan, 0
    return s / c, c


def _fallback_py(y: Sequence[float]) -> float:
    m, c = _finite_mean_py(y, 0, len(y))
    return m if c > 0 else 0.0


def _naive_py(y: Sequence[float], h: int, season: int) -> list[float]:
    n = len(y)
    out = [0.0] * h
    fb = _fallback_py(y)
    for t in range(h):
        p = n + t - season * (t // season + 1)
        v = math.nan
        while p >= 0:
            if not math.isnan(y[p]):
                v = y[p]
                break
            p -= season
        out[t] = fb if math.isnan(v) else v
    return out


def _weekday_mean_py(y: Sequence[float], h: int, per_day: int, k: int) -> list[float]:
    n = len(y)
    week = 7 * per_day
    out = [0.0] * h
    fb = _fallback_py(y)
    for t in range(h):
        p = n + t - week * (t // week + 1)
        s = 0.0
        c = 0
        for _ in range(k):
            if p < 0:
                break
            if not math.isnan(y[p]):
                s += y[p]
                c += 1
            p -= week
        out[t] = s / c if c > 0 else fb
    return out


def _hw_run_py(y: Sequence[float], per_day: int, alpha: float, beta: float, gamma: float,
               season: list[float]) -> tuple[float, float, float]:
    n = len(y)
    p = per_day
    m0, c0 = _finite_mean_py(y, 0, p)
    m1, c1 = _finite_mean_py(y, p, 2 * p)
    if c0 == 0 and c1 == 0:
        m0 = _fallback_py(y)
        m1 = m0
    elif c0 == 0:
        m0 = m1
    elif c1 == 0:
        m1 = m0
    b = (m1 - m0) / p
    lvl = m0 - b * (p + 1) / 2.0
    tot = 0.0
    for i in range(p):
        s = 0.0
        c = 0
        v = y[i]
        if not math.isnan(v):
            s += v - (m0 + b * (i - (p - 1) / 2.0))
            c += 1
        v = y[p + i]
        if not math.isnan(v):
            s += v - (m1 + b * (i - (p - 1) / 2.0))
            c += 1
        season[i] = s / c if c > 0 else 0.0
        tot += season[i]
    mean_s = tot / p
    for i in range(p):
        season[i] -= mean_s
    sse = 0.0
    for t in range(n):
        i = t % p
        v = y[t]
        if math.isnan(v):
            lvl = lvl + b
            continue
        if t >= 2 * p:
            e = v - (lvl + b + season[i])
            sse += e * e
        new = alpha * (v - season[i]) + (1.0 - alpha) * (lvl + b)
        b = beta * (new - lvl) + (1.0 - beta) * b
        season[i] = gamma * (v - new) + (1.0 - gamma) * season[i]
        lvl = new
    return lvl, b, sse


def hw_grid_py(y: Sequence[float], per_day: int, alphas: Sequence[float], betas: Sequence[float],
               gammas: Sequence[float]) -> tuple[float, float, float]:
    season = [0.0] * per_day
    best = math.inf
    ba = alphas[0]
    bb = betas[0]
    bg = gammas[0]
    for a in alphas:
        for b in betas:
            for g in gammas:
                _, _, sse = _hw_run_py(y, per_day, a, b, g, season)
                if sse < best:
                    best = sse
                    ba = a
                    bb = b
                    bg = g
    return ba, bb, bg


def _hw_forecast_py(y: Sequence[float], h: int, per_day: int, alpha: float, beta: float,
                    gamma: float) -> list[float]:
    n = len(y)
    season = [0.0] * per_day
    lvl, b, _ = _hw_run_py(y, per_day, alpha, beta, gamma, season)
    out = [0.0] * h
    for t in range(h):
        out[t] = lvl + (t + 1) * b + season[(n + t) % per_day]
    return out


def forecast_py(y: Sequence[float], h: int, per_day: int, method: int, k: int, alpha: float,
                beta: float, gamma: float, alphas: Sequence[float], betas: Sequence[float],
                gammas: Sequence[float]) -> list[float]:
    if method == SEASONAL_NAIVE_DAILY:
        return _naive_py(y, h, per_day)
    if method == SEASONAL_NAIVE_WEEKLY:
        return _naive_py(y, h, 7 * per_day)
    if method == WEEKDAY_MEAN:
        return _weekday_mean_py(y, h, per_day, k)
    if alpha < 0.0:
        alpha, beta, gamma = hw_grid_py(y, per_day, alphas, betas, gammas)
    return _hw_forecast_py(y, h, per_day, alpha, beta, gamma)


def _naive_mae_py(y: Sequence[float], season: int) -> float:
    s = 0.0
    c = 0
    for t in range(season, len(y)):
        d = y[t] - y[t - season]
        if not math.isnan(d):
            s += abs(d)
            c += 1
    return s / c if c > 0 else math.nan


def backtest_py(y: Sequence[float], h: int, per_day: int, method: int, k: int, alpha: float,
                beta: float, gamma: float, alphas: Sequence[float], betas: Sequence[float],
                gammas: Sequence[float], origins: Sequence[int], mape_floor: float
                ) -> tuple[list[float], list[float]]:
    m = len(origins)
    mase = [math.nan] * m
    mape = [math.nan] * m
    for q in range(m):
        o = int(origins[q])
        train = list(y[:o])
        f = forecast_py(train, h, per_day, method, k, alpha, beta, gamma, alphas, betas, gammas)
        scale = _naive_mae_py(train, per_day)
        sa = 0.0
        c = 0
        for i in range(o):
            v = train[i]
            if not math.isnan(v):
                sa += abs(v)
                c += 1
        floor = mape_floor * (sa / c) if c > 0 else 0.0
        se = 0.0
        ce = 0
        sp = 0.0
        cp = 0
        for t in range(h):
            a = y[o + t]
            if math.isnan(a):
                continue
            e = abs(a - f[t])
            se += e
            ce += 1
            if abs(a) >= floor and abs(a) > 0.0:
                sp += e / abs(a)
                cp += 1
        if ce > 0 and not math.isnan(scale):
            mase[q] = (se / ce) / max(scale, SCALE_FLOOR * (sa / c), 1e-300)
        if cp > 0:
            mape[q] = 100.0 * sp / cp
    return mase, mape
