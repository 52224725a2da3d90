"""MQTT payloads: the contract between a terminal and the platform (see docs/mqtt.md).

Every payload is JSON. The JSON Schemas in docs/schemas/ are generated from these models
(`lmt schemas --out docs/schemas`); a test fails when they are stale.

Records are stored in the buffer without ``seq`` (the buffer puts it first when it publishes
them): build them with :func:`reading_body`, :func:`event_body` and :func:`result_body`, which
validate against :class:`ReadingBody`, :class:`EventBody` and :class:`ResultBody`; the
published :class:`Reading`, :class:`Event` and :class:`Result` are those plus ``seq``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

CONTRACT_VERSION = 1
MAX_DURATION_S = 7 * 86400

TerminalId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
CommandId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
LoadName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")]


def _unique_loads(loads: list[str] | None) -> None:
    if loads is not None and len(set(loads)) != len(loads):
        raise ValueError("loads names a load twice")


_LOADS_DESCRIPTION = ("shed only these loads (names of the terminal's [[loads]]); default: any "
                      "load that is not critical. An unknown, critical or repeated load refuses "
                      "the command (invalid)")


def _loads_field() -> Any:
    return Field(default=None, min_length=1, max_length=256, description=_LOADS_DESCRIPTION,
                 json_schema_extra={"uniqueItems": True})


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- terminal -> platform ------------------------------------------------------------------
class Status(_Msg):
    """Retained on ``<prefix>/<terminal>/status``; the offline form is also the last will."""

    terminal: TerminalId
    online: bool
    ts: float = Field(description="unix time (s) the status was made")
    version: str = Field(description="lmt-edge version")
    contract: int = CONTRACT_VERSION
    config_hash: str = Field(description="sha256 of the agent configuration file")
    devices: list[str] = Field(default_factory=list)
    session: int = Field(description="agent start time in ms: changes on every start, so an old "
                                     "death certificate can be told from a new one")
    connection: int = Field(default=0, ge=0,
                            description="MQTT connection attempt of this session (1, 2, ...): the "
                                        "last will carries the number of the connection it was "
                                        "registered with, like Sparkplug's bdSeq")
    flags: list[Literal["buffer_unwritable"]] = Field(
        default_factory=list,
        description="what is degraded: buffer_unwritable — the buffer file cannot be written "
                    "(the disk is full): readings wait in memory")


class _Seq(_Msg):
    # first base of the published records, so that ``seq`` stays their first field
    seq: int = Field(ge=1)


# -- record bodies: what the agent stores, before the buffer numbers them -----------------
class _Body(_Msg):
    # a body is JSON: NaN or an infinity is not a number there
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ReadingBody(_Body):
    ts: float = Field(description="unix time (s) of the read")
    device: str
    values: dict[str, float | bool | None] = Field(
        description="point values in the units their names say; null = not a number (invalid)")


Phase = Literal["l1", "l2", "l3"]
Quality = Literal["clock_step", "register_reset", "register_rollover", "gap", "estimated",
                  "complete"]
EnergySource = Literal["register", "integrated", "none"]


class PhaseStats(_Body):
    min: float
    mean: float
    max: float


class MonthDemand(_Body):
    kw: float = Field(description="the month's maximum demand so far: the highest mean power "
                                  "over a demand window")
    at: float | None = Field(description="unix time (s) that window ended")
    month: str = Field(description="the local month, YYYY-MM")
    mode: Literal["block", "sliding"]
    minutes: int = Field(description="the demand window")


class PricedPiece(_Body):
    period: str = Field(description="the tariff period: critical, peak, flat, valley, "
                                    "deep_valley")
    kwh: float
    price: float = Field(description="yuan per kWh")
    cost: float = Field(description="yuan")


class IntervalBody(_Body):
    """An interval record (stream ``intervals``): see docs/ledger.md."""

    ts: float = Field(description="unix time (s) the interval ended (= end)")
    kind: Literal["meter"] = "meter"
    meter: str
    start: float = Field(description="unix time (s), on a wall-clock boundary")
    end: float
    minutes: Literal[1, 5, 15, 30, 60]
    import_kwh: float | None = Field(description="the import register's difference across the "
                                                 "interval; null when not known")
    export_kwh: float | None
    source: dict[Literal["import", "export"], EnergySource] = Field(
        description="register: from the register; integrated: from the power readings "
                    "(estimated); none: not known")
    mean_kw: float | None = Field(description="import_kwh over the interval's hours")
    max_kw: float | None = Field(description="the highest one-minute mean power within it")
    voltage_v: dict[Phase, PhaseStats] | None
    current_a: dict[Phase, PhaseStats] | None
    power_factor: float | None
    coverage: float = Field(ge=0, le=1, description="the share of the interval with readings")
    readings: int = Field(ge=0)
    quality: Quality = Field(description="the worst of flags; complete when none")
    flags: list[Quality]
    month_max_demand: MonthDemand | None
    tariff: str | None = Field(default=None, description="the tariff id that priced it")
    period: str | None = Field(default=None, description="its tariff period (mixed: see pieces)")
    pieces: list[PricedPiece] = Field(default_factory=list)
    cost: float | None = Field(default=None, description="yuan: the energy cost of import_kwh")
    kgco2: float | None = Field(default=None, description="kg CO2 of import_kwh")
    export_kgco2: float | None = Field(default=None, description="kg CO2 of export_kwh, "
                                                                 "reported separately")
    factor: str | None = Field(default=None, description="the emission factor used (its id)")
    balance: dict[str, Any] | None = Field(default=None,
                                           description="prepaid balance (the billing meter)")


class LossBody(_Body):
    """A loss group's interval (stream ``intervals``, ``kind: "loss"``): main − Σ sub."""

    ts: float
    kind: Literal["loss"]
    group: str
    start: float
    end: float
    main: str
    main_kwh: float | None
    subs: dict[str, float | None]
    sub_kwh: float | None
    loss_kwh: float | None = Field(description="main_kwh − sub_kwh")
    loss_pct: float | None = Field(description="loss_kwh in % of main_kwh")
    status: Literal["over", "within", "low_load", "missing"]
    exceeded: bool | None = Field(description="null: not judged (low load, a member missing)")
    missing: dict[str, str] = Field(description="the members not judged, and why")
    intervals_over: int
    intervals_under: int
    active: bool = Field(description="the group's loss alarm is on after this interval")


