"""Short-term site load forecasts: cheap methods, picked by a rolling-origin backtest.

The history is one 1-D float64 array of interval values (e.g. 96 a day at 15 min), oldest
first, NaN where an interval is missing; its last value is the interval just before the
forecast. Weekdays are positions, not dates: "the same weekday" is ``7 * per_day`` intervals
back. See docs/forecast.md for the methods, the backtest, the scores and the cold start.

Methods (codes, in order of simplicity, the tie-break order):

* ``seasonal_naive_daily`` (0): the same interval one day back.
* ``seasonal_naive_weekly`` (1): the same interval one week back.
* ``weekday_mean`` (2): the mean of the same interval on the last ``k`` same-weekday days.
* ``holt_winters_daily`` (3): Holt-Winters additive (level, trend, daily season), the
  smoothing parameters fixed or chosen by a grid search on the training history.

Every kernel exists twice: numba kernels over numpy arrays (here), and the same algorithm in
plain Python, statement for statement, in :mod:`lmt.analytics.forecast_reference`: the tests'
oracle. Keep the two in step.

Pure functions: no I/O, no clock, no state between calls. Only numpy, numba and the
standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = [
    "DEFAULT_K",
    "DEFAULT_ORIGINS",
    "HOLT_WINTERS_DAILY",
    "HW_ALPHAS",
    "HW_BETAS",
    "HW_GAMMAS",
    "MAPE_FLOOR",
    "METHODS",
    "SEASONAL_NAIVE_DAILY",
    "SEASONAL_NAIVE_WEEKLY",
    "WEEKDAY_MEAN",
    "CandidateScore",
    "Forecast",
    "backtest_kernel",
    "backtest_origins",
    "candidates",
    "forecast",
    "forecast_kernel",
    "hw_grid_kernel",
]

SEASONAL_NAIVE_DAILY = 0
SEASONAL_NAIVE_WEEKLY = 1
WEEKDAY_MEAN = 2
HOLT_WINTERS_DAILY = 3
METHODS = ("seasonal_naive_daily", "seasonal_naive_weekly", "weekday_mean", "holt_winters_daily")

DEFAULT_K = 4
DEFAULT_ORIGINS = 14
MAX_HORIZON_DAYS = 2
# The Holt-Winters grid (alpha: level, beta: trend, gamma: daily season), per interval.
HW_ALPHAS = (0.02, 0.1, 0.3)
HW_BETAS = (0.0, 0.001, 0.01)
HW_GAMMAS = (0.05, 0.2, 0.5)
# MAPE skips actuals whose magnitude is below this fraction of the training history's mean |y|.
MAPE_FLOOR = 0.05
# The MASE scale (in-sample daily seasonal-naive MAE) is floored at this fraction of the
# training history's mean |y| (and at 1e-300): a strictly periodic history has a scale of
# rounding noise, and every method's MASE comes out ~0 rather than noise over noise.
SCALE_FLOOR = 1e-6
# Mean MASEs within TIE_TOL x max(1, best) of the best are a tie: the simpler method wins.
TIE_TOL = 1e-6


# =========================================================================== numba kernels


@njit(cache=True)
def _finite_mean_nb(y: np.ndarray, lo: int, hi: int) -> tuple[float, int]:
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


@njit(cache=True)
def _fallback_nb(y: np.ndarray) -> float:
    """The mean of the finite history (0 when there is none): where a method has no value."""
    m, c = _finite_mean_nb(y, 0, y.shape[0])
    return m if c > 0 else 0.0


@njit(cache=True)
def _naive_nb(y: np.ndarray, h: int, season: int) -> np.ndarray:
    """f[t] = y[n + t - season * j] for the smallest j >= 1 with that index inside the history
    and its value finite; else the fallback."""
    n = y.shape[0]
    out = np.empty(h, np.float64)
    fb = _fallback_nb(y)
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


@njit(cache=True)
def _weekday_mean_nb(y: np.ndarray, h: int, per_day: int, k: int) -> np.ndarray:
    """f[t] = mean of the finite values among y[n + t - week * j], j = j0 .. j0 + k - 1 (those
    inside the history), j0 the smallest j >= 1 with the index inside; the fallback when none."""
    n = y.shape[0]
    week = 7 * per_day
    out = np.empty(h, np.float64)
    fb = _fallback_nb(y)
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


@njit(cache=True)
def _hw_run_nb(y: np.ndarray, per_day: int, alpha: float, beta: float, gamma: float,
               season: np.ndarray) -> tuple[float, float, float]:
    """Run Holt-Winters additive over the history (n >= 2 days): returns (level, trend, SSE
    of the one-step errors after the first two days); ``season`` (per_day) is filled with the
    final seasonal terms, indexed by position mod per_day.

    Start: m0, m1 the finite means of days 0 and 1; trend b = (m1 - m0) / per_day; season[i]
    the mean over the two days of y - (m_d + b * (i - (per_day - 1) / 2)), centred to sum 0;
    level = m0 - b * (per_day + 1) / 2 (the level at t = -1). Then for every t (from 0):
    l' = alpha (y - s) + (1 - alpha)(l + b); b' = beta (l' - l) + (1 - beta) b;
    s' = gamma (y - l') + (1 - gamma) s. A missing y only advances the level: l' = l + b."""
    n = y.shape[0]
    p = per_day
    m0, c0 = _finite_mean_nb(y, 0, p)
    m1, c1 = _finite_mean_nb(y, p, 2 * p)
    if c0 == 0 and c1 == 0:
        m0 = _fallback_nb(y)
        m1 = m0
    elif c0 == 0:
        m0 = m1
    elif c1 == 0:
        m1 = m0
    b = (m1 - m0) / p
    lvl = m0 - b * (p + 1) / 2.0  # the level at t = -1: the day's mean sits mid-day
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


