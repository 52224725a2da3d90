"""lmt.control: the control decision layer.

Pure decision functions, no I/O: the agent measures the site, calls these functions
with the measurement, the current time and the state of its loads, switches the
relays it is told to, then updates the load states itself (``is_on``,
``shed_by_us``, ``last_switch_s``). Time is always an input; nothing here reads a
clock, talks to a device or keeps state between calls.

The numeric work lives in :mod:`lmt.control.kernel` (numba ``@njit`` kernels over
per-load arrays). This module is the small typed API over it:

* :func:`decide_cap` - one cycle of "cap site import power at X kW": shed the
  least important loads when above ``cap - margin``, restore our shed loads one per
  cycle, most important first, when they fit below it with hysteresis.
* :func:`decide_release` - end of a command: restore everything we shed.
* :func:`select_shed`, :func:`select_restore` - which loads to shed for a required
  reduction (least priority-weighted cost, then least overshoot) and which to restore
  into headroom: exact where the size allows, greedy beyond (:mod:`lmt.control.select`).
* :func:`warmup` - compile the kernels (and fill numba's on-disk cache) at start-up
  so the first control cycle is not delayed by compilation.

This package may import only numpy, numba and the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmt.control.kernel import KEEP, RESTORE, SHED, cap_step, release_step
from lmt.control.select import Selection, select_restore, select_shed
from lmt.control.select import warmup as _warmup_select

__all__ = [
    "KEEP",
    "RESTORE",
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


@dataclass(frozen=True)
class CapParams:
    """Parameters of a "cap site import power" command (kW and seconds)."""

    cap_kw: float
    margin_kw: float = 1.0
    hysteresis_kw: float = 2.0
    min_off_s: float = 5.0
    min_on_s: float = 5.0


@dataclass(frozen=True)
class Decision:
    """Indices (into the ``loads`` sequence) to shed and to restore this cycle.

    ``shed`` is in shedding order (least important first), ``restore`` most
    important first. ``reasons`` holds one sentence per action, sheds first.
    """

    shed: tuple[int, ...]
    restore: tuple[int, ...]
    reasons: tuple[str, ...]


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


def decide_cap(
    site_kw: float,
    now_s: float,
    loads: Sequence[LoadSpec],
    states: Sequence[LoadState],
    params: CapParams,
) -> Decision:
    """One control cycle of "cap site import power at ``params.cap_kw``".

    ``site_kw`` is the measured site import, ``now_s`` the current time on the clock
    of ``LoadState.last_switch_s``. See :func:`lmt.control.kernel.cap_step`.
    """
    _check_lengths(loads, states)
    if not loads:
        return _EMPTY
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
    target = params.cap_kw - params.margin_kw
    reasons = [
        f"shed {_describe(loads[i])}: site {site_kw:.1f} kW > cap {params.cap_kw:.1f}"
        f" - margin {params.margin_kw:.1f}"
        for i in shed
    ]
    reasons += [
        f"restore {_describe(loads[i])}: headroom {target - site_kw:.1f} kW" for i in restore
    ]
    return Decision(tuple(shed), tuple(restore), tuple(reasons))


def decide_release(loads: Sequence[LoadSpec], states: Sequence[LoadState]) -> Decision:
    """End of a command: restore every load we shed that is still off, nothing else."""
    _check_lengths(loads, states)
    if not loads:
        return _EMPTY
    is_on, shed_by_us, _ = _state_arrays(states)
    actions = release_step(shed_by_us, is_on)
    restore = _restore_order(loads, np.flatnonzero(actions == RESTORE).tolist())
    reasons = tuple(f"restore {_describe(loads[i])}: command ended" for i in restore)
    return Decision((), tuple(restore), reasons)


def warmup() -> None:
    """Compile the kernels for the argument types the API uses (numba caches them on disk)."""
    rated = np.array([1.0], dtype=np.float64)
    priority = np.array([1], dtype=np.int64)
    flags = np.array([True], dtype=np.bool_)
    last_switch = np.array([float("-inf")], dtype=np.float64)
    cap_step(0.0, 1.0, 0.0, 0.0, rated, priority, flags, flags, flags, last_switch, 0.0, 0.0, 0.0)
    release_step(flags, flags)
    _warmup_select()
