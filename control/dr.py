"""Demand-response events: a pure, deterministic event scheduler, and baseline helpers.

Time is always an input (unix seconds: events are scheduled in wall-clock time by the
platform); nothing here reads a clock, does I/O or draws from a global random generator.
The agent calls :meth:`DrScheduler.receive`, :meth:`DrScheduler.cancel` and
:meth:`DrScheduler.opt_out` when a command or a customer override arrives, and
:meth:`DrScheduler.tick` every control cycle; each returns the state changes to report on
the result topic, and ``tick`` also returns the :class:`Target` for the control layer.
:meth:`DrScheduler.to_dict` / :meth:`DrScheduler.from_dict` persist the whole state (JSON
types only), so a restart resumes where it stopped.

Life of an event (see docs/control.md, "Demand-response events"):

``received`` → ``scheduled`` → ``active`` → ``completed``; or, from ``scheduled`` or
``active``: ``cancelled`` (the platform), ``opted_out`` (the customer's local override),
``superseded`` (a newer overlapping event); or ``expired`` (received after its end, or its
whole window passed while no control cycle ran).

Times of the window: ``start + offset`` with ``offset`` drawn uniformly in
``[0, randomize_s)`` from a hash of (terminal id, event id) — the same after a restart — and
``end = start + offset + duration_s``. Ends are on time: an active event whose end passes
between two ticks is reported ``completed`` *at its end*, and no target exists after it.

:class:`DeliveryMeter` meters what an active event delivered: the main-meter power
integrated over its window, against its baseline (the result of the event's end carries it).

This module may import only the standard library (the control package: numpy, numba, stdlib).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lmt.control.jsonstate import Json

__all__ = [
    "DEFAULT_LEVEL_FRACTIONS",
    "FINAL_STATES",
    "REGISTER_MIN_WINDOW_S",
    "SIGNALS",
    "DeliveryMeter",
    "DrEvent",
    "DrScheduler",
    "LikeDaysBaseline",
    "PowerHistory",
    "Target",
    "Transition",
    "baseline_before",
    "delivered_reduction_kw",
    "like_days_baseline",
    "start_offset",
]

SignalKind = Literal["level", "reduction_kw", "reduction_pct", "cap_kw"]
SIGNALS: tuple[str, ...] = ("level", "reduction_kw", "reduction_pct", "cap_kw")

State = Literal["received", "scheduled", "active", "completed", "cancelled", "superseded",
                "opted_out", "expired"]
FINAL_STATES = frozenset({"completed", "cancelled", "superseded", "opted_out", "expired"})

# OpenADR SIMPLE levels 1..3 → fraction of the baseline to shed; level 0 is "normal" (no limit).
DEFAULT_LEVEL_FRACTIONS: Mapping[int, float] = {1: 0.10, 2: 0.20, 3: 0.35}

_STATE_VERSION = 1


def _finite(name: str, value: float, who: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{who}: {name} must be finite, got {value!r}")
    return x


@dataclass(frozen=True)
class DrEvent:
    """A demand-response event as the platform sends it.

    ``start`` (unix s) and ``duration_s`` give the nominal window; ``randomize_s`` spreads
    the start of a fleet over ``[start, start + randomize_s)`` (duration kept); ``ramp_s``
    (≤ ``duration_s``): the limit moves linearly from the baseline to the full signal over the
    first ``ramp_s`` of the window; ``recovery_s``: after the end, loads come back paced over
    this long. ``signal`` is one of :data:`SIGNALS` with ``value``: ``level`` 0–3 (OpenADR
    SIMPLE; 0 = normal operation), ``reduction_kw`` > 0, ``reduction_pct`` in (0, 100],
    ``cap_kw`` > 0. ``issued_at`` orders overlapping events (the later one wins).
    ``expires_at``: received at or after it, the event is expired (default: its end).
    """

    id: str
    issued_at: float
    start: float
    duration_s: float
    signal: str
    value: float
    randomize_s: float = 0.0
    ramp_s: float = 0.0
    recovery_s: float = 0.0
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"DR event id must be a non-empty string, got {self.id!r}")
        who = f"DR event {self.id!r}"
        for name in ("issued_at", "start", "duration_s", "value", "randomize_s", "ramp_s",
                     "recovery_s"):
            object.__setattr__(self, name, _finite(name, getattr(self, name), who))
        if self.expires_at is not None:
            object.__setattr__(self, "expires_at", _finite("expires_at", self.expires_at, who))
        if self.duration_s <= 0:
            raise ValueError(f"{who}: duration_s must be > 0 s, got {self.duration_s:g}")
        for name in ("randomize_s", "ramp_s", "recovery_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{who}: {name} must be ≥ 0 s, got {getattr(self, name):g}")
        if self.ramp_s > self.duration_s:
            raise ValueError(f"{who}: ramp_s ({self.ramp_s:g} s) is longer than duration_s "
                             f"({self.duration_s:g} s)")
        v = self.value
        if self.signal == "level":
            if v not in (0.0, 1.0, 2.0, 3.0):
                raise ValueError(f"{who}: level must be 0, 1, 2 or 3, got {v:g}")
        elif self.signal == "reduction_kw":
            if v <= 0:
                raise ValueError(f"{who}: reduction_kw must be > 0 kW, got {v:g}")
        elif self.signal == "reduction_pct":
            if not 0 < v <= 100:
                raise ValueError(f"{who}: reduction_pct must be in (0, 100] %, got {v:g}")
        elif self.signal == "cap_kw":
            if v <= 0:
                raise ValueError(f"{who}: cap_kw must be > 0 kW, got {v:g}")
        else:
            raise ValueError(f"{who}: unknown signal {self.signal!r}; expected one of "
                             f"{', '.join(SIGNALS)}")

    @property
    def end(self) -> float:
        """Nominal end (without randomisation); supersede compares nominal windows."""
        return self.start + self.duration_s

    def describe(self) -> str:
        unit = {"level": "level ", "reduction_kw": "reduce ", "reduction_pct": "reduce ",
                "cap_kw": "cap "}[self.signal]
        value = f"{self.value:g}" + {"level": "", "reduction_kw": " kW", "reduction_pct": " %",
                                     "cap_kw": " kW"}[self.signal]
        return f"{unit}{value} for {self.duration_s:g} s"


@dataclass(frozen=True)
class Transition:
    """One state change of an event, to report on the result topic.

    ``at`` is when it happened: a ``completed`` or ``expired`` found late carries the end
    time of the window, not the time of the call that noticed it.
    """

    event_id: str
    state: State
    at: float
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """What the control layer should do now for demand response.

    Active event: keep site import ≤ ``cap_kw`` (interpolated during the ramp; ``ramping``
    while it still falls: a load shed then is not restored into the headroom of a cap that is
    about to be lower).
    Recovery (``recovering``): shed nothing; restore a shed load only when site import plus
    its rated power stays ≤ ``restore_ceiling_kw``, which rises by ``restore_kw_per_s`` from
    the last cap to the baseline over the event's ``recovery_s``. No target (``None`` from
    :meth:`DrScheduler.tick`): no demand response; restore what it shed.
    """

    event_id: str
    cap_kw: float | None
    recovering: bool = False
    restore_ceiling_kw: float | None = None
    restore_kw_per_s: float | None = None
    baseline_kw: float | None = None
    until: float = 0.0  # end of the active window, or of the recovery
    ramping: bool = False  # the cap is still falling (the ramp): shed, but restore nothing


def start_offset(terminal_id: str, event_id: str, randomize_s: float) -> float:
    """Start offset in ``[0, randomize_s)``, uniform, fixed by (terminal id, event id).

    sha256 rather than ``hash()``: the same on every run and every machine, so a restart
    draws the same offset and a fleet spreads evenly.
    """
    if randomize_s <= 0:
        return 0.0
    digest = hashlib.sha256(f"{terminal_id}\x1f{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * randomize_s


@dataclass
class _Record:
    event: DrEvent
    seq: int
    received_at: float
    offset_s: float
    fraction: float | None  # level signals: the site's reduction fraction, fixed at receipt
    state: str = "received"
    activated_at: float | None = None
    baseline_kw: float | None = None
    ended_at: float | None = None  # active control ended (completed/cancelled/superseded)
    end_cap_kw: float | None = None  # the cap at that moment: recovery starts there
    recovery: bool = False
    final_at: float | None = None
    superseded_by: str | None = None

    @property
    def eff_start(self) -> float:
        return self.event.start + self.offset_s

    @property
    def eff_end(self) -> float:
        return self.eff_start + self.event.duration_s

    @property
    def rank(self) -> tuple[float, int]:
        return (self.event.issued_at, self.seq)


_EVENT_FIELDS = ("id", "issued_at", "start", "duration_s", "signal", "value", "randomize_s",
                 "ramp_s", "recovery_s", "expires_at")
_RECORD_FIELDS = ("seq", "received_at", "offset_s", "fraction", "state", "activated_at",
                  "baseline_kw", "ended_at", "end_cap_kw", "recovery", "final_at", "superseded_by")


def _fmt_t(t: float) -> str:
    return f"{t:.1f}"


class DrScheduler:
    """The demand-response events of one terminal, and their state.

    ``terminal_id`` seeds the start randomisation; ``level_fractions`` maps OpenADR SIMPLE
    levels 1–3 to the fraction of the baseline to shed (site configuration); final events
    are kept ``keep_final_s`` (to recognise a repeated delivery), then forgotten.
    """

    def __init__(self, terminal_id: str, level_fractions: Mapping[int, float] | None = None,
                 keep_final_s: float = 7 * 86400.0) -> None:
        if not terminal_id:
            raise ValueError("terminal_id must be a non-empty string")
        levels = dict(DEFAULT_LEVEL_FRACTIONS if level_fractions is None else level_fractions)
        for level, frac in levels.items():
            if level not in (1, 2, 3):
                raise ValueError(f"level_fractions: level must be 1, 2 or 3, got {level!r}")
            if not (isinstance(frac, int | float) and 0 < frac <= 1):
                raise ValueError(f"level_fractions: level {level} fraction must be in (0, 1], "
                                 f"got {frac!r}")
        self.terminal_id = terminal_id
        self.level_fractions: dict[int, float] = {int(k): float(v) for k, v in levels.items()}
        self.keep_final_s = keep_final_s
        self._records: dict[str, _Record] = {}
        self._seq = 0

    # -- queries ----------------------------------------------------------------------------
    def state_of(self, event_id: str) -> str | None:
        """The event's state, or ``None`` when unknown (never received, or forgotten)."""
        rec = self._records.get(event_id)
        return None if rec is None else rec.state

    def window(self, event_id: str) -> tuple[float, float]:
        """This terminal's (randomised) window ``(start, end)`` of a known event."""
        rec = self._get(event_id)
        return rec.eff_start, rec.eff_end

    def baseline_of(self, event_id: str) -> float | None:
        return self._get(event_id).baseline_kw

    # -- inputs -----------------------------------------------------------------------------
    def receive(self, event: DrEvent, now: float) -> list[Transition]:
        """A new event from the platform: ``received``, then ``scheduled``, ``expired`` or
        ``superseded`` (an overlapping event issued later is already known); older
        overlapping events are ``superseded``. A repeated delivery of a known event (same
        id, same content) changes nothing; the same id with other content is refused.
        """
        now = _finite("now", now, "receive")
        out = self._settle(now)
        known = self._records.get(event.id)
        if known is not None:
            if known.event != event:
                raise ValueError(f"DR event {event.id!r} was already received with other content; "
                                 "send a modification as a new event id (it supersedes the old)")
            return out
        fraction = None
        if event.signal == "level" and event.value > 0:
            level = int(event.value)
            if level not in self.level_fractions:
                raise ValueError(f"DR event {event.id!r}: level {level} has no reduction fraction "
                                 f"configured (configured: {sorted(self.level_fractions)})")
            fraction = self.level_fractions[level]
        self._seq += 1
        rec = _Record(event, self._seq, now, start_offset(self.terminal_id, event.id,
                                                          event.randomize_s), fraction)
        self._records[event.id] = rec
        window = {"start": rec.eff_start, "end": rec.eff_end, "offset_s": rec.offset_s}
        out.append(Transition(event.id, "received", now, event.describe(), dict(window)))
        if now >= rec.eff_end or (event.expires_at is not None and now >= event.expires_at):
            why = (f"its window ended at {_fmt_t(rec.eff_end)}" if now >= rec.eff_end
                   else f"received after expires_at {_fmt_t(event.expires_at or 0.0)}")
            self._finish(rec, "expired", now)
            out.append(Transition(event.id, "expired", now, why, dict(window)))
            return out
        live = [r for r in self._records.values()
                if r is not rec and r.state not in FINAL_STATES and _overlap(r.event, event)]
        newer = [r for r in live if r.event.issued_at > event.issued_at]
        if newer:
            by = max(newer, key=lambda r: r.rank)
            self._finish(rec, "superseded", now)
            out.append(Transition(event.id, "superseded", now,
                                  f"event {by.event.id!r}, issued later, overlaps it",
                                  {"by": by.event.id}))
            return out
        for old in sorted(live, key=lambda r: r.seq):
            old.superseded_by = event.id
            out.append(self._end(old, "superseded", now, f"superseded by event {event.id!r}",
                                 recovery=True, data={"by": event.id}))
        rec.state = "scheduled"
        if now >= rec.eff_start:
            detail = (f"start passed {now - rec.eff_start:.0f} s ago: active from the next "
                      f"control cycle until {_fmt_t(rec.eff_end)}")
        else:
            detail = (f"active {_fmt_t(rec.eff_start)} to {_fmt_t(rec.eff_end)} "
                      f"(start offset {rec.offset_s:.0f} s of up to {event.randomize_s:g} s)")
        out.append(Transition(event.id, "scheduled", now, detail, dict(window)))
        return out

    def cancel(self, event_id: str, now: float, reason: str = "") -> list[Transition]:
        """The platform cancels an event: ``cancelled`` now; an active one recovers paced.

        Unknown id: ``KeyError``. An event already final: no transition (check
        :meth:`state_of`).
        """
        now = _finite("now", now, "cancel")
        out = self._settle(now)
        rec = self._get(event_id)
        if rec.state in FINAL_STATES:
            return out
        detail = "cancelled by the platform" + (f": {reason}" if reason else "")
        out.append(self._end(rec, "cancelled", now, detail, recovery=True))
        return out

    def opt_out(self, event_id: str, now: float, reason: str) -> list[Transition]:
        """The customer overrides an event locally: ``opted_out`` now, loads back at once
        (no recovery pacing: the customer asked for them). Unknown id: ``KeyError``.
        """
        now = _finite("now", now, "opt_out")
        if not reason:
            raise ValueError("opt_out: give the reason (who overrode the event, and how)")
        out = self._settle(now)
        rec = self._get(event_id)
        if rec.state in FINAL_STATES:
            return out
        out.append(self._end(rec, "opted_out", now, f"opted out by the customer: {reason}",
                             recovery=False))
        return out

    def tick(self, now: float, baseline_kw: float | None) -> tuple[list[Transition], Target | None]:
        """One control cycle: the state changes due by ``now``, and the target now.

        ``baseline_kw`` is the pre-event baseline the caller measures (e.g.
        :func:`baseline_before`); it is stored in an event when it becomes active (or at the
        first tick that gives one), so its cap does not drift. Reduction and level signals
        need it; a cap signal uses it only to ramp and to pace the recovery.
        """
        now = _finite("now", now, "tick")
        if baseline_kw is not None:
            baseline_kw = _finite("baseline_kw", baseline_kw, "tick")
        out = self._settle(now)
        for rec in sorted(self._records.values(), key=lambda r: r.seq):
            if rec.state == "scheduled" and now >= rec.eff_start:
                rec.state = "active"
                rec.activated_at = now
                source = self._control_in_effect(rec, now)
                rec.baseline_kw = baseline_kw if source is None else source.baseline_kw
                full = self._full_cap(rec)
                data: dict[str, Any] = {"start": rec.eff_start, "end": rec.eff_end,
                                        "baseline_kw": rec.baseline_kw, "cap_kw": full}
                if source is not None:
                    data["baseline_from"] = source.event.id
                if full is not None:
                    detail = f"cap {full:.1f} kW until {_fmt_t(rec.eff_end)}"
                elif rec.event.signal == "level" and rec.fraction is None:
                    detail = "level 0: normal operation, no limit"
                else:
                    detail = "no baseline yet: the limit starts with the first baseline"
                if now > rec.eff_start:
                    detail += f" (control began {now - rec.eff_start:.1f} s after the start)"
                out.append(Transition(rec.event.id, "active", now, detail, data))
            elif rec.state == "active" and rec.baseline_kw is None and baseline_kw is not None:
                rec.baseline_kw = baseline_kw
        self._prune(now)
        return out, self._target(now)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The whole state in JSON types (for the agent's SQLite)."""
        events = []
        for rec in sorted(self._records.values(), key=lambda r: r.seq):
            d: dict[str, Any] = {name: getattr(rec.event, name) for name in _EVENT_FIELDS}
            d.update({name: getattr(rec, name) for name in _RECORD_FIELDS})
            events.append(d)
        return {"v": _STATE_VERSION, "terminal_id": self.terminal_id, "seq": self._seq,
                "events": events}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], level_fractions: Mapping[int, float] | None = None,
                  keep_final_s: float = 7 * 86400.0) -> DrScheduler:
        """Rebuild a scheduler from :meth:`to_dict`. Offsets, baselines and level fractions
        are the stored ones; ``level_fractions`` applies to events received from now on.
        """
        if not isinstance(data, Mapping) or data.get("v") != _STATE_VERSION:
            raise ValueError(f"DR state: expected a mapping with v={_STATE_VERSION}")
        try:
            sched = cls(str(data["terminal_id"]), level_fractions, keep_final_s)
            sched._seq = int(data["seq"])
            for d in data["events"]:
                ev = DrEvent(**{name: d[name] for name in _EVENT_FIELDS})
                rec = _Record(ev, int(d["seq"]), float(d["received_at"]), float(d["offset_s"]),
                              d["fraction"])
                for name in _RECORD_FIELDS[4:]:
                    setattr(rec, name, d[name])
                if rec.state not in get_args(State):
                    raise ValueError(f"unknown state {rec.state!r}")
                sched._records[ev.id] = rec
        except (KeyError, TypeError) as exc:
            raise ValueError(f"DR state: malformed ({exc!r})") from None
        return sched

    # -- internals --------------------------------------------------------------------------
    def _get(self, event_id: str) -> _Record:
        rec = self._records.get(event_id)
        if rec is None:
            raise KeyError(f"no DR event {event_id!r}")
        return rec

    def _finish(self, rec: _Record, state: str, at: float) -> None:
        rec.state = state
        rec.final_at = at

    def _end(self, rec: _Record, state: State, at: float, detail: str, *, recovery: bool,
             data: dict[str, Any] | None = None) -> Transition:
        was_active = rec.state == "active"
        if was_active:
            rec.ended_at = at
            rec.end_cap_kw = self._cap_at(rec, at)
            rec.recovery = recovery
        self._finish(rec, state, at)
        out = dict(data or {})
        out.update({"was_active": was_active, "baseline_kw": rec.baseline_kw})
        return Transition(rec.event.id, state, at, detail, out)

    def _settle(self, now: float) -> list[Transition]:
        """Ends due by ``now``, each at its own end time, in time order."""
        out: list[Transition] = []
        for rec in sorted(self._records.values(), key=lambda r: (r.eff_end, r.seq)):
            if rec.state in FINAL_STATES or now < rec.eff_end:
                continue
            if rec.state == "active":
                out.append(self._end(rec, "completed", rec.eff_end,
                                     f"ended at {_fmt_t(rec.eff_end)}", recovery=True))
            else:  # scheduled: the whole window passed without a control cycle
                self._finish(rec, "expired", rec.eff_end)
                out.append(Transition(rec.event.id, "expired", rec.eff_end,
                                      "its window passed while no control cycle ran "
                                      "(terminal not running)",
                                      {"start": rec.eff_start, "end": rec.eff_end}))
        return out

    def _control_in_effect(self, rec: _Record, now: float) -> _Record | None:
        """An event whose control still holds the load down when ``rec`` starts: active, in
        recovery, or superseded by ``rec`` before its own end (a modification). Its baseline is
        the one to use: the load measured under control is no baseline.
        """
        found = []
        for r in self._records.values():
            if r is rec or r.activated_at is None or r.baseline_kw is None:
                continue
            recovering = r.ended_at is not None and now < r.ended_at + r.event.recovery_s
            modified = (r.superseded_by == rec.event.id and r.ended_at is not None
                        and now < r.eff_end + r.event.recovery_s)
            if r.state == "active" or recovering or modified:
                found.append(r)
        return max(found, key=lambda r: r.rank) if found else None

    def _prune(self, now: float) -> None:
        for rec in list(self._records.values()):
            if (rec.state in FINAL_STATES and rec.final_at is not None
                    and now - rec.final_at > self.keep_final_s
                    and (rec.ended_at is None or now > rec.ended_at + rec.event.recovery_s)):
                del self._records[rec.event.id]

    def _full_cap(self, rec: _Record) -> float | None:
        ev = rec.event
        if ev.signal == "cap_kw":
            return ev.value
        if ev.signal == "level" and rec.fraction is None:
            return None  # level 0
        b = rec.baseline_kw
        if b is None:
            return None
        if ev.signal == "reduction_kw":
            reduction = ev.value
        elif ev.signal == "reduction_pct":
            reduction = b * ev.value / 100.0
        else:
            reduction = b * (rec.fraction or 0.0)
        return max(0.0, b - reduction)

    def _cap_at(self, rec: _Record, t: float) -> float | None:
        full = self._full_cap(rec)
        b = rec.baseline_kw
        if full is None or b is None or rec.event.ramp_s <= 0 or b <= full:
            return full
        f = min(1.0, max(0.0, (t - rec.eff_start) / rec.event.ramp_s))
        return b + (full - b) * f

    def _target(self, now: float) -> Target | None:
        active = [r for r in self._records.values() if r.state == "active"]
        if active:
            rec = max(active, key=lambda r: r.rank)
            cap = self._cap_at(rec, now)
            if cap is not None:
                full = self._full_cap(rec)
                ramping = (full is not None and cap > full
                           and now < rec.eff_start + rec.event.ramp_s)
                return Target(rec.event.id, cap, baseline_kw=rec.baseline_kw, until=rec.eff_end,
                              ramping=ramping)
        recovering = [r for r in self._records.values()
                      if r.recovery and r.ended_at is not None and r.end_cap_kw is not None
                      and r.baseline_kw is not None and r.baseline_kw > r.end_cap_kw
                      and r.ended_at <= now < r.ended_at + r.event.recovery_s]
        if not recovering:
            return None
        rec = max(recovering, key=lambda r: (r.ended_at or 0.0, r.seq))
        assert rec.ended_at is not None and rec.end_cap_kw is not None and rec.baseline_kw is not None
        rate = (rec.baseline_kw - rec.end_cap_kw) / rec.event.recovery_s
        ceiling = rec.end_cap_kw + rate * (now - rec.ended_at)
        return Target(rec.event.id, None, recovering=True, restore_ceiling_kw=ceiling,
                      restore_kw_per_s=rate, baseline_kw=rec.baseline_kw,
                      until=rec.ended_at + rec.event.recovery_s)


