"""lmt.control: the control decision layer.

Pure decision functions, no I/O: the agent measures the site, calls these functions
with the measurement, the current time and the state of its loads, switches the
relays it is told to, then updates the load states itself (``is_on``,
``shed_by_us``, ``last_switch_s``). Time is always an input; nothing here reads a
clock, talks to a device or keeps state between calls.

The numeric work lives in :mod:`lmt.control.kernel` (numba ``@njit`` kernels over
per-load arrays). This module is the small typed API over it:

* :func:`decide_cap` - one cycle of "cap site import power at X kW": when above
  ``cap - margin``, shed the set of loads that covers the excess at the least total
  priority (then the least overshoot), chosen by :func:`select_shed`; below it, restore
  our shed loads one per cycle, the most important of the set :func:`select_restore`
  fits into the headroom left after hysteresis. ``CapParams(selection="priority")``
  keeps the older priority-order greedy of :func:`lmt.control.kernel.cap_step`.
* :func:`decide_release` - end of a command: restore everything we shed.
* :func:`select_shed`, :func:`select_restore` - which loads to shed for a required
  reduction (least priority-weighted cost, then least overshoot) and which to restore
  into headroom: exact where the size allows, greedy beyond (:mod:`lmt.control.select`).
* :func:`warmup` - compile the kernels (and fill numba's on-disk cache) at start-up
  so the first control cycle is not delayed by compilation.

This package may import only numpy, numba and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmt.control.kernel import KEEP, RESTORE, SHED, cap_step, release_step
from lmt.control.select import (
    DEFAULT_MAX_CELLS,
    DEFAULT_RESOLUTION_KW,
    Selection,
    select_restore,
    select_shed,
)
from lmt.control.select import warmup as _warmup_select

__all__ = [
    "KEEP",
    "RESTORE",
    "SELECTIONS",
    "SHED",
    "CapParams",
    "Decision",
    "LoadSpec",
    "LoadState",
    "Selection",
    "decide_cap",
    "decide_release",
    "select_restore",
    "select_shed",
    "warmup",
]


@dataclass(frozen=True)
class LoadSpec:
    """Static description of a switchable load.

    ``priority``: 1 = least important (shed first) .. 100 = most important (shed
    last). ``critical`` loads are never shed.
    """

    name: str
    rated_kw: float
    priority: int
    critical: bool


@dataclass
class LoadState:
    """Dynamic state of a load, maintained by the caller after each actual switch.

    ``last_switch_s`` uses the same clock as the ``now_s`` given to the decision
    functions; ``-inf`` means never switched.
    """

    is_on: bool
    shed_by_us: bool = False
    last_switch_s: float = float("-inf")
    available: bool = True  # False: its relay failed recently; not a candidate to shed


SELECTIONS = ("optimal", "priority")


@dataclass(frozen=True)
class CapParams:
    """Parameters of a "cap site import power" command (kW and seconds).

    ``selection``: ``"optimal"`` (default) chooses the loads with :func:`select_shed` /
    :func:`select_restore` (exact knapsack at ``resolution_kw`` while the dynamic
    programme has at most ``max_cells`` cells, greedy beyond); ``"priority"`` keeps the
    priority-order greedy of :func:`lmt.control.kernel.cap_step`.
    """

    cap_kw: float
    margin_kw: float = 1.0
    hysteresis_kw: float = 2.0
    min_off_s: float = 5.0
    min_on_s: float = 5.0
    selection: str = "optimal"
    resolution_kw: float = DEFAULT_RESOLUTION_KW
    max_cells: int = DEFAULT_MAX_CELLS

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")


@dataclass(frozen=True)
class Decision:
    """Indices (into the ``loads`` sequence) to shed and to restore this cycle.

    ``shed`` is in shedding order (least important first), ``restore`` most
    important first. ``reasons`` holds one sentence per action, sheds first.
    ``method`` says how the loads were chosen: ``"exact"`` (proven optimal at the
    resolution), ``"greedy"`` (the problem was too large for the exact method),
    ``"none"`` (even all available loads do not cover the excess: all are shed),
    ``"priority"`` (``CapParams(selection="priority")``), ``"release"``
    (:func:`decide_release`), or ``""`` when there is nothing to do.
    """

    shed: tuple[int, ...]
    restore: tuple[int, ...]
    reasons: tuple[str, ...]
    method: str = ""


_EMPTY = Decision((), (), ())


@lru_cache(maxsize=16)
def _static_arrays(loads: tuple[LoadSpec, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rated = np.array([ld.rated_kw for ld in loads], dtype=np.float64)
    priority = np.array([ld.priority for ld in loads], dtype=np.int64)
    controllable = np.array([not ld.critical for ld in loads], dtype=np.bool_)
    return rated, priority, controllable


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


def _eligible(
    now_s: float,
    loads: Sequence[LoadSpec],
    states: Sequence[LoadState],
    params: CapParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """rated kW, priority, may-be-shed mask, may-be-restored mask."""
    rated, priority, controllable = _static_arrays(tuple(loads))
    is_on, shed_by_us, last_switch = _state_arrays(states)
    available = np.array([st.available for st in states], dtype=np.bool_)
    since = now_s - last_switch
    sheddable = controllable & available & is_on & (since >= params.min_on_s)
    restorable = shed_by_us & ~is_on & (since >= params.min_off_s)
    return rated, priority, sheddable, restorable


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
    rated, priority, sheddable, restorable = _eligible(now_s, loads, states, params)
    weight = priority.astype(np.float64)

    if site_kw > target:
        required = site_kw - target
        sel = select_shed(required, rated, weight, sheddable, params.resolution_kw, params.max_cells)
        shed = _shed_order(loads, sel.indices)
        if not shed:
            return _EMPTY
        how = (
            f"{sel.method} selection, cost {sel.total_weight:g}, overshoot {sel.slack_kw:.1f} kW"
            if sel.covered
            else f"{sel.method}: all available loads ({sel.total_kw:.1f} kW) do not cover it"
        )
        reasons = tuple(
            f"shed {_describe(loads[i])}: site {site_kw:.1f} kW > cap {params.cap_kw:.1f}"
            f" - margin {params.margin_kw:.1f}, need {required:.1f} kW; {how}"
            for i in shed
        )
        return Decision(tuple(shed), (), reasons, sel.method)

    headroom = target - site_kw - params.hysteresis_kw
    if not (restorable.any() and headroom >= 0.0):
        return _EMPTY
    # All candidates fit in any headroom above their total: keeps the input finite and small.
    headroom = min(headroom, float(rated[restorable].sum()) + 1.0)
    sel = select_restore(headroom, rated, weight, restorable, params.resolution_kw, params.max_cells)
    if not sel.indices:
        return _EMPTY
    # Staggered: only the most important load of the chosen set this cycle; the rest is chosen
    # again next cycle from the site measured then.
    first = _restore_order(loads, sel.indices)[0]
    reason = (
        f"restore {_describe(loads[first])}: headroom {target - site_kw:.1f} kW"
        f" - hysteresis {params.hysteresis_kw:.1f}; {sel.method} selection of"
        f" {len(sel.indices)} load(s), {sel.total_kw:.1f} kW, value {sel.total_weight:g}"
    )
    return Decision((), (first,), (reason,), sel.method)


def _decide_priority(
    site_kw: float,
    now_s: float,
    loads: Sequence[LoadSpec],
    states: Sequence[LoadState],
    params: CapParams,
) -> Decision:
    rated, priority, controllable = _static_arrays(tuple(loads))
    is_on, shed_by_us, last_switch = _state_arrays(states)
    if not all(st.available for st in states):
        controllable = controllable & np.array([st.available for st in states], dtype=np.bool_)
    actions = cap_step(
        float(site_kw),
        float(params.cap_kw),
        float(params.margin_kw),
        float(params.hysteresis_kw),
        rated,
        priority,
        controllable,
        is_on,
        shed_by_us,
        last_switch,
        float(now_s),
        float(params.min_off_s),
        float(params.min_on_s),
    )
    shed = _shed_order(loads, np.flatnonzero(actions == SHED).tolist())
    restore = _restore_order(loads, np.flatnonzero(actions == RESTORE).tolist())
    if not shed and not restore:
        return _EMPTY
    target = params.cap_kw - params.margin_kw
    reasons = [
        f"shed {_describe(loads[i])}: site {site_kw:.1f} kW > cap {params.cap_kw:.1f}"
        f" - margin {params.margin_kw:.1f}; priority order"
        for i in shed
    ]
    reasons += [
        f"restore {_describe(loads[i])}: headroom {target - site_kw:.1f} kW; priority order"
        for i in restore
    ]
    return Decision(tuple(shed), tuple(restore), tuple(reasons), "priority")


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
    say which method chose. With ``selection="priority"``: see
    :func:`lmt.control.kernel.cap_step`.
    """
    _check_lengths(loads, states)
    if not loads:
        return _EMPTY
    if params.selection == "priority":
        return _decide_priority(float(site_kw), float(now_s), loads, states, params)
    return _decide_optimal(float(site_kw), float(now_s), loads, states, params)


def decide_release(loads: Sequence[LoadSpec], states: Sequence[LoadState]) -> Decision:
    """End of a command: restore every load we shed that is still off, nothing else."""
    _check_lengths(loads, states)
    if not loads:
        return _EMPTY
    is_on, shed_by_us, _ = _state_arrays(states)
    actions = release_step(shed_by_us, is_on)
    restore = _restore_order(loads, np.flatnonzero(actions == RESTORE).tolist())
    if not restore:
        return _EMPTY
    reasons = tuple(f"restore {_describe(loads[i])}: command ended" for i in restore)
    return Decision((), tuple(restore), reasons, "release")


def warmup() -> None:
    """Compile the kernels for the argument types the API uses (numba caches them on disk)."""
    rated = np.array([1.0], dtype=np.float64)
    priority = np.array([1], dtype=np.int64)
    flags = np.array([True], dtype=np.bool_)
    last_switch = np.array([float("-inf")], dtype=np.float64)
    cap_step(0.0, 1.0, 0.0, 0.0, rated, priority, flags, flags, flags, last_switch, 0.0, 0.0, 0.0)
    release_step(flags, flags)
    _warmup_select()
