"""lmt.analytics.baseline: golden CBLs worked by hand for every named rule (exclusions, the X of
Y, the adjustments and their caps), the kernel against its plain-Python twin, the errors.

The small series: 8 intervals a day, ``load[d][j] = level_d + j`` (so a CBL over days of mean
level ``L`` is ``L + j``, a day's mean over the event window (4, 6) is ``level + 5``, over the
adjustment window (1, 2) ``level + 1.5``). The adjustment window is passed explicitly (the
rules' hours are not whole 3-hour intervals).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from lmt.analytics.baseline import (
    CAISO,
    CHINA,
    ERCOT,
    NYISO,
    PJM,
    REASONS,
    RULES,
    Baseline,
    BaselineRule,
    Pick,
    china_rule,
    customer_baseline,
    day_type_codes,
)
from lmt.analytics.baseline_reference import customer_baseline_py

N = 8
EV = (4, 6)
ADJ = (1, 2)
W, R, H = "working", "rest", "holiday"


def row(level: float) -> list[float]:
    return [level + j for j in range(N)]


def curve(level: float, factor: float = 1.0) -> list[float]:
    return [factor * (level + j) for j in range(N)]


# The main series: 14 days, event day 13 (a working day).
#  d  type     level  note
#  0  working  10
#  1  working  12
#  2  rest     30
#  3  rest     31
#  4  holiday  50
#  5  working  14
#  6  working  flat 0.5 (low usage)
#  7  working  16     an earlier event day
#  8  working  17     NaN at interval 3 (outage)
#  9  rest     28
# 10  rest     32
# 11  working  18
# 12  working  20
# 13  working  25     the event day
TYPES = [W, W, R, R, H, W, W, W, W, R, R, W, W, W]
LEVELS = [10, 12, 30, 31, 50, 14, None, 16, 17, 28, 32, 18, 20, 25]


def main_series(event_level: float = 25.0) -> tuple[np.ndarray, list[bool]]:
    loads = np.array([row(lv) if lv is not None else [0.5] * N for lv in LEVELS], dtype=float)
    loads[8, 3] = math.nan
    loads[13] = row(event_level)
    events = [d == 7 for d in range(14)]
    return loads, events


def both(loads: np.ndarray, types: list[str], event_day: int, rule: BaselineRule,
         **kw: object) -> Baseline:
    """The kernel's result, checked equal to the reference's."""
    got = customer_baseline(loads, types, event_day, EV, rule, **kw)  # type: ignore[arg-type]
    ref = customer_baseline_py(loads, types, event_day, EV, rule, **kw)  # type: ignore[arg-type]
    assert got == ref
    return got


def excluded(**nonzero: int) -> dict[str, int]:
    return {r: nonzero.get(r, 0) for r in REASONS}


def assert_curve(got: tuple[float, ...], want: list[float]) -> None:
    assert got == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------------------- PJM


def test_pjm_weekday_highest_4_of_5_with_every_exclusion() -> None:
    # Walking back from day 12: 12, 11 valid; 10, 9 rest (unlike); 8 NaN (outage); 7 event;
    # 6, 5 valid; 4 holiday; 3, 2 rest (unlike); 1, 0 valid. Valid, most recent first, with the
    # event-window mean (level + 5): 12:25, 11:23, 6:0.5, 5:19, 1:17, 0:15.
    # Low usage: the 5 most recent's mean (25 + 23 + 0.5 + 19 + 17) / 5 = 16.9; 25 % = 4.225;
    # day 6 (0.5) is below. Candidates: 12, 11, 5, 1, 0. Highest 4: 12, 11, 5, 1 (levels 20,
    # 18, 14, 12: mean 16); day 0 ranked out.
    # Additive over (1, 2): actual 25 + 1.5 = 26.5, CBL 16 + 1.5 = 17.5: +9.
    loads, events = main_series()
    b = both(loads, TYPES, 13, PJM, event_days=events, adjust_window=ADJ)
    assert b.days == (1, 5, 11, 12)
    assert b.candidates == 5
    assert_curve(b.unadjusted, curve(16))
    assert b.adjustment == "additive" and b.value == pytest.approx(9.0) and b.raw == b.value
    assert_curve(b.adjusted, curve(25))
    assert b.excluded == excluded(unlike=4, holiday=1, event=1, outage=1, low_usage=1,
                                  not_selected=1)


def test_pjm_additive_is_symmetric() -> None:
    # The same CBL (16 + j); event day at level 10: actual 11.5 - 17.5 = -6 (not capped).
    loads, events = main_series(event_level=10)
    b = both(loads, TYPES, 13, PJM, event_days=events, adjust_window=ADJ)
    assert b.value == pytest.approx(-6.0)
    assert_curve(b.adjusted, curve(10))


def test_pjm_weekend_highest_2_of_3_and_holidays_as_rest() -> None:
    # Event on day 10 (rest). Back from 9: 9 rest (33), 8..5 unlike, 4 holiday (excluded),
    # 3 rest (36), 2 rest (35), 1, 0 unlike. Highest 2 of 3: days 3 and 2 (31, 30): 30.5.
    # Adjustment: actual 32 + 1.5 = 33.5, CBL 30.5 + 1.5 = 32: +1.5.
    loads, events = main_series()
    b = both(loads, TYPES, 10, PJM, event_days=events, adjust_window=ADJ)
    assert b.days == (2, 3)
    assert_curve(b.unadjusted, curve(30.5))
    assert b.value == pytest.approx(1.5)
    assert_curve(b.adjusted, curve(32))
    assert b.excluded == excluded(unlike=6, holiday=1, not_selected=1)
    assert b.pick == Pick(3, 2)
    # Holidays counted as rest days: 9 (33), 4 (55), 3 (36) are the 3 most recent (2 older);
    # highest 2: 4 and 3 (50, 31): 40.5; adjustment 33.5 - 42 = -8.5.
    b = both(loads, TYPES, 10, replace(PJM, holidays="as_rest"), event_days=events,
             adjust_window=ADJ)
    assert b.days == (3, 4)
    assert_curve(b.unadjusted, curve(40.5))
    assert b.value == pytest.approx(-8.5)
    assert b.excluded == excluded(unlike=6, older=1, not_selected=1)


def test_rule_windows_in_hours() -> None:
    # An event at 14:00: PJM 3 hours ending 1 hour before (10:00-13:00), NYISO 2 hours starting
    # 4 hours before (10:00-12:00).
    assert PJM.adjust_window(14, 24) == (10, 12)
    assert NYISO.adjust_window(14, 24) == (10, 11)
    assert PJM.adjust_window(56, 96) == (40, 51)
    assert NYISO.adjust_window(56, 96) == (40, 47)
    with pytest.raises(ValueError, match="not whole intervals"):
        PJM.adjust_window(4, 8)
    loads, events = main_series()
    with pytest.raises(ValueError, match="not whole intervals"):
        customer_baseline(loads, TYPES, 13, EV, PJM, event_days=events)
    with pytest.raises(ValueError, match="before midnight"):
        customer_baseline(np.ones((14, 24)), TYPES, 13, (2, 3), PJM, event_days=events)
    with pytest.raises(ValueError, match="must end before the event"):
        customer_baseline(loads, TYPES, 13, EV, PJM, event_days=events, adjust_window=(3, 4))


# ------------------------------------------------------------------------------------- NYISO


def test_nyiso_highest_5_of_10_multiplicative_clipped() -> None:
    # No low-usage screen: valid working days 12:25, 11:23, 6:0.5, 5:19, 1:17, 0:15 (6 of the
    # 10 wanted, at least 5 needed). Highest 5: 12, 11, 5, 1, 0 (20, 18, 14, 12, 10): 14.8;
    # day 6 ranked out. CBL over (1, 2): 14.8 + 1.5 = 16.3.
    loads, events = main_series()
    # Event level 25: 26.5 / 16.3 = 1.6258 -> 1.2.
    b = both(loads, TYPES, 13, NYISO, event_days=events, adjust_window=ADJ)
    assert b.days == (0, 1, 5, 11, 12)
    assert b.candidates == 6
    assert_curve(b.unadjusted, curve(14.8))
    assert b.adjustment == "multiplicative"
    assert b.raw == pytest.approx(26.5 / 16.3) and b.value == 1.2
    assert_curve(b.adjusted, curve(14.8, 1.2))
    assert b.excluded == excluded(unlike=4, holiday=1, event=1, outage=1, not_selected=1)
    # Event level 8: 9.5 / 16.3 = 0.5828 -> 0.8.
    loads, events = main_series(event_level=8)
    b = both(loads, TYPES, 13, NYISO, event_days=events, adjust_window=ADJ)
    assert b.raw == pytest.approx(9.5 / 16.3) and b.value == 0.8
    assert_curve(b.adjusted, curve(14.8, 0.8))
    # Event level 16: 17.5 / 16.3 = 1.0736, inside the bounds.
    loads, events = main_series(event_level=16)
    b = both(loads, TYPES, 13, NYISO, event_days=events, adjust_window=ADJ)
    assert b.value == pytest.approx(17.5 / 16.3)
    assert_curve(b.adjusted, curve(14.8, 17.5 / 16.3))


def test_nyiso_weekend_too_few_days() -> None:
    # Event on day 3 (rest): only day 2 is a rest day before it; 2 of 3 need 2.
    loads, events = main_series()
    for fn in (customer_baseline, customer_baseline_py):
        with pytest.raises(ValueError, match=r"too few candidate days: found 1, need 2"):
            fn(loads, TYPES, 3, EV, NYISO, event_days=events, adjust_window=ADJ)


# ----------------------------------------------------------------------- CAISO and ERCOT
# A longer series: 16 working days, level 10 + d, except day 3 (an event day), day 7 (NaN
# at interval 0) and day 10 (a spike, level 40); day 15 is the event day.
LONG_TYPES = [W] * 16
LONG_LEVELS = [10 + d for d in range(16)]
LONG_LEVELS[10] = 40


def long_series(event_level: float) -> tuple[np.ndarray, list[bool]]:
    loads = np.array([row(lv) for lv in LONG_LEVELS], dtype=float)
    loads[7, 0] = math.nan
    loads[15] = row(event_level)
    return loads, [d == 3 for d in range(16)]


def test_caiso_10_in_10_capped_at_20_percent() -> None:
    # Back from 14: 14..8 valid except 10 is the spike (still valid), 7 outage, 6, 5, 4 valid:
    # the 10 most recent are 14, 13, 12, 11, 10, 9, 8, 6, 5, 4 (2, 1, 0 older; 3 an event day).
    # Levels 24 + 23 + 22 + 21 + 40 + 19 + 18 + 16 + 15 + 14 = 212: CBL 21.2 + j. Over (1, 2):
    # 22.7; the cap: 20 % of 22.7 = 4.54.
    loads, events = long_series(30)
    b = both(loads, LONG_TYPES, 15, CAISO, event_days=events, adjust_window=ADJ)
    assert b.days == (4, 5, 6, 8, 9, 10, 11, 12, 13, 14)
    assert_curve(b.unadjusted, curve(21.2))
    # Event level 30: 31.5 - 22.7 = +8.8 -> +4.54.
    assert b.raw == pytest.approx(8.8) and b.value == pytest.approx(4.54)
    assert_curve(b.adjusted, curve(21.2 + 4.54))
    assert b.excluded == excluded(event=1, outage=1, older=3)
    # Event level 5: 6.5 - 22.7 = -16.2 -> -4.54.
    loads, events = long_series(5)
    b = both(loads, LONG_TYPES, 15, CAISO, event_days=events, adjust_window=ADJ)
    assert b.raw == pytest.approx(-16.2) and b.value == pytest.approx(-4.54)
    assert_curve(b.adjusted, curve(21.2 - 4.54))
    # Event level 23: 24.5 - 22.7 = +1.8, inside the cap.
    loads, events = long_series(23)
    b = both(loads, LONG_TYPES, 15, CAISO, event_days=events, adjust_window=ADJ)
    assert b.value == pytest.approx(1.8)
    assert_curve(b.adjusted, curve(23))


def test_caiso_too_few_days() -> None:
    # The main series has 6 valid working days before day 13; 10-in-10 needs 10.
    loads, events = main_series()
    with pytest.raises(ValueError, match=r"CAISO: too few candidate days: found 6, need 10"):
        customer_baseline(loads, TYPES, 13, EV, CAISO, event_days=events, adjust_window=ADJ)


def test_ercot_middle_8_of_10() -> None:
    # The same 10 candidates as CAISO, ranked by level: 40 (day 10), 24, 23, 22, 21, 19, 18,
    # 16, 15, 14 (day 4). Middle 8: drop day 10 (highest) and day 4 (lowest):
    # 24 + 23 + 22 + 21 + 19 + 18 + 16 + 15 = 158: 19.75. Additive: 31.5 - 21.25 = +10.25.
    loads, events = long_series(30)
    b = both(loads, LONG_TYPES, 15, ERCOT, event_days=events, adjust_window=ADJ)
    assert b.days == (5, 6, 8, 9, 11, 12, 13, 14)
    assert_curve(b.unadjusted, curve(19.75))
    assert b.value == pytest.approx(10.25)
    assert_curve(b.adjusted, curve(30))
    assert b.excluded == excluded(event=1, outage=1, older=3, not_selected=2)


# ------------------------------------------------------------------------------------- China


def test_china_mean_of_recent_like_days() -> None:
    # 5 working days, abnormal day 6 flagged by the caller: 12, 11, 5, 1, 0 (20, 18, 14, 12,
    # 10): 14.8, no adjustment.
    loads, events = main_series()
    abnormal = [d == 6 for d in range(14)]
    b = both(loads, TYPES, 13, CHINA, event_days=events, outage_days=abnormal)
    assert b.days == (0, 1, 5, 11, 12)
    assert_curve(b.unadjusted, curve(14.8))
    assert b.adjusted == b.unadjusted
    assert b.adjustment == "none" and b.value == 0.0
    assert b.excluded == excluded(unlike=4, holiday=1, event=1, outage=2)
    # Unflagged, day 6 (flat 0.5) is one of the 5 most recent: 20 + 18 + 0.5 + 14 + 12 = 64.5.
    b = both(loads, TYPES, 13, CHINA, event_days=events)
    assert b.days == (1, 5, 6, 11, 12)
    assert b.unadjusted == pytest.approx([(64 + 4 * j + 0.5) / 5 for j in range(N)])
    # A rest day: the 3 most recent rest days before day 10 are 9, 3, 2 (28, 31, 30): 89 / 3.
    b = both(loads, TYPES, 10, CHINA, event_days=events)
    assert b.days == (2, 3, 9)
    assert_curve(b.unadjusted, curve(89 / 3))
    # Configurable: 3 working days within 7 days: back from 12 only
    # 12, 11 and 6 are valid working days (5 is 8 days back): 20 + 18 + 0.5 (flat).
    rule = china_rule(3, 2, lookback_days=7)
    b = both(loads, TYPES, 13, rule, event_days=events)
    assert b.days == (6, 11, 12)
    with pytest.raises(ValueError, match="found 2, need 3"):
        customer_baseline(loads, TYPES, 13, EV, china_rule(3, 2, lookback_days=6), event_days=events)


# --------------------------------------------------------------------- kernel == reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kernel_matches_reference_on_random_series(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_days, n_int = 70, 96
    loads = rng.uniform(5.0, 50.0, (n_days, n_int)) * rng.uniform(0.2, 1.5, (n_days, 1))
    loads[rng.random((n_days, n_int)) < 0.002] = math.nan
    loads[rng.random(n_days) < 0.05] *= 0.05  # low-usage days
    types = rng.choice(3, n_days, p=[0.65, 0.28, 0.07]).astype(np.int64)
    events = rng.random(n_days) < 0.1
    outages = rng.random(n_days) < 0.05
    rules = [*RULES.values(), replace(PJM, holidays="as_rest"), china_rule(4, 2, low_usage_frac=0.3,
             adjust="multiplicative", adjust_start_h=3, adjust_hours=2,
             multiplicative_bounds=(0.9, 1.1))]
    checked = 0
    for rule in rules:
        for event_day in (n_days - 1, n_days - 20, 30):
            loads[event_day, 40:56] = rng.uniform(5.0, 50.0, 16)  # keep the window NaN-free
            args = (loads, types, event_day, (56, 71), rule)
            try:
                got = customer_baseline(*args, event_days=events, outage_days=outages)
            except ValueError as e:
                with pytest.raises(ValueError) as info:
                    customer_baseline_py(*args, event_days=events, outage_days=outages)
                assert str(info.value) == str(e)
                continue
            ref = customer_baseline_py(*args, event_days=events, outage_days=outages)
            assert got == ref
            assert all(math.isfinite(v) for v in got.adjusted)
            checked += 1
    assert checked >= 10


# ------------------------------------------------------------------------------- the input


def test_input_errors() -> None:
    loads, events = main_series()
    with pytest.raises(ValueError, match="2-D"):
        customer_baseline(loads[0], TYPES, 13, EV, PJM)
    with pytest.raises(ValueError, match="one entry per day"):
        customer_baseline(loads, TYPES[:-1], 13, EV, PJM)
    with pytest.raises(ValueError, match="unknown day type"):
        day_type_codes(["weekday"])
    with pytest.raises(ValueError, match="event_day"):
        customer_baseline(loads, TYPES, 14, EV, PJM)
    with pytest.raises(ValueError, match="event_window"):
        customer_baseline(loads, TYPES, 13, (6, 4), PJM)
    with pytest.raises(ValueError, match="one flag per day"):
        customer_baseline(loads, TYPES, 13, EV, PJM, event_days=[False])
    with pytest.raises(ValueError, match=r"x .* must be <= y"):
        Pick(3, 4)
    with pytest.raises(ValueError, match="mode"):
        Pick(3, 2, "lowest")
    with pytest.raises(ValueError, match="holidays"):
        replace(PJM, holidays="ignore")
    loads[13, 1] = math.nan
    with pytest.raises(ValueError, match="adjustment window have a missing value"):
        customer_baseline(loads, TYPES, 13, EV, PJM, event_days=events, adjust_window=ADJ)


def test_presets_say_their_source() -> None:
    for rule in RULES.values():
        assert rule.source and rule.verify
    assert (PJM.working, PJM.rest, PJM.lookback_days, PJM.low_usage_frac) == (
        Pick(5, 4), Pick(3, 2), 45, 0.25)
    assert (NYISO.working, NYISO.rest, NYISO.multiplicative_bounds) == (
        Pick(10, 5), Pick(3, 2), (0.8, 1.2))
    assert (CAISO.working, CAISO.rest, CAISO.additive_cap_frac) == (
        Pick(10, 10, "all"), Pick(4, 4, "all"), 0.2)
    assert ERCOT.working == Pick(10, 8, "middle")
    assert (CHINA.working, CHINA.rest, CHINA.adjust) == (Pick(5, 5, "all"), Pick(3, 3, "all"), "none")


def test_pjm_hourly_with_the_rules_own_window() -> None:
    # The main series at 24 intervals a day (level + j, j = 0..23), the event 14:00-18:00
    # (intervals 14..17: a day's mean there is level + 15.5). PJM's window: 3 hours ending 1 hour
    # before, intervals 10..12 (a day's mean there is level + 11). Low usage: the 5 most recent
    # valid days (35.5 + 33.5 + 0.5 + 29.5 + 27.5) / 5 = 25.3, 25 % = 6.325: day 6 out, as at 8
    # intervals. Highest 4: 12, 11, 5, 1: 16 + j; adjustment (25 + 11) - (16 + 11) = +9.
    _, events = main_series()
    loads = np.array([[lv + j for j in range(24)] if lv is not None else [0.5] * 24
                      for lv in [*LEVELS[:13], 25]], dtype=float)
    loads[8, 3] = math.nan
    got = customer_baseline(loads, TYPES, 13, (14, 17), PJM, event_days=events)
    assert got == customer_baseline_py(loads, TYPES, 13, (14, 17), PJM, event_days=events)
    assert got.days == (1, 5, 11, 12)
    assert got.unadjusted == pytest.approx([16 + j for j in range(24)])
    assert got.value == pytest.approx(9.0)
    assert got.adjusted == pytest.approx([25 + j for j in range(24)])
    assert got.excluded["low_usage"] == 1
