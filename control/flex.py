"""Flexibility: what the site could shed now, per load class, and why the rest cannot.

A pure function of the loads as they stand (:class:`LoadNow`) and the terminal's state
(power guarantee, exclusion). Per class:

- **interruptible**: its kW, if on and past its minimum on time;
- **adjustable**: from its setpoint down to ``min_pct`` (rated kW × (setpoint − min_pct) / 100);
- **deferrable**: its kW, if on and past its minimum on time, for at most its ``max_off_s``
  (the record says for how long);
- **critical**: never.

A load already held by a command or a DR event is not offered again (its kW is reported as
``held_kw``); power guarantee (保电) and exclusion (剔除) offer nothing. The kW of a load is its
learned kW when that is confident (:mod:`lmt.control.learn`), else its rating.

Not yet wired into the agent (issue 12: the ``flexibility`` record comes next).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmt.control.cap import LoadSpec

__all__ = ["CLASSES", "Flexibility", "LoadNow", "flexibility"]

CLASSES = ("interruptible", "adjustable", "deferrable")


@dataclass(frozen=True)
class LoadNow:
    """A load as it stands: ``on`` (read), ``held`` (by a command or event), ``on_for_s`` (how
    long since it was last switched on; None: unknown, taken as long enough), ``setpoint_pct``
    (an adjustable load's, as read), ``learned_kw`` (a confident learned kW, or None)."""

    spec: LoadSpec
    on: bool
    held: bool = False
    on_for_s: float | None = None
    setpoint_pct: float | None = None
    learned_kw: float | None = None


@dataclass(frozen=True)
class Flexibility:
    kw: dict[str, float]  # sheddable now, per class
    total_kw: float
    held_kw: float  # already held off (or lowered) by commands and events
    deferrable_for_s: float | None  # the shortest time a deferrable load offered may stay off
    loads: tuple[dict[str, object], ...]  # per load: name, class, kw offered, why not
    blocked: str | None  # "guarantee" or "excluded": nothing is offered


def _kw(load: LoadNow) -> float:
    return load.learned_kw if load.learned_kw is not None else load.spec.rated_kw


def flexibility(loads: Sequence[LoadNow], *, guarantee: bool = False, excluded: bool = False,
                min_on_s: float = 0.0) -> Flexibility:
    """What could be shed now. ``min_on_s``: the default minimum on time (a load's own, when it
    has one, wins)."""
    blocked = "guarantee" if guarantee else "excluded" if excluded else None
    per = dict.fromkeys(CLASSES, 0.0)
    held_kw = 0.0
    deferrable_for: float | None = None
    rows: list[dict[str, object]] = []
    for ld in loads:
        spec = ld.spec
        kind = "critical" if spec.critical else spec.kind
        kw, why = 0.0, ""
        if kind == "critical":
            why = "critical"
        elif ld.held:
            why = "held"
            held_kw += _held_kw(ld)
        elif blocked is not None:
            why = blocked
        elif kind == "adjustable":
            pct = ld.setpoint_pct
            if not ld.on:
                why = "off"
            elif pct is None:
                why = "setpoint unknown"
            elif pct <= spec.min_pct:
                why = "at its minimum"
            else:
                kw = _kw(ld) * (pct - spec.min_pct) / 100.0
        elif not ld.on:
            why = "off"
        else:
            need = spec.min_on_s if spec.min_on_s is not None else min_on_s
            if ld.on_for_s is not None and ld.on_for_s < need:
                why = "minimum on time"
            else:
                kw = _kw(ld)
                if kind == "deferrable" and spec.max_off_s is not None:
                    deferrable_for = spec.max_off_s if deferrable_for is None \
                        else min(deferrable_for, spec.max_off_s)
        if kw > 0.0 and kind in per:
            per[kind] += kw
        rows.append({"load": spec.name, "class": kind, "kw": round(kw, 3),
                     "why_not": why or None})
    return Flexibility(kw={k: round(v, 3) for k, v in per.items()},
                       total_kw=round(sum(per.values()), 3), held_kw=round(held_kw, 3),
                       deferrable_for_s=deferrable_for, loads=tuple(rows), blocked=blocked)


def _held_kw(ld: LoadNow) -> float:
    if ld.spec.kind == "adjustable":
        return 0.0 if ld.setpoint_pct is None else \
            _kw(ld) * max(0.0, 100.0 - ld.setpoint_pct) / 100.0
    return _kw(ld)
