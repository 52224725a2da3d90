"""Customer baseline load (CBL): one day-matching kernel, parameterised by named rules.

What a site would have consumed on an event day had there been no event, estimated from its
own history (docs/baselines.md). Nearly every day-matching baseline has the same shape, so it
is implemented once (:func:`customer_baseline`, numba kernel in
:mod:`lmt.analytics.baseline_kernel`, plain-Python twin in
:mod:`lmt.analytics.baseline_reference`):

1. **candidate days**: walk back from the event day up to ``lookback_days`` calendar days (the
   rows before it); keep like days (same day type; a holiday is excluded, or counted as a rest
   day, per the rule; a holiday event day is matched against rest days); exclude earlier event
   days and outage / abnormal days (flagged, or a NaN anywhere in the day); exclude low-usage
   days (mean over the event window below ``low_usage_frac`` × the mean of the ``y`` most
   recent valid like days); keep the ``y`` most recent;
2. **X of Y**, ranked by mean load over the event window (ties: the more recent first): the
   highest ``x``, the middle ``x`` (``(found − x) // 2`` dropped from the top, the rest from the
   bottom), or all of them; fewer than ``x`` candidates is a :class:`ValueError`;
3. the **unadjusted CBL**: per interval of the day, the mean over the selected days;
4. the **same-day adjustment** over a window of the event day before the event: additive
   ``CBL + (mean(actual_w) − mean(CBL_w))``, optionally capped at ``± cap × mean(CBL_w)``, or
   multiplicative ``CBL × clip(mean(actual_w) / mean(CBL_w), lo, hi)`` (factor 1 when
   ``mean(CBL_w) <= 0``).

The presets (:data:`PJM`, :data:`NYISO`, :data:`CAISO`, :data:`ERCOT`, :data:`CHINA`,
:func:`china_rule`) carry their source; those whose numbers are not checked against the
primary text say ``verify=True``.

Pure: no I/O, no clock, no state. Only numpy, numba and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lmt.analytics import baseline_kernel as K

__all__ = [
    "ADJUSTMENTS",
    "CAISO",
    "CHINA",
    "DAY_TYPE_CODES",
    "ERCOT",
    "HOLIDAY_MODES",
    "MODES",
    "NYISO",
    "PJM",
    "REASONS",
    "RULES",
    "Baseline",
    "BaselineRule",
    "Pick",
    "china_rule",
    "customer_baseline",
    "day_type_codes",
    "warmup",
]

DAY_TYPE_CODES = {"working": K.WORKING, "rest": K.REST, "holiday": K.HOLIDAY}
MODES = {"highest": K.HIGHEST, "middle": K.MIDDLE, "all": K.ALL}
HOLIDAY_MODES = {"exclude": K.HOLIDAY_EXCLUDE, "as_rest": K.HOLIDAY_AS_REST}
ADJUSTMENTS = {"none": K.ADJ_NONE, "additive": K.ADJ_ADDITIVE,
               "multiplicative": K.ADJ_MULTIPLICATIVE}
REASONS = ("unlike", "holiday", "event", "outage", "low_usage", "older", "not_selected")
assert len(REASONS) == K.N_REASONS


def day_type_codes(types: Sequence[str]) -> np.ndarray:
    """``"working"``/``"rest"``/``"holiday"`` (what :func:`lmt.analytics.tariff.day_type`
    returns) per day → the int64 codes :func:`customer_baseline` takes."""
    try:
        return np.array([DAY_TYPE_CODES[t] for t in types], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"unknown day type {e.args[0]!r} (expected one of "
                         f"{', '.join(DAY_TYPE_CODES)})") from None


@dataclass(frozen=True)
class Pick:
    """Select ``x`` of the ``y`` most recent candidate days: ``mode`` ``"highest"``,
    ``"middle"`` or ``"all"`` (every candidate found, at least ``x``)."""

    y: int
    x: int
    mode: str = "highest"

    def __post_init__(self) -> None:
        for name in ("y", "x"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Pick.{name} must be an integer >= 1, got {v!r}")
        if self.x > self.y:
            raise ValueError(f"Pick: x ({self.x}) must be <= y ({self.y})")
        if self.mode not in MODES:
            raise ValueError(f"Pick.mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class BaselineRule:
    """A named CBL rule. ``working``: the pick for a working-day event, ``rest``: for a rest-day
    or holiday event. ``adjust_start_h`` / ``adjust_hours``: the adjustment window starts this
    many hours before the event's first interval and lasts this long (whole intervals; the
    caller may pass an explicit window instead). ``multiplicative_bounds``: (lo, hi) of the
    factor. ``additive_cap_frac``: the additive adjustment is capped at this fraction of the
    CBL's mean over the window (``inf``: uncapped)."""

    name: str
    source: str
    verify: bool
    working: Pick
    rest: Pick
    lookback_days: int = 45
    holidays: str = "exclude"
    low_usage_frac: float = 0.0
    adjust: str = "none"
    adjust_start_h: float = 0.0
    adjust_hours: float = 0.0
    multiplicative_bounds: tuple[float, float] = (0.0, math.inf)
    additive_cap_frac: float = math.inf

    def __post_init__(self) -> None:
        if isinstance(self.lookback_days, bool) or not isinstance(self.lookback_days, int) \
                or self.lookback_days < 1:
            raise ValueError(f"{self.name}: lookback_days must be an integer >= 1, "
                             f"got {self.lookback_days!r}")
        if self.holidays not in HOLIDAY_MODES:
            raise ValueError(f"{self.name}: holidays must be one of {', '.join(HOLIDAY_MODES)}, "
                             f"got {self.holidays!r}")
        if self.adjust not in ADJUSTMENTS:
            raise ValueError(f"{self.name}: adjust must be one of {', '.join(ADJUSTMENTS)}, "
                             f"got {self.adjust!r}")
        if not 0.0 <= self.low_usage_frac < 1.0:
            raise ValueError(f"{self.name}: low_usage_frac must be in [0, 1), "
                             f"got {self.low_usage_frac!r}")
        lo, hi = self.multiplicative_bounds
        if not (0.0 <= lo <= hi) or math.isnan(hi):
            raise ValueError(f"{self.name}: multiplicative_bounds must be 0 <= lo <= hi, "
                             f"got {self.multiplicative_bounds!r}")
        if not self.additive_cap_frac >= 0.0:
            raise ValueError(f"{self.name}: additive_cap_frac must be >= 0, "
                             f"got {self.additive_cap_frac!r}")
        if self.adjust_start_h < 0 or self.adjust_hours < 0 or self.adjust_hours > self.adjust_start_h:
            raise ValueError(f"{self.name}: the adjustment window must end at or before the event "
                             f"(adjust_hours {self.adjust_hours:g} <= adjust_start_h "
                             f"{self.adjust_start_h:g})")

    def adjust_window(self, event_first: int, intervals_per_day: int) -> tuple[int, int]:
        """The adjustment window (first, last interval, inclusive) for an event starting at
        interval ``event_first`` of a day of ``intervals_per_day`` intervals."""
        per_h = intervals_per_day / 24.0
        start, length = self.adjust_start_h * per_h, self.adjust_hours * per_h
        if abs(start - round(start)) > 1e-9 or abs(length - round(length)) > 1e-9 or round(length) < 1:
            raise ValueError(f"{self.name}: the adjustment window ({self.adjust_hours:g} h starting "
                             f"{self.adjust_start_h:g} h before the event) is not whole intervals "
                             f"of a {intervals_per_day}-interval day; pass adjust_window")
        first = event_first - round(start)
        return first, first + round(length) - 1


