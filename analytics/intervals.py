"""Interval records of one meter: energy per wall-clock interval, demand, voltage, current.

A meter is fed its readings one at a time (:func:`feed`); it gives back the intervals that are
complete. An interval's energy is the **register difference** across its boundaries, the
register being the meter's legal value. Registers are read slowly (every minute, say) and
rarely at a boundary, so the register's value at a boundary ``b`` is taken between the last
register reading before it (``r0`` at ``t0``) and the first after (``r1`` at ``t1``), in the
proportion of the energy the meter's power readings integrate to on either side of ``b``::

    R(b) = r0 + (r1 - r0) * (E(b) - E(t0)) / (E(t1) - E(t0))

(linearly in time when the power integrates to nothing). So an interval is complete once the
first register reading after its end has arrived, and the intervals' energies always add up to
the register difference between any two boundaries: each boundary's value is used twice, once
as an end and once as a start.

When no register reading arrives for ``register_wait_s`` after a boundary (the point fails,
or the meter has none), the boundary is estimated from the integrated power instead
(``source: "integrated"``, quality ``estimated``); the first interval after the register is
back absorbs the difference between the estimate and the register (quality ``estimated``), so
the sum is the register's again. A meter that says nothing at all (offline, the agent stopped)
holds its intervals until it is read again: the register difference across the outage is then
shared out as above (with the power interpolated across the gap, i.e. about evenly in time),
and the intervals come out filled, each once, with their ``coverage`` telling how much of
them was measured (quality ``gap``). Past ``hold_max_s`` without a reading they come out
without energy.

A register that goes down is looked at, not subtracted: near the top of its range and back
near zero it rolled over (``register_rollover``: the range is added); otherwise it was reset
or the meter replaced (``register_reset``): the energy across the step is taken from the
integrated power and the register continues from its new value. The time of a reading is
the wall clock (intervals are on wall-clock boundaries); a wall-clock step is told from time
passing by the monotonic clock of the same session: a step back never makes an interval twice
(readings stay in the open interval until the clock is past it again), a step forward makes
the intervals it skips, without energy of their own; both are flagged ``clock_step``.

Demand: the mean power over a demand window (``demand_minutes``), as a block (clock-aligned
windows) or sliding (a window ending at every minute), from the integrated power; the month's
maximum (local calendar month, ``utc_offset_s``) is kept with its time.

Pure: no clock is read, state is a value (:class:`MeterLedger`, JSON through ``to_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from lmt.control.jsonstate import Json

from .sample import Sample

__all__ = [
    "QUALITIES",
    "IntervalConfig",
    "MeterLedger",
    "MeterSpec",
    "feed",
    "month_of",
    "open_interval",
]

#: Worst first: an interval's ``quality`` is the worst of its ``flags`` (``complete`` if none).
QUALITIES = ("clock_step", "register_reset", "register_rollover", "gap", "estimated", "complete")
INTERVAL_MINUTES = (1, 5, 15, 30, 60)
_BIG = 1e300  # the running minimum's start (JSON has no infinity)


@dataclass(frozen=True)
class IntervalConfig:
    """How intervals are cut (shared by every meter of a ledger)."""

    minutes: int = 15
    demand_minutes: int = 15
    demand_mode: Literal["block", "sliding"] = "block"
    utc_offset_s: int = 28800  # local time, for the month of the maximum demand
    register_wait_s: float = 900.0  # a boundary without a register reading this long: estimated
    hold_max_s: float = 86400.0  # intervals held this long for a silent meter: out without energy
    cover_gap_s: float = 10.0  # readings further apart than this leave the time between unmeasured
    complete_coverage: float = 0.9  # below this share measured, an interval is a "gap"
    clock_step_s: float = 5.0  # wall and monotonic clocks disagreeing by more: a clock step
    max_jump_s: float = 40 * 86400.0  # a longer jump starts the meter's timeline afresh

    def __post_init__(self) -> None:
        if self.minutes not in INTERVAL_MINUTES:
            raise ValueError(f"minutes: expected one of {INTERVAL_MINUTES}, got {self.minutes}")
        if self.demand_minutes not in INTERVAL_MINUTES:
            raise ValueError(f"demand_minutes: expected one of {INTERVAL_MINUTES}, "
                             f"got {self.demand_minutes}")

    @property
    def seconds(self) -> int:
        return self.minutes * 60


@dataclass(frozen=True)
class MeterSpec:
    """One meter of the ledger: which registers it has, and the range they roll over at."""

    name: str
    has_import: bool = True
    has_export: bool = False
    register_max_kwh: float = 1_000_000.0  # the register's range (DL/T 645 XXXXXX.XX: 10^6)
    resolution_kwh: float = 0.01



# -- state -------------------------------------------------------------------------------------

@dataclass
class Register(Json):
    """One energy register (import or export) as the ledger follows it.

    ``u`` is the value unwrapped (rollovers and resets taken out: ``u = raw + offset``); ``e``
    the integrated energy (the same direction) at the reading. The anchor is the register's
    value at the last boundary given one (or its estimate), where the integrated energy was
    ``anchor_e``."""

    raw: float | None = None
    u: float | None = None
    t: float | None = None
    e: float = 0.0
    pu: float | None = None  # the reading before
    pt: float | None = None
    pe: float = 0.0
    offset: float = 0.0
    anchor: float | None = None
    anchor_e: float = 0.0
    anchor_est: bool = False
    flags: list[str] = field(default_factory=list)  # rollover/reset since the last boundary


@dataclass
class Acc(Json):
    """What an interval gathered from the readings within it, and, once ended, its energy."""

    start: float
    n: int = 0
    covered_s: float = 0.0
    max_kw: float | None = None
    # voltage then current, per phase [min, sum, max, count]
    vi: list[float] = field(default_factory=lambda: [_BIG, 0.0, -_BIG, 0.0] * 6)
    pf_sum: float = 0.0
    pf_n: int = 0
    flags: list[str] = field(default_factory=list)
    e_imp: float = 0.0  # the integrated energies at the end boundary
    e_exp: float = 0.0
    kwh_imp: float | None = None
    kwh_exp: float | None = None
    src_imp: str = ""  # "" while unresolved, then "register", "integrated" or "none"
    src_exp: str = ""
    md_kw: float | None = None  # the month's maximum demand as of the end, its time, month
    md_at: float | None = None
    md_month: str = ""


@dataclass
class MeterLedger(Json):
    """The ledger of one meter: its timeline, registers and open and unresolved intervals."""

    session: str = ""
    t: float | None = None  # the last reading's time on the ledger's timeline
    wall: float | None = None  # ... its wall-clock time as read
    mono: float | None = None  # ... and its monotonic time
    kw: float | None = None  # the last power read (kW, + import)
    e_imp: float = 0.0  # integrated import energy (kWh) since the ledger began
    e_exp: float = 0.0
    imp: Register = field(default_factory=Register)
    exp: Register = field(default_factory=Register)
    open: Acc | None = None
    pending: list[Acc] = field(default_factory=list)  # ended, waiting for a register reading
    minute: float | None = None  # start of the current minute
    minute_e: float = 0.0  # integrated import energy at its start
    minute_ok: bool = False  # measured throughout so far
    window: list[float] = field(default_factory=list)  # the last minutes' energies (kWh)
    month: str = ""  # the local month of the maximum demand, "2026-07"
    month_max_kw: float | None = None
    month_max_at: float | None = None


def month_of(t: float, utc_offset_s: int) -> str:
    d = datetime.fromtimestamp(t + utc_offset_s, tz=UTC)
    return f"{d.year:04d}-{d.month:02d}"


def open_interval(cfg: IntervalConfig, t: float) -> float:
    """The start of the interval containing ``t``. Boundaries are on the wall clock; every
    allowed length divides an hour, so they are the same in local time for whole-hour (and
    half-hour, up to 30-minute intervals) offsets."""
    return math.floor(t / cfg.seconds) * cfg.seconds


# -- feeding -------------------------------------------------------------------------------------

def feed(cfg: IntervalConfig, spec: MeterSpec, state: MeterLedger, sample: Sample,
         session: str = "") -> tuple[MeterLedger, list[dict[str, Any]]]:
    """One reading of the meter in; the new state and the interval records it completed, in
    order (the input state is not changed). ``session`` names the run of the monotonic clock:
    ``sample.mono`` is compared only within one."""
    out: list[dict[str, Any]] = []
    t = sample.t
    if not math.isfinite(t):
        return state, out
    st = _copy(state)
    step = False
    last = st.t
    if last is not None and st.wall is not None:
        if st.session == session and st.mono is not None and math.isfinite(sample.mono):
            step = abs((t - st.wall) - (sample.mono - st.mono)) > cfg.clock_step_s
        if abs(t - last) > cfg.max_jump_s:  # a clock from another decade: start afresh
            _flush(cfg, spec, st, out, include_open=True, flag="clock_step")
            st = MeterLedger(imp=_restart(st.imp), exp=_restart(st.exp))
        elif t < last:
            t = last  # a step back: time stands until the clock is past it again
    st.session, st.wall, st.mono = session, sample.t, sample.mono
    if st.t is None:  # the first reading (or after a fresh start)
        start = open_interval(cfg, t)
        st.t, st.kw = t, _finite(sample.power_kw)
        st.open = Acc(start=start, flags=["gap"] if t > start else [])
        st.minute, st.minute_e = math.floor(t / 60.0) * 60.0, 0.0
        st.month = month_of(t, cfg.utc_offset_s)
        _take(st.open, sample)
        _registers(spec, st, sample, t)
        return st, out
    long_gap = t - st.t > cfg.hold_max_s
    _advance(cfg, st, sample, t, step)
    _registers(spec, st, sample, t)
    if long_gap and st.pending:  # silent too long: what it held comes out without energy
        _flush(cfg, spec, st, out, include_open=False, flag="gap")
    _resolve(cfg, spec, st, t, out)
    return st, out


def _advance(cfg: IntervalConfig, st: MeterLedger, sample: Sample, t: float, step: bool) -> None:
    """Move the timeline from the last reading to ``t``: integrate the power, close the minutes
    and intervals whose ends lie between."""
    assert st.t is not None and st.open is not None
    t0, k0 = st.t, st.kw
    k1 = _finite(sample.power_kw)
    measured = t - t0 <= cfg.cover_gap_s and k0 is not None
    end = st.open.start + cfg.seconds
    while end <= t:
        _minutes_to(cfg, st, t0, k0, t, k1, end, measured)
        acc = st.open
        if measured:
            acc.covered_s += _overlap(t0, t, acc.start, end)
        d_imp, d_exp = _integral(t0, k0, t, k1, end)
        acc.e_imp, acc.e_exp = st.e_imp + d_imp, st.e_exp + d_exp
        acc.md_kw, acc.md_at, acc.md_month = st.month_max_kw, st.month_max_at, st.month
        if step:
            acc.flags.append("clock_step")
        st.pending.append(acc)
        st.open = Acc(start=end)
        end += cfg.seconds
    if step:
        st.open.flags.append("clock_step")
    _minutes_to(cfg, st, t0, k0, t, k1, t, measured)
    if not measured:
        st.minute_ok = False
    if measured:
        st.open.covered_s += _overlap(t0, t, st.open.start, t)
    d_imp, d_exp = _integral(t0, k0, t, k1, t)
    st.e_imp += d_imp
    st.e_exp += d_exp
    st.t = t
    if k1 is not None:
        st.kw = k1
    _take(st.open, sample)


def _integral(t0: float, k0: float | None, t1: float, k1: float | None, b: float
              ) -> tuple[float, float]:
    """Import and export energy (kWh) from ``t0`` to ``b`` (≤ ``t1``), the power linear between
    the readings at ``t0`` and ``t1``; an unknown power integrates to nothing."""
    if b <= t0 or k0 is None:
        return 0.0, 0.0
    if k1 is None:
        k1 = k0
    kb = k0 + (k1 - k0) * (b - t0) / (t1 - t0) if t1 > t0 else k1
    hours = (b - t0) / 3600.0
    if k0 >= 0.0 and kb >= 0.0:
        return (k0 + kb) / 2.0 * hours, 0.0
    if k0 <= 0.0 and kb <= 0.0:
        return 0.0, -(k0 + kb) / 2.0 * hours
    z = k0 / (k0 - kb)  # the share of the span before the power crosses zero
    a, c = k0 / 2.0 * hours * z, kb / 2.0 * hours * (1.0 - z)
    return max(a, 0.0) + max(c, 0.0), -(min(a, 0.0) + min(c, 0.0))


def _minutes_to(cfg: IntervalConfig, st: MeterLedger, t0: float, k0: float | None, t1: float,
                k1: float | None, upto: float, measured: bool) -> None:
    """Close the minutes that end by ``upto``: the open interval's highest minute power, and
    the demand window."""
    assert st.minute is not None and st.open is not None
    while st.minute + 60.0 <= upto:
        m_end = st.minute + 60.0
        e_end = st.e_imp + _integral(t0, k0, t1, k1, m_end)[0]
        kwh = e_end - st.minute_e
        ok = measured and st.minute_ok  # the whole minute was measured
        if ok:
            kw = kwh * 60.0
            acc = st.open
            if acc.max_kw is None or kw > acc.max_kw:
                acc.max_kw = kw
        _demand(cfg, st, m_end, kwh if ok else None)
        st.minute, st.minute_e, st.minute_ok = m_end, e_end, measured


def _demand(cfg: IntervalConfig, st: MeterLedger, m_end: float, kwh: float | None) -> None:
    month = month_of(m_end - 1.0, cfg.utc_offset_s)
    if month != st.month:
        st.month, st.month_max_kw, st.month_max_at = month, None, None
    n = cfg.demand_minutes
    if kwh is None:  # an unmeasured minute: no window containing it counts
        st.window = []
        return
    st.window.append(kwh)
    if len(st.window) > n:
        del st.window[0]
    block = cfg.demand_mode == "block"
    if block and round(m_end) % (n * 60) != 0:
        return
    if len(st.window) == n:
        kw = sum(st.window) * 60.0 / n
        if st.month_max_kw is None or kw > st.month_max_kw:
            st.month_max_kw, st.month_max_at = kw, m_end
    if block:
        st.window = []


def _take(acc: Acc, s: Sample) -> None:
    acc.n += 1
    vi = acc.vi
    j = 0
    for values in (s.voltage_v, s.current_a):
        for v in values:
            if v is not None and math.isfinite(v):
                if v < vi[j]:
                    vi[j] = v
                vi[j + 1] += v
                if v > vi[j + 2]:
                    vi[j + 2] = v
                vi[j + 3] += 1.0
            j += 4
    pf = s.power_factor
    if pf is not None and math.isfinite(pf):
        acc.pf_sum += abs(pf)
        acc.pf_n += 1


def _registers(spec: MeterSpec, st: MeterLedger, s: Sample, t: float) -> None:
    for reg, raw, e, has in ((st.imp, s.import_kwh, st.e_imp, spec.has_import),
                             (st.exp, s.export_kwh, st.e_exp, spec.has_export)):
        if not has or raw is None or not math.isfinite(raw):
            continue
        if reg.raw is None or reg.u is None:
            reg.raw, reg.u, reg.t, reg.e = raw, raw + reg.offset, t, e
            if reg.anchor is None:  # the first reading: the anchor, backwards by the power
                reg.anchor, reg.anchor_est = reg.u - (e - reg.anchor_e), reg.anchor_e > 0.0
            continue
        d = raw - reg.raw
        if d < -spec.resolution_kwh:
            top = spec.register_max_kwh
            if reg.raw >= 0.9 * top and raw <= 0.1 * top:
                reg.offset += top
                reg.flags.append("register_rollover")
            else:  # reset, or a new meter: the step's energy from the power readings
                reg.offset = reg.u + (e - reg.e) - raw
                reg.flags.append("register_reset")
        elif d < 0.0:
            raw = reg.raw  # a wobble within the resolution: no change
        reg.pu, reg.pt, reg.pe = reg.u, reg.t, reg.e
        reg.raw, reg.u, reg.t, reg.e = raw, raw + reg.offset, t, e


def _resolve(cfg: IntervalConfig, spec: MeterSpec, st: MeterLedger, t: float,
             out: list[dict[str, Any]]) -> None:
    """Give the ended intervals their energy, emit those that have it, in order."""
    for reg, has, imp in ((st.imp, spec.has_import, True), (st.exp, spec.has_export, False)):
        for acc in st.pending:
            if (acc.src_imp if imp else acc.src_exp):
                continue
            end = acc.start + cfg.seconds
            e_b = acc.e_imp if imp else acc.e_exp
            if not has:
                kwh, src = e_b - reg.anchor_e, "integrated"
                reg.anchor_e = e_b
            elif reg.anchor is not None and reg.u is not None and reg.t is not None \
                    and reg.t >= end:
                u_b = _at(reg, end, e_b)
                kwh, src = u_b - reg.anchor, "register"
                if reg.anchor_est:
                    acc.flags.append("estimated")
                acc.flags.extend(reg.flags)
                reg.flags = []
                reg.anchor, reg.anchor_e, reg.anchor_est = u_b, e_b, False
            elif t - end >= cfg.register_wait_s:
                kwh, src = e_b - reg.anchor_e, "integrated"
                acc.flags.append("estimated")
                if reg.anchor is not None:
                    reg.anchor += kwh
                reg.anchor_e, reg.anchor_est = e_b, True
            else:
                break  # this and the later ones wait for a register reading
            if imp:
                acc.kwh_imp, acc.src_imp = kwh, src
            else:
                acc.kwh_exp, acc.src_exp = kwh, src
    while st.pending and st.pending[0].src_imp and st.pending[0].src_exp:
        out.append(_record(cfg, spec, st.pending.pop(0)))


def _at(reg: Register, b: float, e_b: float) -> float:
    """The register's value at boundary ``b`` (≤ the latest reading's time): between the
    latest reading and the one before it (or the anchor, if that is later), by the
    integrated energy, or by time when the power says nothing."""
    assert reg.u is not None and reg.t is not None and reg.anchor is not None
    if reg.pu is not None and reg.pt is not None and reg.pt < b and reg.pe >= reg.anchor_e:
        bu, be, bt = reg.pu, reg.pe, reg.pt
    else:
        bu, be, bt = reg.anchor, reg.anchor_e, None
    de = reg.e - be
    if de > 1e-9:
        share = (e_b - be) / de
    elif bt is not None and reg.t > bt:
        share = (b - bt) / (reg.t - bt)
    else:
        share = 1.0
    return bu + (reg.u - bu) * min(1.0, max(0.0, share))


def _flush(cfg: IntervalConfig, spec: MeterSpec, st: MeterLedger, out: list[dict[str, Any]],
           include_open: bool, flag: str) -> None:
    """Emit the unresolved intervals (and the open one) as they are: without the energy they
    lack. The registers start again from their next reading."""
    accs = [*st.pending, *([st.open] if include_open and st.open is not None else [])]
    for acc in accs:
        acc.flags.append(flag)
        if not acc.src_imp:
            acc.src_imp = "none"
        if not acc.src_exp:
            acc.src_exp = "none"
        out.append(_record(cfg, spec, acc))
    st.pending = []
    for reg in (st.imp, st.exp):
        reg.anchor, reg.anchor_est, reg.anchor_e = None, False, (st.e_imp if reg is st.imp
                                                                  else st.e_exp)
        reg.raw = reg.u = reg.t = reg.pu = reg.pt = None


def _restart(reg: Register) -> Register:
    """A register's state for a timeline started afresh (only its unwrapping is kept)."""
    return Register(offset=reg.offset)


