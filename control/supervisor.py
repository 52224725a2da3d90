"""The control supervisor: every decision of a control cycle, as one pure step.

The agent runs, once per cycle::

    state, actions, records = step(config, state, inputs)
    # 1. persist `state` (and write `records`) - in one transaction
    # 2. then carry out `actions`, in order
    state, records = outcome(config, state, done, now)
    # 3. persist again, write `records`

**Persist, then actuate.** ``step`` returns the state *with its actions already recorded*: a
load about to be shed is marked held (with its owner and since when), an adjustable load about
to be lowered carries the setpoint it had, a command carries its end. Saved before the first
relay moves, this is enough for a crash at any moment to end well: after a restart the same
state is loaded, the loads are read, and control goes on where it was — an active cap is
enforced again, a staggered restore resumes, a load shed by a command that has since ended is
brought back. :func:`outcome` folds in what the writes did (verified by read-back, or failed
with an error): switch states, events, the measured-response check, the ``executed`` result,
and the final result of a command whose loads are all back.

``step`` reads no clock and does no I/O: time comes in :class:`Inputs` (wall clock ``now`` and
monotonic ``mono``, with the agent's ``session``). Control timing runs on the state's own
control clock, :class:`Clock`: within a session it advances with the monotonic clock (a wall-
clock step neither shortens nor stretches a command), across a restart by the wall-clock time
that passed. A command's end is kept on that clock (``end_t``) and as wall time (``end_at``,
for reports).

What one step decides, in order (see docs/control.md, "The supervisor"):

1. the loads' read states (a load read *on* although we shed it is no longer ours; an
   adjustable load read back at its former setpoint is no longer held);
2. the measured response of the last switches (:class:`Check`): a switch whose effect on the
   main meter stays under ``response_fraction`` of what it should have changed, beyond the
   noise, raises ``load_unresponsive``; when what a controller shed shows no effect, it sheds
   no more (``cap_unmet``) instead of switching the rest of the site off blind;
3. the two-minute records of earlier decisions (``control_record``, ``mode_record``);
4. the control requests of verified commands: cap, shed, cancel, DR event, modes, remote,
   guarantee (refusals are ``rejected`` results with their reason);
5. the terminal control modes (:mod:`lmt.control.modes`): rounds tripped and released;
6. demand response (:mod:`lmt.control.dr`): the customer's opt-outs, the baseline, the
   scheduler's tick, the metered delivery;
7. the cap: the lower of the command's cap and the DR event's wins; a DR event recovering
   paces restores under its rising ceiling; a command that ends releases its loads staggered
   (at most ``restore_step_kw`` per cycle); rotation, minimum on/off times and adjustable
   setpoints come from :func:`lmt.control.cap.decide_cap`; setpoints held low are rewritten.

Only numpy, numba and the standard library may be imported here.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from lmt.control import modes
from lmt.control.cap import CapParams, Decision, LoadSpec, LoadState, decide_cap, decide_release
from lmt.control.dr import (
    DEFAULT_LEVEL_FRACTIONS,
    FINAL_STATES,
    DeliveryMeter,
    DrEvent,
    DrScheduler,
    PowerHistory,
    Target,
    Transition,
)
from lmt.control.jsonstate import Json

__all__ = [
    "MODES_OWNER",
    "VOLATILE",
    "Action",
    "CancelRequest",
    "CapRequest",
    "Check",
    "Clock",
    "Command",
    "Done",
    "DrRequest",
    "GuaranteeRequest",
    "Inputs",
    "LoadConfig",
    "LoadRecord",
    "ModesRequest",
    "OptOut",
    "Record",
    "RemoteRequest",
    "Request",
    "ShedRequest",
    "SupervisorConfig",
    "SupervisorState",
    "controlling",
    "initial_state",
    "outcome",
    "step",
]

MODES_OWNER = "modes"  # the owner of the loads the terminal control modes switch
STATE_VERSION = 1
# Top-level keys of the state's dict that may be saved late (at most every minute) without
# risk: a crash loses a little of them, never a decision. Everything else is saved before
# the cycle's actions whenever it changed.
VOLATILE = ("clock", "noise", "noise_last", "noise_quiet", "history", "delivery", "report",
            "cycle", "check")  # (a check is dropped at a restart anyway)
# A setpoint read back within this many % of a value is that value (a float32 register keeps
# ~7 digits); wider, a small step down would read as "back where it was" and lose the hold.
SETPOINT_TOL_PCT = 0.01
NOISE_DIFFS = 12  # changes between quiet consecutive readings kept for the noise estimate


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadConfig:
    """A controllable load as the supervisor sees it: its spec for the cap controller, where it
    is (for the events), its setpoint register's full scale (adjustable), its trip round."""

    spec: LoadSpec
    device: str = ""
    point: str = ""
    full_scale: float = 100.0
    round: int | None = None
    rewrite_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class SupervisorConfig:
    """Everything the supervisor needs from the site's configuration (kW and seconds).

    ``response_fraction``: a switch whose metered effect stays under this share of what it
    should have changed (after ``response_readings`` fresh readings) is unresponsive;
    ``noise_k``: an expected change within this many standard deviations of the main meter's
    noise gives no verdict either way."""

    terminal: str
    loads: tuple[LoadConfig, ...] = ()
    poll_interval_s: float = 1.0
    margin_kw: float = 1.0
    hysteresis_kw: float = 2.0
    min_off_s: float = 5.0
    min_on_s: float = 5.0
    restore_step_kw: float = 50.0
    baseline_window_s: float = 900.0
    level_fractions: Mapping[int, float] = field(
        default_factory=lambda: dict(DEFAULT_LEVEL_FRACTIONS))
    utc_offset_s: int = 8 * 3600
    switch_retry_s: float = 30.0
    record_after_s: float = 120.0
    response_fraction: float = 0.3
    response_readings: int = 3
    noise_k: float = 3.0

    def __post_init__(self) -> None:
        names = [lc.name for lc in self.loads]
        if len(set(names)) != len(names):
            raise ValueError("load names must be unique")
        if not 0.0 < self.response_fraction <= 1.0:
            raise ValueError("response_fraction must be in (0, 1]")
        if self.response_readings < 1:
            raise ValueError("response_readings must be >= 1")

    @cached_property
    def specs(self) -> tuple[LoadSpec, ...]:
        return tuple(lc.spec for lc in self.loads)

    @cached_property
    def index(self) -> dict[str, int]:
        return {lc.name: i for i, lc in enumerate(self.loads)}

    @cached_property
    def rounds(self) -> dict[int, tuple[int, ...]]:
        """Trip round -> the indices of its loads."""
        out: dict[int, list[int]] = {}
        for i, lc in enumerate(self.loads):
            if lc.round is not None:
                out.setdefault(lc.round, []).append(i)
        return {r: tuple(v) for r, v in out.items()}

    @property
    def gap_s(self) -> float:
        """Readings further apart than this are not bridged (a reading this old is stale)."""
        return max(5.0, 3 * self.poll_interval_s)

    @property
    def check_timeout_s(self) -> float:
        """A response check with no verdict after this long (no fresh readings) is dropped."""
        return max(10.0, 4 * self.response_readings * self.poll_interval_s)


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CapRequest:
    """A verified ``cap`` command: keep import at or below ``cap_kw`` for ``duration_s`` or
    until ``until`` (unix s); ``loads``: shed only these."""

    id: str
    cap_kw: float
    duration_s: float | None = None
    until: float | None = None
    loads: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ShedRequest:
    """A verified ``shed`` command: import ``shed_kw`` below its level now, for ``duration_s``."""

    id: str
    shed_kw: float
    duration_s: float
    loads: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CancelRequest:
    id: str
    target: str


@dataclass(frozen=True)
class DrRequest:
    """A verified ``dr_event`` command (its id is the event's id)."""

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


