"""lmt.analytics.theft: each detector's cycle (raised exactly at its delay, cleared exactly at its
clear delay), a clean day raises nothing, missing values, restarts through JSON, clock steps,
registered generation, the meter's event counters."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from lmt.analytics.sample import Sample
from lmt.analytics.theft import (
    COUNTER_ERC,
    CtBypassRule,
    ImbalanceRule,
    RegisterStoppedRule,
    TheftConfig,
    TheftState,
    step,
)

T0 = 1_750_000_000.0  # wall clock of the first reading
PF = 0.95
CFG = TheftConfig()  # Un 230 V, Ib 5 A


def reading(s: float, v: tuple[float | None, float | None, float | None] = (230.0, 230.0, 230.0),
            i: tuple[float | None, float | None, float | None] = (10.0, 10.0, 10.0),
            p: tuple[float | None, float | None, float | None] | None = None,
            kwh: float | None = None, counters: dict[str, int] | None = None,
            wall: float | None = None) -> Sample:
    """A reading ``s`` seconds into the test (mono = s, t = T0 + s unless ``wall``)."""
    if p is None:
        kw = [None if vv is None or ii is None else vv * ii * PF / 1000
              for vv, ii in zip(v, i, strict=True)]
        p = (kw[0], kw[1], kw[2])
    total = None if None in p else sum(x for x in p if x is not None)
    return Sample(t=T0 + s if wall is None else wall, mono=s, import_kwh=kwh, power_kw=total,
                  voltage_v=v, current_a=i, phase_kw=p, power_factor=PF,
                  counters=counters or {})


def run(samples: Iterable[Sample], config: TheftConfig = CFG, state: TheftState | None = None,
        meter: str = "m1") -> tuple[TheftState, list[tuple[float, dict[str, Any]]]]:
    """Feed the readings; every event with the mono time of the reading that produced it."""
    st = TheftState() if state is None else state
    out = []
    for s in samples:
        st, events = step(config, st, meter, s)
        out += [(s.mono, e) for e in events]
    return st, out


def keyed(events: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, str, str, str | None]]:
    return [(at, e["type"], e["data"]["indicator"], e["data"]["phase"]) for at, e in events]


# --- each detector's cycle ------------------------------------------------------------------
NORMAL: Callable[[float], Sample] = reading
# (id, abnormal reading, what it raises: (indicator, phase, erc))
CYCLES: list[tuple[str, Callable[[float], Sample], set[tuple[str, str | None, str]]]] = [
    ("reverse_power", lambda s: reading(s, p=(-2.0, 2.2, 2.2)), {("reverse_power", "l1", "ERC9")}),
    ("ct_bypass", lambda s: reading(s, i=(0.0, 10.0, 10.0)),
     {("ct_bypass", "l1", "ERC9"), ("current_imbalance", None, "ERC17")}),
    ("ct_bypass_near_zero", lambda s: reading(s, i=(10.0, 0.02, 10.0)),  # 0.4 % of Ib
     {("ct_bypass", "l2", "ERC9"), ("current_imbalance", None, "ERC17")}),
    ("voltage_loss", lambda s: reading(s, v=(230.0, 230.0, 170.0)), {("voltage_loss", "l3", "ERC10")}),
    ("phase_loss", lambda s: reading(s, v=(0.0, 230.0, 230.0), i=(0.0, 10.0, 10.0)),
     {("phase_loss", "l1", "ERC10"), ("voltage_imbalance", None, "ERC17"),
      ("current_imbalance", None, "ERC17")}),
    ("voltage_imbalance", lambda s: reading(s, v=(260.0, 260.0, 180.0)),
     {("voltage_imbalance", None, "ERC17")}),
    ("current_imbalance", lambda s: reading(s, i=(10.0, 10.0, 6.5)),
     {("current_imbalance", None, "ERC17")}),
]


@pytest.mark.parametrize(("abnormal", "raised"), [c[1:] for c in CYCLES], ids=[c[0] for c in CYCLES])
def test_a_detector_raises_at_its_delay_and_clears_at_its_clear_delay(
        abnormal: Callable[[float], Sample], raised: set[tuple[str, str | None, str]]) -> None:
    delay = clear = 60
    start, back = 100, 400
    samples = ([NORMAL(s) for s in range(start)] + [abnormal(s) for s in range(start, back)]
               + [NORMAL(s) for s in range(back, back + 200)])
    _, events = run(samples)
    assert sorted(keyed(events)) == sorted(
        [(start + delay, "theft_indicator", ind, ph) for ind, ph, _ in raised]
        + [(back + clear, "theft_indicator_cleared", ind, ph) for ind, ph, _ in raised])
    ercs = {(ind, ph): erc for ind, ph, erc in raised}
    for at, e in events:
        d = e["data"]
        assert d["meter"] == "m1"
        assert d["erc"] == ercs[d["indicator"], d["phase"]]
        assert d["since"] == T0 + start
        assert "Evidence, not a verdict" in d["detail"]
        assert d["readings"]["voltage_v"] == dict(zip(("l1", "l2", "l3"),
                                                      samples[int(at)].voltage_v, strict=True))
        if e["type"] == "theft_indicator_cleared":
            assert d["duration_s"] == back - start
    # the delays exactly: nothing a second earlier
    assert run(samples[:start + delay])[1] == []
    assert len(run(samples[:back + clear])[1]) == len(raised)


def test_event_shapes() -> None:
    _, events = run([NORMAL(0)] + [reading(s, v=(230.0, 170.0, 230.0)) for s in range(1, 62)]
                    + [NORMAL(s) for s in range(62, 123)])
    raised, cleared = (e for _, e in events)
    assert raised["type"] == "theft_indicator"
    assert set(raised["data"]) == {"meter", "indicator", "phase", "erc", "since", "readings", "detail"}
    assert raised["data"] | {"readings": None, "detail": None} == {
        "meter": "m1", "indicator": "voltage_loss", "phase": "l2", "erc": "ERC10", "since": T0 + 1,
        "readings": None, "detail": None}
    r = raised["data"]["readings"]
    assert r["voltage_v"] == {"l1": 230.0, "l2": 170.0, "l3": 230.0}
    assert r["current_a"] == {"l1": 10.0, "l2": 10.0, "l3": 10.0}
    assert r["voltage_below_v"] == pytest.approx(0.78 * 230)
    assert cleared["type"] == "theft_indicator_cleared"
    assert set(cleared["data"]) == set(raised["data"]) | {"duration_s"}
    assert cleared["data"]["since"] == T0 + 1 and cleared["data"]["duration_s"] == 61
    json.dumps(events)  # JSON types only


def test_no_flapping_within_the_hysteresis_band() -> None:
    """Once raised, a voltage between 78 % and 85 % of Un neither clears nor re-raises; a dip
    back into the band restarts the clear delay."""
    low, band, ok = 170.0, 190.0, 230.0  # 190 V is 82.6 % of 230 V
    volts = [ok] * 10 + [low] * 70 + ([band] * 30 + [low] * 5) * 10 + [ok] * 50 + [band] + [ok] * 70
    _, events = run(reading(s, v=(x, ok, ok)) for s, x in enumerate(volts))
    assert keyed(events) == [(70, "theft_indicator", "voltage_loss", "l1"),
                             (len(volts) - 70 + 60, "theft_indicator_cleared", "voltage_loss", "l1")]


def test_a_short_dip_is_not_raised() -> None:
    volts = ([230.0] * 10 + [170.0] * 59 + [230.0]) * 5
    _, events = run(reading(s, v=(x, 230.0, 230.0)) for s, x in enumerate(volts))
    assert events == []


def test_reverse_power_clears_only_above_half_its_threshold() -> None:
    thr = 0.005 * 230 * 5 / 1000  # 5.75 W
    powers = [2.2] * 5 + [-1.0] * 61 + [-0.75 * thr] * 100 + [-0.25 * thr] * 61
    _, events = run(reading(s, p=(x, 2.2, 2.2)) for s, x in enumerate(powers))
    assert keyed(events) == [(65, "theft_indicator", "reverse_power", "l1"),
                             (226, "theft_indicator_cleared", "reverse_power", "l1")]


# --- no event on a clean day ----------------------------------------------------------------
def clean_day(rng: random.Random, seconds: int = 86_400) -> Iterable[Sample]:
    """A balanced three-phase site: a daily load curve (15–60 A a phase), ±3 % phase spread,
    ±2 % noise, voltages 230 V ± 3 %, occasional single-reading dropouts of any value; the
    register (0.01 kWh digits) integrates the true power and is read every minute, the counters
    every 15 minutes."""
    energy = 1234.5
    counters = {"cover_open": 3, "terminal_cover_open": 1, "magnetic_field": 0, "reverse_flow": 0,
                "current_loss": 2, "voltage_loss": 5}
    spread = [rng.uniform(0.97, 1.03) for _ in range(3)]
    for s in range(seconds):
        hour = s / 3600
        level = 15 + 45 * max(0.0, math.sin(math.pi * (hour - 6) / 12)) ** 2
        amps = [level * spread[k] * rng.uniform(0.98, 1.02) for k in range(3)]
        volts = [230 * rng.uniform(0.97, 1.03) for _ in range(3)]
        kws = [v * a * PF / 1000 for v, a in zip(volts, amps, strict=True)]
        energy += sum(kws) / 3600
        vv: list[float | None] = list(volts)
        aa: list[float | None] = list(amps)
        pp: list[float | None] = list(kws)
        if rng.random() < 0.01:  # one value missing now and then
            [vv, aa, pp][rng.randrange(3)][rng.randrange(3)] = None
        yield Sample(t=T0 + s, mono=5000.0 + s,
                     import_kwh=math.floor(energy * 100) / 100 if s % 60 == 0 else None,
                     power_kw=None if None in pp else sum(kws),
                     voltage_v=(vv[0], vv[1], vv[2]), current_a=(aa[0], aa[1], aa[2]),
                     phase_kw=(pp[0], pp[1], pp[2]), power_factor=PF,
                     counters=counters if s % 900 == 0 else {})


def test_a_clean_day_raises_nothing() -> None:
    config = TheftConfig(rated_max_kw=3 * 230 * 60 / 1000)
    state, events = run(clean_day(random.Random(1376)), config)
    assert events == []
    assert state.meters["m1"].conditions == {}
    assert state.meters["m1"].clock_s == 86_399


# --- missing values -------------------------------------------------------------------------
def test_missing_values_raise_nothing() -> None:
    none3 = (None, None, None)
    _, events = run(Sample(t=T0 + s, mono=s, voltage_v=none3, current_a=none3, phase_kw=none3)
                    for s in range(2000))
    assert events == []
    # a phase that was never read is not a phase without current or voltage
    _, events = run(reading(s, v=(230.0, None, 230.0), i=(10.0, None, 10.0)) for s in range(2000))
    assert events == []


def test_missing_values_do_not_clear_a_condition() -> None:
    lost = [reading(s, v=(170.0, 230.0, 230.0)) for s in range(0, 61)]
    unknown = [reading(s, v=(None, 230.0, 230.0), i=(None, 10.0, 10.0), p=(None, 2.2, 2.2))
               for s in range(61, 1000)]
    _, events = run(lost + unknown)
    assert keyed(events) == [(60, "theft_indicator", "voltage_loss", "l1")]
    # values back after a gap longer than max_gap_s: still raised; the clear delay runs anew
    _, events = run(lost + unknown + [NORMAL(s) for s in range(1000, 1100)])
    assert keyed(events)[1:] == [(1060, "theft_indicator_cleared", "voltage_loss", "l1")]


def test_a_missing_reading_within_the_delay_does_not_raise_and_does_not_reset() -> None:
    samples = [reading(s, v=(170.0, 230.0, 230.0)) for s in range(0, 100)]
    samples[60] = reading(60, v=(None, 230.0, 230.0))  # due at 60: unknown then
    _, events = run(samples)
    assert keyed(events) == [(61, "theft_indicator", "voltage_loss", "l1")]
    assert events[0][1]["data"]["since"] == T0


def test_a_gap_longer_than_max_gap_starts_the_delay_afresh() -> None:
    samples = ([reading(s, v=(170.0, 230.0, 230.0)) for s in range(0, 50)]
               + [reading(s, v=(170.0, 230.0, 230.0)) for s in range(400, 500)])
    _, events = run(samples)
    assert keyed(events) == [(460, "theft_indicator", "voltage_loss", "l1")]
    assert events[0][1]["data"]["since"] == T0 + 400


# --- restarts and clocks --------------------------------------------------------------------
def through_json(state: TheftState) -> TheftState:
    return TheftState.from_dict(json.loads(json.dumps(state.to_dict())))


@pytest.mark.parametrize("reboot", [False, True], ids=["restart", "reboot"])
def test_a_restart_mid_delay_keeps_the_delay(reboot: bool) -> None:
    """The state saved 30 s into a 60 s delay and restored: raised at 60 s as without the
    restart. After a reboot the monotonic clock starts over: the wall clock bridges it."""
    def abnormal(s: float) -> Sample:
        return reading(s, i=(0.0, 10.0, 10.0))

    uninterrupted = run([abnormal(s) for s in range(0, 100)])[1]
    state, before = run([abnormal(s) for s in range(0, 30)])
    assert before == []
    state = through_json(state)
    after = []
    for s in range(30, 100):
        sample = abnormal(s)
        if reboot:  # mono restarts near zero, the wall clock goes on
            sample = Sample(t=sample.t, mono=2.0 + s - 30, voltage_v=sample.voltage_v,
                            current_a=sample.current_a, phase_kw=sample.phase_kw,
                            power_kw=sample.power_kw)
        state, events = step(CFG, state, "m1", sample)
        after += [(float(s), e) for e in events]
    assert keyed(after) == keyed(uninterrupted) == [
        (60, "theft_indicator", "ct_bypass", "l1"), (60, "theft_indicator", "current_imbalance", None)]
    assert [e for _, e in after] == [e for _, e in uninterrupted]


def test_a_wall_clock_step_neither_raises_early_nor_delays() -> None:
    """NTP steps the wall clock an hour forward 20 s into the delay: the delay is counted on
    the monotonic clock; ``since`` stays the wall time of the first reading."""
    samples = [reading(s, v=(170.0, 230.0, 230.0), wall=T0 + s + (3600 if s >= 20 else 0))
               for s in range(0, 100)]
    _, events = run(samples)
    assert keyed(events) == [(60, "theft_indicator", "voltage_loss", "l1")]
    assert events[0][1]["data"]["since"] == T0
    back = [reading(s, v=(170.0, 230.0, 230.0), wall=T0 + s - (600 if s >= 20 else 0))
            for s in range(0, 100)]
    assert keyed(run(back)[1]) == [(60, "theft_indicator", "voltage_loss", "l1")]


def test_step_leaves_the_given_state_alone() -> None:
    state, _ = run([reading(s, v=(170.0, 230.0, 230.0), kwh=10.0, counters={"cover_open": 1})
                    for s in range(0, 30)])
    saved = json.dumps(state.to_dict())
    step(CFG, state, "m1", reading(30, v=(170.0, 230.0, 230.0), kwh=9.0, counters={"cover_open": 2}))
    step(CFG, state, "m2", NORMAL(30))
    assert json.dumps(state.to_dict()) == saved


def test_meters_are_independent() -> None:
    state = TheftState()
    events = []
    for s in range(0, 100):
        state, e1 = step(CFG, state, "a", reading(s, v=(170.0, 230.0, 230.0)))
        state, e2 = step(CFG, state, "b", NORMAL(s))
        events += e1 + e2
    assert [(e["data"]["meter"], e["data"]["indicator"]) for e in events] == [("a", "voltage_loss")]
    assert state.meters["b"].conditions == {}


# --- registered generation ------------------------------------------------------------------
def test_registered_generation_suppresses_reverse_power() -> None:
    exporting = [reading(s, p=(-3.0, -3.0, -3.0)) for s in range(0, 600)]
    assert keyed(run(exporting)[1])[0] == (60, "theft_indicator", "reverse_power", "l1")
    pv = TheftConfig(registered_generation=True)
    assert run(exporting, pv)[1] == []
    # a condition raised before generation was registered is dropped, not reported
    state, _ = run(exporting[:100])
    state, events = run(exporting[100:], pv, state)
    assert events == []
    assert state.meters["m1"].conditions == {}


# --- the import register --------------------------------------------------------------------
def metered(seconds: range, kw: float = 10.0, start_kwh: float = 100.0, every: int = 60,
            freeze_at: float | None = None, jump: dict[int, float] | None = None,
            power: bool = True) -> list[Sample]:
    """A balanced load of ``kw`` whose register (0.01 kWh) is read every ``every`` seconds,
    frozen from ``freeze_at``, with ``jump[s]`` kWh added from reading ``s`` on."""
    out = []
    amps = kw * 1000 / 3 / 230 / PF
    added = 0.0
    for s in seconds:
        added += (jump or {}).get(s, 0.0)
        ran = s if freeze_at is None else min(s, freeze_at)
        kwh = math.floor((start_kwh + kw * ran / 3600 + added) * 100 + 1e-9) / 100
        sample = reading(s, i=(amps, amps, amps), kwh=kwh if s % every == 0 else None)
        if not power:
            sample = Sample(t=sample.t, mono=sample.mono, import_kwh=sample.import_kwh)
        out.append(sample)
    return out


def registers(events: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, str, str, str | None]]:
    return [k for k in keyed(events) if k[2].startswith("register")]


def test_register_decreased_is_raised_at_once_and_cleared_after_its_clear_delay() -> None:
    samples = metered(range(0, 3000), jump={600: -5.0})
    _, events = run(samples)
    assert registers(events) == [(600, "theft_indicator", "register_decreased", None),
                                 (660 + 900, "theft_indicator_cleared", "register_decreased", None)]
    raised = events[0][1]["data"]
    assert raised["erc"] == "ERC27" and raised["since"] == T0 + 600
    assert raised["readings"]["import_kwh"]["before"] == pytest.approx(100 + 10 * 540 / 3600)
    assert raised["readings"]["import_kwh"]["after"] == pytest.approx(100 + 10 * 600 / 3600 - 5, abs=0.01)


def test_a_register_wrap_is_no_decrease_when_the_rollover_is_known() -> None:
    samples = metered(range(0, 1200), start_kwh=999_999.0)  # passes 1 000 000 after 6 minutes
    samples = [Sample(t=x.t, mono=x.mono, power_kw=x.power_kw, voltage_v=x.voltage_v,
                      current_a=x.current_a, phase_kw=x.phase_kw,
                      import_kwh=None if x.import_kwh is None else x.import_kwh % 1_000_000)
               for x in samples]
    assert registers(run(samples)[1])[0][1:3] == ("theft_indicator", "register_decreased")
    assert run(samples, TheftConfig(register_rollover_kwh=1_000_000))[1] == []


def test_register_stopped_is_raised_at_its_delay() -> None:
    """10 kW: a digit (0.01 kWh) every 3.6 s, 2 digits in 7.2 s. The register is read every
    second; its last digit comes at 108 s (100.30 kWh) and it stops there: the measured energy
    reaches 2 digits at the read of 116 s, the condition holds from then, raised 900 s later."""
    samples = metered(range(0, 1400), every=1, freeze_at=108)
    assert samples[107].import_kwh == 100.29 and samples[108].import_kwh == 100.30
    _, events = run(samples[:1016])
    assert registers(events) == []
    _, events = run(samples)
    assert registers(events) == [(1016, "theft_indicator", "register_stopped", None)]
    data = events[0][1]["data"]
    assert data["erc"] == "ERC30" and data["since"] == T0 + 116
    assert data["readings"]["unchanged_since"] == T0 + 108
    assert data["readings"]["measured_kwh"] == pytest.approx(10 * (1016 - 108) / 3600)
    # it moves again from 1400 (its next digit at 1404): cleared after 60 s of a moving register
    moving = [Sample(t=x.t, mono=x.mono, power_kw=x.power_kw, voltage_v=x.voltage_v,
                     current_a=x.current_a, phase_kw=x.phase_kw,
                     import_kwh=100.30 + math.floor(10 * (x.mono - 1400) / 36 + 1e-9) / 100)
              for x in metered(range(1400, 1600), every=1)]
    _, events = run(samples + moving)
    assert registers(events) == [(1016, "theft_indicator", "register_stopped", None),
                                 (1464, "theft_indicator_cleared", "register_stopped", None)]
    assert events[1][1]["data"]["duration_s"] == 1404 - 116


def test_a_slow_load_under_two_digits_is_no_stopped_register() -> None:
    """30 W: the register moves one digit every 20 minutes; read each minute it stands still
    19 times in a row, which is no evidence."""
    _, events = run(metered(range(0, 7200), kw=0.03))
    assert events == []


def test_register_stopped_with_slow_reads() -> None:
    samples = metered(range(0, 3000), every=60, freeze_at=600)
    _, events = run(samples)
    assert registers(events) == [(660 + 900, "theft_indicator", "register_stopped", None)]
    short = TheftConfig(register_stopped=RegisterStoppedRule(delay_s=0))
    assert registers(run(samples, short)[1]) == [(660, "theft_indicator", "register_stopped", None)]


def test_register_runaway_against_the_rated_maximum() -> None:
    config = TheftConfig(rated_max_kw=50.0)  # at most 0.833 kWh a minute
    samples = metered(range(0, 3000), power=False, jump={600: 2.0})
    _, events = run(samples, config)
    assert registers(events) == [(600, "theft_indicator", "register_runaway", None),
                                 (660 + 900, "theft_indicator_cleared", "register_runaway", None)]
    r = events[0][1]["data"]["readings"]
    assert events[0][1]["data"]["erc"] == "ERC29"
    assert r["increase_kwh"] == pytest.approx(2.0 + 10 / 60, abs=0.011)
    assert r["rated_bound_kwh"] == pytest.approx(50 / 60 + 0.02)
    assert r["measured_bound_kwh"] is None  # no power was read
    # without a rated maximum and without power readings, nothing can be judged
    assert run(samples)[1] == []


def test_register_runaway_against_the_measured_power() -> None:
    samples = metered(range(0, 3000), jump={600: 0.5})  # 10 kW: 0.1667 kWh a minute
    _, events = run(samples)
    assert registers(events)[0] == (600, "theft_indicator", "register_runaway", None)
    r = events[0][1]["data"]["readings"]
    assert r["measured_kwh"] == pytest.approx(10 / 60)
    assert r["measured_bound_kwh"] == pytest.approx(1.5 * 10 / 60 + 0.02)
    assert r["coverage"] == 1.0
    # power gaps longer than power_gap_s: under 90 % of the minute covered, no measured bound
    sparse = [x if x.mono % 60 == 0 or x.mono % 60 > 40 else
              Sample(t=x.t, mono=x.mono, import_kwh=x.import_kwh) for x in samples]
    assert registers(run(sparse)[1]) == []


# --- the meter's own event counters ---------------------------------------------------------
def counted(s: float, **counters: int) -> Sample:
    return Sample(t=T0 + s, mono=s, counters=counters)


def test_the_first_counter_read_is_the_baseline() -> None:
    _, events = run([counted(0, cover_open=7, magnetic_field=2), counted(60, cover_open=7, magnetic_field=2)])
    assert events == []


def test_a_counter_increase_is_one_event() -> None:
    state, events = run([counted(0, cover_open=7, magnetic_field=2),
                         counted(60, magnetic_field=2),  # cover_open not read: no change
                         counted(120, cover_open=9, magnetic_field=2),
                         counted(180, cover_open=9, magnetic_field=3)])
    assert [(at, e["data"]["readings"]) for at, e in events] == [
        (120, {"counter": "cover_open", "before": 7, "after": 9, "increase": 2,
               "previous_read_t": T0}),
        (180, {"counter": "magnetic_field", "before": 2, "after": 3, "increase": 1,
               "previous_read_t": T0 + 120})]
    first = events[0][1]
    assert first["type"] == "theft_indicator"
    assert first["data"]["indicator"] == "meter_event" and first["data"]["erc"] == "ERC37"
    assert first["data"]["since"] == T0 + 120 and first["data"]["phase"] is None
    assert "Evidence, not a verdict" in first["data"]["detail"]
    assert events[1][1]["data"]["erc"] == COUNTER_ERC["magnetic_field"] == "ERC40"
    # the baseline survives a restart: an increase while the agent was down is seen
    _, events = run([counted(600, cover_open=10, magnetic_field=3)], state=through_json(state))
    assert [e["data"]["readings"]["increase"] for _, e in events] == [1]


def test_a_counter_decrease_is_one_note_and_a_new_baseline() -> None:
    _, events = run([counted(0, cover_open=40, terminal_cover_open=3, current_loss=9),
                     counted(60, cover_open=0, terminal_cover_open=0, current_loss=9),
                     counted(120, cover_open=0, terminal_cover_open=0, current_loss=9),
                     counted(180, cover_open=1, terminal_cover_open=0, current_loss=9)])
    assert [(at, e["data"]["indicator"]) for at, e in events] == [
        (60, "meter_counter_reset"), (180, "meter_event")]
    note = events[0][1]["data"]
    assert note["readings"] == {"counters": {
        "cover_open": {"before": 40, "after": 0, "previous_read_t": T0},
        "terminal_cover_open": {"before": 3, "after": 0, "previous_read_t": T0}}}
    assert events[1][1]["data"]["readings"]["before"] == 0


def test_unknown_counter_names_are_events_without_a_code() -> None:
    _, events = run([counted(0, battery_low=1), counted(60, battery_low=2)])
    assert [(e["data"]["indicator"], e["data"]["erc"]) for _, e in events] == [("meter_event", None)]


# --- configuration --------------------------------------------------------------------------
def test_the_configuration_round_trips_and_is_checked() -> None:
    config = TheftConfig(nominal_voltage_v=220.0, base_current_a=1.5, rated_max_kw=100.0,
                         current_imbalance=ImbalanceRule(limit=0.4, clear_below=0.3))
    assert TheftConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TheftConfig().voltage_imbalance.guard == 0.60
    assert TheftConfig().current_imbalance.guard == 0.05
    with pytest.raises(ValueError, match="clear_below"):
        ImbalanceRule(limit=0.2, clear_below=0.3)
    with pytest.raises(ValueError, match="base_current_a"):
        TheftConfig(base_current_a=0)
    with pytest.raises(ValueError, match="unknown field"):
        TheftConfig.from_dict({"nominal_voltage": 230})


def test_disabled_detectors_stay_silent() -> None:
    config = TheftConfig(ct_bypass=CtBypassRule(enabled=False),
                         current_imbalance=ImbalanceRule(enabled=False))
    _, events = run([reading(s, i=(0.0, 10.0, 10.0)) for s in range(0, 200)], config)
    assert events == []


def test_three_wire_meters_leave_l2_out() -> None:
    config = TheftConfig(three_wire=True, nominal_voltage_v=100.0)
    balanced = [reading(s, v=(100.0, None, 100.0), i=(10.0, None, 10.0)) for s in range(0, 200)]
    assert run(balanced, config)[1] == []
    unbalanced = [reading(s, v=(100.0, None, 100.0), i=(10.0, None, 5.0)) for s in range(0, 200)]
    assert keyed(run(unbalanced, config)[1]) == [(60, "theft_indicator", "current_imbalance", None)]
    # on a four-wire configuration the unread l2 makes the imbalance unjudgeable
    assert run(unbalanced, TheftConfig(nominal_voltage_v=100.0))[1] == []