def _overlap(a: DrEvent, b: DrEvent) -> bool:
    return a.start < b.end and b.start < a.end


# -- baselines ----------------------------------------------------------------------------------
def baseline_before(times: Sequence[float], kw: Sequence[float], at: float,
                    window_s: float = 900.0) -> float | None:
    """Mean load of the samples in ``[at - window_s, at)`` (Jiangsu real-time users: the 15
    minutes before control). Samples at a steady rate; ``None`` when the window has none.
    """
    if len(times) != len(kw):
        raise ValueError(f"{len(times)} times but {len(kw)} values")
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0 s, got {window_s:g}")
    vals = [float(p) for t, p in zip(times, kw, strict=True) if at - window_s <= t < at]
    return sum(vals) / len(vals) if vals else None


BASELINE_BUCKETS = 30  # PowerHistory keeps the baseline window in this many buckets


@dataclass
class PowerHistory(Json):
    """The main-meter power over the baseline window, in :data:`BASELINE_BUCKETS` buckets of
    ``window_s / BASELINE_BUCKETS``: small enough to persist every cycle.
    ``buckets``: (start, sum of kW, samples). :meth:`mean_before` is the mean of the samples
    of the buckets that start in ``[at - window_s, at]`` — :func:`baseline_before` with the
    window's edges on bucket boundaries."""

    window_s: float = 900.0
    buckets: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def bucket_s(self) -> float:
        return self.window_s / BASELINE_BUCKETS

    def add(self, now: float, kw: float) -> None:
        start = math.floor(now / self.bucket_s) * self.bucket_s
        if self.buckets and self.buckets[-1][0] == start:
            _, total, n = self.buckets[-1]
            self.buckets[-1] = (start, total + kw, n + 1)
        else:
            self.buckets.append((start, kw, 1))
        # keep the window (a clock stepped back leaves buckets "from the future": dropped too)
        self.buckets = [b for b in self.buckets if now - self.window_s - self.bucket_s <= b[0]
                        <= now]

    def mean_before(self, at: float) -> float | None:
        total, n = 0.0, 0
        for start, kw, k in self.buckets:
            if at - self.window_s <= start <= at:
                total += kw
                n += k
        return total / n if n else None