@dataclass(frozen=True)
class ModesRequest:
    """A partial :class:`lmt.control.modes.ModeParams` update (objects merged field by field)."""

    id: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class RemoteRequest:
    id: str
    round: int
    action: str  # "trip" or "close"
    alarm_delay_min: int = 0
    limit_half_hours: int = 0


@dataclass(frozen=True)
class GuaranteeRequest:
    id: str
    on: bool
    duration_half_hours: int = 0
    auto_after_h: int | None = None


Request = (CapRequest | ShedRequest | CancelRequest | DrRequest | ModesRequest | RemoteRequest
           | GuaranteeRequest)


@dataclass(frozen=True)
class OptOut:
    """The customer's local opt-out of a DR event (``lmt optout``)."""

    request_id: int
    event_id: str
    reason: str


@dataclass(frozen=True)
class Inputs:
    """One cycle. ``now``: wall clock (unix s); ``mono``: monotonic clock; ``session``: the
    agent's run (a new value after every start). ``site_kw``: the main-meter import read this
    cycle (None: no fresh reading); ``recent_kw``: the latest one of the last few cycles (for
    records and a shed command's start). ``import_kwh``: the main meter's import register.
    ``loads``: per configured load, what was read this cycle — the coil (bool) or the setpoint
    register's value — or None; ``loads_age_s``: how long ago each was read (when the read
    started; none given: just now): a reading from before the load's last write is ignored (a
    slow line's read that overlapped the write says nothing about its result). ``contact``:
    the platform is reachable (MQTT connected). ``stopping``: the agent is stopping: release
    what is held, now."""

    now: float
    mono: float
    session: str
    site_kw: float | None = None
    recent_kw: float | None = None
    import_kwh: float | None = None
    spent_yuan: float | None = None  # the ledger's running cost of the main meter's import
    loads: Sequence[float | bool | None] = ()
    loads_age_s: Sequence[float | None] = ()
    requests: Sequence[Request] = ()
    optouts: Sequence[OptOut] = ()
    contact: bool = False
    stopping: bool = False