@njit(cache=True)
def hw_grid_kernel(y: np.ndarray, per_day: int, alphas: np.ndarray, betas: np.ndarray,
                   gammas: np.ndarray) -> tuple[float, float, float]:
    """The (alpha, beta, gamma) of the grid with the least in-sample one-step SSE (the first
    in alpha-major, then beta, then gamma order on ties)."""
    season = np.empty(per_day, np.float64)
    best = math.inf
    ba = alphas[0]
    bb = betas[0]
    bg = gammas[0]
    for a in alphas:
        for b in betas:
            for g in gammas:
                _, _, sse = _hw_run_nb(y, per_day, a, b, g, season)
                if sse < best:
                    best = sse
                    ba = a
                    bb = b
                    bg = g
    return ba, bb, bg


@njit(cache=True)
def _hw_forecast_nb(y: np.ndarray, h: int, per_day: int, alpha: float, beta: float,
                    gamma: float) -> np.ndarray:
    """f[t] = level + (t + 1) * trend + season[(n + t) mod per_day], from the final state."""
    n = y.shape[0]
    season = np.empty(per_day, np.float64)
    lvl, b, _ = _hw_run_nb(y, per_day, alpha, beta, gamma, season)
    out = np.empty(h, np.float64)
    for t in range(h):
        out[t] = lvl + (t + 1) * b + season[(n + t) % per_day]
    return out


@njit(cache=True)
def forecast_kernel(y: np.ndarray, h: int, per_day: int, method: int, k: int, alpha: float,
                    beta: float, gamma: float, alphas: np.ndarray, betas: np.ndarray,
                    gammas: np.ndarray) -> np.ndarray:
    """The next ``h`` values after ``y`` by ``method``. Holt-Winters: ``alpha < 0`` means
    choose (alpha, beta, gamma) on ``y`` by :func:`hw_grid_kernel`. The caller checks that
    ``y`` is long enough for the method (one day, one week, two days)."""
    if method == SEASONAL_NAIVE_DAILY:
        return _naive_nb(y, h, per_day)
    if method == SEASONAL_NAIVE_WEEKLY:
        return _naive_nb(y, h, 7 * per_day)
    if method == WEEKDAY_MEAN:
        return _weekday_mean_nb(y, h, per_day, k)
    if alpha < 0.0:
        alpha, beta, gamma = hw_grid_kernel(y, per_day, alphas, betas, gammas)
    return _hw_forecast_nb(y, h, per_day, alpha, beta, gamma)