def _record(cfg: IntervalConfig, spec: MeterSpec, acc: Acc) -> dict[str, Any]:
    secs = cfg.seconds
    coverage = min(1.0, acc.covered_s / secs)
    flags = set(acc.flags)
    if coverage < cfg.complete_coverage:
        flags.add("gap")
    if acc.src_imp == "integrated" and spec.has_import:
        flags.add("estimated")
    quality = next((q for q in QUALITIES if q in flags), "complete")
    imp = None if acc.src_imp == "none" or acc.kwh_imp is None else max(0.0, acc.kwh_imp)
    exp = None if acc.src_exp == "none" or acc.kwh_exp is None else max(0.0, acc.kwh_exp)
    vi = acc.vi

    def stats(base: int, digits: int) -> dict[str, dict[str, float]] | None:
        got = {}
        for i, ph in enumerate(("l1", "l2", "l3")):
            j = base + 4 * i
            if vi[j + 3] > 0:
                got[ph] = {"min": round(vi[j], digits), "mean": round(vi[j + 1] / vi[j + 3], digits),
                           "max": round(vi[j + 2], digits)}
        return got or None

    body: dict[str, Any] = {
        "ts": acc.start + secs, "kind": "meter", "meter": spec.name, "start": acc.start,
        "end": acc.start + secs, "minutes": cfg.minutes,
        "import_kwh": None if imp is None else round(imp, 6),
        "export_kwh": None if exp is None else round(exp, 6),
        "source": {"import": acc.src_imp, "export": acc.src_exp},
        "mean_kw": None if imp is None else round(imp * 3600.0 / secs, 4),
        "max_kw": None if acc.max_kw is None else round(acc.max_kw, 4),
        "voltage_v": stats(0, 2), "current_a": stats(12, 3),
        "power_factor": round(acc.pf_sum / acc.pf_n, 4) if acc.pf_n else None,
        "coverage": round(coverage, 4), "readings": acc.n,
        "quality": quality, "flags": sorted(flags),
        "month_max_demand": None if acc.md_kw is None else {
            "kw": round(acc.md_kw, 4), "at": acc.md_at, "month": acc.md_month,
            "mode": cfg.demand_mode, "minutes": cfg.demand_minutes},
    }
    return body


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _shallow(x: Any) -> Any:
    """A shallow copy of a (non-slots) dataclass instance, a quarter of ``copy.copy``'s cost."""
    c = x.__class__.__new__(x.__class__)
    c.__dict__.update(x.__dict__)
    return c


def _copy_acc(a: Acc) -> Acc:
    c: Acc = _shallow(a)
    c.vi, c.flags = list(a.vi), list(a.flags)
    return c


def _copy_reg(r: Register) -> Register:
    c: Register = _shallow(r)
    c.flags = list(r.flags)
    return c


def _copy(st: MeterLedger) -> MeterLedger:
    """A copy sharing nothing mutable with ``st`` (cheaper than ``copy.deepcopy``)."""
    c: MeterLedger = _shallow(st)
    c.imp, c.exp = _copy_reg(st.imp), _copy_reg(st.exp)
    c.open = None if st.open is None else _copy_acc(st.open)
    c.pending = [_copy_acc(a) for a in st.pending]
    c.window = list(st.window)
    return c
