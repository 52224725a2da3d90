"""Learned load response: a load's real kW, from the metered steps of its switches.

The rated kW on a nameplate is often wrong (a chiller at part load, a heater with one element
gone, a relay wired to nothing). Every switch of a load is an experiment: the main meter's
power before and after it. :func:`observe` takes one such step — already sign-normalised to
"what the load draws" (an off-switch's drop, an on-switch's rise) and with the expected change
of any other load switched in the same cycle taken out — and :func:`estimate` says what the
steps agree on:

- the estimate is the **median** of the last ``keep`` steps (a step disturbed by the site's own
  load moving at that moment is an outlier, not a shift of the mean);
- its standard error is ``1.2533 × 1.4826 × MAD / √n`` (the median's, for a normal spread,
  from the median absolute deviation), floored by the step noise the meter's noise implies;
- it is **confident** once there are ``min_steps`` steps and the standard error is within
  ``confident_rel`` of the larger of the estimate and the rating (so a load that does nothing,
  whose steps scatter around zero, is confidently learned as about 0);
- it **drifts** from its rating when confident and further than ``drift_rel`` × rated kW away
  (the ``load_rating_drift`` event).

Pure: state in, state out, no clock, JSON through :class:`LoadLearning`'s ``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lmt.control.jsonstate import Json

__all__ = ["Estimate", "LearnParams", "LoadLearning", "drifts", "estimate", "observe"]

_MEDIAN_SE = 1.2533  # the median's standard error over the mean's, for a normal spread
_MAD_SIGMA = 1.4826  # sigma over the median absolute deviation, for a normal spread


@dataclass(frozen=True)
class LearnParams:
    keep: int = 15  # the most recent steps kept per load
    min_steps: int = 3  # before any confidence
    confident_rel: float = 0.1  # standard error within this share of max(|estimate|, rated)
    drift_rel: float = 0.5  # confident and this far from the rating: it drifted
    max_shared_rel: float = 1.0  # a step shared with others over this share of its load: skipped

    def __post_init__(self) -> None:
        if self.keep < 1 or self.min_steps < 1 or self.min_steps > self.keep:
            raise ValueError("LearnParams: need 1 <= min_steps <= keep")
        if not (0 < self.confident_rel and 0 < self.drift_rel):
            raise ValueError("LearnParams: confident_rel and drift_rel must be > 0")


@dataclass
class LoadLearning(Json):
    """One load's steps (kW it drew, most recent last) and the step noise seen with each."""

    steps: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)
    skipped: int = 0  # steps not used (shared with too much else, or not finite)


@dataclass(frozen=True)
class Estimate:
    kw: float | None  # None before the first step
    n: int
    se_kw: float | None  # standard error of kw
    confident: bool


def observe(p: LearnParams, state: LoadLearning, step_kw: float, noise_kw: float,
            others_kw: float = 0.0, rated_kw: float | None = None) -> LoadLearning:
    """One switch's step: ``step_kw`` the change of site power the switch made, as the load's
    draw (positive for a load that draws), with ``others_kw`` — the expected change of other
    loads switched in the same cycle, same sign convention — already taken out by the caller
    or given here to be taken out; ``noise_kw``: the step's own noise (e.g. the meter's noise ×
    √(2/readings)). A step shared with more than ``max_shared_rel`` × the load's rating of
    other switching is too entangled to learn from: skipped (counted)."""
    if not (math.isfinite(step_kw) and math.isfinite(noise_kw) and math.isfinite(others_kw)):
        return replace(state, skipped=state.skipped + 1)
    if rated_kw is not None and rated_kw > 0 and abs(others_kw) > p.max_shared_rel * rated_kw:
        return replace(state, skipped=state.skipped + 1)
    steps = [*state.steps, step_kw - others_kw][-p.keep:]
    noise = [*state.noise, max(0.0, noise_kw)][-p.keep:]
    return LoadLearning(steps=steps, noise=noise, skipped=state.skipped)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2.0


def estimate(p: LearnParams, state: LoadLearning, rated_kw: float | None = None) -> Estimate:
    """What the steps say the load draws, and how sure."""
    n = len(state.steps)
    if n == 0:
        return Estimate(None, 0, None, False)
    kw = _median(state.steps)
    mad = _median([abs(s - kw) for s in state.steps])
    noise = _median(state.noise) if state.noise else 0.0
    spread = max(_MAD_SIGMA * mad, noise)  # never surer than the meter's noise allows
    se = _MEDIAN_SE * spread / math.sqrt(n)
    scale = max(abs(kw), rated_kw or 0.0)
    confident = n >= p.min_steps and scale > 0 and se <= p.confident_rel * scale
    return Estimate(kw, n, se, confident)


def drifts(p: LearnParams, est: Estimate, rated_kw: float) -> bool:
    """A confident estimate further than ``drift_rel`` of its rating away from it."""
    return est.confident and est.kw is not None and rated_kw > 0 \
        and abs(est.kw - rated_kw) > p.drift_rel * rated_kw
