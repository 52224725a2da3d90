"""The plain-Python twins of the numba kernels of :mod:`lmt.control.select`.

The same algorithm, statement for statement, on lists and loops: the benchmark's baseline
(``benchmarks/bench_control.py``: how much the kernels gain) and the tests' oracle
(``tests/control/test_select.py``: both return the same :class:`Selection` for the same
input). Keep the two in step. Nothing in the agent calls these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmt.control.select import (
    BAD_KW,
    BAD_LENGTH,
    BAD_WEIGHT,
    DEFAULT_MAX_CELLS,
    DEFAULT_RESOLUTION_KW,
    EXACT,
    GREEDY,
    MAX_UNITS,
    NONE,
    SNAP_UNITS,
    TOL_KW,
    Selection,
    _finite,
    _restore_selection,
    _settings,
    _shed_selection,
)

__all__ = ["select_restore_py", "select_shed_py"]


def _argsort_py(keys: list[float]) -> list[int]:
    return sorted(range(len(keys)), key=keys.__getitem__)  # stable, as mergesort


def _greedy_cover_py(order: list[int], wf: Sequence[float], cost: Sequence[float], req: float,
                     tol: float, n: int) -> tuple[list[bool], float]:
    mask = [False] * n
    m = len(order)
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
        mask = [False] * n
        mask[best] = True
        total = cost[best]
    return mask, total


def _greedy_pack_py(order: list[int], wf: Sequence[float], value: Sequence[float], cap: float,
                    tol: float, n: int) -> tuple[list[bool], float]:
    mask = [False] * n
    m = len(order)
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
        mask = [False] * n
        mask[best] = True
        total = value[best]
    return mask, total


def _nonzero_py(mask: list[bool]) -> list[int]:
    return [i for i in range(len(mask)) if mask[i]]


def _greedy_shed_real_py(elig: list[int], kw: Sequence[float], cost: Sequence[float],
                         required_kw: float, n: int) -> list[int]:
    m = len(elig)
    keys = [0.0] * m
    for p in range(m):
        keys[p] = cost[elig[p]] / kw[elig[p]]
    order = [elig[p] for p in _argsort_py(keys)]
    mask, _ = _greedy_cover_py(order, kw, cost, required_kw, TOL_KW, n)
    return _nonzero_py(mask)


def _greedy_restore_real_py(elig: list[int], kw: Sequence[float], value: Sequence[float],
                            headroom_kw: float, zero: list[bool]) -> list[int]:
    m = len(elig)
    keys = [0.0] * m
    for p in range(m):
        keys[p] = -(value[elig[p]] / kw[elig[p]])
    order = [elig[p] for p in _argsort_py(keys)]
    mask, _ = _greedy_pack_py(order, kw, value, headroom_kw, TOL_KW, len(zero))
    return [i for i in range(len(zero)) if mask[i] or zero[i]]


def _shed_core_py(required_kw: float, kw: list[float], cost: list[float], available: list[bool],
                  resolution_kw: float, max_cells: int) -> tuple[list[int], int, int]:
    n = len(kw)
    if not required_kw > 0.0:
        return [], EXACT, 0
    elig: list[int] = []
    total = 0.0
    for i in range(n):
        if available[i] and kw[i] > 0.0:
            elig.append(i)
            total += kw[i]
    m = len(elig)
    if total < required_kw - TOL_KW:
        return elig, NONE, 0

    req = max(1, math.ceil(required_kw / resolution_kw - SNAP_UNITS))
    w = [0] * n
    ue: list[int] = []
    wtot = 0
    for p in range(m):
        i = elig[p]
        wi = math.floor(kw[i] / resolution_kw + SNAP_UNITS)
        if wi > 0:
            w[i] = wi
            ue.append(i)
            wtot += wi
    if wtot < req:
        return _greedy_shed_real_py(elig, kw, cost, required_kw, n), GREEDY, 0
    mu = len(ue)
    keys = [0.0] * mu
    for p in range(mu):
        keys[p] = cost[ue[p]] / w[ue[p]]
    order = [ue[p] for p in _argsort_py(keys)]
    wf = [float(x) for x in w]
    ub_mask, ub = _greedy_cover_py(order, wf, cost, float(req), 0.0, n)

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
    sel = [False] * n
    core: list[int] = []
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
            core.append(i)
            wcore += w[i]
            wmax = max(wmax, w[i])
    k = len(core)
    rest = req - fixed_w
    if rest <= 0:
        return _nonzero_py(sel), EXACT, 0
    if wcore < rest:
        return _nonzero_py(ub_mask), GREEDY, 0
    size = min(rest + wmax, wcore + 1)
    cells = k * min(size, MAX_UNITS)
    if cells > max_cells:
        return _greedy_shed_real_py(elig, kw, cost, required_kw, n), GREEDY, cells

    row = (size + 7) >> 3
    take = bytearray(k * row)
    dp = [math.inf] * size
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
        base = j * row
        for s in range(reach, low - 1, -1):
            v = dp[s - wj] + cj
            if v < dp[s]:
                dp[s] = v
                take[base + (s >> 3)] |= 1 << (s & 7)
    best = -1
    best_c = math.inf
    for s in range(rest, size):
        if dp[s] < best_c:
            best_c = dp[s]
            best = s
    if best < 0:
        return _nonzero_py(ub_mask), GREEDY, cells
    s = best
    for j in range(k - 1, -1, -1):
        if (take[j * row + (s >> 3)] >> (s & 7)) & 1:
            sel[core[j]] = True
            s -= w[core[j]]
    return _nonzero_py(sel), EXACT, cells


def _restore_core_py(headroom_kw: float, kw: list[float], value: list[float],
                     candidates: list[bool], resolution_kw: float, max_cells: int
                     ) -> tuple[list[int], int, int]:
    n = len(kw)
    if not headroom_kw >= 0.0:
        return [], EXACT, 0
    zero = [False] * n
    elig: list[int] = []
    for i in range(n):
        if candidates[i] and value[i] > 0.0:
            if kw[i] > 0.0:
                elig.append(i)
            else:
                zero[i] = True
    m = len(elig)
    sel = list(zero)

    cap = math.floor(headroom_kw / resolution_kw + SNAP_UNITS)
    w = [0] * n
    wtot = 0
    for p in range(m):
        i = elig[p]
        wi = max(1, math.ceil(kw[i] / resolution_kw - SNAP_UNITS))
        w[i] = wi
        wtot += wi
    if wtot <= cap:
        for p in range(m):
            sel[elig[p]] = True
        return _nonzero_py(sel), EXACT, 0
    keys = [0.0] * m
    for p in range(m):
        keys[p] = -(value[elig[p]] / w[elig[p]])
    order = [elig[p] for p in _argsort_py(keys)]
    wf = [float(x) for x in w]
    _, lb = _greedy_pack_py(order, wf, value, float(cap), 0.0, n)

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
    core: list[int] = []
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
            core.append(i)
            wcore += w[i]
    k = len(core)
    size = min(cap - fixed_w, wcore) + 1
    cells = k * min(size, MAX_UNITS)
    if cells > max_cells:
        return _greedy_restore_real_py(elig, kw, value, headroom_kw, zero), GREEDY, cells

    row = (size + 7) >> 3
    take = bytearray(k * row)
    dp = [-math.inf] * size
    dp[0] = 0.0
    reach = 0
    for j in range(k):
        i = core[j]
        wj = w[i]
        vj = value[i]
        reach = min(reach + wj, size - 1)
        base = j * row
        for s in range(reach, wj - 1, -1):
            v = dp[s - wj] + vj
            if v > dp[s]:
                dp[s] = v
                take[base + (s >> 3)] |= 1 << (s & 7)
    best = 0
    for s in range(1, size):
        if dp[s] > dp[best]:
            best = s
    s = best
    for j in range(k - 1, -1, -1):
        if (take[j * row + (s >> 3)] >> (s & 7)) & 1:
            sel[core[j]] = True
            s -= w[core[j]]
    return _nonzero_py(sel), EXACT, cells


def _check_py(kw: list[float], weight: list[float], mask: list[bool], resolution_kw: float) -> int:
    n = len(kw)
    if len(weight) != n or len(mask) != n:
        return BAD_LENGTH
    top = MAX_UNITS * resolution_kw
    for i in range(n):
        if not (kw[i] >= 0.0 and kw[i] <= top):
            return BAD_KW
        if not (weight[i] >= 0.0 and weight[i] < math.inf):
            return BAD_WEIGHT
    return 0


def _totals_py(idx: list[int], kw: list[float], weight: list[float]) -> tuple[float, float]:
    total_kw = 0.0
    total_weight = 0.0
    for p in range(len(idx)):
        total_kw += kw[idx[p]]
        total_weight += weight[idx[p]]
    return total_kw, total_weight


def _shed_py(required_kw: float, kw: list[float], cost: list[float], available: list[bool],
             resolution_kw: float, max_cells: int) -> tuple[list[int], int, int, float, float]:
    bad = _check_py(kw, cost, available, resolution_kw)
    if bad != 0:
        return [], bad, 0, 0.0, 0.0
    idx, method, cells = _shed_core_py(required_kw, kw, cost, available, resolution_kw, max_cells)
    total_kw, total_cost = _totals_py(idx, kw, cost)
    return idx, method, cells, total_kw, total_cost


def _restore_py(headroom_kw: float, kw: list[float], value: list[float], candidates: list[bool],
                resolution_kw: float, max_cells: int) -> tuple[list[int], int, int, float, float]:
    bad = _check_py(kw, value, candidates, resolution_kw)
    if bad != 0:
        return [], bad, 0, 0.0, 0.0
    idx, method, cells = _restore_core_py(headroom_kw, kw, value, candidates, resolution_kw,
                                          max_cells)
    total_kw, total_value = _totals_py(idx, kw, value)
    return idx, method, cells, total_kw, total_value


def select_shed_py(
    required_kw: float,
    kw: Sequence[float],
    cost: Sequence[float],
    available: Sequence[bool] | None = None,
    resolution_kw: float = DEFAULT_RESOLUTION_KW,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> Selection:
    """:func:`select_shed` in plain Python (lists and loops): same algorithm, same result."""
    required = _finite("required_kw", required_kw)
    res, limit = _settings(resolution_kw, max_cells)
    kw_l = [float(v) for v in kw]
    mask = [True] * len(kw_l) if available is None else [bool(v) for v in available]
    idx, method, cells, total_kw, total_cost = _shed_py(
        required, kw_l, [float(v) for v in cost], mask, res, limit)
    return _shed_selection(idx, method, cells, total_kw, total_cost, required)


def select_restore_py(
    headroom_kw: float,
    kw: Sequence[float],
    value: Sequence[float],
    candidates: Sequence[bool] | None = None,
    resolution_kw: float = DEFAULT_RESOLUTION_KW,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> Selection:
    """:func:`select_restore` in plain Python (lists and loops): same algorithm, same result."""
    headroom = _finite("headroom_kw", headroom_kw)
    res, limit = _settings(resolution_kw, max_cells)
    kw_l = [float(v) for v in kw]
    mask = [True] * len(kw_l) if candidates is None else [bool(v) for v in candidates]
    idx, method, cells, total_kw, total_value = _restore_py(
        headroom, kw_l, [float(v) for v in value], mask, res, limit)
    return _restore_selection(idx, method, cells, total_kw, total_value, headroom)