@njit(cache=True)
def _naive_mae_nb(y: np.ndarray, season: int) -> float:
    """Mean |y[t] - y[t - season]| over the pairs with both finite; NaN when there is none."""
    s = 0.0
    c = 0
    for t in range(season, y.shape[0]):
        d = y[t] - y[t - season]
        if not math.isnan(d):
            s += abs(d)
            c += 1
    return s / c if c > 0 else math.nan


@njit(cache=True)
def backtest_kernel(y: np.ndarray, h: int, per_day: int, method: int, k: int, alpha: float,
                    beta: float, gamma: float, alphas: np.ndarray, betas: np.ndarray,
                    gammas: np.ndarray, origins: np.ndarray, mape_floor: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(MASE, MAPE %) of ``method`` at each origin ``o``: forecast y[o : o + h] from y[:o].

    MASE: the MAE over the finite actuals divided by the daily seasonal-naive in-sample MAE
    of y[:o] (floored at SCALE_FLOOR x mean |y[:o]|); NaN with no finite actual or no scale.
    MAPE: 100 x mean |a - f| / |a| over the finite actuals with |a| >= mape_floor x mean
    |y[:o]| and |a| > 0; NaN when none."""
    m = origins.shape[0]
    mase = np.full(m, math.nan)
    mape = np.full(m, math.nan)
    for q in range(m):
        o = origins[q]
        train = y[:o]
        f = forecast_kernel(train, h, per_day, method, k, alpha, beta, gamma, alphas, betas,
                            gammas)
        scale = _naive_mae_nb(train, per_day)
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


# =========================================================================== typed API


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's backtest: mean MASE and mean MAPE (%) over the origins where each is
    defined (NaN when none), and the number of origins."""

    method: str
    mase: float
    mape: float
    origins: int


@dataclass(frozen=True)
class Forecast:
    """What :func:`forecast` returns.

    * ``values``: the ``horizon`` forecast values (float64), the first for the interval right
      after the history.
    * ``method``: the chosen method's name (one of ``METHODS``).
    * ``mase``, ``mape``: its backtest mean MASE and MAPE (%); NaN when there was no backtest.
    * ``scores``: every candidate's :class:`CandidateScore`, in the order of simplicity.
    * ``note``: how the method was chosen (e.g. ``"cold start: seasonal naive"``).
    * ``hw_params``: (alpha, beta, gamma) used when the method is Holt-Winters, else None.
    """

    values: np.ndarray
    method: str
    mase: float
    mape: float
    scores: tuple[CandidateScore, ...]
    note: str
    hw_params: tuple[float, float, float] | None = None


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array(HW_ALPHAS, np.float64), np.array(HW_BETAS, np.float64),
            np.array(HW_GAMMAS, np.float64))


def _mean(xs: np.ndarray) -> float:
    ok = xs[~np.isnan(xs)]
    return float(ok.mean()) if ok.size else math.nan


def candidates(n: int, per_day: int) -> tuple[int, ...]:
    """The candidate method codes for a history of ``n`` intervals (the cold-start rules)."""
    if n >= 14 * per_day:
        return (SEASONAL_NAIVE_DAILY, SEASONAL_NAIVE_WEEKLY, WEEKDAY_MEAN, HOLT_WINTERS_DAILY)
    if n >= 2 * per_day:
        return (SEASONAL_NAIVE_DAILY, HOLT_WINTERS_DAILY)
    return (SEASONAL_NAIVE_DAILY,)


def backtest_origins(n: int, horizon: int, per_day: int, n_origins: int) -> np.ndarray:
    """Origins n - horizon - i * per_day (i = 0 .. n_origins - 1), oldest first, keeping those
    with at least a week of training history when the weekly methods are candidates, else two
    days."""
    least = 7 * per_day if n >= 14 * per_day else 2 * per_day
    os_ = [n - horizon - i * per_day for i in range(n_origins)]
    return np.array(sorted(o for o in os_ if o >= least), np.int64)


