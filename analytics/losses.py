"""Loss groups: a main meter against its sub-meters, interval by interval (Q/GDW 1376.1 ERC22).

Q/GDW 1376.1 ERC22 (有功总电能量差动越限, parameters AFN 04 F15; DL/T 698.45 object 3116) compares
a *comparison* summation group (here: the main meter) with a *reference* group (the sum of the
sub-meters, or a transformer's other side: the same maths) over 60, 30 or 15-minute energies.
A group is configured with a relative limit (%) and an absolute limit (kWh) and **one comparison
method** (F15's flag bit 7): relative (0) or absolute (1). The terminal records ERC22 when the
limit is exceeded, with both deviations, and again when it is back within (the start/stop bit).

This module's rule, per interval (:func:`judge`):

- ``loss_kwh = main_kwh − Σ sub_kwh``; ``loss_pct = 100 × loss_kwh / main_kwh`` (the loss rate
  of the energy the main meter measured, as line-loss rates are stated).
- ``method = "relative"``: exceeded when ``|loss_pct| > relative_limit_pct``. The relative test
  is not applied when ``main_kwh < min_main_kwh`` (or is 0): a percentage of little is noise;
  the interval is *not judged* (status ``low_load``).
- ``method = "absolute"``: exceeded when ``|loss_kwh| > absolute_limit_kwh``, at any load.
- Magnitudes: sub-meters that sum to more than the main (a negative loss) are as wrong as a
  large loss (a meter or CT error, a flow the main meter does not see); the figures keep the
  sign. Both deviations are always reported, whichever method judges.
- A member (main or sub) without energy, with a negative or non-finite value, or of a quality
  the group does not accept (``accept_quality``; an interval's quality in
  :mod:`lmt.analytics.intervals` terms) makes the interval *not judged* (status ``missing``).

Raising and clearing (:func:`step`): ``loss_exceeded`` once the limit has been exceeded for
``raise_after`` consecutive judged intervals; ``loss_cleared`` once, after ``clear_after``
consecutive judged intervals within it. An interval that is not judged (missing, low load)
counts neither way; ``on_missing = "skip"`` (default) lets a run continue across it,
``"break"`` restarts the run being counted. An interval that starts before the end of the last
one stepped (a replay after a restart) changes nothing and gives no records.

:class:`LossState` is JSON (``to_dict``/``from_dict``): persisted with the interval, a restart
resumes a run half-way to raising or clearing. Pure: no clock, no I/O; times are unix seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lmt.control.jsonstate import Json

__all__ = [
    "METHODS",
    "ON_MISSING",
    "LossError",
    "LossGroup",
    "LossInterval",
    "LossState",
    "Verdict",
    "judge",
    "step",
]

METHODS = ("relative", "absolute")  # ERC22 / F15 bit 7: 0 relative, 1 absolute
ON_MISSING = ("skip", "break")
#: Qualities of :mod:`lmt.analytics.intervals` whose energy is a register difference.
DEFAULT_QUALITIES = ("complete", "register_rollover")


class LossError(ValueError):
    """A bad group configuration, interval or state: the message names the field."""


def _number(where: str, value: Any, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < lo:
        raise LossError(f"{where}: expected a finite number ≥ {lo:g}, got {value!r}")
    return float(value)


def _time(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LossError(f"{where}: expected unix seconds (a finite number), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LossGroup(Json):
    """One loss group (差动组). ``main``: the main meter's name (ERC22's comparison group);
    ``subs``: the sub-meters summed against it (the reference group; or a transformer's other
    side). ``method``: ``relative`` (|loss %| against ``relative_limit_pct``, % of the main
    meter's energy) or ``absolute`` (|loss kWh| against ``absolute_limit_kwh``).
    ``min_main_kwh``: below this main-meter energy in an interval the relative test is not
    applied (the interval is not judged). ``raise_after`` (N) judged intervals over the limit
    in a row raise ``loss_exceeded``; ``clear_after`` (M) within it in a row, ``loss_cleared``.
    ``on_missing``: an interval not judged is skipped (``skip``: the run goes on across it) or
    restarts the run being counted (``break``). ``accept_quality``: the members' interval
    qualities taken as measured (others count as missing)."""

    name: str
    main: str
    subs: tuple[str, ...]
    relative_limit_pct: float = 5.0
    absolute_limit_kwh: float = 10.0
    method: str = "relative"
    min_main_kwh: float = 0.0
    raise_after: int = 2
    clear_after: int = 2
    on_missing: str = "skip"
    accept_quality: tuple[str, ...] = DEFAULT_QUALITIES

    def __post_init__(self) -> None:
        who = f"LossGroup {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise LossError(f"LossGroup.name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.main, str) or not self.main.strip():
            raise LossError(f"{who}.main: expected a meter name, got {self.main!r}")
        subs = tuple(self.subs) if isinstance(self.subs, list | tuple) else self.subs
        if not isinstance(subs, tuple) or not subs or not all(
                isinstance(s, str) and s.strip() for s in subs):
            raise LossError(f"{who}.subs: expected one or more meter names, got {self.subs!r}")
        if len(set(subs)) != len(subs):
            raise LossError(f"{who}.subs: a meter is listed twice: {list(subs)}")
        if self.main in subs:
            raise LossError(f"{who}.subs: {self.main!r} is the main meter")
        object.__setattr__(self, "subs", subs)
        object.__setattr__(self, "relative_limit_pct",
                           _number(f"{who}.relative_limit_pct", self.relative_limit_pct))
        object.__setattr__(self, "absolute_limit_kwh",
                           _number(f"{who}.absolute_limit_kwh", self.absolute_limit_kwh))
        object.__setattr__(self, "min_main_kwh", _number(f"{who}.min_main_kwh", self.min_main_kwh))
        if self.method not in METHODS:
            raise LossError(f"{who}.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        limit = "relative_limit_pct" if self.method == "relative" else "absolute_limit_kwh"
        if getattr(self, limit) <= 0:
            raise LossError(f"{who}.{limit}: the {self.method} method needs a limit > 0")
        for name in ("raise_after", "clear_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
                raise LossError(f"{who}.{name}: expected a number of intervals in 1..1000, got {v!r}")
        if self.on_missing not in ON_MISSING:
            raise LossError(f"{who}.on_missing: expected one of {', '.join(ON_MISSING)}, got "
                            f"{self.on_missing!r}")
        quality = tuple(self.accept_quality) if isinstance(self.accept_quality, list) \
            else self.accept_quality
        if not isinstance(quality, tuple) or not quality or not all(
                isinstance(q, str) and q for q in quality):
            raise LossError(f"{who}.accept_quality: expected one or more quality names, got "
                            f"{self.accept_quality!r}")
        object.__setattr__(self, "accept_quality", quality)

    @property
    def meters(self) -> tuple[str, ...]:
        return (self.main, *self.subs)

    def limits(self) -> dict[str, Any]:
        return {"method": self.method, "relative_pct": self.relative_limit_pct,
                "absolute_kwh": self.absolute_limit_kwh, "min_main_kwh": self.min_main_kwh,
                "raise_after": self.raise_after, "clear_after": self.clear_after}


@dataclass(frozen=True)
class LossInterval:
    """What the caller gives for one interval ``[start, end)``: each meter's import energy
    (kWh, None when there is none) and its interval quality (a meter with energy and no
    quality given is taken as ``complete``). Meters not in the group are ignored."""

    start: float
    end: float
    kwh: Mapping[str, float | None]
    quality: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """One interval judged (:func:`judge`). ``status``: ``over`` / ``within`` (judged),
    ``low_load`` / ``missing`` (not judged: ``exceeded`` is None). ``missing``: the members
    that made it missing, with why."""

    status: str
    main_kwh: float | None
    subs_kwh: dict[str, float | None]
    sub_kwh: float | None
    loss_kwh: float | None
    loss_pct: float | None
    missing: dict[str, str]

    @property
    def exceeded(self) -> bool | None:
        return None if self.status in ("low_load", "missing") else self.status == "over"


def _member(interval: LossInterval, meter: str, accept: tuple[str, ...]) -> tuple[float | None, str]:
    """(kWh, '') for a usable member, (value or None, why) otherwise."""
    v = interval.kwh.get(meter)
    if v is None:
        return None, "no energy"
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        return None, f"bad value {v!r}"
    q = interval.quality.get(meter, "complete")
    if q not in accept:
        return float(v), f"quality {q}"
    return float(v), ""


def judge(group: LossGroup, interval: LossInterval) -> Verdict:
    """The loss figures of one interval and whether it exceeds the group's limit (the rule in
    the module's docstring)."""
    missing: dict[str, str] = {}
    values: dict[str, float | None] = {}
    for m in group.meters:
        v, why = _member(interval, m, group.accept_quality)
        values[m] = v
        if why:
            missing[m] = why
    main = values[group.main]
    subs = {s: values[s] for s in group.subs}
    sub_values = [v for v in subs.values() if v is not None]
    sub_total = sum(sub_values) if len(sub_values) == len(subs) else None
    loss = main - sub_total if main is not None and sub_total is not None else None
    pct = 100.0 * loss / main if loss is not None and main else None
    if missing:
        status = "missing"
    elif group.method == "relative":
        if main is None or main == 0 or main < group.min_main_kwh or pct is None:
            status = "low_load"
        else:
            status = "over" if abs(pct) > group.relative_limit_pct else "within"
    else:
        assert loss is not None
        status = "over" if abs(loss) > group.absolute_limit_kwh else "within"
    return Verdict(status, main, subs, sub_total, loss, pct, missing)


@dataclass(frozen=True)
class LossState(Json):
    """A group's state between intervals (persist it with the interval's records).

    ``active``: ``loss_exceeded`` was raised and has not cleared. ``over``: judged intervals
    over the limit in a row while not active (``run_since``: the start of the first of them);
    ``under``: judged intervals within the limit in a row while active. ``raised_since`` /
    ``raised_at``: the raising run's start and the end of the interval that raised it;
    ``peak_loss_kwh`` / ``peak_loss_pct``: the largest judged loss while active (by magnitude
    of the judged quantity). ``last_end``: the end of the last interval stepped."""

    group: str = ""
    active: bool = False
    over: int = 0
    under: int = 0
    run_since: float | None = None
    raised_since: float | None = None
    raised_at: float | None = None
    peak_loss_kwh: float | None = None
    peak_loss_pct: float | None = None
    last_end: float | None = None

    def __post_init__(self) -> None:
        for name in ("over", "under"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LossError(f"LossState.{name}: expected a count ≥ 0, got {v!r}")
        if self.active and self.over:
            raise LossError("LossState: an active alarm counts under, not over")
        if not self.active and self.under:
            raise LossError("LossState: no alarm is active, so nothing counts under")


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _figures(group: LossGroup, interval: LossInterval, v: Verdict) -> dict[str, Any]:
    return {"group": group.name, "start": interval.start, "end": interval.end,
            "main": group.main, "main_kwh": _r(v.main_kwh, 4),
            "subs": {k: _r(x, 4) for k, x in v.subs_kwh.items()}, "sub_kwh": _r(v.sub_kwh, 4),
            "loss_kwh": _r(v.loss_kwh, 4), "loss_pct": _r(v.loss_pct, 3)}


def _worse(group: LossGroup, v: Verdict, st: LossState) -> bool:
    if group.method == "relative":
        return st.peak_loss_pct is None or abs(v.loss_pct or 0.0) > abs(st.peak_loss_pct)
    return st.peak_loss_kwh is None or abs(v.loss_kwh or 0.0) > abs(st.peak_loss_kwh)


def step(group: LossGroup, state: LossState, interval: LossInterval
         ) -> tuple[LossState, list[dict[str, Any]]]:
    """Judge one interval and move the group's state: (new state, records).

    Records, in order: ``{"type": "loss_interval", "ts": end, "data": {figures, status,
    exceeded, missing, intervals_over, intervals_under, active}}`` for every interval stepped
    (the counts of the runs including this interval; ``active`` after it);
    then, when it happens, ``{"type": "loss_exceeded", "ts": end, "data": {figures, limits,
    intervals_over, since, at}}`` or ``{"type": "loss_cleared", "ts": end, "data": {figures,
    limits, intervals_under, since, raised_at, cleared_at, peak_loss_kwh, peak_loss_pct}}``.
    A replayed interval (it starts before ``state.last_end``) gives ``(state, [])``."""
    a, b = _time("interval.start", interval.start), _time("interval.end", interval.end)
    if b <= a:
        raise LossError(f"interval.end: must be after start ({a:g}), got {b:g}")
    if state.group and state.group != group.name:
        raise LossError(f"LossState.group: the state belongs to group {state.group!r}, not "
                        f"{group.name!r}")
    if state.last_end is not None and a < state.last_end:
        return state, []
    v = judge(group, interval)
    st = replace(state, group=group.name, last_end=b)
    events: list[dict[str, Any]] = []
    figures = _figures(group, interval, v)
    if v.exceeded is None:
        if group.on_missing == "break":
            st = replace(st, under=0) if st.active else replace(st, over=0, run_since=None)
    elif not st.active:
        if v.exceeded:
            st = replace(st, over=st.over + 1, run_since=a if st.over == 0 else st.run_since)
        else:
            st = replace(st, over=0, run_since=None)
    else:
        st = replace(st, under=0 if v.exceeded else st.under + 1)
        if _worse(group, v, st):
            st = replace(st, peak_loss_kwh=_r(v.loss_kwh, 4), peak_loss_pct=_r(v.loss_pct, 3))
    counts = st.over, st.under  # the runs including this interval, as the record shows them
    if not st.active and st.over >= group.raise_after:
        events.append({"type": "loss_exceeded", "ts": b, "data": {
            **figures, "limits": group.limits(), "intervals_over": st.over,
            "since": st.run_since, "at": b}})
        st = replace(st, active=True, over=0, under=0, raised_since=st.run_since, raised_at=b,
                     run_since=None, peak_loss_kwh=_r(v.loss_kwh, 4),
                     peak_loss_pct=_r(v.loss_pct, 3))
    elif st.active and st.under >= group.clear_after:
        events.append({"type": "loss_cleared", "ts": b, "data": {
            **figures, "limits": group.limits(), "intervals_under": st.under,
            "since": st.raised_since, "raised_at": st.raised_at, "cleared_at": b,
            "peak_loss_kwh": st.peak_loss_kwh, "peak_loss_pct": st.peak_loss_pct}})
        st = replace(st, active=False, under=0, raised_since=None, raised_at=None,
                     peak_loss_kwh=None, peak_loss_pct=None)
    record = {"type": "loss_interval", "ts": b, "data": {
        **figures, "status": v.status, "exceeded": v.exceeded, "missing": dict(v.missing),
        "intervals_over": counts[0], "intervals_under": counts[1], "active": st.active}}
    return st, [record, *events]