_PJM_SRC = ("PJM Manual 11 (Energy & Ancillary Services Market Operations), economic load "
            "response CBL: weekday highest 4 of 5, weekend/holiday highest 2 of 3, symmetric "
            "additive adjustment")
PJM = BaselineRule(
    name="PJM", source=_PJM_SRC, verify=True,
    working=Pick(5, 4, "highest"), rest=Pick(3, 2, "highest"), lookback_days=45,
    holidays="exclude", low_usage_frac=0.25,
    adjust="additive", adjust_start_h=4.0, adjust_hours=3.0)
"""PJM: weekday highest 4 of the 5 most recent within 45 days, days below 25 % of the set's mean
excluded; weekend/holiday highest 2 of 3; symmetric additive over the 3 hours ending 1 hour
before the event. Verify the numbers against PJM Manual 11."""

NYISO = BaselineRule(
    name="NYISO", source="NYISO Emergency Demand Response Program / ICAP SCR manual, CBL "
    "(highest 5 of 10, weekend 2 of 3, weather-sensitive adjustment 0.8-1.2)", verify=True,
    working=Pick(10, 5, "highest"), rest=Pick(3, 2, "highest"), lookback_days=45,
    holidays="exclude",
    adjust="multiplicative", adjust_start_h=4.0, adjust_hours=2.0,
    multiplicative_bounds=(0.8, 1.2))
"""NYISO: highest 5 of the 10 most recent like days, weekend highest 2 of 3; multiplicative over
the 2 hours starting 4 hours before the event, bounded 0.8-1.2. The 45-day look-back is this
module's choice. Verify."""

