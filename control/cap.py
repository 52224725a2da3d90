"""The cap controller: one cycle of "keep the site's import at or below X kW".

Pure decision functions over the loads and their state, time as an input (the supervisor,
:mod:`lmt.control.supervisor`, calls them every cycle and owns the state):

* :func:`decide_cap` - above ``cap - margin``, shed the set of loads that covers the excess
  at the least total priority (then the least overshoot), chosen by :func:`select_shed`;
  below it, restore our shed loads one per cycle, the most important of the set
  :func:`select_restore` fits into the headroom left after hysteresis. Loads come in four
  classes (:data:`KINDS`): ``critical`` (never shed), ``interruptible`` (on/off),
  ``adjustable`` (a setpoint 0-100 %: shedding lowers it, at most to its ``min_pct``) and
  ``deferrable`` (on/off, off at most ``max_off_s``). Each may carry its own minimum on and
  off times; a load off longer than its ``max_off_s`` is restored and another shed in its
  place (rotation).
* :func:`decide_release` - end of a command: restore everything we shed.

The numeric work is in the numba kernels of :mod:`lmt.control.select`. Only numpy, numba
and the standard library may be imported here.
"""


from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmt.control.select import (
    DEFAULT_MAX_CELLS,
    DEFAULT_RESOLUTION_KW,
    select_restore,
    select_shed,
)

__all__ = [
    "KINDS",
    "CapParams",
    "Decision",
    "LoadSpec",
    "LoadState",
    "decide_cap",
    "decide_release",
]


KINDS = ("critical", "interruptible", "adjustable", "deferrable")