@dataclass(frozen=True)
class LikeDaysBaseline:
    """Baseline per event interval (kW), before and after the day-of adjustment ``factor``."""

    kw: tuple[float, ...]
    unadjusted_kw: tuple[float, ...]
    factor: float


def like_days_baseline(past_days: Sequence[Sequence[float]], event_intervals: range, *,
                       n_days: int = 10, today: Sequence[float] | None = None,
                       adjust_intervals: range | None = None,
                       clamp: tuple[float, float] = (0.8, 1.2)) -> LikeDaysBaseline:
    """Average of the last ``n_days`` like days over the event's intervals.

    ``past_days``: per-day interval loads (kW), oldest first, like days only (the caller
    leaves out weekends, holidays and event days). US practice (LBNL): 10 days with the
    day-of adjustment factor ``clamp(mean(today) / mean(baseline))`` over
    ``adjust_intervals`` (the hours before the event); Jiangsu contracted users: the last
    5 normal working days, no adjustment (leave ``today`` out).
    """
    if n_days < 1:
        raise ValueError(f"n_days must be ≥ 1, got {n_days}")
    days = list(past_days)[-n_days:]
    if not days:
        raise ValueError("no past days to average")
    wanted = list(event_intervals) + list(adjust_intervals or [])
    need = max(wanted, default=-1) + 1
    short = [i for i, d in enumerate(days) if len(d) < need]
    if short:
        raise ValueError(f"{len(short)} past day(s) have fewer than {need} intervals")
    if min(wanted, default=0) < 0:
        raise ValueError("interval indices must be ≥ 0")

    def mean_at(i: int) -> float:
        return sum(float(d[i]) for d in days) / len(days)

    base = tuple(mean_at(i) for i in event_intervals)
    factor = 1.0
    if today is not None and adjust_intervals is not None and len(adjust_intervals) > 0:
        if len(today) < max(adjust_intervals) + 1:
            raise ValueError("today has fewer intervals than adjust_intervals needs")
        recent = sum(float(today[i]) for i in adjust_intervals) / len(adjust_intervals)
        base_recent = sum(mean_at(i) for i in adjust_intervals) / len(adjust_intervals)
        if base_recent > 0:
            lo, hi = clamp
            factor = min(hi, max(lo, recent / base_recent))
    return LikeDaysBaseline(tuple(b * factor for b in base), base, factor)


