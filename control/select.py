"""Choosing loads: which to shed for a required reduction, which to restore into headroom.

Two optimisation problems over the site's loads, each solved exactly where the size
allows and greedily beyond, and each saying which was used (see docs/control.md,
"Choosing loads"):

* :func:`select_shed` - a *covering* knapsack: among the available loads, choose a
  set whose rated kW sum is at least ``required_kw``, with the least total cost,
  and among sets of equal cost the least overshoot (sum - required). The cost of a
  load is what the caller passes; the natural choice is its priority (1 = least
  important .. 100 = most important), so shedding one priority-40 load costs as
  much as shedding four priority-10 loads.
* :func:`select_restore` - the reverse, a *packing* knapsack: among the candidate
  loads, choose a set whose kW sum fits in ``headroom_kw``, with the greatest total
  value (priority: most important first), and among sets of equal value the least kW.

The exact method is dynamic programming over power in units of ``resolution_kw``
(0.1 kW by default), after a reduction that fixes every load the linear-programming
bound proves in or out of every optimal set. The rounding is conservative: for
shedding, load kW is rounded *down* to units and the requirement *up*, so a set that
covers in units covers in real kW; for restoring, load kW is rounded *up* and the
headroom *down*, so a set that fits in units fits in real kW. (Values within
``SNAP_UNITS`` of a unit step are snapped to it first: 0.3 / 0.1 is 3 units, not 2.)
When the remaining dynamic programme has more than ``max_cells`` cells (loads x
units), a greedy heuristic on real kW is used instead.

Every algorithm exists twice: numba kernels over numpy arrays (the API, here), and the
same algorithm in plain Python, statement for statement, in
:mod:`lmt.control.select_reference` (``select_shed_py``, ``select_restore_py``): the
benchmark's baseline and the tests' oracle. Both return the same :class:`Selection` for the
same input.

Pure functions: no I/O, no clock, no state between calls. Only numpy, numba and the
standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = [
    "DEFAULT_MAX_CELLS",
    "DEFAULT_RESOLUTION_KW",
    "EXACT",
    "GREEDY",
    "METHODS",
    "NONE",
    "Selection",
    "restore_kernel",
    "select_restore",
    "select_shed",
    "shed_kernel",
]

EXACT = 0
GREEDY = 1
NONE = 2
METHODS = ("exact", "greedy", "none")
# Input errors, returned by the kernels in place of a method.
BAD_LENGTH = -1
BAD_KW = -2
BAD_WEIGHT = -3

DEFAULT_RESOLUTION_KW = 0.1
# Cells of the dynamic programme (loads left after the reduction x units of power) above
# which the greedy method is used. Bounds time and memory: about 0.5 ns per cell on one
# core of an x86 server (3 million cells: ~1.5 ms; a Raspberry Pi 4 is several times
# slower), one byte per cell for the choices (3 MB), 16 bytes per unit for the DP rows.
DEFAULT_MAX_CELLS = 3_000_000
# kW within this many units of a unit step are taken to be on it (floating-point noise).
SNAP_UNITS = 1e-6
# A sum within this of the requirement (shed) or headroom (restore) counts as meeting it.
TOL_KW = 1e-6
# Largest load in units: keeps every sum of units far inside int64.
MAX_UNITS = 2**40


@dataclass(frozen=True)
class Selection:
    """The loads chosen by :func:`select_shed` or :func:`select_restore`.

    * ``indices``: chosen loads, ascending index order (the caller orders its actions).
    * ``total_kw``: sum of their rated kW.
    * ``total_weight``: sum of their ``cost`` (shed) or ``value`` (restore).
    * ``slack_kw``: shed: ``total_kw - required_kw``, the overshoot (negative when
      ``method == "none"``); restore: ``headroom_kw - total_kw``, the headroom left.
    * ``method``: ``"exact"`` (proven optimal at the resolution), ``"greedy"`` (the
      heuristic: the problem was larger than ``max_cells``, or only real kW, not
      units, can cover the requirement), ``"none"`` (shed only: even every available
      load together does not cover the requirement; all of them are returned).
    * ``covered``: shed: ``total_kw >= required_kw`` (within ``TOL_KW``); restore: the
      selection fits the headroom (always true).
    * ``cells``: size of the dynamic programme (loads left after the reduction x units):
      the one solved (``"exact"``), or the one that exceeded ``max_cells`` (``"greedy"``);
      0 when none was needed.
    """

    indices: tuple[int, ...]
    total_kw: float
    total_weight: float
    slack_kw: float
    method: str
    covered: bool
    cells: int = 0


# =========================================================================== numba kernels


@njit(cache=True)
def _greedy_cover_nb(order: np.ndarray, wf: np.ndarray, cost: np.ndarray, req: float, tol: float,
                     n: int) -> tuple[np.ndarray, float]:
    """Greedy covering over ``order`` (most cost-efficient first): take loads until the
    sum reaches ``req``; drop, latest first, those not needed; then prefer the best single
    load that covers alone if it is better. Returns (mask, total cost)."""
    mask = np.zeros(n, np.bool_)
    m = order.shape[0]
    acc = 0.0
    cnt = 0
    while cnt < m and acc < req - tol:
        i = order[cnt]
        mask[i] = True
        acc += wf[i]
        cnt += 1
    for p in range(cnt - 1, -1, -1):
        i = order[p]
        if acc - wf[i] >= req - tol:
            mask[i] = False
            acc -= wf[i]
    total = 0.0
    for p in range(cnt):
        if mask[order[p]]:
            total += cost[order[p]]
    best = -1
    for p in range(m):
        i = order[p]
        if wf[i] >= req - tol:
            if best < 0 or cost[i] < cost[best] or (cost[i] == cost[best] and wf[i] < wf[best]):
                best = i
    if best >= 0 and (cost[best] < total or (cost[best] == total and wf[best] < acc)):
        mask[:] = False
        mask[best] = True
        total = cost[best]
    return mask, total


@njit(cache=True)
def _greedy_pack_nb(order: np.ndarray, wf: np.ndarray, value: np.ndarray, cap: float, tol: float,
                    n: int) -> tuple[np.ndarray, float]:
    """Greedy packing over ``order`` (most value per kW first): take every load that still
    fits; then prefer the best single load that fits if it is better. Returns (mask, value)."""
    mask = np.zeros(n, np.bool_)
    m = order.shape[0]
    acc = 0.0
    total = 0.0
    for p in range(m):
        i = order[p]
        if acc + wf[i] <= cap + tol:
            mask[i] = True
            acc += wf[i]
            total += value[i]
    best = -1
    for p in range(m):
        i = order[p]
        if wf[i] <= cap + tol:
            if best < 0 or value[i] > value[best] or (value[i] == value[best] and wf[i] < wf[best]):
                best = i
    if best >= 0 and (value[best] > total or (value[best] == total and wf[best] < acc)):
        mask[:] = False
        mask[best] = True
        total = value[best]
    return mask, total


@njit(cache=True)
def _greedy_shed_real_nb(elig: np.ndarray, kw: np.ndarray, cost: np.ndarray, required_kw: float,
                         n: int) -> np.ndarray:
    m = elig.shape[0]
    keys = np.empty(m, np.float64)
    for p in range(m):
        keys[p] = cost[elig[p]] / kw[elig[p]]
    order = elig[np.argsort(keys, kind="mergesort")]
    mask, _ = _greedy_cover_nb(order, kw, cost, required_kw, TOL_KW, n)
    return np.nonzero(mask)[0]


@njit(cache=True)
def _greedy_restore_real_nb(elig: np.ndarray, kw: np.ndarray, value: np.ndarray, headroom_kw: float,
                            zero: np.ndarray) -> np.ndarray:
    m = elig.shape[0]
    keys = np.empty(m, np.float64)
    for p in range(m):
        keys[p] = -(value[elig[p]] / kw[elig[p]])
    order = elig[np.argsort(keys, kind="mergesort")]
    mask, _ = _greedy_pack_nb(order, kw, value, headroom_kw, TOL_KW, zero.shape[0])
    return np.nonzero(mask | zero)[0]


@njit(cache=True)
def _shed_nb(required_kw: float, kw: np.ndarray, cost: np.ndarray, available: np.ndarray,
             resolution_kw: float, max_cells: int) -> tuple[np.ndarray, int, int]:
    n = kw.shape[0]
    if not required_kw > 0.0:
        return np.zeros(0, np.int64), EXACT, 0
    elig = np.empty(n, np.int64)
    m = 0
    total = 0.0
    for i in range(n):
        if available[i] and kw[i] > 0.0:
            elig[m] = i
            m += 1
            total += kw[i]
    elig = elig[:m]
    if total < required_kw - TOL_KW:
        return elig.copy(), NONE, 0

    # The problem in units: loads rounded down, the requirement up.
    req = max(1, math.ceil(required_kw / resolution_kw - SNAP_UNITS))
    w = np.zeros(n, np.int64)
    ue = np.empty(m, np.int64)
    mu = 0
    wtot = 0
    for p in range(m):
        i = elig[p]
        wi = math.floor(kw[i] / resolution_kw + SNAP_UNITS)
        if wi > 0:
            w[i] = wi
            ue[mu] = i
            mu += 1
            wtot += wi
    if wtot < req:  # only the fractions lost to rounding would cover: real kW, greedily
        return _greedy_shed_real_nb(elig, kw, cost, required_kw, n), GREEDY, 0
    ue = ue[:mu]
    keys = np.empty(mu, np.float64)
    for p in range(mu):
        keys[p] = cost[ue[p]] / w[ue[p]]
    order = ue[np.argsort(keys, kind="mergesort")]
    wf = w.astype(np.float64)
    ub_mask, ub = _greedy_cover_nb(order, wf, cost, float(req), 0.0, n)

    # Linear relaxation: the break load b and its cost per unit lam. Any load whose forcing
    # to the other side of b lifts the bound above the greedy cost is fixed.
    acc_w = 0
    acc_c = 0.0
    b = 0
    for p in range(mu):
        i = order[p]
        if acc_w + w[i] >= req:
            b = p
            break
        acc_w += w[i]
        acc_c += cost[i]
    lam = cost[order[b]] / w[order[b]]
    z = acc_c + lam * (req - acc_w)
    tol = 1e-9 * max(1.0, abs(ub))
    sel = np.zeros(n, np.bool_)
    core = np.empty(mu, np.int64)
    k = 0
    fixed_w = 0
    wmax = 0
    wcore = 0
    for p in range(mu):
        i = order[p]
        d = cost[i] - lam * w[i]
        if z + abs(d) > ub + tol:
            if p < b:
                sel[i] = True
                fixed_w += w[i]
        else:
            core[k] = i
            k += 1
            wcore += w[i]
            wmax = max(wmax, w[i])
    rest = req - fixed_w
    if rest <= 0:
        return np.nonzero(sel)[0], EXACT, 0
    if wcore < rest:  # unreachable: the greedy set obeys every fixing
        return np.nonzero(ub_mask)[0], GREEDY, 0
    size = min(rest + wmax, wcore + 1)  # an optimal set minus any one load falls short
    cells = k * min(size, MAX_UNITS)
    if cells > max_cells:
        return _greedy_shed_real_nb(elig, kw, cost, required_kw, n), GREEDY, cells

    # dp[s]: least cost of a set of core loads summing to exactly s units (s < size), kept
    # for the sums that can still reach `rest` with the loads left. take: one byte per
    # (load, s): that load improved dp[s] (k x size <= max_cells bytes). Each load's update
    # reads the row before it from a copy, so the loop has no carried dependency and
    # compiles to branch-free vector code (the Python twin updates in place, downwards: the
    # same result).
    take = np.zeros(k * size, np.uint8)
    dp = np.full(size, np.inf)
    prev = np.empty(size, np.float64)
    dp[0] = 0.0
    reach = 0
    left = wcore
    for j in range(k):
        i = core[j]
        wj = w[i]
        cj = cost[i]
        reach = min(reach + wj, size - 1)
        left -= wj
        low = max(wj, rest - left)  # a smaller sum cannot reach `rest` with the loads left
        if reach < low:
            continue
        span = reach - low + 1
        prev[:span] = dp[low - wj: low - wj + span]
        row = take[j * size + low: j * size + low + span]
        cur = dp[low: low + span]
        for t in range(span):
            v = prev[t] + cj
            better = v < cur[t]
            row[t] = better
            cur[t] = v if better else cur[t]
    best = -1
    best_c = np.inf
    for s in range(rest, size):
        if dp[s] < best_c:
            best_c = dp[s]
            best = s
    if best < 0:  # unreachable, as above
        return np.nonzero(ub_mask)[0], GREEDY, cells
    s = best
    for j in range(k - 1, -1, -1):
        if take[j * size + s]:
            sel[core[j]] = True
            s -= w[core[j]]
    return np.nonzero(sel)[0], EXACT, cells


@njit(cache=True)
def _restore_nb(headroom_kw: float, kw: np.ndarray, value: np.ndarray, candidates: np.ndarray,
                resolution_kw: float, max_cells: int) -> tuple[np.ndarray, int, int]:
    n = kw.shape[0]
    if not headroom_kw >= 0.0:
        return np.zeros(0, np.int64), EXACT, 0
    zero = np.zeros(n, np.bool_)
    elig = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        if candidates[i] and value[i] > 0.0:
            if kw[i] > 0.0:
                elig[m] = i
                m += 1
            else:
                zero[i] = True  # a load of 0 kW fits any headroom
    elig = elig[:m]
    sel = zero.copy()

    # The problem in units: loads rounded up (at least one unit), the headroom down.
    cap = math.floor(headroom_kw / resolution_kw + SNAP_UNITS)
    w = np.zeros(n, np.int64)
    wtot = 0
    for p in range(m):
        i = elig[p]
        wi = max(1, math.ceil(kw[i] / resolution_kw - SNAP_UNITS))
        w[i] = wi
        wtot += wi
    if wtot <= cap:
        for p in range(m):
            sel[elig[p]] = True
        return np.nonzero(sel)[0], EXACT, 0
    keys = np.empty(m, np.float64)
    for p in range(m):
        keys[p] = -(value[elig[p]] / w[elig[p]])
    order = elig[np.argsort(keys, kind="mergesort")]
    wf = w.astype(np.float64)
    _, lb = _greedy_pack_nb(order, wf, value, float(cap), 0.0, n)

    # Linear relaxation: the break load b (the first that does not fit) and its value per
    # unit lam. Any load whose forcing to the other side of b drops the bound below the
    # greedy value is fixed.
    acc_w = 0
    acc_v = 0.0
    b = 0
    for p in range(m):
        i = order[p]
        if acc_w + w[i] > cap:
            b = p
            break
        acc_w += w[i]
        acc_v += value[i]
    lam = value[order[b]] / w[order[b]]
    z = acc_v + lam * (cap - acc_w)
    tol = 1e-9 * max(1.0, abs(lb))
    core = np.empty(m, np.int64)
    k = 0
    fixed_w = 0
    wcore = 0
    for p in range(m):
        i = order[p]
        d = value[i] - lam * w[i]
        if z - abs(d) < lb - tol:
            if p < b:
                sel[i] = True
                fixed_w += w[i]
        else:
            core[k] = i
            k += 1
            wcore += w[i]
    size = min(cap - fixed_w, wcore) + 1
    cells = k * min(size, MAX_UNITS)
    if cells > max_cells:
        return _greedy_restore_real_nb(elig, kw, value, headroom_kw, zero), GREEDY, cells

    # dp[s]: greatest value of a set of core loads summing to exactly s units (s < size);
    # take as in _shed_nb, one byte per (load, s), each row computed from a copy.
    take = np.zeros(k * size, np.uint8)
    dp = np.full(size, -np.inf)
    prev = np.empty(size, np.float64)
    dp[0] = 0.0
    reach = 0
    for j in range(k):
        i = core[j]
        wj = w[i]
        vj = value[i]
        reach = min(reach + wj, size - 1)
        if reach < wj:
            continue
        span = reach - wj + 1
        prev[:span] = dp[0: span]
        row = take[j * size + wj: j * size + wj + span]
        cur = dp[wj: wj + span]
        for t in range(span):
            v = prev[t] + vj
            better = v > cur[t]
            row[t] = better
            cur[t] = v if better else cur[t]
    best = 0
    for s in range(1, size):
        if dp[s] > dp[best]:
            best = s
    s = best
    for j in range(k - 1, -1, -1):
        if take[j * size + s]:
            sel[core[j]] = True
            s -= w[core[j]]
    return np.nonzero(sel)[0], EXACT, cells


@njit(cache=True)
def _check_nb(kw: np.ndarray, weight: np.ndarray, mask: np.ndarray, resolution_kw: float) -> int:
    n = kw.shape[0]
    if weight.shape[0] != n or mask.shape[0] != n:
        return BAD_LENGTH
    top = MAX_UNITS * resolution_kw
    for i in range(n):
        if not (kw[i] >= 0.0 and kw[i] <= top):
            return BAD_KW
        if not (weight[i] >= 0.0 and weight[i] < np.inf):
            return BAD_WEIGHT
    return 0


@njit(cache=True)
def _totals_nb(idx: np.ndarray, kw: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    total_kw = 0.0
    total_weight = 0.0
    for p in range(idx.shape[0]):
        total_kw += kw[idx[p]]
        total_weight += weight[idx[p]]
    return total_kw, total_weight


@njit(cache=True)
def shed_kernel(required_kw: float, kw: np.ndarray, cost: np.ndarray, available: np.ndarray,
                resolution_kw: float, max_cells: int) -> tuple[np.ndarray, int, int, float, float]:
    """Loads to shed: (ascending int64 indices, method code, DP cells, total kW, total cost).

    A negative method code is an input error (``BAD_*``). ``resolution_kw > 0`` and
    ``max_cells >= 0`` are the caller's to check (:func:`select_shed` does)."""
    bad = _check_nb(kw, cost, available, resolution_kw)
    if bad != 0:
        return np.zeros(0, np.int64), bad, 0, 0.0, 0.0
    idx, method, cells = _shed_nb(required_kw, kw, cost, available, resolution_kw, max_cells)
    total_kw, total_cost = _totals_nb(idx, kw, cost)
    return idx, method, cells, total_kw, total_cost


