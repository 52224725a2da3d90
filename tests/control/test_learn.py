"""Learned load response: switches of a simulated load measured on a noisy main meter."""

from __future__ import annotations

import json
import math

import pytest

from lmt.config.site import SiteConfig
from lmt.control.learn import LearnParams, LoadLearning, drifts, estimate, observe
from lmt.firmware_sim.physics import SitePhysics

T0 = 1784080800.0  # 2026-07-15 10:00 in China
READINGS = 5  # readings either side of a switch, one a second


def site(seed: int, kw: float, noise_kw: float = 3.0) -> SitePhysics:
    return SitePhysics(SiteConfig.model_validate({
        "site": {"seed": seed, "base_load_kw": 80.0, "noise_kw": noise_kw, "daily_swing": 0.1},
        "devices": [{"name": "m", "profile": "eastron-sdm630"},
                    {"name": "r", "profile": "generic-relay-8", "device_id": 2}],
        "loads": [{"name": "chiller", "relay": "r.relay_1", "kw": kw}]}))


def switch_steps(ph: SitePhysics, switches: int, wired: bool = True
                 ) -> list[tuple[float, float]]:
    """(step as the load's draw, the step's noise) for each switch: the mean of five
    readings after the switch against the five before, off and on in turn."""
    out = []
    t = T0
    on = True
    for _ in range(switches):
        before = [ph.power_kw(t + i) for i in range(READINGS)]
        t += READINGS
        on = not on
        if wired:
            ph.set_relay("r.relay_1", on)
        after = [ph.power_kw(t + i) for i in range(READINGS)]
        t += READINGS + 60
        change = sum(after) / READINGS - sum(before) / READINGS
        draw = change if on else -change  # switched on: the rise; off: the drop
        out.append((draw, 3.0 * math.sqrt(2 / READINGS)))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_the_learned_kw_converges_within_10_percent_in_10_switches(seed: int) -> None:
    """A chiller rated 30 kW that really draws 24 kW (its nameplate is wrong), 3 kW of site
    noise: after at most 10 switches the estimate is within 10 % of 24 kW, confident, and
    far enough from 30 kW to be a drift."""
    p = LearnParams()
    ph = site(seed, kw=24.0)
    state = LoadLearning()
    for step, noise in switch_steps(ph, 10):
        state = observe(p, state, step, noise, rated_kw=30.0)
        state = LoadLearning.from_dict(json.loads(json.dumps(state.to_dict())))  # a restart
    est = estimate(p, state, rated_kw=30.0)
    assert est.n == 10
    assert est.kw == pytest.approx(24.0, rel=0.10)
    assert est.confident
    assert not drifts(p, est, 30.0)  # 6 kW off is not half the rating
    assert drifts(LearnParams(drift_rel=0.1), est, 30.0)


def test_a_load_whose_relay_does_nothing_is_learned_as_about_zero_and_flagged() -> None:
    p = LearnParams()
    state = LoadLearning()
    for step, noise in switch_steps(site(7, kw=30.0), 10, wired=False):
        state = observe(p, state, step, noise, rated_kw=30.0)
    est = estimate(p, state, rated_kw=30.0)
    assert est.kw is not None and abs(est.kw) < 3.0
    assert est.confident and drifts(p, est, 30.0)


def test_a_step_disturbed_by_the_site_is_an_outlier_not_a_shift() -> None:
    p = LearnParams()
    state = LoadLearning()
    for step in (20.1, 19.8, 20.3, 55.0, 19.9, 20.0):  # the fourth: the site jumped meanwhile
        state = observe(p, state, step, 1.0)
    est = estimate(p, state, rated_kw=20.0)
    assert est.kw == pytest.approx(20.05, abs=0.01)  # the median of the six
    assert est.confident


def test_other_switches_in_the_same_cycle_are_taken_out_or_the_step_skipped() -> None:
    p = LearnParams()
    state = observe(p, LoadLearning(), 32.0, 1.0, others_kw=12.0, rated_kw=20.0)
    assert state.steps == [20.0]
    state = observe(p, state, 60.0, 1.0, others_kw=40.0, rated_kw=20.0)  # too entangled
    assert state.steps == [20.0] and state.skipped == 1
    state = observe(p, state, math.nan, 1.0)
    assert state.skipped == 2


def test_no_confidence_before_min_steps_and_the_noise_bounds_it() -> None:
    p = LearnParams(min_steps=3)
    state = LoadLearning()
    for step in (10.0, 10.0):
        state = observe(p, state, step, 0.5)
    assert not estimate(p, state, rated_kw=10.0).confident  # two steps: too few
    state = observe(p, state, 10.0, 0.5)
    est = estimate(p, state, rated_kw=10.0)
    # identical steps: the spread is the meter's noise, not zero
    assert est.se_kw == pytest.approx(1.2533 * 0.5 / math.sqrt(3))
    assert est.confident
    noisy = LoadLearning()
    for step in (10.0, 10.0, 10.0):
        noisy = observe(p, noisy, step, 4.0)
    assert not estimate(p, noisy, rated_kw=10.0).confident  # 2.9 kW of 10: not sure
    assert estimate(p, LoadLearning()).kw is None


def test_only_the_last_steps_are_kept() -> None:
    p = LearnParams(keep=5)
    state = LoadLearning()
    for step in (1.0,) * 5 + (9.0,) * 5:  # the load changed: the old steps age out
        state = observe(p, state, step, 0.1)
    assert state.steps == [9.0] * 5 and estimate(p, state).kw == 9.0
    with pytest.raises(ValueError):
        LearnParams(keep=2, min_steps=3)
