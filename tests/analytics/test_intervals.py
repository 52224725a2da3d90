"""Interval records: energies from the registers, across restarts, outages and clock steps.

The truth is the simulator's physics (:mod:`lmt.firmware_sim.physics`), stepped on a synthetic
clock: its energy register at any instant is exact, what a meter shows is that register as
float32 (an SDM630), read once a minute like the agent's slow points.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmt.analytics.intervals import IntervalConfig, MeterLedger, MeterSpec, feed, month_of
from lmt.analytics.sample import Sample
from lmt.config.site import SiteConfig
from lmt.firmware_sim.physics import SitePhysics

DAY = 86400
# 2026-07-15 00:00 in China (UTC+8)
MIDNIGHT = 1784044800
SPEC = MeterSpec("main", has_import=True, has_export=True, register_max_kwh=1e7,
                 resolution_kwh=0.001)


def physics(seed: int = 3, start_kwh: float = 12345.6) -> SitePhysics:
    site = SiteConfig.model_validate({
        "site": {"seed": seed, "base_load_kw": 80.0, "noise_kw": 2.0, "daily_swing": 0.3,
                 "import_energy_kwh": start_kwh},
        "devices": [{"name": "m", "profile": "eastron-sdm630"}]})
    return SitePhysics(site)


def sample(ph: SitePhysics, t: float, mono: float, register: bool,
           register_of: Callable[[float], float] | None = None) -> Sample:
    q = ph.sample(t)
    reg = None
    if register:
        raw = q["import_energy_kwh"] if register_of is None else register_of(q["import_energy_kwh"])
        reg = float(np.float32(raw))
    return Sample(t=t, mono=mono, import_kwh=reg, export_kwh=0.0 if register else None,
                  power_kw=q["power_w"] / 1000.0,
                  voltage_v=(q["voltage_l1_v"], q["voltage_l2_v"], q["voltage_l3_v"]),
                  current_a=(q["current_l1_a"], q["current_l2_a"], q["current_l3_a"]),
                  power_factor=q["power_factor"])


@dataclass
class Run:
    """A meter read every ``every_s`` over a span, into the ledger; the truth recorded."""

    cfg: IntervalConfig = field(default_factory=IntervalConfig)
    spec: MeterSpec = SPEC
    state: MeterLedger = field(default_factory=MeterLedger)
    records: list[dict[str, Any]] = field(default_factory=list)
    session: str = "a"

    def feed(self, s: Sample) -> None:
        self.state, out = feed(self.cfg, self.spec, self.state, s, self.session)
        self.records += out

    def restart(self, session: str) -> None:
        """The agent stops and starts: the state goes through JSON, the monotonic clock is new."""
        self.state = MeterLedger.from_dict(json.loads(json.dumps(self.state.to_dict())))
        self.session = session

    def day(self, start: float = MIDNIGHT) -> list[dict[str, Any]]:
        return [r for r in self.records if start <= r["start"] < start + DAY]


def times(start: float, end: float, every_s: float) -> Iterator[float]:
    t = start
    while t < end:
        yield t
        t += every_s


def run_day(every_s: float = 5.0, register_every: int = 12, outage: tuple[float, float] | None = None,
            restart_at: float | None = None, restart_gap_s: float = 20.0, seed: int = 3,
            **cfg: Any) -> tuple[Run, float]:
    """A day (and a margin either side) read every ``every_s``; the register every
    ``register_every`` readings. Returns the run and the true register difference of the day."""
    ph, run = physics(seed), Run(cfg=IntervalConfig(**cfg))
    truth = {}
    mono_base = 1000.0
    for i, t in enumerate(times(MIDNIGHT - 600, MIDNIGHT + DAY + 1200, every_s)):
        if MIDNIGHT not in truth and t >= MIDNIGHT:
            truth[MIDNIGHT] = _register_at(ph, MIDNIGHT)
        if MIDNIGHT + DAY not in truth and t >= MIDNIGHT + DAY:
            truth[MIDNIGHT + DAY] = _register_at(ph, MIDNIGHT + DAY)
        if outage and outage[0] <= t < outage[1]:
            ph.sample(t)  # the site goes on; nobody reads it
            continue
        if restart_at is not None and restart_at <= t < restart_at + restart_gap_s:
            ph.sample(t)
            continue
        if restart_at is not None and t >= restart_at + restart_gap_s and run.session == "a":
            run.restart("b")
            mono_base = 50.0 - t
        run.feed(sample(ph, t, t + mono_base, register=i % register_every == 0))
    return run, truth[MIDNIGHT + DAY] - truth[MIDNIGHT]


def _register_at(ph: SitePhysics, t: float) -> float:
    ph.sample(t)
    return ph.import_energy_kwh


def check_day(run: Run, truth_kwh: float, tolerance_kwh: float = 0.01) -> list[dict[str, Any]]:
    day = run.day()
    starts = [r["start"] for r in day]
    assert starts == [MIDNIGHT + 900 * i for i in range(96)], "each interval once, in order"
    total = sum(r["import_kwh"] for r in day)
    assert total == pytest.approx(truth_kwh, abs=tolerance_kwh)
    return day


def test_a_day_sums_to_the_register_difference() -> None:
    run, truth = run_day()
    day = check_day(run, truth)
    assert all(r["quality"] == "complete" and r["source"]["import"] == "register" for r in day)
    assert all(r["coverage"] == 1.0 for r in day)
    # the mean demand is the energy over the interval's hours; the highest minute is above it
    r = day[40]
    assert r["mean_kw"] == pytest.approx(r["import_kwh"] * 4, abs=1e-3)
    assert r["max_kw"] >= r["mean_kw"] - 1.0
    v = r["voltage_v"]["l1"]
    assert 225 < v["min"] <= v["mean"] <= v["max"] < 235
    assert r["power_factor"] == pytest.approx(0.95)


def test_each_interval_is_close_to_the_truth() -> None:
    """Not only the sum: every boundary is placed by the integrated power, so each interval is
    within a few watt-hours of the physics' own register difference."""
    ph, run = physics(), Run()
    bounds: dict[float, float] = {}
    for i, t in enumerate(times(MIDNIGHT - 60, MIDNIGHT + 4 * 3600 + 120, 1.0)):
        if t % 900 == 0:
            bounds[t] = _register_at(ph, t)
        run.feed(sample(ph, t, t, register=i % 60 == 30))
    for r in run.records:
        if r["start"] in bounds and r["end"] in bounds:
            assert r["import_kwh"] == pytest.approx(bounds[r["end"]] - bounds[r["start"]], abs=0.005)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(at=st.floats(min_value=3600.0, max_value=DAY - 7200.0))