def forecast(history: object, horizon: int, per_day: int, *, k: int = DEFAULT_K,
             n_origins: int = DEFAULT_ORIGINS,
             hw_params: tuple[float, float, float] | None = None,
             mape_floor: float = MAPE_FLOOR) -> Forecast:
    """Forecast the next ``horizon`` intervals (at most two days) after ``history``.

    Each candidate (see :func:`candidates`) is backtested at :func:`backtest_origins` with the
    same horizon; the least mean MASE wins, a tie (within TIE_TOL) going to the simpler method.
    ``hw_params`` fixes Holt-Winters' (alpha, beta, gamma); None chooses them by the grid search
    on each training history. A history under two days is a cold start: daily seasonal naive."""
    y = np.ascontiguousarray(history, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError("history must be one-dimensional")
    y = y if y.flags.writeable else y.copy()
    if isinstance(per_day, bool) or int(per_day) != per_day or per_day < 1:
        raise ValueError(f"per_day must be an integer >= 1, got {per_day!r}")
    if isinstance(horizon, bool) or int(horizon) != horizon or not 1 <= horizon <= 2 * per_day:
        raise ValueError(f"horizon must be an integer in 1 .. 2 * per_day, got {horizon!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(n_origins, bool) or int(n_origins) != n_origins or n_origins < 0:
        raise ValueError(f"n_origins must be an integer >= 0, got {n_origins!r}")
    if np.isinf(y).any():
        raise ValueError("history must hold finite values or NaN")
    if y.shape[0] < per_day:
        raise ValueError("history must hold at least one day")
    if np.isnan(y).all():
        raise ValueError("history has no value")
    if not 0.0 <= float(mape_floor) < math.inf:
        raise ValueError(f"mape_floor must be finite and >= 0, got {mape_floor!r}")
    if hw_params is not None:
        if len(hw_params) != 3 or not all(0.0 <= float(p) <= 1.0 for p in hw_params):
            raise ValueError("hw_params must be (alpha, beta, gamma), each in 0 .. 1")
        alpha, beta, gamma = (float(p) for p in hw_params)
    else:
        alpha, beta, gamma = -1.0, 0.0, 0.0
    per_day, horizon, k = int(per_day), int(horizon), int(k)
    n = y.shape[0]
    ga, gb, gg = _grid()
    cands = candidates(n, per_day)
    origins = backtest_origins(n, horizon, per_day, int(n_origins)) if len(cands) > 1 else None
    if origins is not None and origins.size == 0:
        origins = None

    scores: list[CandidateScore] = []
    if origins is not None:
        for c in cands:
            mase, mape = backtest_kernel(y, horizon, per_day, c, k, alpha, beta, gamma, ga, gb, gg,
                                         origins, float(mape_floor))
            scores.append(CandidateScore(METHODS[c], _mean(mase), _mean(mape), int(origins.size)))
    scored = [(s.mase, i) for i, s in enumerate(scores) if not math.isnan(s.mase)]
    if len(cands) == 1:
        method, note = SEASONAL_NAIVE_DAILY, "cold start: seasonal naive"
    elif not scored:
        method, note = SEASONAL_NAIVE_DAILY, "no backtest origin: seasonal naive"
    else:
        best = min(m for m, _ in scored)
        pick = min(i for m, i in scored if m <= best + TIE_TOL * max(1.0, abs(best)))
        method = cands[pick]
        weekly = "" if len(cands) == 4 else " (under two weeks: no weekly methods)"
        count = origins.size if origins is not None else 0
        note = f"least mean MASE over {count} origin{'' if count == 1 else 's'}{weekly}"
    used: tuple[float, float, float] | None = None
    if method == HOLT_WINTERS_DAILY:
        used = (alpha, beta, gamma) if alpha >= 0.0 else hw_grid_kernel(y, per_day, ga, gb, gg)
        alpha, beta, gamma = used
    values = forecast_kernel(y, horizon, per_day, method, k, alpha, beta, gamma, ga, gb, gg)
    chosen = next((s for s in scores if s.method == METHODS[method]), None)
    params = (float(used[0]), float(used[1]), float(used[2])) if used is not None else None
    return Forecast(values, METHODS[method], chosen.mase if chosen else math.nan,
                    chosen.mape if chosen else math.nan, tuple(scores), note, params)


def warmup() -> None:
    """Compile the kernels for the argument types the API passes (fills numba's disk cache)."""
    history = np.arange(4 * 7 * 2, dtype=np.float64) % 4.0 + 1.0
    forecast(history, 4, 4, n_origins=2)