@dataclass(frozen=True)
class LoadSpec:
    """Static description of a controllable load.

    ``priority``: 1 = least important (shed first) .. 100 = most important (shed
    last). ``kind`` (one of :data:`KINDS`): ``critical`` loads are never shed;
    ``interruptible`` and ``deferrable`` loads are switched on/off; an ``adjustable``
    load has a setpoint in % of ``rated_kw`` (its power is taken as proportional), lowered
    to shed and never below ``min_pct``. ``critical=True`` is the same as
    ``kind="critical"``.

    ``min_on_s`` / ``min_off_s``: this load's minimum on and off times (``None``: the
    command's :class:`CapParams` values for on/off loads, 0 for an adjustable load, whose
    setpoint may move every cycle). ``max_off_s``: shed at most this long; then it is
    restored and, if the cap needs it, another load is shed in its place (rotation).
    A deferrable load must have one (its energy is postponed, not forgone).
    """

    name: str
    rated_kw: float
    priority: int
    critical: bool = False
    kind: str = "interruptible"
    min_on_s: float | None = None
    min_off_s: float | None = None
    max_off_s: float | None = None
    min_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"load {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.critical and self.kind not in ("critical", "interruptible"):
            raise ValueError(f"load {self.name!r}: critical=True with kind {self.kind!r}")
        object.__setattr__(self, "critical", self.critical or self.kind == "critical")
        object.__setattr__(self, "kind", "critical" if self.critical else self.kind)
        if self.kind == "deferrable" and self.max_off_s is None:
            raise ValueError(f"load {self.name!r}: a deferrable load needs max_off_s")
        for name in ("min_on_s", "min_off_s", "max_off_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"load {self.name!r}: {name} must be a finite number >= 0")
        if not 0.0 <= self.min_pct < 100.0:
            raise ValueError(f"load {self.name!r}: min_pct must be in [0, 100)")

    @property
    def adjustable(self) -> bool:
        return self.kind == "adjustable"


@dataclass
class LoadState:
    """Dynamic state of a load, maintained by the caller after each actual switch.

    ``last_switch_s`` uses the same clock as the ``now_s`` given to the decision
    functions; ``-inf`` means never switched. An adjustable load counts as on;
    ``setpoint_pct`` is its present setpoint and ``restore_pct`` the one it had before we
    lowered it (where a restore takes it back); ``shed_by_us`` while we hold it below that.
    A NaN ``setpoint_pct`` (not read yet) keeps an adjustable load out of every decision.
    """

    is_on: bool
    shed_by_us: bool = False
    last_switch_s: float = float("-inf")
    available: bool = True  # False: its relay failed recently; not a candidate to shed
    setpoint_pct: float = 100.0
    restore_pct: float = 100.0


@dataclass(frozen=True)
class CapParams:
    """Parameters of a "cap site import power" command (kW and seconds).

    The loads are chosen with :func:`select_shed` / :func:`select_restore`: an exact
    knapsack at ``resolution_kw`` while the dynamic programme has at most ``max_cells``
    cells, greedy beyond.
    """

    cap_kw: float
    margin_kw: float = 1.0
    hysteresis_kw: float = 2.0
    min_off_s: float = 5.0
    min_on_s: float = 5.0
    resolution_kw: float = DEFAULT_RESOLUTION_KW
    max_cells: int = DEFAULT_MAX_CELLS


@dataclass(frozen=True)
class Decision:
    """Indices (into the ``loads`` sequence) to shed and to restore this cycle.

    ``shed`` is in shedding order (least important first), ``restore`` most
    important first. ``reasons`` holds one sentence per action, sheds first.
    ``method`` says how the loads were chosen: ``"exact"`` (proven optimal at the
    resolution), ``"greedy"`` (the problem was too large for the exact method),
    ``"none"`` (even all available loads do not cover the excess: all are shed),
    ``"rotation"`` or ``"rotation/<method>"`` (a load past its maximum off time comes back,
    another takes its place), ``"partial"`` (an adjustable load part of the way back),
    ``"release"``
    (:func:`decide_release`), or ``""`` when there is nothing to do.
    """

    shed: tuple[int, ...]
    restore: tuple[int, ...]
    reasons: tuple[str, ...]
    method: str = ""
    setpoints: tuple[tuple[int, float], ...] = ()

    def steps(self) -> list[tuple[int, str, float | None, str]]:
        """The actions in the order to carry them out, with their reasons:
        ``(index, "shed" | "set" | "restore", setpoint % for "set" else None, reason)``.
        Sheds and setpoint changes come first, so a rotation never lifts the site."""
        kinds: list[tuple[int, str, float | None]] = [(i, "shed", None) for i in self.shed]
        kinds += [(i, "set", pct) for i, pct in self.setpoints]
        kinds += [(i, "restore", None) for i in self.restore]
        return [(i, k, v, why) for (i, k, v), why in zip(kinds, self.reasons, strict=True)]


_EMPTY = Decision((), (), ())


@lru_cache(maxsize=16)
def _static_arrays(loads: tuple[LoadSpec, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rated = np.array([ld.rated_kw for ld in loads], dtype=np.float64)
    priority = np.array([ld.priority for ld in loads], dtype=np.int64)
    controllable = np.array([not ld.critical for ld in loads], dtype=np.bool_)
    return rated, priority, controllable


@lru_cache(maxsize=16)
def _class_arrays(loads: tuple[LoadSpec, ...], min_on_s: float, min_off_s: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """adjustable mask, per-load min on, min off, max off (inf: none) and min % arrays."""
    adjustable = np.array([ld.adjustable for ld in loads], dtype=np.bool_)

    def per_load(name: str, default: float) -> np.ndarray:
        return np.array([getattr(ld, name) if getattr(ld, name) is not None
                         else (0.0 if ld.adjustable else default) for ld in loads],
                        dtype=np.float64)

    max_off = np.array([math.inf if ld.max_off_s is None or ld.adjustable else ld.max_off_s
                        for ld in loads], dtype=np.float64)
    min_pct = np.array([ld.min_pct for ld in loads], dtype=np.float64)
    return (adjustable, per_load("min_on_s", min_on_s), per_load("min_off_s", min_off_s),
            max_off, min_pct)


def _state_arrays(states: Sequence[LoadState]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    is_on = np.array([st.is_on for st in states], dtype=np.bool_)
    shed_by_us = np.array([st.shed_by_us for st in states], dtype=np.bool_)
    last_switch = np.array([st.last_switch_s for st in states], dtype=np.float64)
    return is_on, shed_by_us, last_switch


def _check_lengths(loads: Sequence[LoadSpec], states: Sequence[LoadState]) -> None:
    if len(loads) != len(states):
        raise ValueError(f"{len(loads)} loads but {len(states)} states")


def _describe(load: LoadSpec) -> str:
    return f"{load.name} ({load.rated_kw:.1f} kW, priority {load.priority})"


def _shed_order(loads: Sequence[LoadSpec], idx: Sequence[int]) -> list[int]:
    return sorted(idx, key=lambda i: (loads[i].priority, -loads[i].rated_kw, i))


def _restore_order(loads: Sequence[LoadSpec], idx: Sequence[int]) -> list[int]:
    return sorted(idx, key=lambda i: (-loads[i].priority, loads[i].rated_kw, i))


# Setpoints are written in steps of this many %: lowered setpoints round down (the chosen
# reduction stays covered), raised ones round down too (the headroom is not exceeded).
PCT_STEP = 0.1
# A partial raise of an adjustable load smaller than this (% of its rating) is not worth a write.
MIN_RAISE_PCT = 1.0


def _floor_pct(x: float) -> float:
    return math.floor(x / PCT_STEP + 1e-9) * PCT_STEP


@dataclass
class _View:
    """One cycle's per-load arrays: what each load can give (shed) or take back (restore)."""

    rated: np.ndarray
    weight: np.ndarray
    adjustable: np.ndarray
    shed_kw: np.ndarray  # reduction available now: rated (on/off) or down to min_pct
    sheddable: np.ndarray
    restore_kw: np.ndarray  # increase a restore gives: rated (on/off) or back to restore_pct
    restorable: np.ndarray
    overdue: np.ndarray  # shed by us for longer than its max_off_s: must come back
    off_for: np.ndarray


def _view(now_s: float, loads: Sequence[LoadSpec], states: Sequence[LoadState],
          params: CapParams) -> _View:
    rated, priority, controllable = _static_arrays(tuple(loads))
    adjustable, min_on, min_off, max_off, min_pct = _class_arrays(
        tuple(loads), float(params.min_on_s), float(params.min_off_s))
    is_on, shed_by_us, last_switch = _state_arrays(states)
    available = np.array([st.available for st in states], dtype=np.bool_)
    setpoint = np.array([st.setpoint_pct for st in states], dtype=np.float64)
    back_to = np.array([st.restore_pct for st in states], dtype=np.float64)
    since = now_s - last_switch
    # an adjustable load whose setpoint is not known yet (NaN: never read) is left alone
    known = np.isfinite(setpoint) & np.isfinite(back_to)
    safe_sp = np.where(known, setpoint, 0.0)
    safe_back = np.where(known, back_to, 0.0)
    room = np.where(adjustable, np.maximum(safe_sp - min_pct, 0.0), 100.0)
    shed_kw = rated * room / 100.0
    sheddable = controllable & available & is_on & (since >= min_on) & (room > 0.0) \
        & (known | ~adjustable)
    up = np.where(adjustable, np.maximum(safe_back - safe_sp, 0.0), 100.0)
    restore_kw = rated * up / 100.0
    restorable = shed_by_us & (since >= min_off) & np.where(adjustable, (up > 0.0) & known,
                                                             ~is_on)
    # (a load whose relay is failing is not rotated: its restore would fail and the
    # replacement be shed again every cycle)
    overdue = (shed_by_us & ~is_on & ~adjustable & available & np.isfinite(max_off)
               & (since >= max_off))
    return _View(rated, priority.astype(np.float64), adjustable, shed_kw, sheddable,
                 restore_kw, restorable, overdue, since)


def _trim(loads: Sequence[LoadSpec], states: Sequence[LoadState], view: _View,
          chosen: Sequence[int], slack_kw: float) -> tuple[list[int], list[tuple[int, float]]]:
    """Split a shed selection into on/off sheds and setpoints of the adjustable loads in it,
    giving the overshoot back through the adjustable ones (most important first)."""
    sheds = [i for i in chosen if not view.adjustable[i]]
    sets: list[tuple[int, float]] = []
    slack = max(0.0, slack_kw)
    for i in _restore_order(loads, [i for i in chosen if view.adjustable[i]]):
        depth = float(view.shed_kw[i])
        give = min(slack, depth)
        slack -= give
        depth -= give
        pct = _floor_pct(states[i].setpoint_pct - depth / loads[i].rated_kw * 100.0)
        pct = max(loads[i].min_pct, pct)
        if pct < states[i].setpoint_pct - 1e-9:
            sets.append((i, pct))
    return _shed_order(loads, sheds), sorted(sets, key=lambda s: (loads[s[0]].priority, s[0]))


def _shed_reasons(loads: Sequence[LoadSpec], states: Sequence[LoadState], sheds: Sequence[int],
                  sets: Sequence[tuple[int, float]], why: str) -> list[str]:
    out = [f"shed {_describe(loads[i])}: {why}" for i in sheds]
    out += [f"lower {_describe(loads[i])} from {states[i].setpoint_pct:.1f} % to {pct:.1f} %"
            f" (-{(states[i].setpoint_pct - pct) * loads[i].rated_kw / 100.0:.1f} kW): {why}"
            for i, pct in sets]
    return out


def _rotate(site_kw: float, target: float, loads: Sequence[LoadSpec],
            states: Sequence[LoadState], view: _View, params: CapParams) -> Decision:
    """Restore the load longest past its maximum off time; shed what covers it in its place."""
    over = np.flatnonzero(view.overdue)
    o = int(over[np.argmax(view.off_for[over])])
    spec = loads[o]
    required = site_kw + spec.rated_kw - target
    sheds: list[int] = []
    sets: list[tuple[int, float]] = []
    method = "rotation"
    reasons: list[str] = []
    if required > 0.0:
        mask = view.sheddable.copy()
        mask[o] = False
        sel = select_shed(required, view.shed_kw, view.weight, mask, params.resolution_kw,
                          params.max_cells)
        sheds, sets = _trim(loads, states, view, sel.indices, sel.slack_kw)
        how = (f"{sel.method} selection, cost {sel.total_weight:g}" if sel.covered
               else f"{sel.method}: all available loads ({sel.total_kw:.1f} kW) do not cover it")
        reasons = _shed_reasons(
            loads, states, sheds, sets,
            f"in place of {spec.name}, off for its maximum {spec.max_off_s:g} s (rotation), "
            f"need {required:.1f} kW; {how}")
        if sheds or sets:
            method = f"rotation/{sel.method}"
    restore_why = (f"restore {_describe(spec)}: off {view.off_for[o]:.0f} s, its maximum off "
                   f"time is {spec.max_off_s:g} s (rotation)")
    if not sheds and not sets and required > 0.0:
        restore_why += "; no other load can take its place: the site may go over the cap"
    reasons.append(restore_why)
    return Decision(tuple(sheds), (o,), tuple(reasons), method, tuple(sets))


def _decide_optimal(
    site_kw: float,
    now_s: float,
    loads: Sequence[LoadSpec],
    states: Sequence[LoadState],
    params: CapParams,
) -> Decision:
    target = params.cap_kw - params.margin_kw
    if not (math.isfinite(site_kw) and math.isfinite(target)):
        return _EMPTY  # a faulty reading (or cap) decides nothing
    view = _view(now_s, loads, states, params)
    if view.overdue.any():
        return _rotate(site_kw, target, loads, states, view, params)

    if site_kw > target:
        required = site_kw - target
        sel = select_shed(required, view.shed_kw, view.weight, view.sheddable,
                          params.resolution_kw, params.max_cells)
        sheds, sets = _trim(loads, states, view, sel.indices, sel.slack_kw)
        if not sheds and not sets:
            return _EMPTY
        removed = sum(loads[i].rated_kw for i in sheds) + sum(
            (states[i].setpoint_pct - pct) * loads[i].rated_kw / 100.0 for i, pct in sets)
        how = (
            f"{sel.method} selection, cost {sel.total_weight:g}, "
            f"overshoot {max(removed - required, 0.0):.1f} kW"
            if sel.covered
            else f"{sel.method}: all available loads ({sel.total_kw:.1f} kW) do not cover it"
        )
        why = (f"site {site_kw:.1f} kW > cap {params.cap_kw:.1f} - margin {params.margin_kw:.1f},"
               f" need {required:.1f} kW; {how}")
        reasons = _shed_reasons(loads, states, sheds, sets, why)
        return Decision(tuple(sheds), (), tuple(reasons), sel.method, tuple(sets))

    headroom = target - site_kw - params.hysteresis_kw
    if not (view.restorable.any() and headroom >= 0.0):
        return _EMPTY
    # All candidates fit in any headroom above their total: keeps the input finite and small.
    headroom = min(headroom, float(view.restore_kw[view.restorable].sum()) + 1.0)
    sel = select_restore(headroom, view.restore_kw, view.weight, view.restorable,
                         params.resolution_kw, params.max_cells)
    head = f"headroom {target - site_kw:.1f} kW - hysteresis {params.hysteresis_kw:.1f}"
    if not sel.indices:
        # Nothing fits whole: an adjustable load may still come part of the way back.
        adj = [int(i) for i in np.flatnonzero(view.restorable & view.adjustable)]
        for i in _restore_order(loads, adj):
            st = states[i]
            pct = _floor_pct(min(st.restore_pct,
                                 st.setpoint_pct + headroom / loads[i].rated_kw * 100.0))
            if pct - st.setpoint_pct >= MIN_RAISE_PCT:
                why = (f"raise {_describe(loads[i])} from {st.setpoint_pct:.1f} % to {pct:.1f} %"
                       f" (+{(pct - st.setpoint_pct) * loads[i].rated_kw / 100.0:.1f} kW): {head}")
                return Decision((), (), (why,), "partial", ((i, pct),))
        return _EMPTY
    # Staggered: only the most important load of the chosen set this cycle; the rest is chosen
    # again next cycle from the site measured then.
    first = _restore_order(loads, sel.indices)[0]
    chose = (f"{head}; {sel.method} selection of {len(sel.indices)} load(s), "
             f"{sel.total_kw:.1f} kW, value {sel.total_weight:g}")
    if view.adjustable[first]:
        st = states[first]
        why = f"raise {_describe(loads[first])} from {st.setpoint_pct:.1f} % back to " \
              f"{st.restore_pct:.1f} %: {chose}"
        return Decision((), (), (why,), sel.method, ((first, st.restore_pct),))
    return Decision((), (first,), (f"restore {_describe(loads[first])}: {chose}",), sel.method)


def decide_cap(
    site_kw: float,
    now_s: float,
    loads: Sequence[LoadSpec],
    states: Sequence[LoadState],
    params: CapParams,
) -> Decision:
    """One control cycle of "cap site import power at ``params.cap_kw``".

    ``site_kw`` is the measured site import, ``now_s`` the current time on the clock
    of ``LoadState.last_switch_s``.

    With ``selection="optimal"`` (default): when ``site_kw > cap - margin``, the loads
    that may be shed (not critical, available, on for at least ``min_on_s``) go to
    :func:`select_shed` with ``required = site_kw - (cap - margin)`` and cost = priority:
    the set covering it at the least total priority, then the least overshoot, is shed
    (if none covers, all of them are: best effort). Nothing is restored in such a cycle.
    Otherwise the loads we shed that are off for at least ``min_off_s`` go to
    :func:`select_restore` with headroom ``cap - margin - site_kw - hysteresis`` and
    value = priority, and the most important load of the chosen set is restored (one per
    cycle). A non-finite ``site_kw`` yields no action. ``Decision.method`` and the reasons
    say which method chose.
    """
    _check_lengths(loads, states)
    if not loads:
        return _EMPTY
    return _decide_optimal(float(site_kw), float(now_s), loads, states, params)


def decide_release(loads: Sequence[LoadSpec], states: Sequence[LoadState]) -> Decision:
    """End of a command: restore every load we shed that is still off, and take every
    adjustable load we lowered back to its former setpoint; nothing else. Most important
    first (``Decision.steps()``: setpoints, then on/off restores)."""
    _check_lengths(loads, states)
    if not loads:
        return _EMPTY
    is_on, shed_by_us, _ = _state_arrays(states)
    adjustable = np.array([ld.adjustable for ld in loads], dtype=np.bool_)
    restore = _restore_order(loads, np.flatnonzero(shed_by_us & ~adjustable & ~is_on).tolist())
    lowered = _restore_order(loads, [i for i in np.flatnonzero(shed_by_us & adjustable).tolist()
                                     if not states[i].setpoint_pct >= states[i].restore_pct])
    if not restore and not lowered:
        return _EMPTY
    reasons = tuple(
        [f"raise {_describe(loads[i])} back to {states[i].restore_pct:.1f} %: command ended"
         for i in lowered]
        + [f"restore {_describe(loads[i])}: command ended" for i in restore])
    sets = tuple((i, states[i].restore_pct) for i in lowered)
    return Decision((), tuple(restore), reasons, "release", sets)