class BillBody(_Body):
    """A bill (stream ``bills``): a day's or a month's, so far or final; see docs/ledger.md."""

    ts: float
    meter: str
    kind: Literal["day", "month"]
    label: str = Field(description="the local day (YYYY-MM-DD) or month (YYYY-MM)")
    final: bool = Field(description="true once the day or month has ended")
    bill: dict[str, Any]


EventType = Literal[
    "agent_started",
    "device_offline", "device_online", "points_failed", "points_recovered",
    "control_started", "control_ended", "control_record",
    "load_shed", "load_restored", "load_adjusted", "switch_failed", "load_unresponsive",
    "cap_unmet", "control_fault", "ledger_fault",
    # the energy ledger (docs/ledger.md)
    "balance_low", "loss_exceeded", "loss_cleared", "theft_indicator", "theft_indicator_cleared",
    "tariff_changed", "carbon_curve_changed",
    "optout_ignored", "commands_dropped",
    "telemetry_dropped", "buffer_full", "buffer_unwritable", "buffer_writable",
    # terminal control modes: mode_<kind> for kind in lmt.control.modes.KINDS, and the record
    "mode_alarm", "mode_alarm_off", "mode_trip", "mode_restore", "mode_guarantee_on",
    "mode_guarantee_off", "mode_order", "mode_ignored", "mode_record"]
"""Every event type the agent emits (docs/mqtt.md, "Events", says what each one's data has)."""


class EventBody(_Body):
    ts: float
    type: EventType = Field(description="what happened: see docs/mqtt.md, Events")
    data: dict[str, Any] = Field(default_factory=dict)