def test_a_30_minute_outage_is_filled_not_lost(at: float) -> None:
    start = MIDNIGHT + at
    run, truth = run_day(every_s=10.0, register_every=6, outage=(start, start + 1800.0))
    day = check_day(run, truth)
    def unread(r: dict[str, Any]) -> float:
        return max(0.0, min(r["end"], start + 1800.0) - max(r["start"], start))

    hit = [r for r in day if unread(r) > 0.1 * 900 + 10]  # more than a tenth of it unread
    assert len(hit) >= 2 and all(r["quality"] == "gap" for r in hit)
    assert all(r["coverage"] == pytest.approx(1 - unread(r) / 900, abs=0.02) for r in day)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(at=st.floats(min_value=600.0, max_value=DAY - 3600.0))
def test_a_restart_resumes_the_partial_interval(at: float) -> None:
    run, truth = run_day(every_s=10.0, register_every=6, restart_at=MIDNIGHT + at)
    day = check_day(run, truth)
    assert len({r["start"] for r in day}) == 96


def test_the_power_integration_fallback_is_within_1_percent() -> None:
    """A meter without registers: every interval from the integrated power, flagged."""
    ph = physics()
    run = Run(spec=MeterSpec("main", has_import=False, has_export=False))
    truth = {}
    for t in times(MIDNIGHT - 60, MIDNIGHT + DAY + 60, 1.0):
        if t in (MIDNIGHT, MIDNIGHT + DAY):
            truth[t] = _register_at(ph, t)
        run.feed(sample(ph, t, t, register=False))
    day = run.day()
    assert len(day) == 96
    assert all(r["source"]["import"] == "integrated" for r in day)
    total = sum(r["import_kwh"] for r in day)
    assert total == pytest.approx(truth[MIDNIGHT + DAY] - truth[MIDNIGHT], rel=0.01)


def test_a_failing_register_falls_back_then_the_register_takes_over_again() -> None:
    """The energy point stops answering for an hour: those intervals are estimated from the
    power; the first interval after it is back absorbs the difference: the day still sums."""
    ph, run = physics(), Run(cfg=IntervalConfig(register_wait_s=300.0))
    truth = {}
    fail = (MIDNIGHT + 5 * 3600, MIDNIGHT + 6 * 3600)
    for i, t in enumerate(times(MIDNIGHT - 600, MIDNIGHT + DAY + 900, 5.0)):
        if t in (MIDNIGHT, MIDNIGHT + DAY):
            truth[t] = _register_at(ph, t)
        run.feed(sample(ph, t, t, register=i % 12 == 0 and not fail[0] <= t < fail[1]))
    day = check_day(run, truth[MIDNIGHT + DAY] - truth[MIDNIGHT])
    estimated = [r for r in day if r["quality"] == "estimated"]
    assert estimated and all(fail[0] <= r["end"] <= fail[1] + 900 for r in estimated)
    assert any(r["source"]["import"] == "integrated" for r in estimated)