@njit(cache=True)
def restore_kernel(headroom_kw: float, kw: np.ndarray, value: np.ndarray, candidates: np.ndarray,
                   resolution_kw: float, max_cells: int) -> tuple[np.ndarray, int, int, float, float]:
    """Loads to restore: (ascending int64 indices, method code, DP cells, total kW, total value).

    A negative method code is an input error (``BAD_*``). ``resolution_kw > 0`` and
    ``max_cells >= 0`` are the caller's to check (:func:`select_restore` does)."""
    bad = _check_nb(kw, value, candidates, resolution_kw)
    if bad != 0:
        return np.zeros(0, np.int64), bad, 0, 0.0, 0.0
    idx, method, cells = _restore_nb(headroom_kw, kw, value, candidates, resolution_kw, max_cells)
    total_kw, total_value = _totals_nb(idx, kw, value)
    return idx, method, cells, total_kw, total_value


# =========================================================================== typed API


def _finite(name: str, x: float) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return v


def _settings(resolution_kw: float, max_cells: int) -> tuple[float, int]:
    res = _finite("resolution_kw", resolution_kw)
    if not res > 0.0:
        raise ValueError(f"resolution_kw must be > 0, got {resolution_kw!r}")
    if isinstance(max_cells, bool) or int(max_cells) != max_cells or max_cells < 0:
        raise ValueError(f"max_cells must be an integer >= 0, got {max_cells!r}")
    return res, min(int(max_cells), 2**62)