ResultStatus = Literal["accepted", "rejected", "executed", "completed", "cancelled",
                       "superseded", "failed",
                       # demand-response event states (command_id = the event id)
                       "received", "scheduled", "active", "opted_out", "expired"]
RejectReason = Literal["malformed", "bad_signature", "invalid", "wrong_terminal", "expired",
                       "not_yet_valid", "replayed", "unknown_target", "unavailable"]


class ResultBody(_Body):
    ts: float
    command_id: str | None = Field(description="null when the command had no readable id")
    status: ResultStatus
    reason: RejectReason | None = None
    detail: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


# -- published records: a body and its sequence number ------------------------------------
class Reading(ReadingBody, _Seq):
    seq: int = Field(ge=1, description="telemetry stream sequence number")


class Event(EventBody, _Seq):
    seq: int = Field(ge=1, description="events stream sequence number")


class Result(ResultBody, _Seq):
    seq: int = Field(ge=1, description="results stream sequence number")


# Each builds the body dict the agent stores, in the order published (ts first), after
# validating it strictly against its model (a wrong type is an error, never converted: the
# dict returned is the one validated, so its JSON is what was given). ValidationError when
# it breaks the contract. About 3 µs for a 20-point reading.
def reading_body(ts: float, device: str, values: dict[str, float | bool | None]
                 ) -> dict[str, Any]:
    """A telemetry record body: ``{"ts", "device", "values"}``."""
    body = {"ts": ts, "device": device, "values": values}
    ReadingBody.model_validate(body, strict=True)
    return body


def event_body(type_: EventType, ts: float, data: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """An events record body: ``{"ts", "type", "data"}``."""
    body = {"ts": ts, "type": type_, "data": {} if data is None else data}
    EventBody.model_validate(body, strict=True)
    return body


_BODIES: dict[str, type[_Body]] = {"events": EventBody, "results": ResultBody,
                                   "intervals": IntervalBody, "bills": BillBody}


def validate_body(stream: str, body: dict[str, Any]) -> dict[str, Any]:
    """A record body built elsewhere (the control supervisor's, the ledger's), checked against
    its stream's model; returned as it is."""
    model = LossBody if stream == "intervals" and body.get("kind") == "loss" else _BODIES[stream]
    model.model_validate(body, strict=True)
    return body


def result_body(command_id: str | None, status: ResultStatus, ts: float,
                reason: RejectReason | None = None, detail: str = "",
                data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A results record body: ``{"ts", "command_id", "status", "reason", "detail", "data"}``."""
    body = {"ts": ts, "command_id": command_id, "status": status, "reason": reason,
            "detail": detail, "data": {} if data is None else data}
    ResultBody.model_validate(body, strict=True)
    return body


class TelemetryBatch(_Msg):
    """``<prefix>/<terminal>/telemetry``"""

    terminal: TerminalId
    stream: Literal["telemetry"] = "telemetry"
    historical: bool = Field(description="true when sent from the backlog, not live")
    records: list[Reading] = Field(min_length=1)


class EventBatch(_Msg):
    """``<prefix>/<terminal>/events``"""

    terminal: TerminalId
    stream: Literal["events"] = "events"
    historical: bool
    records: list[Event] = Field(min_length=1)


class ResultBatch(_Msg):
    """``<prefix>/<terminal>/result``"""

    terminal: TerminalId
    stream: Literal["results"] = "results"
    historical: bool
    records: list[Result] = Field(min_length=1)


class Interval(IntervalBody, _Seq):
    seq: int = Field(ge=1, description="intervals stream sequence number")


class LossInterval(LossBody, _Seq):
    seq: int = Field(ge=1, description="intervals stream sequence number")


class Bill(BillBody, _Seq):
    seq: int = Field(ge=1, description="bills stream sequence number")


class IntervalBatch(_Msg):
    """``<prefix>/<terminal>/intervals``"""

    terminal: TerminalId
    stream: Literal["intervals"] = "intervals"
    historical: bool
    records: list[Annotated[Interval | LossInterval, Field(discriminator="kind")]] = Field(
        min_length=1)


class BillBatch(_Msg):
    """``<prefix>/<terminal>/bills``"""

    terminal: TerminalId
    stream: Literal["bills"] = "bills"
    historical: bool
    records: list[Bill] = Field(min_length=1)


# -- platform -> terminal ------------------------------------------------------------------
class SignedCommand(_Msg):
    """``<prefix>/<terminal>/cmd``: the command body as exact bytes, and their signature.

    ``sig`` is the Ed25519 signature (base64) over the UTF-8 bytes of ``body``; ``body`` is the
    JSON text of a :class:`Command`. Signing the exact text avoids any canonicalisation.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    v: Literal[1] = 1
    body: str = Field(max_length=16384)
    sig: str = Field(max_length=200)


class _CommandBase(_Msg):
    # strict: "12" or true is not a number; no NaN/inf: NaN passes every time comparison
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    id: CommandId
    terminal: TerminalId
    issued_at: float = Field(description="unix time (s) the platform issued it")
    expires_at: float = Field(description="refused when received after this unix time; must be "
                                          "after issued_at")

    @model_validator(mode="after")
    def _check_times(self) -> _CommandBase:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class CapCommand(_CommandBase):
    """Keep the site's import at or below ``cap_kw`` until ``until`` (or for ``duration_s``)."""

    # exactly one of duration_s and until, in the schema too
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": [end], "properties": {end: {"type": "number"}}}
        for end in ("duration_s", "until")]})

    type: Literal["cap"]
    cap_kw: float = Field(gt=0, le=1_000_000)
    duration_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    until: float | None = Field(default=None, description="unix time the cap ends, at most 7 days "
                                                         "after issued_at")
    loads: list[LoadName] | None = _loads_field()

    @model_validator(mode="after")
    def _one_end(self) -> CapCommand:
        _unique_loads(self.loads)
        if (self.duration_s is None) == (self.until is None):
            raise ValueError("give exactly one of duration_s and until")
        if self.until is not None and self.until - self.issued_at > MAX_DURATION_S:
            raise ValueError("until is more than 7 days after issued_at")
        return self


