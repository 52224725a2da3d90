"""Short-term load forecasts: kernels against their plain-Python twins, hand-checked cases,
the backtest's choice on series built to favour each method, the cold start."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmt.analytics.forecast import (
    HOLT_WINTERS_DAILY,
    HW_ALPHAS,
    HW_BETAS,
    HW_GAMMAS,
    SEASONAL_NAIVE_DAILY,
    SEASONAL_NAIVE_WEEKLY,
    WEEKDAY_MEAN,
    backtest_kernel,
    backtest_origins,
    forecast,
    forecast_kernel,
    hw_grid_kernel,
)
from lmt.analytics.forecast_reference import backtest_py, forecast_py, hw_grid_py

P = 24  # intervals a day in the built series (small: the tests stay fast)
GRID = (np.array(HW_ALPHAS), np.array(HW_BETAS), np.array(HW_GAMMAS))
GRID_PY = (list(HW_ALPHAS), list(HW_BETAS), list(HW_GAMMAS))
ALL = (SEASONAL_NAIVE_DAILY, SEASONAL_NAIVE_WEEKLY, WEEKDAY_MEAN, HOLT_WINTERS_DAILY)


def built(seed: int, days: int, per_day: int, *, weekly: float = 0.0, trend: float = 0.0,
          noise: float = 0.5, missing: float = 0.0) -> np.ndarray:
    """A level of 10, a daily sine of amplitude 5, weekends `weekly` lower, a trend per
    interval, Gaussian noise, and a fraction of values missing (plus one whole missing day
    when `missing` > 0)."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * per_day)
    y = (10.0 + 5.0 * np.sin(2 * np.pi * t / per_day)
         - weekly * ((t // per_day) % 7 >= 5) + trend * t + rng.normal(0.0, noise, t.size))
    if missing > 0.0:
        y[rng.random(t.size) < missing] = np.nan
        d = int(rng.integers(0, days))
        y[d * per_day:(d + 1) * per_day] = np.nan
    return y


# --------------------------------------------------------------- kernels = plain Python


@pytest.mark.parametrize("seed", range(5))
def test_every_kernel_equals_its_plain_python_twin(seed: int) -> None:
    per_day = 6
    rng = np.random.default_rng(100 + seed)
    y = built(seed, 22, per_day, weekly=2.0, trend=0.01 * seed, missing=0.1 * (seed % 3))
    h = int(rng.integers(1, 2 * per_day + 1))
    k = int(rng.integers(1, 5))
    for method in ALL:
        for params in ((-1.0, 0.0, 0.0), (0.3, 0.05, 0.1)):
            got = forecast_kernel(y, h, per_day, method, k, *params, *GRID)
            want = forecast_py(list(y), h, per_day, method, k, *params, *GRID_PY)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert hw_grid_kernel(y, per_day, *GRID) == hw_grid_py(list(y), per_day, *GRID_PY)
    origins = backtest_origins(y.size, h, per_day, 5)
    assert origins.size == 5
    for method in ALL:
        mase, mape = backtest_kernel(y, h, per_day, method, k, -1.0, 0.0, 0.0, *GRID, origins, 0.05)
        mase_py, mape_py = backtest_py(list(y), h, per_day, method, k, -1.0, 0.0, 0.0, *GRID_PY,
                                       list(origins), 0.05)
        np.testing.assert_allclose(mase, mase_py, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(mape, mape_py, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- small cases by hand


def test_seasonal_naive_repeats_the_last_day_and_the_last_week() -> None:
    per_day = 4
    y = np.arange(21 * per_day, dtype=np.float64)
    daily = forecast_kernel(y, 8, per_day, SEASONAL_NAIVE_DAILY, 1, 0, 0, 0, *GRID)
    assert daily.tolist() == [80.0, 81.0, 82.0, 83.0] * 2
    weekly = forecast_kernel(y, 8, per_day, SEASONAL_NAIVE_WEEKLY, 1, 0, 0, 0, *GRID)
    assert weekly.tolist() == [56.0, 57.0, 58.0, 59.0, 60.0, 61.0, 62.0, 63.0]
    y[80] = np.nan  # a missing value: the same interval a season further back
    daily = forecast_kernel(y, 8, per_day, SEASONAL_NAIVE_DAILY, 1, 0, 0, 0, *GRID)
    assert daily.tolist() == [76.0, 81.0, 82.0, 83.0] * 2


def test_the_mean_of_the_last_k_same_weekdays_by_hand() -> None:
    per_day = 2
    y = np.arange(3 * 7 * per_day, dtype=np.float64)  # three weeks, 42 values
    # The next interval is position 42: the same weekday and time at 28, 14, 0.
    f = forecast_kernel(y, 3, per_day, WEEKDAY_MEAN, 2, 0, 0, 0, *GRID)
    assert f.tolist() == [(28 + 14) / 2, (29 + 15) / 2, (30 + 16) / 2]
    f = forecast_kernel(y, 1, per_day, WEEKDAY_MEAN, 5, 0, 0, 0, *GRID)  # only three there
    assert f.tolist() == [(28 + 14 + 0) / 3]
    y[28] = np.nan  # skipped
    f = forecast_kernel(y, 1, per_day, WEEKDAY_MEAN, 2, 0, 0, 0, *GRID)
    assert f.tolist() == [14.0]


def test_holt_winters_on_a_daily_sine_and_a_level_is_exact() -> None:
    t = np.arange(10 * P)
    truth = 10.0 + 5.0 * np.sin(2 * np.pi * np.arange(t.size + 2 * P) / P)
    y = truth[:t.size]
    for params in ((0.3, 0.01, 0.2), (-1.0, 0.0, 0.0)):
        f = forecast_kernel(y, 2 * P, P, HOLT_WINTERS_DAILY, 1, *params, *GRID)
        np.testing.assert_allclose(f, truth[t.size:], atol=1e-9)


def test_holt_winters_converges_to_a_sine_after_a_level_step() -> None:
    """The level steps from 10 to 14 on day 3; the forecast error shrinks day by day (slowly:
    a level-season exchange decays over weeks) to under 0.1 % of the level after 60 days."""
    errors = []
    for days in (10, 30, 60):
        n = days * P
        t = np.arange(n + P)
        truth = 10.0 + 5.0 * np.sin(2 * np.pi * t / P) + 4.0 * (t >= 3 * P)
        f = forecast_kernel(truth[:n], P, P, HOLT_WINTERS_DAILY, 1, 0.1, 0.0, 0.1, *GRID)
        errors.append(float(np.abs(f - truth[n:]).max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.014, errors


def test_holt_winters_on_a_ramp_is_exact_and_daily_naive_lags_a_day() -> None:
    """The worked example of docs/forecast.md: y = t, 4 a day, 3 days, horizon 4."""
    y = np.arange(12, dtype=np.float64)
    r = forecast(y, 4, 4)
    assert r.method == "holt_winters_daily"
    np.testing.assert_allclose(r.values, [12.0, 13.0, 14.0, 15.0], atol=1e-9)
    naive, hw = r.scores
    assert (naive.method, naive.origins, hw.origins) == ("seasonal_naive_daily", 1, 1)
    # One origin, 8: the naive forecast of 8..11 is 4..7, every error 4; the in-sample
    # daily-naive MAE of 0..7 is 4 as well: MASE 1. MAPE: 4/8, 4/9, 4/10, 4/11.
    assert naive.mase == pytest.approx(1.0)
    assert naive.mape == pytest.approx(100 * (4 / 8 + 4 / 9 + 4 / 10 + 4 / 11) / 4)
    assert hw.mase == pytest.approx(0.0, abs=1e-9)
    assert r.mase == hw.mase
    assert r.note == "least mean MASE over 1 origin (under two weeks: no weekly methods)"


def test_mape_skips_near_zero_actuals() -> None:
    per_day = 4
    y = np.tile([0.0, 10.0, 10.0, 10.0], 3)
    y[8:] = [0.01, 12.0, 12.0, 12.0]  # the last day: a near-zero night and a higher day
    mase, mape = backtest_kernel(y, 4, per_day, SEASONAL_NAIVE_DAILY, 1, 0, 0, 0, *GRID,
                                 np.array([8]), 0.05)
    # Floor: 5 % of the mean |y| of 0..7 (7.5) = 0.375, so 0.01 is skipped; MAPE = 2/12.
    assert mape[0] == pytest.approx(100 * 2 / 12)
    assert math.isfinite(mase[0])


# --------------------------------------------------------------- the backtest's choice


@pytest.mark.parametrize("seed", [1, 2])
def test_a_strong_weekly_pattern_picks_a_weekly_method(seed: int) -> None:
    r = forecast(built(seed, 28, P, weekly=4.0, noise=0.3), P, P)
    assert r.method in ("seasonal_naive_weekly", "weekday_mean"), r
    assert [s.method for s in r.scores] == ["seasonal_naive_daily", "seasonal_naive_weekly",
                                            "weekday_mean", "holt_winters_daily"]
    assert r.mase == min(s.mase for s in r.scores)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_pure_daily_pattern_with_noise_picks_a_daily_method(seed: int) -> None:
    r = forecast(built(seed, 28, P, noise=0.5), P, P)
    assert r.method in ("seasonal_naive_daily", "holt_winters_daily"), r


@pytest.mark.parametrize("seed", [1, 2])
def test_a_trending_daily_series_picks_holt_winters(seed: int) -> None:
    r = forecast(built(seed, 28, P, trend=0.02, noise=0.3), 2 * P, P)
    assert r.method == "holt_winters_daily", r
    assert r.hw_params is not None and r.values.shape == (2 * P,)


def test_ties_go_to_the_simpler_method() -> None:
    t = np.arange(21 * P)
    r = forecast(10.0 + 5.0 * np.sin(2 * np.pi * t / P), P, P)  # every method is exact
    assert r.method == "seasonal_naive_daily"
    assert all(s.mase < 1e-6 for s in r.scores)


def test_missing_values_still_give_a_finite_forecast() -> None:
    r = forecast(built(3, 21, P, weekly=3.0, missing=0.2), 2 * P, P)
    assert np.isfinite(r.values).all() and math.isfinite(r.mase)


# --------------------------------------------------------------- cold start


def test_cold_start_under_two_days_is_daily_seasonal_naive() -> None:
    y = built(0, 2, P)[: P + 5]
    r = forecast(y, P, P)
    assert (r.method, r.note, r.scores) == ("seasonal_naive_daily", "cold start: seasonal naive", ())
    assert math.isnan(r.mase) and math.isnan(r.mape)
    np.testing.assert_array_equal(r.values, y[5:P + 5])


def test_under_two_weeks_the_weekly_methods_are_no_candidates() -> None:
    r = forecast(built(0, 13, P), P, P)
    assert [s.method for s in r.scores] == ["seasonal_naive_daily", "holt_winters_daily"]
    assert "no weekly methods" in r.note
    r = forecast(built(0, 14, P), P, P)
    assert len(r.scores) == 4 and all(s.origins == 7 for s in r.scores)  # origins >= day 7


def test_two_days_with_no_room_for_an_origin() -> None:
    r = forecast(built(0, 2, P), P, P)  # the only origin would leave one day to train on
    assert (r.method, r.note, r.scores) == ("seasonal_naive_daily",
                                            "no backtest origin: seasonal naive", ())


def test_fixed_holt_winters_parameters_are_used() -> None:
    r = forecast(built(1, 28, P, trend=0.02, noise=0.3), P, P, hw_params=(0.1, 0.01, 0.2))
    assert r.method == "holt_winters_daily" and r.hw_params == (0.1, 0.01, 0.2)


@pytest.mark.parametrize(("args", "kwargs"), [
    ((np.zeros((2, 24)), 4, 24), {}),
    ((np.zeros(48), 0, 24), {}),
    ((np.zeros(48), 49, 24), {}),
    ((np.zeros(48), 4, 0), {}),
    ((np.zeros(10), 4, 24), {}),
    ((np.full(48, np.nan), 4, 24), {}),
    ((np.r_[np.zeros(47), np.inf], 4, 24), {}),
    ((np.zeros(48), 4, 24), {"k": 0}),
    ((np.zeros(48), 4, 24), {"hw_params": (0.1, 2.0, 0.1)}),
    ((np.zeros(48), 4, 24), {"mape_floor": -1.0}),
])
def test_bad_input_is_refused(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        forecast(*args, **kwargs)  # type: ignore[arg-type]