CAISO = BaselineRule(
    name="CAISO", source="CAISO 10-in-10 baseline with a same-day adjustment capped at ±20 % "
    "(a CAISO working-group proposal); weekend 4-in-4", verify=True,
    working=Pick(10, 10, "all"), rest=Pick(4, 4, "all"), lookback_days=45,
    holidays="exclude",
    adjust="additive", adjust_start_h=4.0, adjust_hours=3.0, additive_cap_frac=0.20)
"""CAISO: the 10 most recent similar non-event days within 45 days (weekend: 4 in 4), additive
adjustment capped at ±20 % of the CBL's window mean. The adjustment window (3 hours ending
1 hour before the event) is this module's choice. Verify."""

ERCOT = BaselineRule(
    name="ERCOT", source="ERCOT baseline procedure: middle 8 of the 10 preceding like days, "
    "event-day adjustment", verify=True,
    working=Pick(10, 8, "middle"), rest=Pick(10, 8, "middle"), lookback_days=45,
    holidays="exclude",
    adjust="additive", adjust_start_h=4.0, adjust_hours=3.0)
"""ERCOT: middle 8 of the 10 preceding like days (the highest and the lowest dropped), additive
event-day adjustment. The window, the look-back and the weekend pick are this module's choice.
Verify."""


def china_rule(working_days: int = 5, rest_days: int = 3, *, lookback_days: int = 30,
               holidays: str = "exclude", low_usage_frac: float = 0.0, adjust: str = "none",
               adjust_start_h: float = 0.0, adjust_hours: float = 0.0,
               multiplicative_bounds: tuple[float, float] = (0.0, math.inf)) -> BaselineRule:
    """A Chinese provincial rule: the mean of the same intervals over the N most recent like
    days (``working_days`` for a working-day event, ``rest_days`` for a rest day or holiday),
    response (event) days and abnormal (outage-flagged) days excluded; no adjustment unless the
    programme says so. GB/T 32127-2015 and GB/T 37016-2018 frame it; the provincial numbers are
    configuration (unverified)."""
    return BaselineRule(
        name=f"China-{working_days}w{rest_days}r",
        source="GB/T 32127-2015, GB/T 37016-2018; provincial practice: mean of the N most recent "
        "like days, response and abnormal days excluded (provincial texts unverified)",
        verify=True, working=Pick(working_days, working_days, "all"),
        rest=Pick(rest_days, rest_days, "all"), lookback_days=lookback_days, holidays=holidays,
        low_usage_frac=low_usage_frac, adjust=adjust, adjust_start_h=adjust_start_h,
        adjust_hours=adjust_hours, multiplicative_bounds=multiplicative_bounds)


CHINA = china_rule()
RULES: dict[str, BaselineRule] = {"PJM": PJM, "NYISO": NYISO, "CAISO": CAISO, "ERCOT": ERCOT,
                                  "China": CHINA}


@dataclass(frozen=True)
class Baseline:
    """What :func:`customer_baseline` returns.

    * ``adjusted``, ``unadjusted``: the CBL per interval of the day (kW, or whatever unit the
      loads are in).
    * ``days``: the selected days (row indices, ascending); ``candidates``: how many candidate
      days were found (at most ``y``).
    * ``adjustment``: ``"none"``, ``"additive"`` or ``"multiplicative"``; ``value``: what was
      applied (added kW, or the factor; 0.0 with ``"none"``); ``raw``: before the cap / bounds.
    * ``excluded``: per reason (:data:`REASONS`), how many days of the look-back were not used.
    * ``rule``: the rule's name; ``pick``: the X-of-Y used.
    """

    adjusted: tuple[float, ...]
    unadjusted: tuple[float, ...]
    days: tuple[int, ...]
    candidates: int
    adjustment: str
    value: float
    raw: float
    excluded: dict[str, int]
    rule: str
    pick: Pick


def _window(name: str, w: Sequence[int], n_int: int) -> tuple[int, int]:
    if len(w) != 2:
        raise ValueError(f"{name} must be (first, last) intervals")
    a, b = int(w[0]), int(w[1])
    if not 0 <= a <= b < n_int:
        raise ValueError(f"{name} ({a}, {b}) must satisfy 0 <= first <= last < {n_int}")
    return a, b


def _flags(name: str, f: Any, n: int) -> np.ndarray:
    if f is None:
        return np.zeros(n, dtype=np.bool_)
    a = np.array(f, dtype=np.bool_)
    if a.shape != (n,):
        raise ValueError(f"{name} must have one flag per day ({n}), got shape {a.shape}")
    return a