class ShedCommand(_CommandBase):
    """Reduce the site's import by ``shed_kw`` below its level at the start, for ``duration_s``."""

    type: Literal["shed"]
    shed_kw: float = Field(gt=0, le=1_000_000)
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    loads: list[LoadName] | None = _loads_field()

    @model_validator(mode="after")
    def _check_loads(self) -> ShedCommand:
        _unique_loads(self.loads)
        return self


_SIGNAL_RANGES: list[tuple[str, JsonDict]] = [
    ("level", {"enum": [0, 1, 2, 3]}), ("reduction_kw", {"exclusiveMinimum": 0}),
    ("cap_kw", {"exclusiveMinimum": 0}), ("reduction_pct", {"exclusiveMinimum": 0, "maximum": 100})]

DrSignal = Literal["level", "reduction_kw", "reduction_pct", "cap_kw"]


class DrEventCommand(_CommandBase):
    """A demand-response event (its id is the command id): a signal over a window.

    This terminal's window starts ``start`` plus an offset in ``[0, randomize_s)`` and lasts
    ``duration_s``; the limit ramps in over ``ramp_s``; loads come back over ``recovery_s``.
    ``value``: ``level`` 0-3, ``reduction_kw`` > 0, ``reduction_pct`` in (0, 100],
    ``cap_kw`` > 0. See docs/control.md, "Demand-response events".
    """

    # the value's range for each signal, in the schema too
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"signal": {"const": sig}}},
         "then": {"properties": {"value": rng}}}
        for sig, rng in _SIGNAL_RANGES]})

    type: Literal["dr_event"]
    start: float = Field(description="unix time (s) of the nominal start")
    duration_s: float = Field(gt=0, le=MAX_DURATION_S)
    signal: DrSignal
    value: float = Field(ge=0, le=1_000_000)
    randomize_s: float = Field(default=0.0, ge=0, le=86400)
    ramp_s: float = Field(default=0.0, ge=0, le=MAX_DURATION_S,
                          description="at most duration_s")
    recovery_s: float = Field(default=0.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _check_signal(self) -> DrEventCommand:
        v = self.value
        if self.signal == "level" and v not in (0, 1, 2, 3):
            raise ValueError("a level signal's value must be 0, 1, 2 or 3")
        if self.signal in ("reduction_kw", "cap_kw") and v <= 0:
            raise ValueError(f"a {self.signal} signal's value must be > 0")
        if self.signal == "reduction_pct" and not 0 < v <= 100:
            raise ValueError("a reduction_pct signal's value must be in (0, 100]")
        if self.ramp_s > self.duration_s:
            raise ValueError("ramp_s must not be longer than duration_s")
        return self


class CancelCommand(_CommandBase):
    """End the control started by command ``target``, or the demand-response event ``target``,
    and restore the loads."""

    type: Literal["cancel"]
    target: CommandId


class ModesCommand(_CommandBase):
    """Set terminal control mode parameters: ``params`` is a partial ``ModeParams`` (see
    docs/control.md, "Terminal control modes"), merged into the stored ones (objects field by
    field, lists replaced whole). Refused ``invalid`` when the result does not validate."""

    type: Literal["modes"]
    params: dict[str, Any] = Field(min_length=1)


class RemoteCommand(_CommandBase):
    """Remote control (遥控) of one trip round: ``trip`` after ``alarm_delay_min`` of alarm,
    for ``limit_half_hours`` (0 = until an allow-close), or ``close`` (allow close)."""

    type: Literal["remote"]
    round: int = Field(ge=1, le=8)
    action: Literal["trip", "close"]
    alarm_delay_min: int = Field(default=0, ge=0, le=15)
    limit_half_hours: int = Field(default=0, ge=0, le=255)


class GuaranteeCommand(_CommandBase):
    """Power guarantee (保电) on (every round closed, no mode control) for
    ``duration_half_hours`` (0 = until switched off), or off. ``auto_after_h`` (optional):
    guarantee automatically after this many hours without platform contact (0 = never)."""

    type: Literal["guarantee"]
    on: bool
    duration_half_hours: int = Field(default=0, ge=0, le=255)
    auto_after_h: int | None = Field(default=None, ge=0, le=255)


class TariffCommand(_CommandBase):
    """Replace the energy ledger's tariff from ``effective_from`` on (unix s): every interval
    that starts then or later is priced by ``tariff`` (a tariff file's content as JSON, see
    docs/tariffs.md). Refused ``invalid``, changing nothing, when the tariff does not validate
    or the terminal keeps no ledger."""

    type: Literal["tariff"]
    tariff: dict[str, Any] = Field(min_length=1)
    effective_from: float = Field(ge=0, description="unix time (s) from which it prices")


class CarbonCurveCommand(_CommandBase):
    """Hourly grid emission factors (kg CO2/kWh) for the ledger's carbon, replacing the
    configured factor where they apply (docs/carbon-and-losses.md). Refused ``invalid`` when
    the curve does not validate."""

    type: Literal["carbon_curve"]
    curve: dict[str, Any] = Field(min_length=1, description="id, source, start (unix s on the "
                                                            "hour), kg_per_kwh (one per hour)")


Command = Annotated[CapCommand | ShedCommand | DrEventCommand | CancelCommand | ModesCommand
                    | RemoteCommand | GuaranteeCommand | TariffCommand | CarbonCurveCommand,
                    Field(discriminator="type", title="Command",
                          description="The body of a signed command (SignedCommand.body, as "
                                      "JSON), of the kind its type says. The schema cannot "
                                      "compare two fields: expires_at must also be after "
                                      "issued_at, a cap's until at most 7 days after it, a "
                                      "dr_event's ramp_s at most its duration_s")]
"""A command body: validate it with ``TypeAdapter(Command)``."""

SCHEMA_MODELS: dict[str, Any] = {  # a model class or an annotated type, e.g. Command
    "status": Status,
    "telemetry": TelemetryBatch,
    "events": EventBatch,
    "result": ResultBatch,
    "intervals": IntervalBatch,
    "bills": BillBatch,
    "cmd": SignedCommand,
    "command-body": Command,
}
