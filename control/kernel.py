"""Numba kernels for the "cap site import power" command.

:func:`cap_step` is the priority-order greedy selection, used by
:func:`lmt.control.decide_cap` with ``CapParams(selection="priority")``; the default
selection there is the optimal one of :mod:`lmt.control.select`. :func:`release_step`
serves :func:`lmt.control.decide_release`.

Pure functions: arrays and scalars in, one action per load out. No I/O, no clock
(``now_s`` is an input), no state kept between calls. The caller applies the
actions to the relays and updates ``is_on`` / ``shed_by_us`` / ``last_switch_s``.

Per-load arrays (length n, one entry per load):

* ``rated_kw``      float64  nominal power of the load
* ``priority``      int64    1 = least important (shed first) .. 100 = most important
* ``controllable``  bool     False = critical load, never shed
* ``is_on``         bool     relay closed, load supplied
* ``shed_by_us``    bool     we opened this relay for the current command
* ``last_switch_s`` float64  time of the last switch of this load (same clock as
  ``now_s``); ``-inf`` if never switched

Output: int8 array, one of ``KEEP``, ``SHED``, ``RESTORE`` per load.
"""

from __future__ import annotations

import numpy as np
from numba import njit

KEEP = 0
SHED = 1
RESTORE = 2


@njit(cache=True)
def cap_step(
    site_kw: float,
    cap_kw: float,
    margin_kw: float,
    hysteresis_kw: float,
    rated_kw: np.ndarray,
    priority: np.ndarray,
    controllable: np.ndarray,
    is_on: np.ndarray,
    shed_by_us: np.ndarray,
    last_switch_s: np.ndarray,
    now_s: float,
    min_off_s: float,
    min_on_s: float,
) -> np.ndarray:
    """One control cycle of "cap site import at ``cap_kw``".

    Shedding, when ``site_kw > cap_kw - margin_kw``: among controllable loads that
    are on and have been on for at least ``min_on_s``, shed in ascending priority
    (ties: larger ``rated_kw`` first, then lower index) until the shed rated power
    covers the excess. If all candidates together do not cover it, all are shed.
    Nothing is restored in a shedding cycle.

    Restoring, when ``site_kw <= cap_kw - margin_kw``: among loads we shed that are
    off and have been off for at least ``min_off_s``, restore at most one: the first
    in descending priority (ties: smaller ``rated_kw`` first, then lower index)
    whose ``rated_kw + hysteresis_kw`` fits in the headroom.

    A NaN ``site_kw`` yields no action.
    """
    n = rated_kw.shape[0]
    out = np.zeros(n, dtype=np.int8)
    target = cap_kw - margin_kw

    if site_kw > target:
        need = site_kw - target
        covered = 0.0
        # Selection by repeated scan: no extra buffer, and n is small (loads of one
        # site). ``out`` marks the loads already picked.
        while covered < need:
            best = -1
            for i in range(n):
                if out[i] != KEEP:
                    continue
                if not (controllable[i] and is_on[i]):
                    continue
                if not (now_s - last_switch_s[i] >= min_on_s):
                    continue
                if best < 0:
                    best = i
                elif priority[i] < priority[best]:
                    best = i
                elif priority[i] == priority[best] and rated_kw[i] > rated_kw[best]:
                    best = i
                # equal priority and rating: keep the lower index (scan order)
            if best < 0:
                break  # best effort: every candidate is already shed
            out[best] = SHED
            covered += rated_kw[best]
        return out

    if site_kw <= target:
        headroom = target - site_kw
        best = -1
        for i in range(n):
            if not shed_by_us[i] or is_on[i]:
                continue
            if not (now_s - last_switch_s[i] >= min_off_s):
                continue
            if not (rated_kw[i] + hysteresis_kw <= headroom):
                continue
            if best < 0:
                best = i
            elif priority[i] > priority[best]:
                best = i
            elif priority[i] == priority[best] and rated_kw[i] < rated_kw[best]:
                best = i
        if best >= 0:
            out[best] = RESTORE
    return out


@njit(cache=True)
def release_step(shed_by_us: np.ndarray, is_on: np.ndarray) -> np.ndarray:
    """End of a command: restore every load we shed that is still off."""
    n = shed_by_us.shape[0]
    out = np.zeros(n, dtype=np.int8)
    for i in range(n):
        if shed_by_us[i] and not is_on[i]:
            out[i] = RESTORE
    return out