def delivered_reduction_kw(baseline_kwh: float, metered_kwh: float, duration_s: float) -> float:
    """Response = (baseline energy − metered energy) / event duration, in kW."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0 s, got {duration_s:g}")
    return (baseline_kwh - metered_kwh) / (duration_s / 3600.0)


# -- delivery -----------------------------------------------------------------------------------
# The import register's difference is used only over a window at least this long: it is a slow
# point (read every poll.slow_interval_s), so over a short window it says little.
REGISTER_MIN_WINDOW_S = 900.0


@dataclass
class MeteredWindow(Json):
    """What one active event has metered so far: energy integrated from the power samples
    (``kwh`` over ``covered_s``), the import register at the start, and the last sample."""

    start: float
    start_kwh: float | None = None
    kwh: float = 0.0
    covered_s: float = 0.0
    last_t: float | None = None
    last_kw: float | None = None


@dataclass
class DeliveryMeter(Json):
    """The metered delivery of the active DR events (persisted with the supervisor's state).

    :meth:`start` when an event becomes active, :meth:`sample` every cycle with the main-meter
    power (trapezoids; a gap longer than ``gap_s`` is not bridged, and counts as not covered;
    nothing past the window's end), :meth:`end` when it ends: baseline and metered energy over
    the active window and the delivered reduction. The power samples are used unless they
    cover under 90 % of the window (the agent was down): then the import register's
    difference, when it was read at both ends, the end was seen live, and the window is at
    least :data:`REGISTER_MIN_WINDOW_S` long.
    """

    events: dict[str, MeteredWindow] = field(default_factory=dict)

    def start(self, event_id: str, at: float, now: float, kw: float | None,
              kwh: float | None) -> None:
        self.events[event_id] = MeteredWindow(start=at, start_kwh=kwh,
                                              last_t=None if kw is None else max(at, now),
                                              last_kw=kw)

    def sample(self, now: float, kw: float | None, ends: Mapping[str, float],
               gap_s: float) -> None:
        """``ends``: each event's window end (an event missing from it counts up to now)."""
        if kw is None:
            return
        for event_id, acc in self.events.items():
            end = ends.get(event_id, now)
            if acc.last_t is not None and acc.last_kw is not None \
                    and 0 < now - acc.last_t <= gap_s and acc.last_t < end:
                dt = min(now, end) - acc.last_t
                acc.kwh += (acc.last_kw + kw) / 2 * dt / 3600.0
                acc.covered_s += dt
            acc.last_t, acc.last_kw = now, kw

    def end(self, event_id: str, at: float, now: float, baseline_kw: float | None,
            kwh: float | None, gap_s: float) -> dict[str, Any] | None:
        """The delivery of an event that ended at ``at`` (None when there is nothing to say:
        no baseline, an empty window, no measurement); the event is forgotten."""
        acc = self.events.pop(event_id, None)
        if acc is None:
            return None
        duration = at - acc.start
        if duration <= 0 or baseline_kw is None:
            return None
        live = now - at <= gap_s
        register = (kwh - acc.start_kwh if acc.start_kwh is not None and kwh is not None
                    and live and duration >= REGISTER_MIN_WINDOW_S else None)
        coverage = min(1.0, acc.covered_s / duration)
        if coverage >= 0.9 or (register is None and coverage > 0):
            metered, method = acc.kwh / coverage, "power samples"
        elif register is not None:
            metered, method = register, "energy register"
        else:
            return None
        baseline_kwh = baseline_kw * duration / 3600.0
        return {"start": round(acc.start, 3), "end": round(at, 3),
                "register_kwh": None if register is None else round(register, 4),
                "duration_s": round(duration, 3), "baseline_kw": round(baseline_kw, 3),
                "baseline_kwh": round(baseline_kwh, 4), "metered_kwh": round(metered, 4),
                "mean_kw": round(metered / (duration / 3600.0), 3),
                "delivered_reduction_kw": round(
                    delivered_reduction_kw(baseline_kwh, metered, duration), 3),
                "method": method, "coverage": round(coverage, 3)}