# The kernels get C-contiguous, writable 1-D arrays only: the types warmup() compiles for, so a
# decision never waits for numba to compile another signature.


def _vector(name: str, x: object) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    return a if a.flags.writeable else a.copy()


def _mask(name: str, x: object, n: int) -> np.ndarray:
    if x is None:
        return np.ones(n, dtype=np.bool_)
    a = np.ascontiguousarray(x, dtype=np.bool_)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    return a if a.flags.writeable else a.copy()


def _raise(code: int, weight: str, mask: str) -> None:
    if code == BAD_LENGTH:
        raise ValueError(f"kw, {weight} and {mask} must have the same length")
    if code == BAD_KW:
        raise ValueError(f"kw must be finite and >= 0 (and below {MAX_UNITS} resolution units)")
    raise ValueError(f"{weight} must be finite and >= 0")


def _shed_selection(idx: list[int], method: int, cells: int, total_kw: float, total_cost: float,
                    required_kw: float) -> Selection:
    if method < 0:
        _raise(method, "cost", "available")
    return Selection(tuple(idx), total_kw, total_cost, total_kw - required_kw, METHODS[method],
                     total_kw >= required_kw - TOL_KW, int(cells))


def _restore_selection(idx: list[int], method: int, cells: int, total_kw: float, total_value: float,
                       headroom_kw: float) -> Selection:
    if method < 0:
        _raise(method, "value", "candidates")
    return Selection(tuple(idx), total_kw, total_value, headroom_kw - total_kw, METHODS[method],
                     not idx or total_kw <= headroom_kw + TOL_KW, int(cells))


