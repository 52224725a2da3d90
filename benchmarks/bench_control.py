"""Control decisions: choosing loads to shed and restore, numba against plain Python; cold start.

Run: .venv/bin/python benchmarks/bench_control.py [--runs N] [--py-runs N] [--largest-of N]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.

1. Decision time of `select_shed` and `select_restore` for 1,000 and 10,000 loads (median of
   --runs calls after a warm-up call), against the same algorithm in plain Python
   (`select_shed_py`, `select_restore_py`) on the same instance, side by side in the same run;
   ratio = numba / Python (the speed-up is 1 / ratio). The method used is in the name: first
   with the default `max_cells`, then forced the other way (`max_cells=0`: greedy unless the
   reduction alone solves it; `max_cells=1e9`: exact). Goals: exact for 1,000 loads <= 5 ms,
   speed-up >= 50. For an exact decision forced beyond `max_cells`, the time per cell of its
   dynamic programme (loads left x units), to size `max_cells` for another machine.
2. The exact shed on the 1,000-load instance with the largest dynamic programme among
   --largest-of random ones, side by side as in 1.
3. Start-up to the first control decision in a fresh process (interpreter start, imports,
   `lmt.control.warmup()`, one 1,000-load `select_shed`): cold (empty numba cache dir, so the
   kernels compile) against warm (a second process on the same cache dir, so they load).

Instances: loads of 1-50 kW in 0.1 kW steps, priorities 1-100 (the cost and the value), 10 %
of the loads unavailable; shed 30 % of the available power, restore into a headroom of 30 %
of the candidates' power.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from lmt.control import Selection, select_restore, select_shed
from lmt.control.select import select_restore_py, select_shed_py


def emit(name: str, value: float, unit: str, baseline: float | None) -> None:
    ratio = None if baseline in (None, 0) else round(value / baseline, 3)
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit,
                      "baseline": None if baseline is None else round(baseline, 6),
                      "ratio": ratio}), flush=True)


Case = tuple[float, list[float], list[float], list[bool]]


def instance(n: int, seed: int) -> Case:
    rng = random.Random(seed)
    kw = [rng.randint(10, 500) / 10 for _ in range(n)]
    priority = [float(rng.randint(1, 100)) for _ in range(n)]
    mask = [rng.random() < 0.9 for _ in range(n)]
    target = 0.3 * sum(k for k, m in zip(kw, mask, strict=True) if m)
    return target, kw, priority, mask


def median_s(call: Callable[[], Selection], runs: int) -> float:
    call()  # warm-up: compiled code loaded, caches hot
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def side_by_side(op: str, n: int, case: Case, max_cells: int | None, runs: int, py_runs: int,
                 suffix: str = "") -> tuple[Selection, float, float]:
    target, kw, weight, mask = case
    kw_a, weight_a, mask_a = np.array(kw), np.array(weight), np.array(mask, dtype=np.bool_)
    opt = {} if max_cells is None else {"max_cells": max_cells}
    fast_fn, slow_fn = (select_shed, select_shed_py) if op == "shed" else (select_restore,
                                                                            select_restore_py)

    def fast() -> Selection:
        return fast_fn(target, kw_a, weight_a, mask_a, **opt)

    def slow() -> Selection:
        return slow_fn(target, kw, weight, mask, **opt)

    got = fast()
    if slow() != got:
        raise SystemExit(f"select_{op} numba and Python disagree for n={n}, max_cells={max_cells}")
    t_fast = median_s(fast, runs)
    t_slow = median_s(slow, py_runs)
    name = f"select_{op}_{n}_{got.method}{suffix}"
    emit(name, t_fast * 1000, "ms", t_slow * 1000)
    return got, t_fast, t_slow


CHILD = """
import time
t0 = time.perf_counter()
import json, random
import numpy as np
from lmt.control import select_shed, warmup
t1 = time.perf_counter()
warmup()
t2 = time.perf_counter()
rng = random.Random(1)
kw = np.array([rng.randint(10, 500) / 10 for _ in range(1000)])
prio = np.array([float(rng.randint(1, 100)) for _ in range(1000)])
sel = select_shed(0.3 * kw.sum(), kw, prio)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "warmup": t2 - t1, "decision": t3 - t2, "method": sel.method}))
"""


def start_up(cache_dir: str) -> tuple[float, dict[str, float]]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True,
                         text=True).stdout
    return time.perf_counter() - t0, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21, help="timed numba calls per measurement")
    ap.add_argument("--py-runs", type=int, default=5, help="timed plain-Python calls")
    ap.add_argument("--largest-of", type=int, default=20, help="1,000-load instances for the worst case")
    args = ap.parse_args()

    for n in (1000, 10000):
        case = instance(n, seed=n)
        for op in ("shed", "restore"):
            got, _, _ = side_by_side(op, n, case, None, args.runs, args.py_runs)
            if got.method == "exact":
                side_by_side(op, n, case, 0, args.runs, args.py_runs, "_max_cells_0")
            else:
                got, t_fast, t_slow = side_by_side(op, n, case, 10**9, args.runs,
                                                   max(1, args.py_runs // 2), "_max_cells_1e9")
                emit(f"select_{op}_{n}_{got.method}_time_per_dp_cell", t_fast / got.cells * 1e9, "ns",
                     t_slow / got.cells * 1e9)

    # the largest dynamic programme among --largest-of instances (chosen by size, not by a
    # measured time, which would pick the noisiest run)
    biggest = max(range(args.largest_of), key=lambda seed: select_shed(*instance(1000, seed)).cells)
    side_by_side("shed", 1000, instance(1000, biggest), None, args.runs, args.py_runs,
                 f"_largest_of_{args.largest_of}")

    with tempfile.TemporaryDirectory() as cache:
        cold_wall, cold = start_up(cache)
        warm_wall, warm = start_up(cache)
    emit("startup_to_first_decision_cold_vs_warm", cold_wall, "s", warm_wall)
    emit("warmup_cold_compile_vs_warm_cache", cold["warmup"], "s", warm["warmup"])
    emit(f"first_select_shed_1000_{warm['method']}_after_warmup_cold_vs_warm", cold["decision"] * 1000,
         "ms", warm["decision"] * 1000)


if __name__ == "__main__":
    main()