# -- outputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """One write to carry out, in order: ``shed`` (coil off), ``restore`` (coil on) or ``set``
    (an adjustable load's setpoint register to ``value``, ``pct`` % of its full scale).
    ``owner``: the command, DR event or ``"modes"`` it is for; ``site_kw``: the reading the
    decision was made on; ``quiet``: a periodic rewrite of the same setpoint (no event)."""

    kind: Literal["shed", "restore", "set"]
    load: int
    reason: str
    owner: str | None
    site_kw: float | None = None
    pct: float | None = None
    value: float | None = None
    quiet: bool = False


@dataclass(frozen=True)
class Done:
    """What carrying out an action gave: ``error`` None when the write took (verified)."""

    action: Action
    error: str | None = None


@dataclass(frozen=True)
class Record:
    """An event or a result to publish (the body as stored, without its sequence number)."""

    stream: Literal["events", "results"]
    body: dict[str, Any]


def _event(ts: float, type_: str, **data: Any) -> Record:
    return Record("events", {"ts": ts, "type": type_, "data": data})


def _result(ts: float, command_id: str | None, status: str, reason: str | None = None,
            detail: str = "", **data: Any) -> Record:
    return Record("results", {"ts": ts, "command_id": command_id, "status": status,
                              "reason": reason, "detail": detail, "data": data})


# -- state --------------------------------------------------------------------------------------
@dataclass
class Clock(Json):
    """The control clock ``t``: monotonic within a session, wall-clock time across restarts."""

    t: float = 0.0
    wall: float | None = None
    mono: float | None = None
    session: str = ""


@dataclass
class LoadRecord(Json):
    """One load. ``held``: we hold it off (or lowered) for ``owner`` since ``since`` (wall).
    ``switched_t``, ``retry_t``, ``written_t``: control-clock times of its last switch, of when
    a failing relay may be tried again, of its last setpoint write. ``setpoint_pct``: an
    adjustable load's setpoint as read (None: unknown since the start), ``restore_pct`` the one
    it had before we lowered it. ``unresponsive``: its last switch showed no effect."""

    on: bool = True
    held: bool = False
    owner: str | None = None
    since: float | None = None
    switched_t: float | None = None
    retry_t: float | None = None
    written_t: float | None = None
    setpoint_pct: float | None = None
    restore_pct: float = 100.0
    unresponsive: bool = False


@dataclass
class Command(Json):
    """The active cap or shed command. ``ending``: None, "completed", "cancelled" or
    "stopped" (the agent stops); its loads come back, then it gets its final result.
    ``switched``: every load switched for it; the rest is what its final result reports."""

    id: str
    kind: str
    cap_kw: float
    started_at: float
    started_t: float
    end_at: float
    end_t: float
    loads: list[str] | None = None
    executed: bool = False
    ending: str | None = None
    cancel_id: str | None = None
    stopped_in: str | None = None  # the session of the agent that stopped while it ran
    switched: list[str] = field(default_factory=list)
    unresponsive: list[str] = field(default_factory=list)
    reached_t: float | None = None  # the first fresh reading at or under the cap
    above_s: float = 0.0  # time with readings above the cap
    max_excess_kw: float = 0.0
    last_t: float | None = None  # the last fresh reading during the command
    last_kw: float | None = None


@dataclass
class Escalation(Json):
    """How one controller's sheds showed on the main meter (per owner)."""

    responded: int = 0
    unresponsive_run: int = 0
    blocked: str | None = None  # escalation stopped: why
    infeasible: bool = False  # cap_unmet "infeasible" was raised
    cap_kw: float | None = None  # its cap at its last decision


@dataclass
class Check(Json):
    """Switches waiting for their effect on the main meter: ``expected_kw`` (signed: a shed is
    negative) against the reading ``ref_kw`` the decision was made on."""

    owner: str | None
    ref_kw: float
    expected_kw: float
    loads: list[str]
    sheds: bool
    started_t: float
    noise_kw: float
    readings: int = 0
    best_kw: float = 0.0  # the measured change closest to the expected one so far


@dataclass
class CycleNote(Json):
    """What ``step`` leaves for ``outcome`` of the same cycle."""

    executed: dict[str, Any] | None = None  # the command's first decision: site, cap, owner


@dataclass
class SupervisorState(Json):
    """The supervisor's whole state: one serialisable value (``to_dict`` / ``from_dict``)."""

    v: int = STATE_VERSION
    clock: Clock = field(default_factory=Clock)
    loads: dict[str, LoadRecord] = field(default_factory=dict)
    command: Command | None = None
    dr: dict[str, Any] | None = None  # DrScheduler.to_dict()
    dr_owner: str | None = None  # the DR event whose control holds loads
    delivery: DeliveryMeter = field(default_factory=DeliveryMeter)
    history: PowerHistory = field(default_factory=PowerHistory)
    mode_params: modes.ModeParams = field(default_factory=modes.ModeParams)
    mode_state: modes.ModeState | None = None
    mode_held: list[str] = field(default_factory=list)  # held off by a tripped round
    mode_freed: bool = False  # a round was released: its loads come back staggered
    records: list[dict[str, Any]] = field(default_factory=list)  # two-minute records due
    check: Check | None = None
    escalation: dict[str, Escalation] = field(default_factory=dict)
    noise: list[float] = field(default_factory=list)  # |change| between quiet readings
    noise_last: float | None = None  # the last fresh reading
    noise_quiet: bool = True  # nothing was switched since it
    contact_t: float | None = None
    report: dict[str, Any] = field(default_factory=dict)  # the modes' outputs, for status
    cycle: CycleNote = field(default_factory=CycleNote)


def _clone(st: SupervisorState) -> SupervisorState:
    """A copy of the state that ``step`` and ``outcome`` may change freely: every part they
    change in place is copied (loads, the command, the check, the escalations, the delivery,
    the history, the records, the clock, the report); what they only ever replace is shared
    (the mode parameters and state — ``modes.step`` returns new ones — and the DR scheduler's
    dict). Much cheaper than a deep copy: it runs twice a cycle."""
    out = copy.copy(st)
    out.clock = copy.copy(st.clock)
    out.loads = {n: copy.copy(ld) for n, ld in st.loads.items()}
    if st.command is not None:
        cmd = out.command = copy.copy(st.command)
        cmd.switched, cmd.unresponsive = list(cmd.switched), list(cmd.unresponsive)
        cmd.loads = None if cmd.loads is None else list(cmd.loads)
    out.delivery = DeliveryMeter({k: copy.copy(v) for k, v in st.delivery.events.items()})
    out.history = PowerHistory(st.history.window_s, list(st.history.buckets))
    out.mode_held = list(st.mode_held)
    out.records = list(st.records)
    out.check = None if st.check is None else copy.copy(st.check)
    if out.check is not None:
        out.check.loads = list(out.check.loads)
    out.escalation = {k: copy.copy(v) for k, v in st.escalation.items()}
    out.noise = list(st.noise)
    out.report = dict(st.report)
    out.cycle = copy.copy(st.cycle)
    return out


def initial_state(config: SupervisorConfig) -> SupervisorState:
    st = SupervisorState(history=PowerHistory(window_s=config.baseline_window_s))
    _reconcile(config, st)
    return st


def _reconcile(config: SupervisorConfig, st: SupervisorState) -> None:
    """Loads added to or removed from the configuration since the state was saved."""
    for lc in config.loads:
        if lc.name not in st.loads:
            st.loads[lc.name] = LoadRecord()
    for name in [n for n in st.loads if n not in config.index]:
        del st.loads[name]
    # a load no longer in a trip round is no longer held by one: the release brings it back
    for name in [n for n in st.mode_held
                 if n not in config.index or config.loads[config.index[n]].round is None]:
        st.mode_held.remove(name)
        ld = st.loads.get(name)
        if ld is not None and ld.owner == MODES_OWNER:
            ld.owner = None
    if st.command is not None and st.command.loads is not None:
        st.command.loads = [n for n in st.command.loads if n in config.index]
    if st.history.window_s != config.baseline_window_s:
        st.history = PowerHistory(window_s=config.baseline_window_s)


def controlling(state: SupervisorState) -> bool:
    """A command or a DR event is in control (the main meter is urgent)."""
    return state.command is not None or state.dr_owner is not None \
        or any(ld.held and ld.owner != MODES_OWNER for ld in state.loads.values())


def _status(cmd: Command) -> str:
    """The final status a command's ending gives."""
    return "failed" if cmd.ending in (None, "stopped") else str(cmd.ending)


def _noise_kw(diffs: Sequence[float]) -> float:
    """The main meter's noise (one standard deviation, kW) from the changes between consecutive
    readings with no switch in between: the median absolute change (robust to the site's own
    steps), scaled to a standard deviation."""
    if len(diffs) < 3:
        return 0.0
    return 1.4826 * statistics.median(diffs) / math.sqrt(2.0)


def _finite(x: float | bool | None) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


class _Refuse(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A partial ModeParams update: objects merged field by field, anything else replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) \
            else v
    return out


# -- the step -----------------------------------------------------------------------------------
class _Cycle:
    """One call's working context over a private copy of the state."""

    def __init__(self, cfg: SupervisorConfig, st: SupervisorState, now: float) -> None:
        self.cfg = cfg
        self.st = st
        self.now = now
        self.t = st.clock.t
        self.actions: list[Action] = []
        self.records: list[Record] = []
        self.held_back = False  # apply() wanted sheds that wait for the last ones' effect
        self.recent: float | None = None  # the latest main-meter reading of the last cycles
        self.import_kwh: float | None = None

    def load_scheduler(self) -> None:
        """The DR scheduler from the state (only ``step`` needs it; it is saved back at the
        end of the step)."""
        fractions = dict(self.cfg.level_fractions)
        self.sched = DrScheduler(self.cfg.terminal, fractions)
        if self.st.dr is not None:
            try:
                sched = DrScheduler.from_dict(self.st.dr, fractions)
                if sched.terminal_id == self.cfg.terminal:
                    self.sched = sched
            except ValueError:
                pass  # unreadable: no events (the agent validates the state when it loads it)

    # -- records --
    def event(self, type_: str, **data: Any) -> None:
        self.records.append(_event(self.now, type_, **data))

    def result(self, command_id: str | None, status: str, reason: str | None = None,
               detail: str = "", **data: Any) -> None:
        self.records.append(_result(self.now, command_id, status, reason, detail, **data))

    # -- views --
    def load(self, i: int) -> LoadRecord:
        return self.st.loads[self.cfg.loads[i].name]

    def available(self, ld: LoadRecord) -> bool:
        return ld.retry_t is None or ld.retry_t <= self.t

    def cap_view(self) -> list[LoadState]:
        """The loads as the cap/DR controller sees them: a load held off by a tripped round is
        neither its to restore nor to shed (off, not shed by it, unavailable)."""
        held = set(self.st.mode_held)
        out = []
        for lc in self.cfg.loads:
            ld = self.st.loads[lc.name]
            if lc.name in held:
                out.append(LoadState(is_on=False, available=False))
                continue
            sp = ld.setpoint_pct if lc.spec.adjustable else 100.0
            out.append(LoadState(
                is_on=ld.on or lc.spec.adjustable, shed_by_us=ld.held,
                last_switch_s=-math.inf if ld.switched_t is None else ld.switched_t,
                available=self.available(ld),
                setpoint_pct=math.nan if sp is None else sp,
                restore_pct=ld.restore_pct if lc.spec.adjustable else 100.0))
        return out

    def any_held(self) -> bool:
        held = set(self.st.mode_held)
        return any(ld.held and name not in held for name, ld in self.st.loads.items())

    # -- planning writes (recorded in the state before they are carried out) --
    def plan_switch(self, i: int, on: bool, reason: str, owner: str | None,
                    site: float | None) -> None:
        ld = self.load(i)
        if not on:
            ld.held, ld.owner, ld.since = True, owner, self.now
        self.actions.append(Action("restore" if on else "shed", i, reason, owner, site))

    def plan_set(self, i: int, pct: float, reason: str, owner: str | None, site: float | None,
                 quiet: bool = False) -> None:
        lc, ld = self.cfg.loads[i], self.load(i)
        before = ld.setpoint_pct
        if before is not None and pct < before and not ld.held:
            ld.restore_pct, ld.held, ld.owner, ld.since = round(before, 3), True, owner, self.now
        value = round(pct / 100.0 * lc.full_scale, 4)
        self.actions.append(Action("set", i, reason, owner, site, pct=pct, value=value,
                                   quiet=quiet))

    # -- 0. the clock, the configuration --
    def advance_clock(self, inp: Inputs) -> bool:
        """Advance the control clock; True on a new session (the agent restarted)."""
        c = self.st.clock
        new = c.session != inp.session
        if not new and c.mono is not None:
            dt = inp.mono - c.mono
        elif c.wall is not None:
            dt = inp.now - c.wall  # across a restart: the wall-clock time that passed
        else:
            dt = 0.0
        c.t += max(0.0, dt) if math.isfinite(dt) else 0.0
        c.wall, c.mono, c.session = inp.now, inp.mono, inp.session
        self.t = c.t
        if new:
            # An adjustable load's setpoint is unknown until read (the device may have gone
            # back to its default meanwhile); a check from before the restart says nothing.
            for lc in self.cfg.loads:
                if lc.spec.adjustable:
                    self.st.loads[lc.name].setpoint_pct = None
            self.st.check = None
            self.st.noise_last = None
        if self.st.contact_t is None or new:  # counted from the start, as the terminal's own
            self.st.contact_t = self.t
        if inp.contact:  # the platform is reachable (MQTT connected)
            self.st.contact_t = self.t
        return new

    # -- 1. read states --
    def read_loads(self, values: Sequence[float | bool | None],
                   ages: Sequence[float | None]) -> None:
        for i, lc in enumerate(self.cfg.loads):
            v = values[i] if i < len(values) else None
            if v is None:
                continue
            ld = self.st.loads[lc.name]
            age = ages[i] if i < len(ages) else None
            if ld.switched_t is not None and self.t - (age or 0.0) < ld.switched_t:
                continue  # read before its last write took: stale
            if lc.spec.adjustable:
                raw = _finite(v)
                if raw is None:
                    continue
                ld.setpoint_pct = raw / lc.full_scale * 100.0
                if ld.held and ld.setpoint_pct >= ld.restore_pct - SETPOINT_TOL_PCT:
                    # back where it was (by hand, or the device's own fallback): not held
                    ld.held, ld.owner, ld.since = False, None, None
            else:
                ld.on = bool(v)
                if ld.on and ld.held and lc.name not in self.st.mode_held:
                    # On although we shed it: switched back by hand, or the off-write never
                    # took. Either way we no longer hold it off.
                    ld.held, ld.owner, ld.since = False, None, None

    # -- 2. the measured response, the command's record of the cap --
    def fresh_site(self, kw: float | None) -> None:
        st = self.st
        check = st.check
        if check is not None and self.t - check.started_t > self.cfg.check_timeout_s:
            st.check = None  # no fresh readings for too long: no verdict
        if kw is None:
            return
        if st.noise_last is not None and st.noise_quiet and st.check is None:
            st.noise = [*st.noise, abs(kw - st.noise_last)][-NOISE_DIFFS:]
        st.noise_last, st.noise_quiet = kw, True
        cmd = st.command
        if cmd is not None and cmd.ending is None:
            if cmd.last_t is not None and cmd.last_kw is not None \
                    and self.t - cmd.last_t <= self.cfg.gap_s and cmd.last_kw > cmd.cap_kw:
                cmd.above_s += self.t - cmd.last_t
            if kw <= cmd.cap_kw and cmd.reached_t is None:
                cmd.reached_t = self.t
            cmd.max_excess_kw = max(cmd.max_excess_kw, kw - cmd.cap_kw)
            cmd.last_t, cmd.last_kw = self.t, kw
        if st.check is not None:
            self.verify(st.check, kw)

    def verify(self, c: Check, kw: float) -> None:
        measured = kw - c.ref_kw
        if abs(c.expected_kw) <= self.cfg.noise_k * c.noise_kw:
            self.st.check = None  # within the meter's noise: no verdict either way
            return
        ratio = measured / c.expected_kw
        if abs(measured - c.expected_kw) < abs(c.best_kw - c.expected_kw):
            c.best_kw = measured
        esc = self.st.escalation.setdefault(c.owner or "", Escalation())
        if ratio >= self.cfg.response_fraction:
            self.st.check = None
            for name in c.loads:
                self.st.loads[name].unresponsive = False
            if c.sheds:
                esc.responded += 1
                esc.unresponsive_run = 0
            return
        c.readings += 1
        if c.readings < self.cfg.response_readings:
            return
        self.st.check = None
        for name in c.loads:
            self.st.loads[name].unresponsive = True
        cmd = self.st.command
        if cmd is not None and cmd.id == c.owner:
            cmd.unresponsive = sorted({*cmd.unresponsive, *c.loads})
        self.event("load_unresponsive", loads=c.loads, expected_kw=round(c.expected_kw, 3),
                   measured_kw=round(c.best_kw, 3), site_kw=round(kw, 3),
                   before_kw=round(c.ref_kw, 3), noise_kw=round(c.noise_kw, 3),
                   command_id=c.owner,
                   detail=f"{', '.join(c.loads)} should have changed the site by "
                          f"{c.expected_kw:+.1f} kW; the main meter moved {c.best_kw:+.1f} kW "
                          f"in {c.readings} readings (noise {c.noise_kw:.1f} kW)")
        if not c.sheds or c.owner is None or c.owner == MODES_OWNER:
            return
        esc.unresponsive_run += 1
        if esc.blocked is None and (esc.responded == 0 or esc.unresponsive_run >= 2):
            esc.blocked = (f"the loads shed ({', '.join(c.loads)}) showed no effect on the main "
                           "meter: no more loads are shed for it (a frozen or wrong meter, or "
                           "relays that do not switch?)")
            self.event("cap_unmet", command_id=c.owner, reason="unresponsive",
                       cap_kw=self.cap_of(c.owner), site_kw=round(kw, 3),
                       detail=esc.blocked)

    def cap_of(self, owner: str | None) -> float | None:
        cmd = self.st.command
        if cmd is not None and cmd.id == owner:
            return round(cmd.cap_kw, 3)
        esc = self.st.escalation.get(owner or "")
        return None if esc is None else esc.cap_kw

    # -- 3. two-minute records --
    def due_records(self, recent: float | None) -> None:
        def is_due(r: dict[str, Any]) -> bool:
            # the modes' records follow the wall clock, as the modes do; the others the control
            # clock
            return bool(r["due_at"] <= self.now) if "due_at" in r else bool(r["due_t"] <= self.t)

        due = [r for r in self.st.records if is_due(r)]
        if not due:
            return
        kw = None if recent is None else round(recent, 3)
        for r in due:
            if r["type"] == "mode_record":
                self.event("mode_record", **r["data"], power_kw_after_2min=kw)
            else:
                self.event("control_record", **r["data"], site_kw_after_2min=kw)
        self.st.records = [r for r in self.st.records if not is_due(r)]

    # -- 4. requests --
    def request(self, r: Request, inp: Inputs) -> None:
        self.st.contact_t = self.t
        try:
            if isinstance(r, ModesRequest | RemoteRequest | GuaranteeRequest):
                self.mode_request(r)
            elif isinstance(r, DrRequest):
                self.dr_request(r)
            elif isinstance(r, CancelRequest):
                self.cancel(r)
            else:
                self.start_command(r, inp)
        except _Refuse as x:
            self.result(r.id, "rejected", x.reason, x.detail)

    def mode_request(self, r: ModesRequest | RemoteRequest | GuaranteeRequest) -> None:
        """Change the stored mode parameters; the modes act on them in this very cycle. Every
        command is addressed to this terminal alone, so exclusion (剔除, which ignores group
        commands) never refuses one."""
        current = self.st.mode_params.to_dict()
        if isinstance(r, ModesRequest):
            update: dict[str, Any] = dict(r.params)
            detail = f"mode parameters set: {', '.join(sorted(r.params))}"
        elif isinstance(r, RemoteRequest):
            if r.round not in self.cfg.rounds:
                raise _Refuse("invalid", f"round {r.round} has no load on this terminal")
            order = {"round": r.round, "action": r.action, "issued_s": self.now,
                     "alarm_delay_min": r.alarm_delay_min,
                     "limit_half_hours": r.limit_half_hours}
            others = [o for o in current["remote"] if o["round"] != r.round]
            update = {"remote": [*others, order]}
            detail = (f"remote {r.action} of round {r.round}"
                      + (f" after {r.alarm_delay_min} min of alarm" if r.action == "trip" else ""))
        else:
            g: dict[str, Any] = {"on": r.on, "issued_s": self.now,
                                 "duration_half_hours": r.duration_half_hours}
            if r.auto_after_h is not None:
                g["auto_after_h"] = r.auto_after_h
            update, detail = {"guarantee": g}, f"power guarantee {'on' if r.on else 'off'}"
        try:
            self.st.mode_params = modes.ModeParams.from_dict(_merge(current, update))
        except (ValueError, TypeError) as exc:
            raise _Refuse("invalid", str(exc)) from None
        self.result(r.id, "accepted", detail=detail)
        self.result(r.id, "completed", detail=f"{detail}; the control modes act on it from "
                                              "this cycle")

    def dr_request(self, r: DrRequest) -> None:
        try:
            ev = DrEvent(id=r.id, issued_at=r.issued_at, start=r.start, duration_s=r.duration_s,
                         signal=r.signal, value=r.value, randomize_s=r.randomize_s,
                         ramp_s=r.ramp_s, recovery_s=r.recovery_s, expires_at=r.expires_at)
        except ValueError as exc:
            raise _Refuse("invalid", str(exc)) from None
        if ev.signal == "level" and ev.value > 0 \
                and int(ev.value) not in self.sched.level_fractions:
            raise _Refuse("invalid", f"level {ev.value:g} has no reduction fraction configured "
                          "(dr.level_fractions)")
        try:
            transitions = self.sched.receive(ev, self.now)
        except ValueError as exc:
            raise _Refuse("invalid", str(exc)) from None
        self.result(r.id, "accepted", detail=f"DR event: {ev.describe()}")
        self.report_dr(transitions)

    def cancel(self, r: CancelRequest) -> None:
        state = self.sched.state_of(r.target)
        if state is not None:
            if state in FINAL_STATES:
                raise _Refuse("unknown_target", f"DR event {r.target!r} is already {state}")
            self.result(r.id, "accepted", detail=f"cancelling DR event {r.target}")
            self.report_dr(self.sched.cancel(r.target, self.now, f"command {r.id}"))
            self.result(r.id, "completed", detail=f"DR event {r.target} cancelled")
            return
        cmd = self.st.command
        if cmd is None or cmd.id != r.target or cmd.ending is not None:
            raise _Refuse("unknown_target", f"no active control with id {r.target!r}")
        self.result(r.id, "accepted", detail=f"cancelling {r.target}")
        cmd.ending, cmd.cancel_id = "cancelled", r.id

    def allowed(self, names: tuple[str, ...] | None) -> list[str] | None:
        if names is None:
            return None
        unknown = [n for n in names if n not in self.cfg.index]
        if unknown:
            known = ", ".join(self.cfg.index) or "none"
            raise _Refuse("invalid", f"unknown load {', '.join(map(repr, unknown))} (this "
                          f"terminal's loads: {known})")
        critical = [n for n in names if self.cfg.loads[self.cfg.index[n]].spec.critical]
        if critical:
            raise _Refuse("invalid", f"load {', '.join(map(repr, critical))} is critical: "
                          "never shed")
        return list(names)

    def start_command(self, r: CapRequest | ShedRequest, inp: Inputs) -> None:
        loads = self.allowed(r.loads)
        if isinstance(r, ShedRequest):
            site = inp.site_kw if inp.site_kw is not None else inp.recent_kw
            if site is None:
                raise _Refuse("unavailable", "no recent main-meter reading to shed from")
            cap, duration = site - r.shed_kw, r.duration_s
            if cap <= 0:
                raise _Refuse("invalid", f"shed_kw {r.shed_kw:g} exceeds the site's "
                              f"{site:.1f} kW import")
            detail, kind = f"shed {r.shed_kw:g} kW from {site:.1f} kW: cap {cap:.1f} kW", "shed"
        else:
            cap, kind = r.cap_kw, "cap"
            duration = r.duration_s if r.duration_s is not None else (r.until or self.now) - self.now
            if duration <= 0:
                raise _Refuse("expired", "the cap's end time has passed")
            detail = f"cap {cap:g} kW"
        detail += f" for {duration:.0f} s"
        if loads is not None:
            detail += f", shedding only {', '.join(loads)}"
        old = self.st.command
        if old is not None:
            # The new command takes over the loads the old one shed.
            for ld in self.st.loads.values():
                if ld.held and ld.owner == old.id:
                    ld.owner = r.id
            if self.st.check is not None and self.st.check.owner == old.id:
                self.st.check.owner = r.id  # its verdict is about the loads the new one took
            esc = self.st.escalation.pop(old.id, None)
            self.finish(old, "superseded", f"by {r.id}", inp.recent_kw)
            if esc is not None:
                self.st.escalation[r.id] = replace(esc, infeasible=False)
        self.result(r.id, "accepted", detail=detail, cap_kw=round(cap, 3),
                    end_at=round(self.now + duration, 3))
        self.st.command = Command(id=r.id, kind=kind, cap_kw=cap, started_at=self.now,
                                  started_t=self.t, end_at=self.now + duration,
                                  end_t=self.t + duration, loads=loads)
        self.event("control_started", command_id=r.id, kind=kind, cap_kw=round(cap, 3),
                   end_at=round(self.now + duration, 3))

    def finish(self, cmd: Command, status: str, detail: str, site: float | None) -> None:
        """The command's final result: how it went, every load switched for it, whether the
        cap was met (brought under it, and no controller blinded by loads that showed no
        effect), the time above it and the largest excess."""
        esc = self.st.escalation.pop(cmd.id, Escalation())
        met = cmd.reached_t is not None and esc.blocked is None
        if cmd.reached_t is None:
            how = "cap not met: the site never came under it"
        elif esc.blocked is not None:
            how = f"cap not met: {esc.blocked}"
        else:
            how = f"cap met (under it {cmd.reached_t - cmd.started_t:.1f} s after acceptance)"
        if cmd.above_s > 0:
            how += f"; {cmd.above_s:.0f} s above it, at most {cmd.max_excess_kw:.1f} kW over"
        if esc.infeasible and cmd.reached_t is None:
            how += "; the cap is below the site's uncontrollable load"
        self.result(cmd.id, status, detail=f"{detail}; {how}" if detail else how,
                    cap_kw=round(cmd.cap_kw, 3), switched=cmd.switched,
                    unresponsive=cmd.unresponsive, cap_met=met,
                    time_to_cap_s=None if cmd.reached_t is None
                    else round(cmd.reached_t - cmd.started_t, 3),
                    above_cap_s=round(cmd.above_s, 3),
                    max_excess_kw=round(max(0.0, cmd.max_excess_kw), 3))
        if cmd.cancel_id:
            self.result(cmd.cancel_id, "completed", detail=f"{cmd.id} {status}")
        self.event("control_ended", command_id=cmd.id, how=status,
                   site_kw=None if site is None else round(site, 3))
        if self.st.command is cmd:
            self.st.command = None

    # -- 5. the terminal control modes --
    def modes(self, inp: Inputs) -> None:
        cfg, st = self.cfg, self.st
        if not cfg.rounds:
            return
        day, minute = modes.local_time(self.now, cfg.utc_offset_s)
        rounds = {r: sum(cfg.loads[i].spec.rated_kw for i in idx)
                  for r, idx in cfg.rounds.items()}
        try:
            ci = modes.CycleInputs(now_s=self.now, local_date=day, minute_of_day=minute,
                                   site_kw=inp.site_kw, import_kwh=inp.import_kwh,
                                   spent_yuan=_finite(inp.spent_yuan),
                                   since_contact_s=max(0.0, self.t - (
                                       self.t if st.contact_t is None else st.contact_t)),
                                   rounds=rounds)
            state, out = modes.step(st.mode_params, st.mode_state, ci)
        except Exception as exc:  # a fault in the modes must not stop caps, DR and telemetry
            self.event("control_fault", part="modes", error=f"{type(exc).__name__}: {exc}",
                       detail="the terminal control modes step failed; rounds stay as they are")
            return
        st.mode_state = state
        st.report["modes"] = {
            "tripped": list(out.tripped), "alarms": list(out.alarms),
            "power_mode": out.power_mode, "setpoint_kw": out.setpoint_kw,
            "measured_kw": out.measured_kw, "guarantee": out.guarantee,
            "excluded": out.excluded, "energy_alarms": list(out.energy_alarms),
            "month_used_kwh": out.month_used_kwh, "purchase_left_kwh": out.purchase_left_kwh,
            "purchase_unit": out.purchase_unit}
        for d in out.decisions:
            data = {"round": d.round, "mode": d.mode, "reason": d.reason,
                    "power_kw": None if d.power_kw is None else round(d.power_kw, 3)}
            if d.mode == "purchase":  # the balance as it changes: orders, alarms, trips
                left = out.purchase_left_kwh
                data |= {"left": None if left is None else round(left, 2),
                         "unit": out.purchase_unit}
            self.event(f"mode_{d.kind}", **data)
            if d.kind == "alarm" and d.mode == "purchase":  # the prepaid balance is low
                pp = st.mode_params.purchase
                left = out.purchase_left_kwh
                self.event("balance_low", unit=out.purchase_unit,
                           left=None if left is None else round(left, 2),
                           alarm=pp.alarm, trip=pp.trip, order_no=pp.order_no,
                           month_used_kwh=None if out.month_used_kwh is None
                           else round(out.month_used_kwh, 3),
                           detail=d.reason)
            st.records.append({"due_at": self.now + cfg.record_after_s, "type": "mode_record",
                               "data": {"kind": d.kind, **data}})
        held = {cfg.loads[i].name for r in out.tripped for i in cfg.rounds.get(r, ())}
        if set(st.mode_held) - held:
            st.mode_freed = True  # released loads come back by the staggered release
        st.mode_held = sorted(held)
        for name in st.mode_held:
            i = cfg.index[name]
            ld, lc = st.loads[name], cfg.loads[i]
            if ld.on and self.available(ld):
                self.plan_switch(i, False, f"round {lc.round} tripped by the terminal control "
                                           "modes", MODES_OWNER, inp.site_kw)
            elif not ld.held:  # already off: ours to restore once the round is released
                ld.held, ld.owner, ld.since = True, MODES_OWNER, self.now

    # -- 6. demand response --
    def report_dr(self, transitions: Sequence[Transition]) -> None:
        """Each DR state change is a result under the event's id; the end of an event that was
        active carries what it delivered (``delivery``)."""
        for tr in transitions:
            data = dict(tr.data)
            if tr.state == "active":
                self.st.delivery.start(tr.event_id, tr.at, self.now, self.recent,
                                       self.import_kwh)
            elif tr.event_id in self.st.delivery.events:
                got = self.st.delivery.end(tr.event_id, tr.at, self.now,
                                           data.get("baseline_kw"), self.import_kwh,
                                           self.cfg.gap_s)
                if got is not None and data.get("was_active"):
                    data["delivery"] = got
            self.result(tr.event_id, tr.state, detail=tr.detail, at=tr.at, **data)

    def dr(self, inp: Inputs) -> Target | None:
        st = self.st
        for o in inp.optouts:
            try:
                self.report_dr(self.sched.opt_out(o.event_id, self.now, o.reason))
            except (KeyError, ValueError) as exc:
                why = exc.args[0] if exc.args else str(exc)
                self.event("optout_ignored", event_id=o.event_id, reason=o.reason,
                           error=str(why))
        baseline = st.history.mean_before(self.now)
        if inp.site_kw is not None:
            st.history.add(self.now, inp.site_kw)
        transitions, target = self.sched.tick(self.now, baseline)
        ends = {}
        for event_id in st.delivery.events:
            try:
                ends[event_id] = self.sched.window(event_id)[1]
            except KeyError:
                pass
        st.delivery.sample(self.now, inp.site_kw, ends, self.cfg.gap_s)
        self.report_dr(transitions)
        return target

    # -- 7. the cap --
    def params(self, cap: float) -> CapParams:
        c = self.cfg
        return CapParams(cap_kw=cap, margin_kw=c.margin_kw, hysteresis_kw=c.hysteresis_kw,
                         min_off_s=c.min_off_s, min_on_s=c.min_on_s)

    def apply(self, dec: Decision, site: float, owner: str | None, restore_only: bool = False,
              shed_only: bool = False, suffix: str = "") -> list[str]:
        """Plan a decision's steps in order (sheds, then setpoints, then restores); the names
        of the loads shed or lowered. ``restore_only``: only what brings load back (a
        recovering DR event); ``shed_only``: only what takes load off (a DR cap still ramping
        down). While switches wait for their measured effect, no further load comes back, and
        no further load is shed for the same controller; a controller whose sheds showed no
        effect sheds no more."""
        steps = dec.steps()
        check = self.st.check
        blocked = self.st.escalation.get(owner or "", Escalation()).blocked is not None
        if dec.method.startswith("rotation"):
            # a swap is one unit: its restore is the point (max off time), its sheds make room
            if check is not None:
                return []
            restore_only = shed_only = False
            blocked = False
        no_shed = restore_only or blocked or (check is not None and check.sheds)
        no_restore = shed_only or check is not None
        view = self.cap_view()
        lowers = [(i, pct, why) for i, kind, pct, why in steps
                  if kind == "set" and pct is not None and pct < view[i].setpoint_pct]
        raises = [(i, pct, why) for i, kind, pct, why in steps
                  if kind == "set" and pct is not None and pct >= view[i].setpoint_pct]
        sheds = [(i, why) for i, kind, _, why in steps if kind == "shed"]
        restores = [(i, why) for i, kind, _, why in steps if kind == "restore"]
        done: list[str] = []
        # sheds wanted but waiting for the last ones' effect (not refused for good)
        self.held_back = bool((sheds or lowers) and no_shed and not restore_only and not blocked)
        if (sheds or lowers) and not no_shed:
            if check is not None and not check.sheds:
                self.st.check = None  # a shed matters more than a restore's verdict
                no_restore = False
            for i, why in sheds:
                self.plan_switch(i, False, why + suffix, owner, site)
                done.append(self.cfg.loads[i].name)
            for i, pct, why in lowers:
                self.plan_set(i, pct, why + suffix, owner, site)
                done.append(self.cfg.loads[i].name)
        if not no_restore:
            for i, pct, why in raises:
                self.plan_set(i, pct, why + suffix, owner, site)
            for i, why in restores:
                self.plan_switch(i, True, why + suffix, owner, site)
        return done

    def rewrite_setpoints(self, owner: str | None) -> None:
        """Devices that fall back to a default without fresh writes (an EV charger's validity
        time): the setpoint of a load we hold lowered is written again every ``rewrite_s``."""
        planned = {a.load for a in self.actions}
        for i, lc in enumerate(self.cfg.loads):
            ld = self.st.loads[lc.name]
            last = ld.written_t if ld.written_t is not None else ld.switched_t
            if lc.rewrite_s is not None and ld.held and self.available(ld) and i not in planned \
                    and ld.setpoint_pct is not None \
                    and (last is None or self.t - last >= lc.rewrite_s):
                self.plan_set(i, ld.setpoint_pct, "rewrite", owner, None, quiet=True)

    def release(self, site: float | None, why: str, owner: str | None,
                staggered: bool = True) -> None:
        """Bring back the loads we hold off, most important first. ``staggered``: at most
        ``restore_step_kw`` of rated load (and at least one load) per cycle, and none while
        earlier switches wait for their measured effect, so the site does not rebound all at
        once; a stopping agent restores everything at once. A load whose relay is failing is
        tried again once its retry time has come."""
        if staggered and self.st.check is not None:
            return
        view = self.cap_view()
        dec = decide_release(self.cfg.specs, view)
        step_kw, planned = self.cfg.restore_step_kw, 0.0
        for idx, kind, pct, _why in dec.steps():
            lc, st = self.cfg.loads[idx], view[idx]
            if staggered and not st.available:
                continue
            if kind == "set":
                assert pct is not None
                kw = (pct - st.setpoint_pct) * lc.spec.rated_kw / 100.0
                if not math.isfinite(kw):  # not read since a restart: count it whole
                    kw = lc.spec.rated_kw
            else:
                kw = lc.spec.rated_kw
            if staggered and planned > 0 and planned + kw > step_kw:
                break
            planned += kw
            if kind == "set":
                assert pct is not None
                self.plan_set(idx, pct, f"back to {pct:.1f} %: {why}", owner, site)
            else:
                self.plan_switch(idx, True, f"restore {lc.name}: {why}", owner, site)

    def uncontrollable_kw(self, site: float, view: Sequence[LoadState],
                          only: set[int] | None) -> float:
        """The site's import with every load that could be shed shed: the floor of any cap."""
        off = 0.0
        for i, (lc, st) in enumerate(zip(self.cfg.loads, view, strict=True)):
            if lc.spec.critical or (only is not None and i not in only) or not st.is_on:
                continue
            if lc.spec.adjustable:
                if math.isfinite(st.setpoint_pct):
                    off += lc.spec.rated_kw * max(0.0, st.setpoint_pct - lc.spec.min_pct) / 100.0
            elif lc.name not in self.st.mode_held:
                off += lc.spec.rated_kw
        return site - off

    def cap(self, inp: Inputs, dr: Target | None) -> None:
        st = self.st
        site = inp.site_kw
        dr_cap = dr.cap_kw if dr is not None and dr.cap_kw is not None else None
        cmd = st.command
        if cmd is not None and cmd.ending is None and self.t >= cmd.end_t:
            cmd.ending = "completed"
        if cmd is not None and cmd.ending is not None:
            if dr_cap is not None and dr is not None:
                # the DR event holds the loads on: it takes them over
                for ld in st.loads.values():
                    if ld.held and ld.owner == cmd.id:
                        ld.owner = dr.event_id
                if st.check is not None and st.check.owner == cmd.id:
                    st.check.owner = dr.event_id
                self.finish(cmd, _status(cmd), f"loads now held by DR event {dr.event_id}",
                            inp.recent_kw)
                cmd = None
            else:
                self.release(site, f"command {cmd.ending}", cmd.id)
                return
        caps: list[tuple[float, str]] = []
        if cmd is not None:
            caps.append((cmd.cap_kw, cmd.id))
        if dr is not None and dr_cap is not None:
            caps.append((dr_cap, dr.event_id))
        if not caps:
            self.no_cap(site, dr)
            return
        cap, owner = min(caps)
        if dr is not None and owner == dr.event_id:
            st.dr_owner = owner
        if site is None:
            return  # no fresh main-meter reading: control holds this cycle
        params = self.params(cap)
        view = self.cap_view()
        only: set[int] | None = None
        if cmd is not None and owner == cmd.id and cmd.loads is not None:
            # only the command's loads may be shed (any load it shed may come back)
            only = {self.cfg.index[n] for n in cmd.loads}
            view = [s if i in only else replace(s, available=False) for i, s in enumerate(view)]
        target = cap - params.margin_kw
        esc = st.escalation.setdefault(owner, Escalation())
        unknown = any(lc.spec.adjustable and not math.isfinite(v.setpoint_pct)
                      and (only is None or i in only)
                      for i, (lc, v) in enumerate(zip(self.cfg.loads, view, strict=True)))
        esc.cap_kw = round(cap, 3)
        if site > target and not esc.infeasible and not unknown:
            floor = self.uncontrollable_kw(site, view, only)
            if floor > target:
                esc.infeasible = True
                self.event("cap_unmet", command_id=owner, reason="infeasible",
                           cap_kw=round(cap, 3), site_kw=round(site, 3),
                           uncontrollable_kw=round(floor, 3),
                           detail=f"with every load it may shed off, the site would still "
                                  f"draw about {floor:.1f} kW, above the cap {cap:.1f} kW "
                                  f"- margin {params.margin_kw:.1f}: the cap cannot be met")
        dec = decide_cap(site, self.t, self.cfg.specs, view, params)
        shed_only = restore_only = False
        if dr is not None and owner == dr.event_id and dr.ramping:
            shed_only = True  # the cap falls on: restoring now would only flap
        elif dr is not None and dr.recovering and dr.restore_ceiling_kw is not None \
                and not dec.shed and not any(pct < view[i].setpoint_pct
                                             for i, pct in dec.setpoints):
            # a command caps the site while a DR event recovers: loads come back under the
            # lower of the command's cap and the event's rising ceiling
            limit = min(cap - params.margin_kw - params.hysteresis_kw, dr.restore_ceiling_kw)
            params = replace(params, cap_kw=limit, margin_kw=0.0, hysteresis_kw=0.0)
            dec = decide_cap(site, self.t, self.cfg.specs, view, params)
            restore_only = True
        self.apply(dec, site, owner, restore_only=restore_only, shed_only=shed_only)
        self.rewrite_setpoints(owner)
        for gone in [o for o in st.escalation if o not in {c for _, c in caps}]:
            del st.escalation[gone]  # an event or command no longer in control
        if cmd is not None and not cmd.executed and not self.held_back:
            # (a decision held back for the last sheds' effect is not yet what it executes)
            st.cycle.executed = {"site_kw": site, "cap_kw": cap, "owner": owner,
                                 "blocked": esc.blocked}

    def no_cap(self, site: float | None, dr: Target | None) -> None:
        """No cap holds: a DR event recovering restores loads paced under its ceiling;
        otherwise every load we hold off comes back, staggered."""
        st = self.st
        if not self.any_held():
            st.dr_owner = None
            st.mode_freed = False
            st.escalation.clear()
            return
        if dr is not None and dr.recovering and dr.restore_ceiling_kw is not None:
            if site is None:
                return
            # restore only: a load comes back while site + its rated power ≤ the ceiling
            params = CapParams(cap_kw=dr.restore_ceiling_kw, margin_kw=0.0, hysteresis_kw=0.0,
                               min_off_s=self.cfg.min_off_s, min_on_s=self.cfg.min_on_s)
            dec = decide_cap(site, self.t, self.cfg.specs, self.cap_view(), params)
            self.apply(dec, site, dr.event_id, restore_only=True,
                       suffix=f" (DR event {dr.event_id} recovery, ceiling "
                              f"{dr.restore_ceiling_kw:.1f} kW)")
            self.rewrite_setpoints(dr.event_id)
            return
        if st.dr_owner is not None:
            state = self.sched.state_of(st.dr_owner) or "ended"
            self.release(site, f"DR event {st.dr_owner} {state}", st.dr_owner)
            return
        # released by a control mode, or left over from before a restart
        why = ("its round was released by the terminal control modes" if st.mode_freed
               else "no command holds it (shed before the agent restarted)")
        self.release(site, why, None)

    def stop(self, inp: Inputs) -> None:
        """The agent stops: no load stays off. The active command's loads come back at once
        and it fails (in :func:`outcome`, once the writes are done); one that had already ended
        and was bringing its loads back ends as it would have, once they are back (a load that
        would not come back is tried again at the next start). A DR event stays in its state
        and resumes control at the next start; loads held by a tripped round stay off."""
        cmd = self.st.command
        if cmd is None:
            if self.any_held():
                owner = self.st.dr_owner
                self.release(inp.recent_kw, "agent stopping" + (
                    f" (DR event {owner} resumes control at the next start)" if owner else ""),
                    owner, staggered=False)
            return
        if cmd.ending is None:
            cmd.ending, cmd.stopped_in = "stopped", inp.session
        self.release(inp.recent_kw, "agent stopping", cmd.id, staggered=False)

    def settle(self, recent: float | None, final: bool) -> None:
        """A command whose end has come gets its final result once its loads are back; a
        stopping one once the writes were tried (``final``)."""
        cmd = self.st.command
        if cmd is None or cmd.ending is None:
            return
        left = [n for n, ld in self.st.loads.items()
                if ld.held and n not in self.st.mode_held]
        if cmd.ending == "stopped":
            stopping = cmd.stopped_in == self.st.clock.session
            if left and not (final and stopping):
                return  # (killed while it stopped: it ends once the next run has them back)
            detail = ("agent stopped before the command ended; all loads restored" if not left
                      else f"agent stopped before the command ended; could not restore "
                           f"{', '.join(left)} (restored at the next start)")
            self.finish(cmd, "failed", detail, recent)
        elif not left:
            self.finish(cmd, cmd.ending, "all loads restored", recent)

    def run(self, inp: Inputs) -> None:
        self.recent = inp.recent_kw if inp.recent_kw is not None else inp.site_kw
        self.import_kwh = _finite(inp.import_kwh)
        self.load_scheduler()
        self.st.cycle = CycleNote()
        self.advance_clock(inp)
        _reconcile(self.cfg, self.st)
        self.read_loads(inp.loads, inp.loads_age_s)
        site = _finite(inp.site_kw)
        if site != inp.site_kw:
            inp = replace(inp, site_kw=site)
        self.fresh_site(site)
        self.due_records(self.recent)
        if inp.stopping:
            self.stop(inp)
            self.settle(self.recent, final=not self.actions)
        else:
            for r in inp.requests:
                self.request(r, inp)
            self.modes(inp)
            self.dr_target = self.dr(inp)
            self.cap(inp, self.dr_target)
            self.settle(self.recent, final=False)
        self.st.dr = self.sched.to_dict()


def step(config: SupervisorConfig, state: SupervisorState | None, inputs: Inputs
         ) -> tuple[SupervisorState, list[Action], list[Record]]:
    """One control cycle: the new state, the writes to carry out (in order) and the events and
    results to publish. ``state`` None: a fresh terminal. The arguments are not changed.

    **Persist the returned state before carrying out its actions**: it already records what
    they are about to do (loads marked held, the setpoint to go back to, the command), so a
    crash between the two ends, after a restart, with control taken up where it was."""
    st = _clone(state) if state is not None else initial_state(config)
    cycle = _Cycle(config, st, inputs.now)
    cycle.run(inputs)
    return st, cycle.actions, cycle.records


def outcome(config: SupervisorConfig, state: SupervisorState, done: Sequence[Done], now: float
            ) -> tuple[SupervisorState, list[Record]]:
    """Fold what the cycle's writes did back into the state: switch states and times, a failing
    relay left out for ``switch_retry_s``, the events (``load_shed``, ``load_restored``,
    ``load_adjusted``, ``switch_failed``), the measured-response check of what switched, the
    two-minute record, the command's ``executed`` result, and the final result of a command
    whose loads are all back. Call it after every :func:`step`, with an empty ``done`` when
    there was nothing to do. The arguments are not changed."""
    if not done and state.cycle.executed is None and (state.command is None
                                                      or state.command.ending is None):
        return state, []  # nothing was carried out and nothing waits on it
    st = _clone(state)
    cycle = _Cycle(config, st, now)
    cfg, t = config, st.clock.t
    # the writes are done now: a reading that started before this is no proof of their result
    done_t = t + (max(0.0, now - st.clock.wall) if st.clock.wall is not None else 0.0)
    switched: dict[str | None, dict[str, list[str]]] = {}
    delta: dict[str | None, float] = {}
    names: dict[str | None, list[str]] = {}
    sheds: dict[str | None, bool] = {}
    ref: dict[str | None, float | None] = {}
    stopping = st.command is not None and st.command.ending == "stopped" \
        and st.command.stopped_in == st.clock.session
    for d in done:
        a = d.action
        lc = cfg.loads[a.load]
        ld = st.loads[lc.name]
        if d.error is not None:
            ld.retry_t = t + cfg.switch_retry_s
            what = {"shed": "off", "restore": "on"}.get(a.kind, f"to {a.pct or 0.0:.1f} %")
            extra: dict[str, Any] = ({"on": a.kind == "restore"} if a.kind != "set"
                                     else {"setpoint_pct": a.pct})
            cycle.event("switch_failed", load=lc.name, **extra, error=d.error,
                        command_id=a.owner, detail=f"switching {lc.name} {what} failed")
            continue
        site = None if a.site_kw is None else round(a.site_kw, 3)
        if a.kind == "set":
            assert a.pct is not None
            before = ld.setpoint_pct
            ld.setpoint_pct, ld.written_t = a.pct, done_t
            if not a.quiet:  # a rewrite of the same value is no switch: min on/off run on
                ld.switched_t = done_t
            if ld.held and a.pct >= ld.restore_pct - 1e-6:
                ld.held, ld.owner, ld.since = False, None, None
            if a.quiet:
                continue
            change = None if before is None else (a.pct - before) * lc.spec.rated_kw / 100.0
            cycle.event("load_adjusted", load=lc.name, device=lc.device, point=lc.point,
                        rated_kw=lc.spec.rated_kw, setpoint_pct=round(a.pct, 2),
                        from_pct=None if before is None else round(before, 2), value=a.value,
                        kw_change=None if change is None else round(change, 3), site_kw=site,
                        reason=a.reason, command_id=a.owner)
            lowered = change is not None and change < 0
            rec = switched.setdefault(a.owner, {"shed": [], "restored": []})
            rec["shed" if lowered else "restored"].append(lc.name)
        else:
            on = a.kind == "restore"
            ld.on, ld.switched_t = on, done_t
            if on:
                ld.held, ld.owner, ld.since = False, None, None
            change = lc.spec.rated_kw if on else -lc.spec.rated_kw
            cycle.event("load_restored" if on else "load_shed", load=lc.name, device=lc.device,
                        point=lc.point, rated_kw=lc.spec.rated_kw, site_kw=site,
                        reason=a.reason, command_id=a.owner)
            switched.setdefault(a.owner, {"shed": [], "restored": []})[
                "restored" if on else "shed"].append(lc.name)
        if a.owner == MODES_OWNER or change is None or stopping:
            continue  # the modes keep their own records; no verdict on a stopping agent
        delta[a.owner] = delta.get(a.owner, 0.0) + change
        names.setdefault(a.owner, []).append(lc.name)
        sheds[a.owner] = sheds.get(a.owner, False) or change < 0
        if ref.get(a.owner) is None:
            ref[a.owner] = a.site_kw
    for owner, rec in switched.items():
        if owner == MODES_OWNER:
            continue
        site = next((d.action.site_kw for d in done if d.action.owner == owner
                     and d.action.site_kw is not None), None)
        st.records.append({"due_t": t + cfg.record_after_s, "type": "control_record",
                           "data": {"command_id": owner, "at": now, "shed": rec["shed"],
                                    "restored": rec["restored"],
                                    "site_kw": None if site is None else round(site, 3)}})
        cmd = st.command
        if cmd is not None and cmd.id == owner:
            cmd.switched = [*cmd.switched, *(n for n in rec["shed"] + rec["restored"]
                                             if n not in cmd.switched)]
    for owner, change in delta.items():
        r = ref.get(owner)
        if r is None:
            continue  # no reading to compare with (a release without a fresh reading)
        c = st.check
        if c is not None:
            c.expected_kw += change
            c.loads = [*c.loads, *(n for n in names[owner] if n not in c.loads)]
            c.sheds = c.sheds or sheds[owner]
            c.readings, c.started_t = 0, t
        else:
            st.check = Check(owner=owner, ref_kw=r, expected_kw=change, loads=names[owner],
                             sheds=sheds[owner], started_t=t, noise_kw=_noise_kw(st.noise))
    cmd = st.command
    note = st.cycle.executed
    if cmd is not None and not cmd.executed and note is not None:
        cmd.executed = True
        owner = note["owner"]
        done_names = switched.get(owner, {"shed": []})["shed"]
        cap = float(note["cap_kw"])
        site_kw = float(note["site_kw"])
        nothing = ("nothing more: " + str(note["blocked"])) if note.get("blocked") \
            else "nothing needed"
        cycle.result(cmd.id, "executed",
                     detail=f"site {site_kw:.1f} kW, cap {cmd.cap_kw:.1f} kW, "
                            f"shed: {', '.join(done_names) or nothing}"
                            + (f" (DR event {owner}'s lower cap {cap:.1f} kW applies)"
                               if owner != cmd.id else ""),
                     site_kw=round(site_kw, 3), cap_kw=cmd.cap_kw, shed=done_names)
    if any(d.error is None and not d.action.quiet for d in done):
        st.noise_quiet = False  # the next reading's change is no noise
    st.cycle = CycleNote()
    cycle.settle(st.noise_last, final=True)
    return st, cycle.records