def prepare(loads: Any, day_types: Any, event_day: int, event_window: Sequence[int],
            rule: BaselineRule, event_days: Any = None, outage_days: Any = None,
            adjust_window: Sequence[int] | None = None) -> tuple[Any, ...]:
    """Validate the input and turn it into the kernel's arguments (shared with the reference)."""
    arr = np.array(loads, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"loads must be a 2-D array (days x intervals), got shape {arr.shape}")
    n_days, n_int = arr.shape
    if isinstance(day_types, np.ndarray) and day_types.dtype.kind in "iu":
        types = day_types.astype(np.int64)
    else:
        items = list(day_types)
        types = (day_type_codes(items) if items and isinstance(items[0], str)
                 else np.array(items, dtype=np.int64))
    if types.shape != (n_days,):
        raise ValueError(f"day_types must have one entry per day ({n_days}), got {types.shape}")
    if np.any((types < 0) | (types > 2)):
        raise ValueError("day_types codes must be 0 (working), 1 (rest) or 2 (holiday)")
    ev = _flags("event_days", event_days, n_days)
    out = _flags("outage_days", outage_days, n_days)
    if isinstance(event_day, bool) or int(event_day) != event_day or not 0 <= event_day < n_days:
        raise ValueError(f"event_day must be a row index 0..{n_days - 1}, got {event_day!r}")
    e0, e1 = _window("event_window", event_window, n_int)
    pick = rule.working if types[event_day] == K.WORKING else rule.rest
    a0, a1 = -1, -1
    if rule.adjust != "none":
        if adjust_window is None:
            a0, a1 = rule.adjust_window(e0, n_int)
            if a0 < 0:
                raise ValueError(f"{rule.name}: the adjustment window starts before midnight of "
                                 f"the event day (event at interval {e0}); pass adjust_window")
        else:
            a0, a1 = _window("adjust_window", adjust_window, n_int)
        if a1 >= e0:
            raise ValueError(f"adjust_window ({a0}, {a1}) must end before the event ({e0})")
    lo, hi = rule.multiplicative_bounds
    return (arr, types, ev, out, int(event_day), e0, e1, a0, a1, pick.y, pick.x, MODES[pick.mode],
            HOLIDAY_MODES[rule.holidays], rule.lookback_days, float(rule.low_usage_frac),
            ADJUSTMENTS[rule.adjust], float(lo), float(hi), float(rule.additive_cap_frac))


def result(out: tuple[Any, ...], rule: BaselineRule, pick: Pick) -> Baseline:
    """The kernel's (or the reference's) tuple → a :class:`Baseline`; raises on its status."""
    unadj, adj, days, value, raw, counts, found, status = out
    excluded = {r: int(counts[i]) for i, r in enumerate(REASONS)}
    if status == K.TOO_FEW:
        why = ", ".join(f"{r} {n}" for r, n in excluded.items() if n)
        raise ValueError(f"{rule.name}: too few candidate days: found {int(found)}, need {pick.x} "
                         f"(within {rule.lookback_days} days; excluded: {why or 'none'})")
    if status == K.NAN_ACTUAL:
        raise ValueError(f"{rule.name}: the event day's loads over the adjustment window have "
                         "a missing value (NaN)")
    return Baseline(tuple(float(v) for v in adj), tuple(float(v) for v in unadj),
                    tuple(int(d) for d in days), int(found), rule.adjust, float(value), float(raw),
                    excluded, rule.name, pick)


def customer_baseline(loads: Any, day_types: Any, event_day: int, event_window: Sequence[int],
                      rule: BaselineRule, *, event_days: Any = None, outage_days: Any = None,
                      adjust_window: Sequence[int] | None = None) -> Baseline:
    """The CBL of ``event_day`` (a row of ``loads``) under ``rule``.

    ``loads``: days × intervals of the day (e.g. 96 at 15 min), oldest first, one row per
    calendar day (NaN = missing). ``day_types``: per day ``"working"``/``"rest"``/``"holiday"``
    or their codes 0/1/2. ``event_days``, ``outage_days``: per-day flags (earlier event or test
    days; outage or abnormal days). ``event_window``: (first, last) interval, inclusive.
    ``adjust_window``: (first, last), inclusive, overriding the rule's. Raises ValueError on bad
    input and when fewer than the pick's ``x`` candidate days exist.
    """
    args = prepare(loads, day_types, event_day, event_window, rule, event_days, outage_days,
                   adjust_window)
    pick = rule.working if args[1][args[4]] == K.WORKING else rule.rest
    return result(K.baseline_kernel(*args), rule, pick)


def warmup() -> None:
    """Compile the kernel for the argument types the API passes (fills numba's disk cache)."""
    loads = np.ones((3, 4), dtype=np.float64)
    customer_baseline(loads, [0, 0, 0], 2, (2, 3), replace(PJM, working=Pick(1, 1)),
                      adjust_window=(0, 1))