def test_a_register_rollover_is_added_not_subtracted() -> None:
    top = 1000.0
    spec = MeterSpec("main", has_import=True, register_max_kwh=top, resolution_kwh=0.001)
    ph, run = physics(start_kwh=top - 30.0), Run(spec=spec)
    truth = {}
    for i, t in enumerate(times(MIDNIGHT - 600, MIDNIGHT + DAY + 900, 5.0)):
        if t in (MIDNIGHT, MIDNIGHT + DAY):
            truth[t] = _register_at(ph, t)
        run.feed(sample(ph, t, t, register=i % 12 == 0, register_of=lambda r: r % top))
    day = check_day(run, truth[MIDNIGHT + DAY] - truth[MIDNIGHT], tolerance_kwh=0.02)
    wraps = int(truth[MIDNIGHT + DAY] // top) - int(truth[MIDNIGHT] // top)
    assert wraps >= 1
    assert sum(r["quality"] == "register_rollover" for r in day) == wraps


def test_a_register_reset_takes_the_step_from_the_power() -> None:
    """The meter is replaced at 10:00 (a new register from 0): the interval across it has its
    energy from the power readings, flagged; nothing is negative, the rest is from registers."""
    ph, run = physics(), Run()
    swap = MIDNIGHT + 10 * 3600 + 100
    offset = {"v": 0.0}

    def shown(r: float) -> float:
        return r - offset["v"]

    truth = {}
    for i, t in enumerate(times(MIDNIGHT - 600, MIDNIGHT + DAY + 900, 5.0)):
        if t in (MIDNIGHT, MIDNIGHT + DAY):
            truth[t] = _register_at(ph, t)
        if t >= swap and not offset["v"]:
            offset["v"] = ph.import_energy_kwh
        run.feed(sample(ph, t, t, register=i % 12 == 0, register_of=shown))
    day = check_day(run, truth[MIDNIGHT + DAY] - truth[MIDNIGHT], tolerance_kwh=1.0)
    reset = [r for r in day if r["quality"] == "register_reset"]
    assert len(reset) == 1 and reset[0]["start"] <= swap < reset[0]["end"] + 900
    assert all(r["import_kwh"] >= 0 for r in day)


@pytest.mark.parametrize("step_s", [-600.0, 600.0])
def test_a_clock_step_makes_no_interval_twice_and_loses_none(step_s: float) -> None:
    """The gateway's clock is stepped by ten minutes at 12:05: every interval once, in order,
    those touched flagged; the day's energy still matches the register."""
    ph, run = physics(), Run()
    at = MIDNIGHT + 12 * 3600 + 300
    truth = {}
    mono = 0.0
    for i, t in enumerate(times(MIDNIGHT - 600, MIDNIGHT + DAY + 900, 5.0)):
        mono += 5.0
        if t in (MIDNIGHT, MIDNIGHT + DAY):
            truth[t] = _register_at(ph, t)
        wall = t + step_s if t >= at else t
        q = sample(ph, t, mono, register=i % 12 == 0)
        run.feed(Sample(t=wall, mono=mono, import_kwh=q.import_kwh, export_kwh=q.export_kwh,
                        power_kw=q.power_kw))
    starts = [r["start"] for r in run.records]
    assert starts == sorted(set(starts)), "no interval twice"
    assert starts == [starts[0] + 900 * i for i in range(len(starts))], "none lost"
    stepped = [r for r in run.records if "clock_step" in r["flags"]]
    assert 1 <= len(stepped) <= 2
    # the wall-clock day is ten minutes (about 16 kWh at 95 kW) longer or shorter than the
    # true day; no energy is made or lost beyond that
    day = run.day()
    assert sum(r["import_kwh"] for r in day) == pytest.approx(
        truth[MIDNIGHT + DAY] - truth[MIDNIGHT], abs=25.0)


def test_a_meter_silent_past_the_hold_gives_its_intervals_without_energy() -> None:
    ph, run = physics(), Run(cfg=IntervalConfig(hold_max_s=3600.0))
    for i, t in enumerate(times(MIDNIGHT, MIDNIGHT + 6 * 3600, 5.0)):
        if MIDNIGHT + 3600 <= t < MIDNIGHT + 3 * 3600:
            ph.sample(t)
            continue
        run.feed(sample(ph, t, t, register=i % 12 == 0))
    starts = [r["start"] for r in run.records]
    assert starts == [MIDNIGHT + 900 * i for i in range(len(starts))]
    silent = [r for r in run.records if MIDNIGHT + 3600 <= r["start"] < MIDNIGHT + 3 * 3600 - 900]
    assert silent and all(r["import_kwh"] is None and r["quality"] == "gap" for r in silent)
    after = [r for r in run.records if r["start"] >= MIDNIGHT + 3 * 3600 + 900]
    assert after and all(r["import_kwh"] is not None and r["import_kwh"] < 40 for r in after)


@pytest.mark.parametrize("mode", ["block", "sliding"])
def test_the_month_maximum_demand(mode: str) -> None:
    """A 200 kW step for 20 minutes from 14:07 on 100 kW: a sliding window finds 15 minutes
    of it (200 kW); the best block, 14:15-14:30, holds 12 of its minutes:
    (12 * 200 + 3 * 100) / 15 = 180 kW. A new month starts from nothing."""
    run = Run(cfg=IntervalConfig(demand_mode=mode))  # type: ignore[arg-type]
    end_of_month = 1785513600  # 2026-08-01 00:00 local
    day0 = end_of_month - DAY
    peak = (day0 + 14 * 3600 + 420, day0 + 14 * 3600 + 420 + 1200)
    for t in times(day0, end_of_month + 3600, 1.0):
        kw = 200.0 if peak[0] <= t < peak[1] else 100.0
        run.feed(Sample(t=t, mono=t, power_kw=kw, import_kwh=None))
    july = [r for r in run.records if r["end"] <= end_of_month]
    md = july[-1]["month_max_demand"]
    assert md["month"] == "2026-07"
    if mode == "sliding":
        assert md["kw"] == pytest.approx(200.0, abs=0.5)
        assert peak[0] + 900 <= md["at"] <= peak[1]
    else:
        assert md["kw"] == pytest.approx((12 * 200 + 3 * 100) / 15, abs=0.5)
        assert md["at"] == day0 + 14 * 3600 + 1800
    aug = [r for r in run.records if r["start"] >= end_of_month + 900]
    assert aug and aug[-1]["month_max_demand"]["month"] == "2026-08"
    assert aug[-1]["month_max_demand"]["kw"] == pytest.approx(100.0, abs=0.5)
    assert month_of(end_of_month, 28800) == "2026-08"


def test_the_state_does_not_change_under_the_caller() -> None:
    ph, cfg = physics(), IntervalConfig()
    s0 = MeterLedger()
    s1, _ = feed(cfg, SPEC, s0, sample(ph, MIDNIGHT, 0.0, register=True))
    before = json.dumps(s1.to_dict())
    s2, _ = feed(cfg, SPEC, s1, sample(ph, MIDNIGHT + 901, 901.0, register=True))
    assert json.dumps(s1.to_dict()) == before
    assert s0 == MeterLedger()
    assert s2.pending == [] and s2.open is not None and s2.open.start == MIDNIGHT + 900


def test_the_worked_example_of_docs_ledger() -> None:
    """docs/ledger.md, "Intervals": readings every 30 s, 40 kW until 09:59:30 and 80 kW from
    10:00; the register read at 09:44:30 (995.80), 09:59:30 (1005.80), 10:00:30 (1006.40) and
    10:14:30 (1015.60)."""
    b = 1784080800.0  # 2026-07-15 10:00 in China
    run = Run(cfg=IntervalConfig(cover_gap_s=60.0), spec=MeterSpec("main"))
    reg = {b - 930: 995.80, b - 30: 1005.80, b + 30: 1006.40, b + 870: 1015.60}
    for k in range(-31, 31):
        t = b + 30 * k
        run.feed(Sample(t=t, mono=t, power_kw=40.0 if t < b else 80.0, import_kwh=reg.get(t)))
    r_0945 = 995.80 + (1005.80 - 995.80) * (40 * 30 / 3600) / (40 * 900 / 3600)
    r_1000 = 1005.80 + (1006.40 - 1005.80) * ((40 + 80) / 2 * 30 / 3600) / (
        (40 + 80) / 2 * 30 / 3600 + 80 * 30 / 3600)
    assert r_0945 == pytest.approx(996.1333, abs=1e-4)
    assert r_1000 == pytest.approx(1006.0571, abs=1e-4)
    first, second = run.records
    assert first["start"] == b - 1800 and first["quality"] == "gap"  # read from 09:44:30 only
    assert second["start"] == b - 900 and second["quality"] == "complete"
    assert second["import_kwh"] == pytest.approx(r_1000 - r_0945, abs=1e-6)
    assert second["import_kwh"] == pytest.approx(9.9238, abs=1e-4)
    assert second["mean_kw"] == pytest.approx(9.9238 * 4, abs=1e-3)
