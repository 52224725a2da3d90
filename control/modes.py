"""Terminal control modes (负控终端控制模式): a pure, deterministic round-level state machine.

One call per control cycle::

    state, out = step(params, state, inputs)

``params`` (:class:`ModeParams`) is what the platform set by signed commands and the agent
stores; ``state`` (:class:`ModeState`) is what this module remembers between cycles and the
agent persists (``to_dict`` / ``from_dict``, JSON types); ``inputs`` (:class:`CycleInputs`)
is this cycle's measurement and time. Nothing here reads a clock, looks at a time zone or
does I/O: the caller passes unix seconds *and* the local date and minute of the day
(:func:`local_time` derives them from an explicit UTC offset). ``step`` never mutates its
arguments.

Rounds (轮次) 1..8 are groups of controllable loads. The machine decides, per round, whether
it is wanted tripped (open) or closed, and whether its alarm is on; the agent drives the
relays of each round to that state. Each trip, restore, alarm and guarantee change is a
:class:`ModeDecision` carrying the site power at that moment; the agent adds the power two
minutes later to the event it records.

Precedence (in this order):

1. power guarantee (保电) overrides everything: every round closed, no alarm, no control;
2. of the power controls only one runs: float-down > business suspension > rest-day > period;
3. a round is tripped while remote control OR the active power control OR monthly energy
   control OR purchased-energy control holds it;
4. a remote "allow close" releases the round from every mode that held it; a power or energy
   control that held it leaves it alone until that control is re-armed (switched on again,
   a new period or day, a new month, a new purchase order).

See docs/control.md, "Terminal control modes", for every mode's behaviour and parameters.
Only numpy, numba and the standard library may be imported here (this module needs only
the standard library).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from lmt.control.jsonstate import Json

__all__ = [
    "ALL_ROUNDS",
    "ENERGY_MODES",
    "KINDS",
    "MODES",
    "POWER_MODES",
    "CycleInputs",
    "CycleOutputs",
    "EnergyParams",
    "EnergyProgress",
    "FloatDownParams",
    "GuaranteeParams",
    "ModeDecision",
    "ModeParams",
    "ModeState",
    "MonthlyParams",
    "PeriodParams",
    "PowerParams",
    "PowerProgress",
    "PurchaseParams",
    "RemoteOrder",
    "RemoteProgress",
    "RestDayParams",
    "RoundOutput",
    "SuspensionParams",
    "accepts_group_command",
    "local_time",
    "step",
]

ALL_ROUNDS = (1, 2, 3, 4, 5, 6, 7, 8)
# Power controls, highest precedence first.
POWER_MODES = ("float_down", "suspension", "rest_day", "period")
ENERGY_MODES = ("monthly", "purchase")
MODES = ("remote", *POWER_MODES, *ENERGY_MODES)
# Kinds of decision record.
KINDS = ("alarm", "alarm_off", "trip", "restore", "guarantee_on", "guarantee_off", "order", "ignored")

HALF_HOUR_S = 1800.0


# --------------------------------------------------------------------------------------------
# Validation helpers


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _int_in(where: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(f"{where} must be an integer from {lo} to {hi}, got {value!r}")


def _num_in(where: str, value: float, lo: float = -math.inf, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(f"{where} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        _fail(f"{where} must be from {lo:g} to {hi:g}, got {value!r}")


def _round_set(where: str, rounds: tuple[int, ...]) -> None:
    for r in rounds:
        _int_in(f"{where}: round", r, 1, 8)
    if len(set(rounds)) != len(rounds):
        _fail(f"{where}: round listed twice in {rounds!r}")


def _per_round(where: str, values: tuple[int, ...], lo: int, hi: int) -> None:
    if len(values) > 8:
        _fail(f"{where}: at most 8 values (rounds 1..8), got {len(values)}")
    for i, v in enumerate(values):
        _int_in(f"{where}[round {i + 1}]", v, lo, hi)


def _at(values: tuple[int, ...], rnd: int) -> int:
    """Per-round table lookup: missing entries are 0."""
    return values[rnd - 1] if rnd <= len(values) else 0


# --------------------------------------------------------------------------------------------
# Parameters (set by signed commands, stored by the agent)


@dataclass(frozen=True)
class RemoteOrder(Json):
    """The latest remote command for one round (遥控): ``action`` "trip" (跳闸) or "close"
    (允许合闸). A new order is one with a different ``issued_s``.

    ``alarm_delay_min`` 0..15: the alarm sounds this long before the trip (0 = trip at once).
    ``limit_half_hours`` 0..255: the round comes back this long after the trip (0 = until an
    allow-close)."""

    round: int
    action: str
    issued_s: float
    alarm_delay_min: int = 0
    limit_half_hours: int = 0

    def __post_init__(self) -> None:
        _int_in("RemoteOrder.round", self.round, 1, 8)
        if self.action not in ("trip", "close"):
            _fail(f"RemoteOrder.action must be 'trip' or 'close', got {self.action!r}")
        _num_in("RemoteOrder.issued_s", self.issued_s)
        _int_in("RemoteOrder.alarm_delay_min", self.alarm_delay_min, 0, 15)
        _int_in("RemoteOrder.limit_half_hours", self.limit_half_hours, 0, 255)


@dataclass(frozen=True)
class PowerParams(Json):
    """Shared by the power controls. ``rounds``: the rounds under power control (功控轮次),
    tripped lowest first. ``slide_min`` 1..60: power is the mean of 1-minute means over this
    window (功率控制滑差时间). ``alarm_min[i]`` 0..60: round i+1's alarm time before a trip
    (功控告警时间; missing = 0). ``max_off_min[i]``: rotation, a round off this long is swapped
    for another (0 or missing = never)."""

    rounds: tuple[int, ...] = ALL_ROUNDS
    slide_min: int = 1
    alarm_min: tuple[int, ...] = ()
    max_off_min: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _round_set("PowerParams.rounds", self.rounds)
        _int_in("PowerParams.slide_min", self.slide_min, 1, 60)
        _per_round("PowerParams.alarm_min", self.alarm_min, 0, 60)
        _per_round("PowerParams.max_off_min", self.max_off_min, 0, 24 * 60)


@dataclass(frozen=True)
class EnergyParams(Json):
    """Shared by monthly and purchased-energy control: ``rounds`` under energy control
    (电控轮次), tripped lowest first, one every ``interval_s`` (> 0) while over."""

    rounds: tuple[int, ...] = ALL_ROUNDS
    interval_s: float = 60.0

    def __post_init__(self) -> None:
        _round_set("EnergyParams.rounds", self.rounds)
        _num_in("EnergyParams.interval_s", self.interval_s, 1e-3)


@dataclass(frozen=True)
class PeriodParams(Json):
    """Period power control (时段功控). ``periods``: up to 8 (start_min, end_min) periods of the
    day, minutes since midnight, in order, not overlapping. ``schemes``: up to 3 tuples of one
    setpoint (kW, or None = not controlled) per period. ``scheme`` 1..3 selects one;
    ``periods_on`` lists the controlled periods (1-based, the period mask). Setpoint =
    scheme value × (100 + ``float_pct``) / 100, never below the protection floor."""

    enabled: bool = False
    periods: tuple[tuple[int, int], ...] = ()
    schemes: tuple[tuple[float | None, ...], ...] = ()
    scheme: int = 1
    periods_on: tuple[int, ...] = ()
    float_pct: float = 0.0

    def __post_init__(self) -> None:
        w = "PeriodParams"
        if len(self.periods) > 8:
            _fail(f"{w}.periods: at most 8 periods, got {len(self.periods)}")
        end = 0
        for i, (start, stop) in enumerate(self.periods):
            _int_in(f"{w}.periods[{i + 1}] start", start, 0, 1439)
            _int_in(f"{w}.periods[{i + 1}] end", stop, 1, 1440)
            if stop <= start:
                _fail(f"{w}.periods[{i + 1}]: end {stop} must be after start {start}")
            if start < end:
                _fail(f"{w}.periods[{i + 1}]: starts at {start}, before period {i} ends ({end});"
                      " periods must be in order and not overlap")
            end = stop
        if len(self.schemes) > 3:
            _fail(f"{w}.schemes: at most 3 schemes, got {len(self.schemes)}")
        for s, values in enumerate(self.schemes):
            if len(values) != len(self.periods):
                _fail(f"{w}.schemes[{s + 1}]: {len(values)} setpoints for {len(self.periods)} periods")
            for i, v in enumerate(values):
                if v is not None:
                    _num_in(f"{w}.schemes[{s + 1}][period {i + 1}]", v, 0.0)
        _int_in(f"{w}.scheme", self.scheme, 1, 3)
        for n in self.periods_on:
            _int_in(f"{w}.periods_on: period", n, 1, max(1, len(self.periods)))
        _num_in(f"{w}.float_pct", self.float_pct, -99.0, 99.0)
        if self.enabled and len(self.schemes) < self.scheme:
            _fail(f"{w}: scheme {self.scheme} is selected but only {len(self.schemes)} are defined")


@dataclass(frozen=True)
class RestDayParams(Json):
    """Rest-day control (厂休功控): ``setpoint_kw`` on ``weekdays`` (ISO: 1 = Monday .. 7 =
    Sunday) from ``start_min`` (minutes since midnight) for ``duration_half_hours``, within the
    day."""

    enabled: bool = False
    setpoint_kw: float = 0.0
    start_min: int = 0
    duration_half_hours: int = 48
    weekdays: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        w = "RestDayParams"
        _num_in(f"{w}.setpoint_kw", self.setpoint_kw, 0.0)
        _int_in(f"{w}.start_min", self.start_min, 0, 1439)
        _int_in(f"{w}.duration_half_hours", self.duration_half_hours, 1, 48)
        if self.start_min + 30 * self.duration_half_hours > 1440:
            _fail(f"{w}: start {self.start_min} min + {self.duration_half_hours} half-hours runs past"
                  " midnight; split it over two weekdays")
        for d in self.weekdays:
            _int_in(f"{w}.weekdays: day", d, 1, 7)
        if self.enabled and not self.weekdays:
            _fail(f"{w}: enabled with no weekday")


@dataclass(frozen=True)
class SuspensionParams(Json):
    """Business-suspension control (营业报停控): ``setpoint_kw`` from ``start`` to ``end``
    (local dates, both included)."""

    enabled: bool = False
    start: date | None = None
    end: date | None = None
    setpoint_kw: float = 0.0

    def __post_init__(self) -> None:
        w = "SuspensionParams"
        _num_in(f"{w}.setpoint_kw", self.setpoint_kw, 0.0)
        if self.enabled and (self.start is None or self.end is None):
            _fail(f"{w}: enabled without a start and an end date")
        if self.start is not None and self.end is not None and self.end < self.start:
            _fail(f"{w}: end {self.end} is before start {self.start}")


@dataclass(frozen=True)
class FloatDownParams(Json):
    """Current-power float-down control (当前功率下浮控), switched on at ``issued_s`` for
    ``control_half_hours``. Baseline = mean of the 1-minute means over ``window_min`` (定值滑差
    时间, 1..60) ending ``freeze_delay_min`` (0..60) after switch-on; setpoint = baseline ×
    (100 + ``k_pct``) / 100 (k negative = cut by k %). ``alarm_min``: its own per-round alarm
    times (missing = 0)."""

    enabled: bool = False
    issued_s: float = 0.0
    window_min: int = 15
    k_pct: float = 0.0
    freeze_delay_min: int = 0
    control_half_hours: int = 1
    alarm_min: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        w = "FloatDownParams"
        _num_in(f"{w}.issued_s", self.issued_s)
        _int_in(f"{w}.window_min", self.window_min, 1, 60)
        _num_in(f"{w}.k_pct", self.k_pct, -99.0, 99.0)
        _int_in(f"{w}.freeze_delay_min", self.freeze_delay_min, 0, 60)
        _int_in(f"{w}.control_half_hours", self.control_half_hours, 1, 255)
        _per_round(f"{w}.alarm_min", self.alarm_min, 0, 60)


@dataclass(frozen=True)
class MonthlyParams(Json):
    """Monthly energy control (月电控): alarm once this month's import reaches ``alarm_pct`` % of
    ``limit_kwh``; at the limit, trip the energy rounds one per interval."""

    enabled: bool = False
    limit_kwh: float = 0.0
    alarm_pct: float = 80.0

    def __post_init__(self) -> None:
        w = "MonthlyParams"
        _num_in(f"{w}.limit_kwh", self.limit_kwh, 0.0)
        _num_in(f"{w}.alarm_pct", self.alarm_pct, 0.0, 100.0)
        if self.enabled and self.limit_kwh <= 0:
            _fail(f"{w}: enabled with a limit of {self.limit_kwh:g} kWh; it must be > 0")


@dataclass(frozen=True)
class PurchaseParams(Json):
    """Purchased-energy (prepaid) control (购电控). The latest order: ``order_no`` (> the last
    applied one, else ignored; 0 = none yet), ``append`` (True: add the amount to what is
    left; False: refresh, what is left becomes the amount). ``unit``: ``"kwh"`` — the order
    is energy (``amount_kwh``, ``alarm_kwh``, ``trip_kwh``), counted down by the main meter's
    import register; ``"yuan"`` — money (``amount_yuan``, ``alarm_yuan``, ``trip_yuan``),
    counted down by what that energy costs under the tariff (the ledger's running cost).
    Alarm when what is left ≤ the alarm threshold; staged trips (one round per interval)
    while it is ≤ the trip threshold."""

    enabled: bool = False
    order_no: int = 0
    append: bool = True
    amount_kwh: float = 0.0
    alarm_kwh: float = 0.0
    trip_kwh: float = 0.0
    unit: str = "kwh"
    amount_yuan: float = 0.0
    alarm_yuan: float = 0.0
    trip_yuan: float = 0.0

    def __post_init__(self) -> None:
        w = "PurchaseParams"
        _int_in(f"{w}.order_no", self.order_no, 0, 2**53)
        if self.unit not in ("kwh", "yuan"):
            _fail(f"{w}.unit: expected \"kwh\" or \"yuan\", got {self.unit!r}")
        for u in ("kwh", "yuan"):
            _num_in(f"{w}.amount_{u}", getattr(self, f"amount_{u}"), 0.0)
            _num_in(f"{w}.alarm_{u}", getattr(self, f"alarm_{u}"))
            _num_in(f"{w}.trip_{u}", getattr(self, f"trip_{u}"))
        if self.alarm < self.trip:
            unit = "kWh" if self.unit == "kwh" else "yuan"
            _fail(f"{w}: alarm threshold {self.alarm:g} {unit} is below the trip "
                  f"threshold {self.trip:g} {unit}")

    @property
    def amount(self) -> float:
        return self.amount_yuan if self.unit == "yuan" else self.amount_kwh

    @property
    def alarm(self) -> float:
        return self.alarm_yuan if self.unit == "yuan" else self.alarm_kwh

    @property
    def trip(self) -> float:
        return self.trip_yuan if self.unit == "yuan" else self.trip_kwh


@dataclass(frozen=True)
class GuaranteeParams(Json):
    """Power guarantee (保电). ``on`` since ``issued_s`` for ``duration_half_hours`` (0 =
    until cleared). ``auto_after_h`` (0 = never, 1..255): guarantee automatically while the
    platform has not been heard from for this many hours."""

    on: bool = False
    issued_s: float = 0.0
    duration_half_hours: int = 0
    auto_after_h: int = 0

    def __post_init__(self) -> None:
        w = "GuaranteeParams"
        _num_in(f"{w}.issued_s", self.issued_s)
        _int_in(f"{w}.duration_half_hours", self.duration_half_hours, 0, 255)
        _int_in(f"{w}.auto_after_h", self.auto_after_h, 0, 255)


@dataclass(frozen=True)
class ModeParams(Json):
    """Everything the platform sets. ``floor_kw``: protection floor (保安定值), no power setpoint
    below it. ``restore_interval_s``: staggered restore, at most one round per interval.
    ``exclusion`` (剔除): group-addressed commands other than time sync are ignored (the
    command layer checks it, see :func:`accepts_group_command`)."""

    power: PowerParams = field(default_factory=PowerParams)
    energy: EnergyParams = field(default_factory=EnergyParams)
    floor_kw: float = 0.0
    restore_interval_s: float = 60.0
    remote: tuple[RemoteOrder, ...] = ()
    period: PeriodParams = field(default_factory=PeriodParams)
    rest_day: RestDayParams = field(default_factory=RestDayParams)
    suspension: SuspensionParams = field(default_factory=SuspensionParams)
    float_down: FloatDownParams = field(default_factory=FloatDownParams)
    monthly: MonthlyParams = field(default_factory=MonthlyParams)
    purchase: PurchaseParams = field(default_factory=PurchaseParams)
    guarantee: GuaranteeParams = field(default_factory=GuaranteeParams)
    exclusion: bool = False

    def __post_init__(self) -> None:
        _num_in("ModeParams.floor_kw", self.floor_kw, 0.0)
        _num_in("ModeParams.restore_interval_s", self.restore_interval_s, 0.0)
        rounds = [o.round for o in self.remote]
        if len(set(rounds)) != len(rounds):
            _fail(f"ModeParams.remote: more than one order for a round ({rounds!r}); keep the latest")


def accepts_group_command(params: ModeParams, *, time_sync: bool) -> bool:
    """Exclusion (剔除): while it is on, a group-addressed command is ignored unless it is a
    time synchronisation. Commands addressed to this terminal alone are not affected."""
    return time_sync or not params.exclusion


# --------------------------------------------------------------------------------------------
# Inputs and outputs of one cycle


def local_time(now_s: float, utc_offset_s: int) -> tuple[date, int]:
    """The local date and minute of the day at ``now_s`` for an explicit UTC offset
    (China: 8 * 3600). Calendar arithmetic only, no time-zone database."""
    t = datetime.fromtimestamp(math.floor(now_s) + utc_offset_s, tz=UTC)
    return t.date(), t.hour * 60 + t.minute


@dataclass(frozen=True)
class CycleInputs:
    """One control cycle. ``now_s``: unix seconds. ``local_date`` / ``minute_of_day``: the local
    calendar view of ``now_s`` (weekday derived from the date). ``site_kw``: site import power
    this cycle, None (or not finite) = no fresh reading. ``import_kwh``: the main meter's
    cumulative import register (None = not read). ``since_contact_s``: seconds since the
    platform was last heard from (None = unknown). ``rounds``: the rounds present, each with
    its total sheddable kW (None = unknown). ``spent_yuan``: what the main meter's import has
    cost so far, a running total that only grows (the energy ledger's; None = no tariff):
    a purchase order in money counts down with it."""

    now_s: float
    local_date: date
    minute_of_day: int
    site_kw: float | None
    import_kwh: float | None = None
    since_contact_s: float | None = 0.0
    rounds: Mapping[int, float | None] = field(default_factory=dict)
    spent_yuan: float | None = None

    def __post_init__(self) -> None:
        _num_in("CycleInputs.now_s", self.now_s)
        _int_in("CycleInputs.minute_of_day", self.minute_of_day, 0, 1439)
        for r, kw in self.rounds.items():
            _int_in("CycleInputs.rounds: round", r, 1, 8)
            if kw is not None:
                _num_in(f"CycleInputs.rounds[{r}] kW", kw, 0.0)
        if self.import_kwh is not None:
            _num_in("CycleInputs.import_kwh", self.import_kwh)
        if self.spent_yuan is not None:
            _num_in("CycleInputs.spent_yuan", self.spent_yuan)
        if self.since_contact_s is not None:
            _num_in("CycleInputs.since_contact_s", self.since_contact_s, 0.0)

    @property
    def weekday(self) -> int:
        """ISO weekday of ``local_date``: 1 = Monday .. 7 = Sunday."""
        return self.local_date.isoweekday()

    @property
    def power_kw(self) -> float | None:
        kw = self.site_kw
        return kw if kw is not None and math.isfinite(kw) else None


@dataclass(frozen=True)
class ModeDecision:
    """One record for the event log. ``kind``: see :data:`KINDS`. ``round``: None for
    terminal-wide records (energy alarms, guarantee, orders). ``power_kw``: site power at the
    moment (None if there was no fresh reading)."""

    kind: str
    mode: str
    round: int | None
    reason: str
    power_kw: float | None


@dataclass(frozen=True)
class RoundOutput:
    """The wanted state of one round: ``tripped`` (open) or closed, ``alarm`` on (a trip is
    coming), ``held_by``: the modes holding it tripped (empty while a released round waits
    for its staggered restore)."""

    round: int
    tripped: bool
    alarm: bool
    held_by: tuple[str, ...]


@dataclass(frozen=True)
class CycleOutputs:
    rounds: tuple[RoundOutput, ...]
    decisions: tuple[ModeDecision, ...]
    power_mode: str | None  # the running power control (None: none)
    setpoint_kw: float | None  # its setpoint, floor applied (None: not known yet)
    measured_kw: float | None  # its slide-window power since the last switch (None: not yet)
    guarantee: str  # "off", "manual" or "auto"
    excluded: bool
    energy_alarms: tuple[str, ...]  # "monthly" / "purchase" while their alarm is on
    month_used_kwh: float | None
    purchase_left_kwh: float | None  # what is left of the order, in purchase_unit
    purchase_unit: str = "kwh"

    @property
    def tripped(self) -> tuple[int, ...]:
        return tuple(r.round for r in self.rounds if r.tripped)

    @property
    def alarms(self) -> tuple[int, ...]:
        return tuple(r.round for r in self.rounds if r.alarm)


# --------------------------------------------------------------------------------------------
# State (persisted by the agent)


@dataclass
class RemoteProgress(Json):
    """A remote order being carried out: phase "alarm", "tripped" or "done"."""

    issued_s: float
    phase: str


@dataclass
class PowerProgress(Json):
    """The running power control. ``key`` names its activation (a new key = a reset)."""

    key: str | None = None
    mode: str | None = None
    armed_s: float = 0.0
    setpoint_kw: float | None = None
    baseline_kw: float | None = None
    alarm_round: int | None = None
    alarm_since_s: float | None = None
    rotate_out: int | None = None  # the alarm is for a rotation that replaces this round


@dataclass
class EnergyProgress(Json):
    armed: bool = False
    alarm: bool = False
    last_trip_s: float | None = None


@dataclass
class ModeState(Json):
    """What the machine remembers. ``tripped``: round -> when it was tripped (wanted open).
    ``holds``: round -> modes holding it tripped; a tripped round with no holder waits for its
    staggered restore (``pending`` says which mode released it and why). ``released``:
    rounds freed by a remote allow-close, per control ("power", "monthly", "purchase"), until
    that control re-arms. ``minute_means``: (minute index, mean kW) of the last two hours."""

    tripped: dict[int, float] = field(default_factory=dict)
    holds: dict[int, list[str]] = field(default_factory=dict)
    pending: dict[int, tuple[str, str]] = field(default_factory=dict)
    released: dict[str, list[int]] = field(default_factory=dict)
    last_restore_s: float | None = None
    last_switch_s: float | None = None
    remote: dict[int, RemoteProgress] = field(default_factory=dict)
    power: PowerProgress = field(default_factory=PowerProgress)
    minute: int | None = None
    minute_sum: float = 0.0
    minute_n: int = 0
    minute_means: list[tuple[int, float]] = field(default_factory=list)
    month: str | None = None
    month_start_kwh: float | None = None
    monthly: EnergyProgress = field(default_factory=EnergyProgress)
    order_no: int = 0
    order_left_kwh: float | None = None  # left when the order was applied (in order_unit)
    order_at_kwh: float | None = None  # the counter then: the import register, or spent_yuan
    order_refused: int = 0
    order_unit: str = "kwh"
    purchase: EnergyProgress = field(default_factory=EnergyProgress)
    guarantee: str = "off"


_KEEP_MINUTES = 120


def _fmt(kw: float | None) -> str:
    return "?" if kw is None else f"{kw:.1f}"


# --------------------------------------------------------------------------------------------
# The machine


class _Cycle:
    """One step's working context over a private copy of the state."""

    def __init__(self, params: ModeParams, state: ModeState, inputs: CycleInputs) -> None:
        self.p = params
        self.st = copy.deepcopy(state)
        self.inp = inputs
        self.now = float(inputs.now_s)
        self.kw = inputs.power_kw
        self.present = dict(inputs.rounds)
        self.out: list[ModeDecision] = []
        self.measured: float | None = None

    # -- records and round bookkeeping --------------------------------------------------------

    def rec(self, kind: str, mode: str, rnd: int | None, reason: str) -> None:
        self.out.append(ModeDecision(kind, mode, rnd, reason, self.kw))

    def held(self, rnd: int) -> list[str]:
        return self.st.holds.get(rnd, [])

    def released(self, key: str) -> list[int]:
        return self.st.released.setdefault(key, [])

    def hold(self, rnd: int, mode: str, reason: str) -> None:
        """``mode`` wants ``rnd`` tripped; trip it if it is not yet (a trip record)."""
        modes = self.st.holds.setdefault(rnd, [])
        if mode not in modes:
            modes.append(mode)
            modes.sort()
        self.st.pending.pop(rnd, None)
        if rnd not in self.st.tripped:
            self.st.tripped[rnd] = self.now
            self.st.last_switch_s = self.now
            self.rec("trip", mode, rnd, reason)

    def unhold(self, rnd: int, mode: str, why: str) -> None:
        """``mode`` lets go of ``rnd``; with no holder left it waits for a staggered restore."""
        modes = self.st.holds.get(rnd)
        if not modes or mode not in modes:
            return
        modes.remove(mode)
        if not modes:
            del self.st.holds[rnd]
            if rnd in self.st.tripped:
                self.st.pending[rnd] = (mode, why)

    def restore_now(self, rnd: int, mode: str, reason: str) -> None:
        """Close ``rnd`` this cycle whatever holds it (allow-close, guarantee, rotation)."""
        self.st.holds.pop(rnd, None)
        self.st.pending.pop(rnd, None)
        if self.st.tripped.pop(rnd, None) is not None:
            self.st.last_switch_s = self.now
            self.rec("restore", mode, rnd, reason)

    def holders_of(self, mode: str) -> list[int]:
        return sorted(r for r, m in self.st.holds.items() if mode in m)

    # -- power measurement ----------------------------------------------------------------------

    def sample(self) -> None:
        st, minute = self.st, math.floor(self.now / 60.0)
        if st.minute is not None and minute != st.minute:
            if st.minute_n > 0:
                st.minute_means.append((st.minute, st.minute_sum / st.minute_n))
            st.minute_sum, st.minute_n = 0.0, 0
        if st.minute is None or minute != st.minute:
            st.minute = minute
            st.minute_means = [(k, m) for k, m in st.minute_means if minute - _KEEP_MINUTES <= k < minute]
        if self.kw is not None:
            st.minute_sum += self.kw
            st.minute_n += 1

    def mean_over(self, lo_min: int, hi_min: int, since_s: float | None = None) -> float | None:
        """Mean of the 1-minute means with index in [lo_min, hi_min) that started after ``since_s``
        (a minute that starts at a switch holds the reading taken before it)."""
        vals = [m for k, m in self.st.minute_means
                if lo_min <= k < hi_min and (since_s is None or k * 60.0 > since_s)]
        return sum(vals) / len(vals) if vals else None

    def window_power(self, since_s: float | None) -> float | None:
        cur = math.floor(self.now / 60.0)
        return self.mean_over(cur - self.p.power.slide_min, cur, since_s)

    def fit_power(self) -> float | None:
        """Power for a restore check: the larger of this reading and the recent window."""
        if self.kw is None:
            return None
        recent = self.window_power(self.st.last_switch_s)
        return self.kw if recent is None else max(self.kw, recent)

    # -- guarantee ------------------------------------------------------------------------------

    def guarantee(self) -> bool:
        g, st = self.p.guarantee, self.st
        manual = g.on and self.now >= g.issued_s and (
            g.duration_half_hours == 0 or self.now < g.issued_s + g.duration_half_hours * HALF_HOUR_S)
        since = self.inp.since_contact_s
        auto = g.auto_after_h > 0 and since is not None and since >= g.auto_after_h * 3600.0
        new = "manual" if manual else "auto" if auto else "off"
        if new != st.guarantee:
            if new == "off":
                self.rec("guarantee_off", "guarantee", None,
                         "power guarantee ended" if st.guarantee == "manual"
                         else "platform contact restored: automatic guarantee ended")
            elif new == "manual":
                until = ("until cleared" if g.duration_half_hours == 0
                         else f"for {g.duration_half_hours * 0.5:g} h")
                self.rec("guarantee_on", "guarantee", None, f"power guarantee on {until}")
            else:
                self.rec("guarantee_on", "guarantee", None,
                         f"no platform contact for {since:.0f} s (>= {g.auto_after_h} h):"
                         " automatic power guarantee")
            st.guarantee = new
        return new != "off"

    def force_close(self) -> None:
        st = self.st
        for rnd, prog in st.remote.items():
            if prog.phase == "alarm":
                self.rec("alarm_off", "remote", rnd, "power guarantee: remote trip cancelled")
            prog.phase = "done"
        for rnd, order in self.new_remote_orders():
            self.rec("ignored", "remote", rnd, f"remote {order.action} ignored: power guarantee")
            st.remote[rnd] = RemoteProgress(order.issued_s, "done")
        self.reset_power(None, None, "power guarantee")
        for mode in ENERGY_MODES:
            prog = getattr(st, mode)
            if prog.alarm:
                self.rec("alarm_off", mode, None, "power guarantee")
            prog.alarm, prog.last_trip_s = False, None
        for rnd in sorted(st.tripped):
            self.restore_now(rnd, "guarantee", "power guarantee: all rounds allowed to close")

    # -- remote control -------------------------------------------------------------------------

    def new_remote_orders(self) -> list[tuple[int, RemoteOrder]]:
        return [(o.round, o) for o in self.p.remote if o.issued_s <= self.now
                and ((prog := self.st.remote.get(o.round)) is None or prog.issued_s != o.issued_s)]

    def remote(self) -> None:
        st = self.st
        orders = {o.round: o for o in self.p.remote}
        for rnd in sorted(set(orders) | set(st.remote)):
            order, prog = orders.get(rnd), st.remote.get(rnd)
            if order is not None and order.issued_s > self.now:
                continue  # stamped later than this cycle: not yet in force
            if prog is not None and (order is None or order.issued_s != prog.issued_s):
                # withdrawn or superseded: end what the old order was doing
                if prog.phase == "alarm":
                    self.rec("alarm_off", "remote", rnd, "remote trip withdrawn")
                self.unhold(rnd, "remote", "remote order withdrawn")
                if order is None:
                    del st.remote[rnd]
                    continue
                prog = None
            assert order is not None
            trip_at = order.issued_s + order.alarm_delay_min * 60.0
            ends_at = (trip_at + order.limit_half_hours * HALF_HOUR_S
                       if order.limit_half_hours else math.inf)
            if prog is None:
                prog = st.remote[rnd] = RemoteProgress(order.issued_s, "done")
                if order.action == "close":
                    self.allow_close(rnd)
                    continue
                if rnd not in self.present:
                    self.rec("ignored", "remote", rnd, f"remote trip of round {rnd}: no such round")
                    continue
                if self.now >= ends_at:
                    self.rec("ignored", "remote", rnd, "remote trip arrived after its limit time")
                    continue
                prog.phase = "alarm"
                if self.now < trip_at:
                    self.rec("alarm", "remote", rnd,
                             f"remote trip in {order.alarm_delay_min} min")
            if prog.phase == "alarm" and rnd not in self.present:
                prog.phase = "done"
                self.rec("alarm_off", "remote", rnd, f"remote trip of round {rnd}: no longer configured")
            if prog.phase == "alarm" and self.now >= trip_at:
                prog.phase = "tripped"
                until = (f"for {order.limit_half_hours * 0.5:g} h" if order.limit_half_hours
                         else "until allowed to close")
                self.hold(rnd, "remote", f"remote trip {until}")
            if prog.phase == "tripped" and self.now >= ends_at:
                prog.phase = "done"
                self.unhold(rnd, "remote", f"remote limit time of {order.limit_half_hours * 0.5:g} h over")

    def allow_close(self, rnd: int) -> None:
        """Remote allow-close: release ``rnd`` from every mode now; the controls that held it
        leave it alone until they re-arm."""
        st = self.st
        for mode in self.held(rnd):
            key = "power" if mode in POWER_MODES else mode if mode in ENERGY_MODES else None
            if key is not None and rnd not in self.released(key):
                self.released(key).append(rnd)
        if st.power.alarm_round == rnd:
            self.rec("alarm_off", st.power.mode or "power", rnd, "remote allow close")
            st.power.alarm_round = st.power.alarm_since_s = st.power.rotate_out = None
        if rnd in st.tripped:
            self.restore_now(rnd, "remote", "remote allow close")
        else:
            self.rec("ignored", "remote", rnd, "remote allow close: round not tripped")

    # -- power control --------------------------------------------------------------------------

    def active_power(self) -> tuple[str | None, str | None, float | None, str]:
        """(mode, activation key, raw setpoint kW, detail) of the power control that runs."""
        p, d, minute = self.p, self.inp.local_date, self.inp.minute_of_day
        fd = p.float_down
        if fd.enabled and fd.issued_s <= self.now < fd.issued_s + fd.control_half_hours * HALF_HOUR_S:
            return "float_down", f"float_down@{fd.issued_s:.0f}", None, ""
        su = p.suspension
        if su.enabled and su.start is not None and su.end is not None and su.start <= d <= su.end:
            return "suspension", f"suspension@{su.start}..{su.end}", su.setpoint_kw, ""
        rd = p.rest_day
        if (rd.enabled and self.inp.weekday in rd.weekdays
                and rd.start_min <= minute < rd.start_min + 30 * rd.duration_half_hours):
            return "rest_day", f"rest_day@{d}", rd.setpoint_kw, ""
        pe = p.period
        if pe.enabled:
            for i, (start, stop) in enumerate(pe.periods):
                if start <= minute < stop:
                    value = pe.schemes[pe.scheme - 1][i]
                    if i + 1 in pe.periods_on and value is not None:
                        return ("period", f"period@{d}#{i + 1}", value * (100.0 + pe.float_pct) / 100.0,
                                f" (period {i + 1}, scheme {pe.scheme})")
                    break
        return None, None, None, ""

    def reset_power(self, mode: str | None, key: str | None, why: str) -> None:
        st, pw = self.st, self.st.power
        if pw.alarm_round is not None:
            self.rec("alarm_off", pw.mode or "power", pw.alarm_round, why)
        if pw.mode is not None:
            for rnd in self.holders_of(pw.mode):
                self.unhold(rnd, pw.mode, why)
        st.released["power"] = []
        st.power = PowerProgress(key=key, mode=mode, armed_s=self.now)

    def float_baseline(self) -> float | None:
        fd, pw = self.p.float_down, self.st.power
        if pw.baseline_kw is None:
            freeze_at = fd.issued_s + fd.freeze_delay_min * 60.0
            if self.now < freeze_at:
                return None
            fm, cur, win = math.floor(freeze_at / 60.0), math.floor(self.now / 60.0), fd.window_min
            base = self.mean_over(fm - win, fm)
            if base is None and cur > fm + win:  # no history before: the first full window after
                base = self.mean_over(cur - win, cur, freeze_at)
            pw.baseline_kw = base
        if pw.baseline_kw is None:
            return None
        return pw.baseline_kw * (100.0 + fd.k_pct) / 100.0

    def alarm_time_s(self, mode: str, rnd: int) -> float:
        table = self.p.float_down.alarm_min if mode == "float_down" else self.p.power.alarm_min
        return _at(table, rnd) * 60.0

    def next_power_round(self, mode: str) -> int | None:
        """The lowest controlled round this control does not hold yet; rounds already off for
        another reason are adopted on the way (held, nothing switches)."""
        released = self.released("power")
        for rnd in sorted(self.p.power.rounds):
            if rnd not in self.present or mode in self.held(rnd) or rnd in released:
                continue
            if rnd in self.st.tripped:
                self.hold(rnd, mode, "")
                continue
            return rnd
        return None

    def rotation_candidate(self, mode: str) -> tuple[int, int] | None:
        """(round to swap out, round to trip in its place) when a round held only by this
        control has been off for its maximum off time and another can take its place."""
        st, released = self.st, self.released("power")
        due = [r for r in self.holders_of(mode)
               if self.held(r) == [mode] and _at(self.p.power.max_off_min, r) > 0
               and self.now - st.tripped.get(r, self.now) >= _at(self.p.power.max_off_min, r) * 60.0]
        for out in sorted(due, key=lambda r: (st.tripped[r], r)):
            out_kw = self.present.get(out)
            for rnd in sorted(self.p.power.rounds):
                if (rnd in self.present and rnd not in st.tripped and rnd not in released
                        and (out_kw is None or (kw := self.present[rnd]) is None or kw >= out_kw)):
                    return out, rnd
        return None

    def power_control(self) -> tuple[str | None, float | None]:
        st = self.st
        mode, key, raw, detail = self.active_power()
        if key != st.power.key:
            prev = st.power.mode
            why = ("" if prev is None else f"{prev} control ended" if mode is None
                   else f"{prev} control reset ({key})" if mode == prev
                   else f"{mode} control takes over from {prev} control")
            self.reset_power(mode, key, why)
        pw = st.power
        if mode is None:
            return None, None
        if mode == "float_down":
            raw = self.float_baseline()
        setpoint = None if raw is None else max(raw, self.p.floor_kw)
        pw.setpoint_kw = setpoint
        since = pw.armed_s if st.last_switch_s is None else max(pw.armed_s, st.last_switch_s)
        measured = self.measured = self.window_power(since)

        # drop an alarm whose round is no longer a candidate
        if pw.alarm_round is not None:
            rnd, swap = pw.alarm_round, pw.rotate_out
            ok = (rnd in self.present and rnd not in st.tripped and rnd not in self.released("power")
                  and (swap is None or self.held(swap) == [mode]))
            if not ok:
                self.rec("alarm_off", mode, rnd, "round no longer to be tripped")
                pw.alarm_round = pw.alarm_since_s = pw.rotate_out = None
        ready = setpoint is not None and self.now >= pw.armed_s + self.p.power.slide_min * 60.0
        if not ready:
            return mode, setpoint
        assert setpoint is not None
        over = measured is not None and measured > setpoint
        if pw.alarm_round is not None and pw.rotate_out is None and measured is not None and not over:
            self.rec("alarm_off", mode, pw.alarm_round,
                     f"{_fmt(measured)} kW back under setpoint {setpoint:.1f} kW")
            pw.alarm_round = pw.alarm_since_s = None
        if over and pw.alarm_round is None:
            nxt = self.next_power_round(mode)
            if nxt is not None:
                pw.alarm_round, pw.alarm_since_s = nxt, self.now
                if self.alarm_time_s(mode, nxt) > 0:
                    self.rec("alarm", mode, nxt,
                             f"{mode} control: {measured:.1f} kW > setpoint {setpoint:.1f} kW{detail};"
                             f" trip in {self.alarm_time_s(mode, nxt) / 60:g} min")
        if pw.alarm_round is None and (pair := self.rotation_candidate(mode)) is not None:
            leaving, coming = pair
            pw.alarm_round, pw.alarm_since_s, pw.rotate_out = coming, self.now, leaving
            if self.alarm_time_s(mode, coming) > 0:
                self.rec("alarm", mode, coming, f"rotation: round {coming} to replace round "
                         f"{leaving} in {self.alarm_time_s(mode, coming) / 60:g} min")
        alarmed = pw.alarm_round
        if alarmed is None or pw.alarm_since_s is None:
            return mode, setpoint
        rnd = alarmed
        if self.now < pw.alarm_since_s + self.alarm_time_s(mode, rnd):
            return mode, setpoint
        if pw.rotate_out is not None:
            out = pw.rotate_out
            off_min = (self.now - st.tripped[out]) / 60.0
            self.hold(rnd, mode, f"rotation: replaces round {out}, off {off_min:.0f} min")
            self.restore_now(out, mode, f"rotation: off {off_min:.0f} min (max"
                             f" {_at(self.p.power.max_off_min, out)} min), round {rnd} tripped instead")
            pw.alarm_round = pw.alarm_since_s = pw.rotate_out = None
        elif over:
            self.hold(rnd, mode, f"{mode} control: {measured:.1f} kW > setpoint {setpoint:.1f} kW{detail}")
            pw.alarm_round = pw.alarm_since_s = None
        return mode, setpoint

    # -- energy controls ------------------------------------------------------------------------

    def track_month(self) -> None:
        st, d = self.st, self.inp.local_date
        key = f"{d.year:04d}-{d.month:02d}"
        if st.month != key:
            if st.month is not None:
                self.energy_reset("monthly", f"new month {key}")
            st.month, st.month_start_kwh = key, self.inp.import_kwh
        elif st.month_start_kwh is None:
            st.month_start_kwh = self.inp.import_kwh

    def month_used(self) -> float | None:
        e, start = self.inp.import_kwh, self.st.month_start_kwh
        return None if e is None or start is None else e - start

    def counter(self, unit: str) -> float | None:
        """What an order in ``unit`` counts down with: the import register (kWh) or the
        running cost (yuan)."""
        return self.inp.spent_yuan if unit == "yuan" else self.inp.import_kwh

    def apply_order(self) -> None:
        pp, st = self.p.purchase, self.st
        if pp.order_no in (0, st.order_no, st.order_refused):
            return
        if pp.order_no < st.order_no:  # a replayed or stale order never adds energy twice
            st.order_refused = pp.order_no
            self.rec("ignored", "purchase", None,
                     f"purchase order {pp.order_no} is not newer than order {st.order_no}")
            return
        e = self.counter(pp.unit)
        if e is None:
            return  # applied once the meter is read (or the tariff prices it)
        unit, dp = ("元", 2) if pp.unit == "yuan" else ("kWh", 1)
        left = self.purchase_left() if st.order_unit == pp.unit else None
        if pp.append and left is not None:
            new_left, how = left + pp.amount, f"appended {pp.amount:g} {unit} to {left:.{dp}f}"
        else:
            new_left, how = pp.amount, f"refreshed to {pp.amount:g} {unit}"
        st.order_no, st.order_left_kwh, st.order_at_kwh = pp.order_no, new_left, e
        st.order_unit = pp.unit
        self.released("purchase").clear()
        self.rec("order", "purchase", None,
                 f"purchase order {pp.order_no}: {how}, {new_left:.{dp}f} {unit} left")

    def purchase_left(self) -> float | None:
        """What is left of the order (in its unit)."""
        st = self.st
        e = self.counter(st.order_unit)
        if st.order_left_kwh is None or st.order_at_kwh is None or e is None:
            return None
        return st.order_left_kwh - (e - st.order_at_kwh)

    def energy_reset(self, mode: str, why: str) -> None:
        prog: EnergyProgress = getattr(self.st, mode)
        if prog.alarm:
            self.rec("alarm_off", mode, None, why)
        for rnd in self.holders_of(mode):
            self.unhold(rnd, mode, why)
        prog.alarm, prog.last_trip_s = False, None
        self.st.released[mode] = []

    def energy_control(self, mode: str, enabled: bool, alarm: bool | None, over: bool | None,
                       what: str) -> None:
        prog: EnergyProgress = getattr(self.st, mode)
        if not enabled:
            if prog.armed:
                self.energy_reset(mode, f"{mode} control switched off")
                prog.armed = False
            return
        if not prog.armed:
            prog.armed = True
            self.st.released[mode] = []
        if alarm is None or over is None:
            return  # no meter reading: hold everything as it is
        if alarm != prog.alarm:
            self.rec("alarm" if alarm else "alarm_off", mode, None, what)
            prog.alarm = alarm
        if not over:
            if self.holders_of(mode):
                for rnd in self.holders_of(mode):
                    self.unhold(rnd, mode, what)
            prog.last_trip_s = None
            return
        if prog.last_trip_s is not None and self.now - prog.last_trip_s < self.p.energy.interval_s:
            return
        released = self.released(mode)
        for rnd in sorted(self.p.energy.rounds):
            if rnd not in self.present or mode in self.held(rnd) or rnd in released:
                continue
            tripped = rnd in self.st.tripped
            self.hold(rnd, mode, f"{mode} control: {what}")
            if not tripped:
                prog.last_trip_s = self.now
                return

    def monthly(self) -> None:
        mp = self.p.monthly
        used = self.month_used()
        alarm = over = None
        what = ""
        if used is not None:
            alarm = used >= mp.limit_kwh * mp.alarm_pct / 100.0
            over = used >= mp.limit_kwh
            what = f"{used:.1f} kWh used this month of {mp.limit_kwh:g} kWh"
        self.energy_control("monthly", mp.enabled, alarm, over, what)

    def purchase(self) -> None:
        pp = self.p.purchase
        left = self.purchase_left()
        alarm = over = None
        what = ""
        if left is not None and self.st.order_unit == pp.unit:
            unit, dp = ("元", 2) if pp.unit == "yuan" else ("kWh", 1)
            alarm, over = left <= pp.alarm, left <= pp.trip
            what = f"{left:.{dp}f} {unit} left (alarm at {pp.alarm:g}, trip at {pp.trip:g})"
        self.energy_control("purchase", pp.enabled, alarm, over, what)

    # -- restore ----------------------------------------------------------------------------------

    def staggered_restore(self, mode: str | None, setpoint: float | None) -> None:
        """At most one round per restore interval, in strict reverse trip order (highest round
        first), and, while a power control runs, only when the site power plus the round's kW
        stays under its setpoint. Candidates: released rounds (no holder), and rounds held only
        by the running power control (power has fallen). The first candidate that does not fit
        makes the others wait."""
        st = self.st
        if st.last_restore_s is not None and self.now - st.last_restore_s < self.p.restore_interval_s:
            return
        pfit = self.fit_power()
        for rnd in sorted(st.tripped, reverse=True):
            kw = self.present.get(rnd)
            holders = self.held(rnd)
            own = mode is not None and holders == [mode] and rnd != st.power.rotate_out
            if holders and not own:
                continue  # held by remote or energy control, or rotating: not ours to restore
            if mode is None:
                by, why = st.pending.get(rnd, ("restore", "released"))
                self.restore_now(rnd, by, f"{why}; staggered restore")
            else:
                if setpoint is None or pfit is None or (own and kw is None):
                    return
                if pfit + (kw or 0.0) >= setpoint:
                    return
                fits = f"{pfit:.1f} + {_fmt(kw)} kW < setpoint {setpoint:.1f} kW"
                if own:
                    self.restore_now(rnd, mode, f"power fell: {fits}")
                else:
                    by, why = st.pending.get(rnd, ("restore", "released"))
                    self.restore_now(rnd, by, f"{why}; staggered restore: {fits}")
            st.last_restore_s = self.now
            return

    # -- the cycle --------------------------------------------------------------------------------

    def drop_absent(self) -> None:
        for rnd in sorted(set(self.st.tripped) | set(self.st.holds)):
            if rnd not in self.present:
                self.st.holds.pop(rnd, None)
                if rnd in self.st.tripped:
                    self.restore_now(rnd, "config", f"round {rnd} is no longer configured")
        pw = self.st.power
        if pw.alarm_round is not None and pw.alarm_round not in self.present:
            self.rec("alarm_off", pw.mode or "power", pw.alarm_round, "round no longer configured")
            pw.alarm_round = pw.alarm_since_s = pw.rotate_out = None

    def run(self) -> CycleOutputs:
        st = self.st
        self.sample()
        self.drop_absent()
        self.track_month()
        self.apply_order()
        mode: str | None = None
        setpoint: float | None = None
        if self.guarantee():
            self.force_close()
        else:
            self.remote()
            mode, setpoint = self.power_control()
            self.monthly()
            self.purchase()
            self.staggered_restore(mode, setpoint)
        alarms = {r for r, prog in st.remote.items() if prog.phase == "alarm"}
        if st.power.alarm_round is not None:
            alarms.add(st.power.alarm_round)
        rounds = tuple(RoundOutput(r, r in st.tripped, r in alarms, tuple(self.held(r)))
                       for r in sorted(self.present))
        return CycleOutputs(
            rounds=rounds,
            decisions=tuple(self.out),
            power_mode=mode,
            setpoint_kw=setpoint,
            measured_kw=self.measured,
            guarantee=st.guarantee,
            excluded=self.p.exclusion,
            energy_alarms=tuple(m for m in ENERGY_MODES if getattr(st, m).alarm),
            month_used_kwh=self.month_used(),
            purchase_left_kwh=self.purchase_left(),
            purchase_unit=st.order_unit,
        )


def step(params: ModeParams, state: ModeState | None, inputs: CycleInputs) -> tuple[ModeState, CycleOutputs]:
    """One control cycle: the new state and what to do. ``state`` None = a fresh terminal.

    Persist the returned state *before* switching the relays its decisions ask for, so that a
    crash between the two ends, after a restart, with the relays driven to the persisted
    wanted state (nothing tripped twice, nothing left off)."""
    cycle = _Cycle(params, state if state is not None else ModeState(), inputs)
    out = cycle.run()
    return cycle.st, out