def select_shed(
    required_kw: float,
    kw: Sequence[float] | np.ndarray,
    cost: Sequence[float] | np.ndarray,
    available: Sequence[bool] | np.ndarray | None = None,
    resolution_kw: float = DEFAULT_RESOLUTION_KW,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> Selection:
    """Loads to shed for a reduction of ``required_kw``: least total ``cost``, then least
    overshoot, among the loads with ``available`` true (default: all).

    ``kw``: the reduction each load gives when shed (rated kW, >= 0). ``cost``: what
    shedding it costs (>= 0; use the priority). ``required_kw <= 0`` selects nothing.
    Raises ValueError on NaN, infinite or negative inputs and on length mismatches.
    """
    required = _finite("required_kw", required_kw)
    res, limit = _settings(resolution_kw, max_cells)
    kw_a = _vector("kw", kw)
    idx, method, cells, total_kw, total_cost = shed_kernel(
        required, kw_a, _vector("cost", cost), _mask("available", available, kw_a.shape[0]), res, limit)
    return _shed_selection(idx.tolist(), int(method), cells, total_kw, total_cost, required)


def select_restore(
    headroom_kw: float,
    kw: Sequence[float] | np.ndarray,
    value: Sequence[float] | np.ndarray,
    candidates: Sequence[bool] | np.ndarray | None = None,
    resolution_kw: float = DEFAULT_RESOLUTION_KW,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> Selection:
    """Loads to switch back on within ``headroom_kw``: greatest total ``value``, then least
    kW, among the loads with ``candidates`` true (default: all).

    ``kw``: the increase each load gives when restored (rated kW, >= 0). ``value``: what
    restoring it is worth (>= 0; use the priority). Loads of value 0 are never chosen;
    loads of 0 kW always are (when ``headroom_kw >= 0``). ``headroom_kw < 0`` selects
    nothing. Raises ValueError on NaN, infinite or negative inputs and on length mismatches.
    """
    headroom = _finite("headroom_kw", headroom_kw)
    res, limit = _settings(resolution_kw, max_cells)
    kw_a = _vector("kw", kw)
    idx, method, cells, total_kw, total_value = restore_kernel(
        headroom, kw_a, _vector("value", value), _mask("candidates", candidates, kw_a.shape[0]), res, limit)
    return _restore_selection(idx.tolist(), int(method), cells, total_kw, total_value, headroom)


def warmup() -> None:
    """Compile both kernels for the argument types the API passes (fills numba's disk cache)."""
    kw = np.array([1.0], dtype=np.float64)
    flags = np.array([True], dtype=np.bool_)
    shed_kernel(0.5, kw, kw, flags, DEFAULT_RESOLUTION_KW, DEFAULT_MAX_CELLS)
    restore_kernel(0.5, kw, kw, flags, DEFAULT_RESOLUTION_KW, DEFAULT_MAX_CELLS)
