"""Theft and tamper indicators computed from a meter's readings: pure, time as an input.

The agent calls :func:`step` with every reading of every meter (a :class:`Sample`) and persists
the :class:`TheftState` it returns (``to_dict``/``from_dict``). Each detector watches one
signature (a reversed phase, a bypassed current circuit, a lost voltage, an imbalance, a register
that goes backwards, stops or races, the meter's own tamper counters) and says so **once** when
the condition has held for its delay (``theft_indicator``), and once more when it has been gone
for its clear delay (``theft_indicator_cleared``). Every indicator is evidence, not a verdict:
the events carry the readings that triggered them and say so in their detail text.

Rules, defaults and their sources: docs/theft.md. In short, the thresholds are the defaults of
the State Grid smart meter's own event parameters (open meter firmware
``coldrainnight/base_meter`` ``source/App/monitor/MNT.c``, ``MNT_EvtParaCal``: loss of voltage
below 78 % of Un with current ≥ 0.5 % of Ib, recovering at 85 %; phase break below 60 % of Un
and 0.5 % of Ib; loss of current below 0.5 % of Ib at ≥ 70 % of Un while another phase carries
≥ 5 % of Ib; reverse power beyond 0.5 % of Un × Ib; voltage and current unbalance 30 % as
(max − min) / max; 60 s for each), DL/T 614-2007 §3.2 (loss of voltage: under 78 % with load
current, longer than 1 min) and the Q/GDW 1376.1 terminal's event codes (ERC9, 10, 17, 27, 29,
30, 37, 38, 40; open terminal firmware ``gdgly/NUC97X_JS``
``STM32F4xx/Terminal/Terminal_AFN0E_Event.h``).

Timing. Delays are measured on the meter's own clock in the state: it advances by the
monotonic difference between reads (``Sample.mono``) and falls back to the wall clock only when
the monotonic clock went backwards (a reboot), so a wall-clock step (NTP at boot) neither raises
a condition early nor holds it up. ``since`` in the events is wall-clock (``Sample.t``).
A condition held for its delay is raised on the first reading at or after ``since + delay_s``;
a reading that cannot judge it (a missing value, a level between the raise and the clear
thresholds where that applies) neither raises nor clears anything. A condition seen again after
a gap longer than ``max_gap_s`` (``register_max_gap_s`` for the register checks) starts its delay
afresh: what happened in between is unknown.

Cost. One call does a few dozen float comparisons and copies the meter's small state (the
state is never mutated; the returned one shares what did not change). Nothing is allocated for
an idle detector; event dicts are built only when an event is due.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lmt.analytics.sample import PHASES, Sample
from lmt.control.jsonstate import Json

__all__ = [
    "COUNTER_ERC",
    "INDICATORS",
    "CtBypassRule",
    "ImbalanceRule",
    "MeterEventRule",
    "MeterTheftState",
    "PhaseLossRule",
    "RegisterDecreasedRule",
    "RegisterRunawayRule",
    "RegisterStoppedRule",
    "ReversePowerRule",
    "TheftCondition",
    "TheftConfig",
    "TheftState",
    "VoltageLossRule",
    "step",
]

#: Every ``indicator`` an event can name, with the Q/GDW 1376.1 event code it corresponds to
#: (None: the terminal protocol has no code for it).
INDICATORS: dict[str, str | None] = {
    "reverse_power": "ERC9",        # current circuit anomaly, kind 3: reverse
    "ct_bypass": "ERC9",            # current circuit anomaly (short / bypass); ERC34 is the CT's own
    "voltage_loss": "ERC10",        # voltage circuit anomaly, kind 2: loss of voltage (失压)
    "phase_loss": "ERC10",          # voltage circuit anomaly, kind 1: phase break (断相)
    "voltage_imbalance": "ERC17",
    "current_imbalance": "ERC17",
    "register_decreased": "ERC27",  # 电能表示度下降
    "register_stopped": "ERC30",    # 电能表停走
    "register_runaway": "ERC29",    # 电能表飞走
    "meter_event": None,            # the code of the counter (COUNTER_ERC)
    "meter_counter_reset": None,    # the meter's event counters went down (cleared, reset, replaced)
}

#: The meter's own event counters the agent reads (DL/T 645 profile points
#: ``event_<name>_count``) and the terminal event code each corresponds to.
COUNTER_ERC: dict[str, str | None] = {
    "cover_open": "ERC37",           # 电能表开表盖事件
    "terminal_cover_open": "ERC38",  # 电能表开端钮盒事件
    "magnetic_field": "ERC40",       # 磁场异常事件
    "reverse_flow": "ERC9",          # 潮流反向 / 功率反向
    "current_loss": "ERC9",          # 失流
    "voltage_loss": "ERC10",         # 失压
}

_COUNTER_LABEL = {
    "cover_open": "meter cover opened",
    "terminal_cover_open": "terminal cover opened",
    "magnetic_field": "magnetic field",
    "reverse_flow": "reverse power flow",
    "current_loss": "loss of current",
    "voltage_loss": "loss of voltage",
}

EVIDENCE = "Evidence, not a verdict: check on site before drawing conclusions."
_EPS = 1e-6  # seconds: a delay of 60 s is met by a reading 60 s later despite float sums
_KEYS = {name: tuple(f"{name}:{ph}" for ph in PHASES)
         for name in ("reverse_power", "ct_bypass", "voltage_loss", "phase_loss")}
_RP, _CT, _VL, _PL = (_KEYS[n] for n in ("reverse_power", "ct_bypass", "voltage_loss", "phase_loss"))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _check_delays(name: str, delay_s: float, clear_delay_s: float) -> None:
    _check(delay_s >= 0, f"{name}.delay_s must be ≥ 0 s, got {delay_s:g}")
    _check(clear_delay_s >= 0, f"{name}.clear_delay_s must be ≥ 0 s, got {clear_delay_s:g}")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ReversePowerRule(Json):
    """Reverse active power on a phase at a site without registered generation (ERC9 kind 3).

    Raised when the phase's active power is below ``−power_fraction × Un × Ib`` (0.5 %: the
    meter's 功率反向事件有功功率触发下限 default, MNT.c) for ``delay_s`` (60 s, the meter's
    功率反向事件判定延时); cleared when it is back above half that threshold for
    ``clear_delay_s``. Never raised where ``TheftConfig.registered_generation`` is set."""

    enabled: bool = True
    power_fraction: float = 0.005
    delay_s: float = 60.0
    clear_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.power_fraction > 0, f"reverse_power.power_fraction must be > 0, got "
                                        f"{self.power_fraction:g}")
        _check_delays("reverse_power", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class CtBypassRule(Json):
    """CT bypass / shunt: one phase's current near zero while its voltage is normal and another
    phase carries load (the meter's 失流, loss of current; terminal ERC9).

    Raised when the phase current is below ``current_below × Ib`` (0.5 %, 失流事件电流触发上限)
    with its voltage at least ``voltage_at_least × Un`` (70 %, 失流事件电压触发下限) and another
    phase carrying at least ``others_at_least × Ib`` (5 %, 失流事件电流触发下限), for
    ``delay_s`` (60 s); cleared when the phase current is back at ``current_recover × Ib``
    (5 %, 失流事件电流恢复下限) for ``clear_delay_s``. While no other phase carries load (or
    the voltage is low: the voltage detectors' case) the phase cannot be judged."""

    enabled: bool = True
    current_below: float = 0.005
    current_recover: float = 0.05
    voltage_at_least: float = 0.70
    others_at_least: float = 0.05
    delay_s: float = 60.0
    clear_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check(0 < self.current_below < self.current_recover,
               "ct_bypass: need 0 < current_below < current_recover")
        _check(self.voltage_at_least > 0 and self.others_at_least > 0,
               "ct_bypass: voltage_at_least and others_at_least must be > 0")
        _check_delays("ct_bypass", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class VoltageLossRule(Json):
    """Loss of voltage (失压, ERC10 kind 2): a phase's voltage low while its current flows.

    Raised when the voltage is below ``voltage_below × Un`` (78 %: DL/T 614-2007 §3.2 and the
    meter's 失压事件电压触发上限) with the phase current at least ``current_at_least × Ib``
    (0.5 %, 失压事件电流触发下限) for ``delay_s`` (60 s: "longer than 1 min"); cleared when the
    voltage is back at ``voltage_recover × Un`` (85 %, 失压事件电压恢复下限) for
    ``clear_delay_s``."""

    enabled: bool = True
    voltage_below: float = 0.78
    voltage_recover: float = 0.85
    current_at_least: float = 0.005
    delay_s: float = 60.0
    clear_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check(0 < self.voltage_below < self.voltage_recover,
               "voltage_loss: need 0 < voltage_below < voltage_recover")
        _check(self.current_at_least > 0, "voltage_loss.current_at_least must be > 0")
        _check_delays("voltage_loss", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class PhaseLossRule(Json):
    """Phase break (断相, ERC10 kind 1): a phase with neither voltage nor current while another
    phase carries load.

    Raised when the voltage is below ``voltage_below × Un`` (60 %, 断相事件电压触发上限) and the
    current below ``current_below × Ib`` (0.5 %, 断相事件电流触发上限) while another phase
    carries at least ``others_at_least × Ib`` (5 %) for ``delay_s`` (60 s); cleared when the
    voltage is back at ``voltage_recover × Un`` (85 %) for ``clear_delay_s``."""

    enabled: bool = True
    voltage_below: float = 0.60
    current_below: float = 0.005
    voltage_recover: float = 0.85
    others_at_least: float = 0.05
    delay_s: float = 60.0
    clear_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check(0 < self.voltage_below < self.voltage_recover,
               "phase_loss: need 0 < voltage_below < voltage_recover")
        _check(self.current_below > 0 and self.others_at_least > 0,
               "phase_loss: current_below and others_at_least must be > 0")
        _check_delays("phase_loss", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class ImbalanceRule(Json):
    """Voltage or current unbalance (ERC17): ``(max − min) / max`` over the phases (the meter's
    不平衡率, MNT.c ``MNT_RefreshVC``).

    Raised when above ``limit`` (30 %, 电压/电流不平衡率限值) for ``delay_s`` (60 s); cleared
    when below ``clear_below`` (25 %: this module's hysteresis) for ``clear_delay_s``. Judged
    only when every phase was read and the largest is at least ``guard`` (× Un for voltage:
    60 %, the meter's 临界电压; × Ib for current: 5 %, the State Grid rule that one phase must
    carry more than 5 % of Ib)."""

    enabled: bool = True
    limit: float = 0.30
    clear_below: float = 0.25
    guard: float = 0.05
    delay_s: float = 60.0
    clear_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check(0 < self.clear_below <= self.limit < 1, "imbalance: need 0 < clear_below ≤ limit < 1")
        _check(self.guard > 0, "imbalance.guard must be > 0")
        _check_delays("imbalance", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class RegisterDecreasedRule(Json):
    """The import register went down (ERC27, 电能表示度下降): raised at the read that shows it
    (by more than half a register digit); cleared after ``clear_delay_s`` (900 s) of reads that
    do not go down. A wrap-around is not a decrease when ``TheftConfig.register_rollover_kwh``
    is set."""

    enabled: bool = True
    clear_delay_s: float = 900.0

    def __post_init__(self) -> None:
        _check_delays("register_decreased", 0.0, self.clear_delay_s)


@dataclass(frozen=True)
class RegisterStoppedRule(Json):
    """The import register stood still while the measured power says it should have moved
    (ERC30, 电能表停走).

    The condition holds while the register is unchanged and the energy integrated from the
    measured power since it last moved is at least ``min_digits`` register digits (2: one digit
    can hide in the register's rounding); raised after ``delay_s`` (900 s: the terminal's
    停走阈值 is set in 15-minute steps, AFN04 F59); cleared when the register has moved again
    and stayed consistent for ``clear_delay_s``."""

    enabled: bool = True
    min_digits: float = 2.0
    delay_s: float = 900.0
    clear_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _check(self.min_digits >= 1, "register_stopped.min_digits must be ≥ 1")
        _check_delays("register_stopped", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class RegisterRunawayRule(Json):
    """The import register ran faster than possible (ERC29, 电能表飞走), judged between two
    register reads.

    Raised when the increase exceeds ``rated_max_kw × elapsed`` (when the rated maximum is
    configured) or ``measured_factor × the energy of the measured power`` (1.5: far beyond meter
    and sampling error; only when the power was integrated over at least ``min_coverage`` (90 %)
    of the interval), each plus ``margin_digits`` register digits (2); ``delay_s`` 0: one
    impossible interval is enough. Cleared after ``clear_delay_s`` (900 s) of plausible
    intervals."""

    enabled: bool = True
    measured_factor: float = 1.5
    min_coverage: float = 0.9
    margin_digits: float = 2.0
    delay_s: float = 0.0
    clear_delay_s: float = 900.0

    def __post_init__(self) -> None:
        _check(self.measured_factor > 1, "register_runaway.measured_factor must be > 1")
        _check(0 < self.min_coverage <= 1, "register_runaway.min_coverage must be in (0, 1]")
        _check(self.margin_digits >= 0, "register_runaway.margin_digits must be ≥ 0")
        _check_delays("register_runaway", self.delay_s, self.clear_delay_s)


@dataclass(frozen=True)
class MeterEventRule(Json):
    """The meter's own event counters (cover opened, terminal cover opened, magnetic field,
    reverse flow, loss of current, loss of voltage): an increase since the previous read is one
    ``meter_event`` (one-shot, never cleared); the first read of a counter is its baseline; a
    counter that went down is one ``meter_counter_reset`` note per read (its records were
    cleared, or the meter was reset or replaced), never an event per count."""

    enabled: bool = True


@dataclass(frozen=True)
class TheftConfig(Json):
    """What the detectors need to know about the meter and the site, and one rule per detector.

    ``nominal_voltage_v``: Un, in the units of ``Sample.voltage_v`` (phase to neutral; line to
    line on a three-wire meter). 230 V by default; China's low-voltage nominal is 220 V
    (GB/T 156): set it per site. ``base_current_a``: Ib, in the units of ``Sample.current_a``
    (primary amperes when the profile applies the CT ratio), the reference of every "near zero"
    and "carries load" threshold: 5 A by default (a 5(60) A direct meter, or a 5 A CT
    secondary). ``registered_generation``: the site may export (PV, storage): reverse power is
    no indicator there. ``rated_max_kw``: the most the metering point can draw (3 × Un × Imax),
    for the runaway check; None leaves that bound unchecked. ``three_wire``: three-phase
    three-wire metering (two elements): l2 is not measured and left out of every comparison.
    ``register_resolution_kwh``: one digit of the import register (0.01 kWh: DL/T 645's
    XXXXXX.XX format; a float32 Modbus register is coarser at large values).
    ``register_rollover_kwh``: where the register wraps to zero (1 000 000 for six integer
    digits); None: unknown, a wrap then reads as a decrease. ``max_gap_s``: a condition seen
    again after a longer gap in its readings starts its delay afresh (300 s);
    ``register_max_gap_s``: the same for the register checks, whose reads are slow (3600 s).
    ``power_gap_s``: the longest gap between two power readings that is integrated (30 s)."""

    nominal_voltage_v: float = 230.0
    base_current_a: float = 5.0
    registered_generation: bool = False
    rated_max_kw: float | None = None
    three_wire: bool = False
    register_resolution_kwh: float = 0.01
    register_rollover_kwh: float | None = None
    max_gap_s: float = 300.0
    register_max_gap_s: float = 3600.0
    power_gap_s: float = 30.0
    reverse_power: ReversePowerRule = field(default_factory=ReversePowerRule)
    ct_bypass: CtBypassRule = field(default_factory=CtBypassRule)
    voltage_loss: VoltageLossRule = field(default_factory=VoltageLossRule)
    phase_loss: PhaseLossRule = field(default_factory=PhaseLossRule)
    voltage_imbalance: ImbalanceRule = field(default_factory=lambda: ImbalanceRule(guard=0.60))
    current_imbalance: ImbalanceRule = field(default_factory=ImbalanceRule)
    register_decreased: RegisterDecreasedRule = field(default_factory=RegisterDecreasedRule)
    register_stopped: RegisterStoppedRule = field(default_factory=RegisterStoppedRule)
    register_runaway: RegisterRunawayRule = field(default_factory=RegisterRunawayRule)
    meter_events: MeterEventRule = field(default_factory=MeterEventRule)

    def __post_init__(self) -> None:
        _check(self.nominal_voltage_v > 0, f"nominal_voltage_v must be > 0, got {self.nominal_voltage_v:g}")
        _check(self.base_current_a > 0, f"base_current_a must be > 0, got {self.base_current_a:g}")
        _check(self.rated_max_kw is None or self.rated_max_kw > 0, "rated_max_kw must be > 0 or None")
        _check(self.register_resolution_kwh > 0, "register_resolution_kwh must be > 0")
        _check(self.register_rollover_kwh is None
               or self.register_rollover_kwh > 100 * self.register_resolution_kwh,
               "register_rollover_kwh must be None or far above the register resolution")
        for name in ("max_gap_s", "register_max_gap_s", "power_gap_s"):
            _check(getattr(self, name) > 0, f"{name} must be > 0 s")

    @cached_property
    def _limits(self) -> _Limits:
        return _Limits(self)


class _Limits:
    """A configuration's thresholds in absolute units, computed once per configuration."""

    def __init__(self, c: TheftConfig) -> None:
        un, ib = c.nominal_voltage_v, c.base_current_a
        self.phases: tuple[int, ...] = (0, 2) if c.three_wire else (0, 1, 2)
        r = c.reverse_power
        self.reverse = r.enabled and not c.registered_generation
        self.reverse_kw = r.power_fraction * un * ib / 1000.0
        b = c.ct_bypass
        self.ct_below, self.ct_recover = b.current_below * ib, b.current_recover * ib
        self.ct_voltage, self.ct_others = b.voltage_at_least * un, b.others_at_least * ib
        v = c.voltage_loss
        self.vl_below, self.vl_recover = v.voltage_below * un, v.voltage_recover * un
        self.vl_current = v.current_at_least * ib
        p = c.phase_loss
        self.pl_below, self.pl_recover = p.voltage_below * un, p.voltage_recover * un
        self.pl_current, self.pl_others = p.current_below * ib, p.others_at_least * ib
        self.vi_guard = c.voltage_imbalance.guard * un
        self.ci_guard = c.current_imbalance.guard * ib
        self.digit = c.register_resolution_kwh
        self.register = (c.register_decreased.enabled or c.register_stopped.enabled
                         or c.register_runaway.enabled)


# --------------------------------------------------------------------------------------------
# State (persisted by the agent)


@dataclass(frozen=True)
class TheftCondition(Json):
    """One detector's condition on one meter (and phase) while it is pending or raised.

    ``since``: wall-clock time of its first reading (reported); ``start_s``, ``seen_s``,
    ``clear_s``: the meter clock (:attr:`MeterTheftState.clock_s`) at its first reading, at the
    last reading that judged it, and at the first reading of the normal state while raised."""

    since: float
    start_s: float
    seen_s: float
    active: bool = False
    clear_s: float | None = None


@dataclass
class MeterTheftState(Json):
    """What the detectors remember about one meter.

    ``last_t``/``last_mono``/``clock_s``: the previous read and the meter clock (seconds of
    readings, see the module doc). ``power_kw``/``power_s``: the last import power (kW ≥ 0) and
    when, for integrating energy. ``reg_kwh``/``reg_t``/``reg_s``: the import register at its
    last read; ``read_kwh``/``read_covered_s``: energy integrated since that read and the time
    it covers; ``moved_t``/``moved_s``/``moved_kwh``: when the register last moved and the
    energy integrated since. ``counters``: each event counter's last value and the wall-clock
    time of that read. ``conditions``: pending and raised conditions by key
    (``indicator`` or ``indicator:phase``)."""

    last_t: float | None = None
    last_mono: float | None = None
    clock_s: float = 0.0
    power_kw: float | None = None
    power_s: float | None = None
    reg_kwh: float | None = None
    reg_t: float | None = None
    reg_s: float | None = None
    read_kwh: float = 0.0
    read_covered_s: float = 0.0
    moved_t: float | None = None
    moved_s: float | None = None
    moved_kwh: float = 0.0
    counters: dict[str, tuple[int, float]] = field(default_factory=dict)
    conditions: dict[str, TheftCondition] = field(default_factory=dict)

    def _copy(self) -> MeterTheftState:
        return MeterTheftState(self.last_t, self.last_mono, self.clock_s, self.power_kw,
                               self.power_s, self.reg_kwh, self.reg_t, self.reg_s, self.read_kwh,
                               self.read_covered_s, self.moved_t, self.moved_s, self.moved_kwh,
                               self.counters, dict(self.conditions))


@dataclass
class TheftState(Json):
    """Every meter's detector state, by meter name."""

    meters: dict[str, MeterTheftState] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The condition machine

RAISE, BAND, NORMAL = 1, 0, -1  # what one reading says about a condition (None: cannot judge)
_Edge = tuple[bool, float, float]  # (raised, since, duration_s): raised or cleared


def _advance(conds: dict[str, TheftCondition], key: str, ev: int, now: float, t: float,
             delay: float, clear_delay: float, gap: float) -> _Edge | None:
    """Feed one judging reading (``ev``: RAISE, BAND or NORMAL) to the condition ``key``.

    Not raised: RAISE starts or continues the delay (raised once it is met); BAND or NORMAL
    drops it. Raised: NORMAL starts or continues the clear delay (cleared once it is met);
    RAISE or BAND stops it. Returns the edge when the condition was raised or cleared."""
    c = conds.get(key)
    if c is None:
        if ev != RAISE:
            return None
        c = TheftCondition(t, now, now)
    elif now - c.seen_s > gap + _EPS:  # unseen for too long: the timers start afresh
        if c.active:
            c = TheftCondition(c.since, c.start_s, now, True)
        elif ev == RAISE:
            c = TheftCondition(t, now, now)
        else:
            del conds[key]
            return None
    if not c.active:
        if ev != RAISE:
            del conds[key]
            return None
        if now - c.start_s + _EPS >= delay:
            conds[key] = TheftCondition(c.since, c.start_s, now, True)
            return (True, c.since, 0.0)
        conds[key] = TheftCondition(c.since, c.start_s, now)
        return None
    if ev != NORMAL:
        conds[key] = TheftCondition(c.since, c.start_s, now, True)
        return None
    clear_s = now if c.clear_s is None else c.clear_s
    if now - clear_s + _EPS >= clear_delay:
        del conds[key]
        return (False, c.since, max(0.0, clear_s - c.start_s))
    conds[key] = TheftCondition(c.since, c.start_s, now, True, clear_s)
    return None


def _event(edge: _Edge, meter: str, indicator: str, phase: str | None, erc: str | None,
           readings: dict[str, Any], raised: str, cleared: str) -> dict[str, Any]:
    is_raised, since, duration = edge
    data: dict[str, Any] = {"meter": meter, "indicator": indicator, "phase": phase, "erc": erc,
                            "since": since, "readings": readings}
    if is_raised:
        data["detail"] = f"{raised} {EVIDENCE}"
        return {"type": "theft_indicator", "data": data}
    data["detail"] = f"{cleared}; the condition lasted {duration:.0f} s. {EVIDENCE}"
    data["duration_s"] = duration
    return {"type": "theft_indicator_cleared", "data": data}


# --------------------------------------------------------------------------------------------
# The step


def _num(x: float | None) -> float | None:
    return None if x is None or x != x else x  # NaN (a float32 register) is no value


def _phase_readings(s: Sample, **extra: Any) -> dict[str, Any]:
    return {"voltage_v": dict(zip(PHASES, s.voltage_v, strict=True)),
            "current_a": dict(zip(PHASES, s.current_a, strict=True)),
            "phase_kw": dict(zip(PHASES, s.phase_kw, strict=True)), **extra}


def _fmt(x: float | None, digits: int = 1) -> str:
    return "?" if x is None else f"{x:.{digits}f}"


def step(config: TheftConfig, state: TheftState, meter: str, sample: Sample
         ) -> tuple[TheftState, list[dict[str, Any]]]:
    """Feed one reading of ``meter``: the new state (``state`` is left as it was) and the events
    it raises (``theft_indicator``) or clears (``theft_indicator_cleared``), usually none."""
    lim = config._limits
    old = state.meters.get(meter)
    ms = MeterTheftState() if old is None else old._copy()
    t, mono = float(sample.t), float(sample.mono)
    if ms.last_t is not None and ms.last_mono is not None:
        dm = mono - ms.last_mono
        ms.clock_s += dm if dm > 0 else max(0.0, t - ms.last_t)
    ms.last_t, ms.last_mono = t, mono
    now = ms.clock_s
    conds = ms.conditions
    out: list[dict[str, Any]] = []
    gap = config.max_gap_s

    # -- the power, integrated (for the register checks) -------------------------------------
    kw = _num(sample.power_kw)
    if kw is None:
        pk = sample.phase_kw
        p0, p1, p2 = _num(pk[0]), _num(pk[1]), _num(pk[2])
        if p0 is not None and p2 is not None and (p1 is not None or config.three_wire):
            kw = p0 + p2 + (p1 or 0.0)
    if kw is not None:
        kw = kw if kw > 0 else 0.0
        if ms.power_kw is not None and ms.power_s is not None:
            span = now - ms.power_s
            if 0 < span <= config.power_gap_s:
                e = (ms.power_kw + kw) * span / 7200.0
                ms.read_kwh += e
                ms.read_covered_s += span
                ms.moved_kwh += e
        ms.power_kw, ms.power_s = kw, now

    # -- per phase --------------------------------------------------------------------------
    vs, cs, ps = sample.voltage_v, sample.current_a, sample.phase_kw
    volts = [_num(vs[0]), _num(vs[1]), _num(vs[2])]
    amps = [_num(cs[0]), _num(cs[1]), _num(cs[2])]
    amps = [None if a is None else abs(a) for a in amps]
    cfg_ct, cfg_vl, cfg_pl, cfg_rp = (config.ct_bypass, config.voltage_loss, config.phase_loss,
                                      config.reverse_power)
    for k in lim.phases:
        ph = PHASES[k]
        v, i = volts[k], amps[k]
        key = _RP[k]
        if lim.reverse or key in conds:
            p = _num(ps[k])
            if not lim.reverse:
                del conds[key]  # disabled, or the site now has registered generation
            elif p is not None:
                thr = lim.reverse_kw
                ev = RAISE if p < -thr else NORMAL if p >= -thr / 2 else BAND
                if ev == RAISE or key in conds:
                    edge = _advance(conds, key, ev, now, t, cfg_rp.delay_s, cfg_rp.clear_delay_s, gap)
                    if edge:
                        out.append(_event(
                            edge, meter, "reverse_power", ph, "ERC9",
                            _phase_readings(sample, threshold_kw=-thr),
                            f"Active power on {ph} has been reversed ({p:.3f} kW, beyond "
                            f"{-thr:.3f} kW) for at least {cfg_rp.delay_s:g} s at a site without registered "
                            f"generation: a reversed current connection is one explanation (ERC9 "
                            f"reverse).",
                            f"Active power on {ph} is no longer reversed ({p:.3f} kW)"))
        others: float | None = None
        if cfg_ct.enabled or cfg_pl.enabled:
            for j in lim.phases:
                a = amps[j]
                if j != k and a is not None and (others is None or a > others):
                    others = a
        # CT bypass / loss of current
        key = _CT[k]
        if not cfg_ct.enabled:
            conds.pop(key, None)
        elif i is not None:
            ev_ct: int | None
            if i >= lim.ct_recover:
                ev_ct = NORMAL
            elif v is None or v < lim.ct_voltage:
                ev_ct = None
            elif i < lim.ct_below:
                ev_ct = RAISE if others is not None and others >= lim.ct_others else None
            else:
                ev_ct = BAND
            if ev_ct is not None and (ev_ct == RAISE or key in conds):
                edge = _advance(conds, key, ev_ct, now, t, cfg_ct.delay_s, cfg_ct.clear_delay_s, gap)
                if edge:
                    out.append(_event(
                        edge, meter, "ct_bypass", ph, "ERC9",
                        _phase_readings(sample, current_below_a=lim.ct_below,
                                        voltage_at_least_v=lim.ct_voltage,
                                        others_at_least_a=lim.ct_others),
                        f"Phase {ph} has carried almost no current ({i:.3f} A, under "
                        f"{lim.ct_below:.3f} A) at normal voltage ({_fmt(v)} V) for at least "
                        f"{cfg_ct.delay_s:g} s while another phase carries {_fmt(others, 2)} A: "
                        f"the signature of a bypassed or shunted current circuit (loss of current; "
                        f"ERC9), or of a phase with no load of its own.",
                        f"Phase {ph} carries current again ({i:.3f} A)"))
        if v is None:
            continue
        # loss of voltage
        key = _VL[k]
        if not cfg_vl.enabled:
            conds.pop(key, None)
        else:
            ev_vl: int | None
            if v >= lim.vl_recover:
                ev_vl = NORMAL
            elif v < lim.vl_below:
                ev_vl = None if i is None or i < lim.vl_current else RAISE
            else:
                ev_vl = BAND
            if ev_vl is not None and (ev_vl == RAISE or key in conds):
                edge = _advance(conds, key, ev_vl, now, t, cfg_vl.delay_s, cfg_vl.clear_delay_s, gap)
                if edge:
                    out.append(_event(
                        edge, meter, "voltage_loss", ph, "ERC10",
                        _phase_readings(sample, voltage_below_v=lim.vl_below,
                                        voltage_recover_v=lim.vl_recover,
                                        current_at_least_a=lim.vl_current),
                        f"Phase {ph} voltage has been {v:.1f} V (under {lim.vl_below:.1f} V) for at least "
                        f"{cfg_vl.delay_s:g} s while {_fmt(i, 3)} A flows: loss of voltage (失压, "
                        f"ERC10); the meter under-registers, as when a voltage link is opened.",
                        f"Phase {ph} voltage is back ({v:.1f} V)"))
        # phase break
        key = _PL[k]
        if not cfg_pl.enabled:
            conds.pop(key, None)
        else:
            ev_pl: int | None
            if v >= lim.pl_recover:
                ev_pl = NORMAL
            elif v < lim.pl_below:
                if i is None:
                    ev_pl = None
                elif i >= lim.pl_current:
                    ev_pl = BAND  # current without voltage: the loss-of-voltage case
                else:
                    ev_pl = RAISE if others is not None and others >= lim.pl_others else None
            else:
                ev_pl = BAND
            if ev_pl is not None and (ev_pl == RAISE or key in conds):
                edge = _advance(conds, key, ev_pl, now, t, cfg_pl.delay_s, cfg_pl.clear_delay_s, gap)
                if edge:
                    out.append(_event(
                        edge, meter, "phase_loss", ph, "ERC10",
                        _phase_readings(sample, voltage_below_v=lim.pl_below,
                                        current_below_a=lim.pl_current,
                                        others_at_least_a=lim.pl_others),
                        f"Phase {ph} has had neither voltage ({v:.1f} V) nor current "
                        f"({_fmt(i, 3)} A) for at least {cfg_pl.delay_s:g} s while another phase carries "
                        f"{_fmt(others, 2)} A: phase break (断相, ERC10), a blown fuse or an "
                        f"opened phase.",
                        f"Phase {ph} voltage is back ({v:.1f} V)"))

    # -- imbalance ---------------------------------------------------------------------------
    for indicator, rule, values, guard, unit in (
            ("voltage_imbalance", config.voltage_imbalance, volts, lim.vi_guard, "V"),
            ("current_imbalance", config.current_imbalance, amps, lim.ci_guard, "A")):
        if not rule.enabled:
            conds.pop(indicator, None)
            continue
        hi = lo = None
        for k in lim.phases:
            x = values[k]
            if x is None:
                hi = None
                break
            if hi is None or lo is None:
                hi = lo = x
            elif x > hi:
                hi = x
            elif x < lo:
                lo = x
        if hi is None or lo is None or hi < guard:
            continue
        ratio = (hi - lo) / hi
        ev_im = RAISE if ratio > rule.limit else NORMAL if ratio < rule.clear_below else BAND
        if ev_im == RAISE or indicator in conds:
            edge = _advance(conds, indicator, ev_im, now, t, rule.delay_s, rule.clear_delay_s, gap)
            if edge:
                what = "voltage" if unit == "V" else "current"
                out.append(_event(
                    edge, meter, indicator, None, "ERC17",
                    _phase_readings(sample, unbalance=ratio, limit=rule.limit,
                                    clear_below=rule.clear_below),
                    f"Phase {what}s have been unbalanced by {ratio:.0%} ((max − min) / max, limit "
                    f"{rule.limit:.0%}) for at least {rule.delay_s:g} s (ERC17): one phase may be "
                    f"bypassed, tampered with or lost, or the load is simply single-phase.",
                    f"Phase {what}s are balanced again ({ratio:.0%})"))

    # -- the import register ------------------------------------------------------------------
    reg = _num(sample.import_kwh)
    if reg is not None and lim.register:
        _register(config, lim, ms, meter, t, now, reg, out)
    elif not lim.register:
        for key in ("register_decreased", "register_stopped", "register_runaway"):
            conds.pop(key, None)

    # -- the meter's own event counters -------------------------------------------------------
    if sample.counters and config.meter_events.enabled:
        _counters(ms, meter, t, sample.counters, out)

    meters = dict(state.meters)
    meters[meter] = ms
    return TheftState(meters), out


def _register(config: TheftConfig, lim: _Limits, ms: MeterTheftState, meter: str, t: float,
              now: float, reg: float, out: list[dict[str, Any]]) -> None:
    conds, gap, digit = ms.conditions, config.register_max_gap_s, lim.digit
    prev, prev_t, prev_s = ms.reg_kwh, ms.reg_t, ms.reg_s
    moved = True
    if prev is not None and prev_s is not None:
        delta = reg - prev
        wrapped = False
        roll = config.register_rollover_kwh
        if roll is not None and delta < -roll / 2:
            delta += roll
            wrapped = True
        tol = digit / 2
        elapsed = now - prev_s
        before_after = {"before": prev, "after": reg, "previous_read_t": prev_t}
        rule_d = config.register_decreased
        decreased = delta < -tol
        if not rule_d.enabled:
            conds.pop("register_decreased", None)
        elif decreased or "register_decreased" in conds:
            edge = _advance(conds, "register_decreased", RAISE if decreased else NORMAL, now, t,
                            0.0, rule_d.clear_delay_s, gap)
            if edge:
                out.append(_event(
                    edge, meter, "register_decreased", None, "ERC27",
                    {"import_kwh": before_after, "elapsed_s": elapsed,
                     "rollover_kwh": config.register_rollover_kwh},
                    f"The import register went down from {prev} to {reg} kWh (ERC27): it was "
                    f"reset, replaced or tampered with" + ("" if roll is not None else
                                                          ", or it wrapped around") + ".",
                    f"The import register has counted up again since the decrease, now {reg} kWh"))
        if decreased:
            moved = True  # start over from the new value
        else:
            moved = delta > tol
            rule_s = config.register_stopped
            if not rule_s.enabled:
                conds.pop("register_stopped", None)
            else:
                stopped = not moved and ms.moved_kwh >= rule_s.min_digits * digit
                if stopped or "register_stopped" in conds:
                    edge = _advance(conds, "register_stopped", RAISE if stopped else NORMAL, now,
                                    t, rule_s.delay_s, rule_s.clear_delay_s, gap)
                    if edge:
                        out.append(_event(
                            edge, meter, "register_stopped", None, "ERC30",
                            {"import_kwh": before_after, "unchanged_since": ms.moved_t,
                             "measured_kwh": ms.moved_kwh, "power_kw": ms.power_kw,
                             "min_kwh": rule_s.min_digits * digit},
                            f"The import register has stood at {reg} kWh since t={ms.moved_t} "
                            f"while the measured power adds up to {ms.moved_kwh:.3f} kWh (ERC30 "
                            f"stopped): the meter's register or its pulse path may be interfered "
                            f"with.",
                            f"The import register moves again ({reg} kWh)"))
            rule_r = config.register_runaway
            if not rule_r.enabled:
                conds.pop("register_runaway", None)
            elif elapsed > 0:
                margin = rule_r.margin_digits * digit
                rated = (None if config.rated_max_kw is None
                         else config.rated_max_kw * elapsed / 3600.0 + margin)
                coverage = min(1.0, ms.read_covered_s / elapsed)
                measured = (ms.read_kwh * rule_r.measured_factor + margin
                            if coverage >= rule_r.min_coverage else None)
                ev: int | None
                if (rated is not None and delta > rated) or (measured is not None and delta > measured):
                    ev = RAISE
                elif rated is not None or measured is not None or not moved:
                    ev = NORMAL
                else:
                    ev = None
                if ev is not None and (ev == RAISE or "register_runaway" in conds):
                    edge = _advance(conds, "register_runaway", ev, now, t, rule_r.delay_s,
                                    rule_r.clear_delay_s, gap)
                    if edge:
                        out.append(_event(
                            edge, meter, "register_runaway", None, "ERC29",
                            {"import_kwh": before_after, "increase_kwh": delta,
                             "elapsed_s": elapsed, "wrapped": wrapped,
                             "measured_kwh": ms.read_kwh, "coverage": coverage,
                             "rated_max_kw": config.rated_max_kw, "rated_bound_kwh": rated,
                             "measured_bound_kwh": measured},
                            f"The import register rose {delta:.3f} kWh in {elapsed:.0f} s, more "
                            f"than possible (rated bound {_fmt(rated, 3)} kWh, measured-power "
                            f"bound {_fmt(measured, 3)} kWh; ERC29 runaway): a faulty or "
                            f"manipulated meter.",
                            f"The import register runs plausibly again ({delta:.3f} kWh in "
                            f"{elapsed:.0f} s)"))
    ms.reg_kwh, ms.reg_t, ms.reg_s = reg, t, now
    ms.read_kwh = ms.read_covered_s = 0.0
    if moved:
        ms.moved_t, ms.moved_s, ms.moved_kwh = t, now, 0.0


def _counters(ms: MeterTheftState, meter: str, t: float, counters: Mapping[str, int],
              out: list[dict[str, Any]]) -> None:
    base = ms.counters
    new = dict(base)
    resets: dict[str, dict[str, Any]] = {}
    for name, value in counters.items():
        if value is None:
            continue
        value = int(value)
        new[name] = (value, t)
        seen = base.get(name)
        if seen is None:
            continue  # the baseline
        before, before_t = seen
        if value > before:
            # a per-phase count (reverse_flow_l2) is its kind's, on that phase
            kind, _, phase = name.rpartition("_")
            if not (phase in PHASES and kind):
                kind, phase = name, ""
            label = _COUNTER_LABEL.get(kind, kind.replace("_", " ")) + \
                (f" on {phase}" if phase else "")
            erc = COUNTER_ERC.get(kind)
            out.append({"type": "theft_indicator", "data": {
                "meter": meter, "indicator": "meter_event", "phase": phase or None, "erc": erc,
                "since": t,
                "readings": {"counter": name, "before": before, "after": value,
                             "increase": value - before, "previous_read_t": before_t},
                "detail": f"The meter counted {value - before} new '{label}' event(s) between "
                          f"t={before_t} and t={t} (counter {before} → {value}"
                          + (f"; {erc}" if erc else "") + f"). {EVIDENCE}"}})
        elif value < before:
            resets[name] = {"before": before, "after": value, "previous_read_t": before_t}
    if resets:
        names = ", ".join(sorted(resets))
        out.append({"type": "theft_indicator", "data": {
            "meter": meter, "indicator": "meter_counter_reset", "phase": None, "erc": None,
            "since": t, "readings": {"counters": resets},
            "detail": f"The meter's event counter(s) {names} went down: its event records were "
                      f"cleared, or the meter was reset or replaced. Counting starts again from the "
                      f"new values; clearing a meter's records can also hide tamper history. "
                      f"{EVIDENCE}"}})
    ms.counters = new
