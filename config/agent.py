"""Agent configuration (``lmt run --config <agent.toml>``)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .errors import load_toml
from .profiles import Profile, Table, load_profile

NAME = r"^[a-z0-9][a-z0-9_-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve(v: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the configuration file's folder."""
    if v is None:
        return None
    base = (info.context or {}).get("base_dir")
    v = Path(v).expanduser()
    return v if v.is_absolute() or base is None else Path(base) / v


class Terminal(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                    description="terminal id: one MQTT topic level, no wildcards")


def _readable_file(v: Path | None, info: ValidationInfo, what: str) -> Path | None:
    """Resolve a path and check it can be read now (a service finds out at start, not later)."""
    p = _resolve(v, info)
    if p is None:
        return None
    try:
        p.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file {p} not found ({what})") from None
    except IsADirectoryError:
        raise ValueError(f"{p} is a folder, not a file ({what})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc.strerror} ({what})") from None
    return p


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


class _EncryptedKey(Exception):
    pass


def _no_key_password() -> bytes:
    raise _EncryptedKey  # never let OpenSSL prompt on a terminal a service does not have


class Tls(_Strict):
    """``[mqtt.tls]``: TLS to the broker; the table being there (even empty) turns TLS on."""

    ca_file: Path | None = Field(default=None, description="CA certificate(s), PEM, the broker's "
                                 "certificate must chain to; default: the system's trusted CAs")
    cert_file: Path | None = Field(default=None, description="client certificate (PEM)")
    key_file: Path | None = Field(default=None, description="its private key (PEM, unencrypted)")
    insecure: bool = Field(default=False, description="skip the check that the broker's "
                           "certificate names mqtt.host (the chain is still verified)")
    min_version: Literal["1.2", "1.3"] = Field(default="1.2", description="lowest TLS version")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _files(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        what = {"ca_file": "the CA certificate the broker's certificate is signed by",
                "cert_file": "the TLS client certificate",
                "key_file": "the TLS client certificate's private key"}[str(info.field_name)]
        return _readable_file(v, info, what)

    @model_validator(mode="after")
    def _check(self) -> Tls:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (("cert_file", "key_file") if self.key_file is None
                              else ("key_file", "cert_file"))
            raise ValueError(f"{given} is given without {missing}: a client certificate needs "
                             "both cert_file and key_file (or neither)")
        self.ssl_context()
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """The client context: verifies the broker's chain (and name, unless ``insecure``),
        presents the client certificate if there is one. Raises ValueError naming the key."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if self.min_version == "1.3" \
            else ssl.TLSVersion.TLSv1_2
        try:
            if self.ca_file is None:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                ctx.load_verify_locations(cafile=str(self.ca_file))
        except ssl.SSLError as exc:
            raise ValueError(f"ca_file: {self.ca_file} holds no usable PEM CA certificate "
                             f"({_ssl_reason(exc)})") from None
        if self.cert_file is not None and self.key_file is not None:
            try:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file),
                                    password=_no_key_password)
            except _EncryptedKey:
                raise ValueError(f"key_file: {self.key_file} is encrypted; the agent needs an "
                                 "unencrypted key (protect it with file permissions)") from None
            except ssl.SSLError as exc:
                reason = _ssl_reason(exc)
                if "mismatch" in reason:
                    msg = f"{self.key_file} is not the key of {self.cert_file}"
                else:
                    msg = f"{self.cert_file} / {self.key_file} are not a PEM certificate and key"
                raise ValueError(f"cert_file, key_file: {msg} ({reason})") from None
        if self.insecure:
            ctx.check_hostname = False
        return ctx


class Mqtt(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535, description="1883; usually 8883 with TLS")
    topic_prefix: str = Field(default="lmt/v1", pattern=r"^[^#+]+[^/#+]$")
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT version")
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    password_file: Path | None = Field(default=None, description="file whose first line is the "
                                       "password, instead of password")
    tls: Tls | None = None
    session_expiry_s: int = Field(default=86400, ge=0, le=0xFFFFFFFF,
                                  description="MQTT 5: how long the broker keeps the session "
                                              "(subscription, queued commands) while away")
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    connect_jitter_s: float = Field(default=0.0, ge=0, le=86400,
                                    description="wait a random 0..this before the first connect")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: object) -> object:
        return "5" if v in (5, 5.0) else v  # `protocol = 5` in TOML is an integer

    @field_validator("password_file")
    @classmethod
    def _password_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        p = _readable_file(v, info, "the broker password")
        if p is not None and not _first_line(p):
            raise ValueError(f"{p} is empty: its first line must be the broker password")
        return p

    @model_validator(mode="after")
    def _check(self) -> Mqtt:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("a password (password or password_file) needs username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self

    def secret(self) -> str | None:
        """The password: inline, or the first line of password_file (read now)."""
        if self.password_file is not None:
            return _first_line(self.password_file)
        return self.password


def _first_line(p: Path) -> str:
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0] if lines else ""


class Security(_Strict):
    platform_public_key: Path = Field(description="the platform's Ed25519 public key (PEM)")
    clock_skew_s: float = Field(default=30.0, ge=0,
                                description="how far in the future issued_at may be")
    max_lifetime_s: float = Field(default=86400.0, gt=0,
                                  description="longest accepted expires_at - issued_at")

    @field_validator("platform_public_key")
    @classmethod
    def _key_file(cls, v: Path, info: ValidationInfo) -> Path:
        p = _resolve(v, info)
        assert p is not None
        try:
            text = p.read_text(errors="replace")
        except FileNotFoundError:
            raise ValueError(f"file {p} not found (make it with `lmt platform keygen`; "
                             "install the .pub file, never the .key)") from None
        except OSError as exc:
            raise ValueError(f"cannot read {p}: {exc.strerror}") from None
        if "PRIVATE KEY" in text:
            raise ValueError(f"{p} is a private key: a terminal holds only the public key")
        if "-----BEGIN PUBLIC KEY-----" not in text:
            raise ValueError(f"{p} is not a PEM public key")
        return p


class Buffer(_Strict):
    path: Path = Path("lmt-buffer.sqlite")
    flush_interval_s: float = Field(default=1.0, gt=0)
    keep_delivered_h: float = Field(default=24.0, ge=0,
                                    description="hours delivered records stay in the buffer")
    max_mb: float = Field(default=256.0, ge=1.0,
                          description="disk cap (MB) of the buffer's files; past it, old "
                                      "telemetry is dropped, never events or results")

    _path = field_validator("path")(_resolve)


class Poll(_Strict):
    interval_s: float = Field(default=1.0, ge=0.1, description="cycle; fast points every cycle")
    slow_interval_s: float = Field(default=60.0, ge=0.1,
                                   description="max age of slow points (energy totals)")
    timeout_s: float = Field(default=1.0, gt=0,
                             description="response timeout before a device's latency is known")
    min_timeout_s: float = Field(default=0.2, gt=0, description="adaptive timeout floor")
    max_timeout_s: float = Field(default=5.0, gt=0, description="adaptive timeout ceiling")
    offline_after_s: float = Field(default=10.0, ge=0,
                                   description="failing this long marks a device offline")
    backoff_max_s: float = Field(default=60.0, gt=0, description="longest retry interval")


SerialParity = Literal["N", "E", "O"]
# (baud, parity) a serial line uses unless configured: the common field settings per protocol
SERIAL_DEFAULTS: dict[str, tuple[int, str]] = {"modbus-rtu": (9600, "N"), "dlt645": (2400, "E")}


class Line(_Strict):
    """A serial line (RS-485 bus) shared by the devices on it, one transaction at a time."""

    name: str = Field(pattern=NAME)
    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyUSB0")
    protocol: Literal["modbus-rtu", "dlt645"]
    baud: int | None = Field(default=None, description="default 9600 (Modbus RTU), 2400 (DL/T 645)")
    parity: SerialParity | None = Field(default=None, description="default N (RTU), E (DL/T 645)")
    stop_bits: Literal[1, 2] = 1
    byte_size: Literal[7, 8] = 8
    timeout_s: float | None = Field(default=None, gt=0,
                                    description="response timeout (default: poll.timeout_s)")

    @field_validator("baud")
    @classmethod
    def _baud(cls, v: int | None) -> int | None:
        if v is not None and v not in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200):
            raise ValueError("baud must be one of 1200, 2400, 4800, 9600, 19200, 38400, 57600, "
                             "115200")
        return v

    @property
    def baud_rate(self) -> int:
        return self.baud or SERIAL_DEFAULTS[self.protocol][0]

    @property
    def parity_bit(self) -> str:
        return self.parity or SERIAL_DEFAULTS[self.protocol][1]


class Sync(_Strict):
    max_batch: int = Field(default=20, ge=1, le=1000, description="readings per message")
    max_inflight: int = Field(default=20, ge=1, le=1000, description="unacknowledged messages")
    backlog_rate: float = Field(default=500.0, ge=0,
                                description="readings per second sent from the backlog after an "
                                            "outage, behind live data (0: no limit)")


class Device(_Strict):
    """A device: a profile bound to a place — a TCP endpoint, or an address on a serial line."""

    name: str = Field(pattern=NAME)
    profile: str
    host: str | None = Field(default=None, description="Modbus TCP: host of the device/gateway")
    port: int = Field(default=502, ge=1, le=65535)
    line: str | None = Field(default=None, description="serial: name of a [[lines]] entry")
    device_id: int = Field(default=1, ge=0, le=255, description="Modbus device (unit) id")
    address: str | None = Field(default=None, pattern=r"^[0-9]{12}$",
                                description="DL/T 645 meter address, 12 digits")
    offline_after_s: float | None = Field(default=None, ge=0,
                                          description="default: poll.offline_after_s")

    @model_validator(mode="after")
    def _one_place(self) -> Device:
        if (self.host is None) == (self.line is None):
            raise ValueError(f"device {self.name!r}: give host (Modbus TCP) or line (serial)")
        return self


LoadClass = Literal["critical", "interruptible", "adjustable", "deferrable"]


class Load(_Strict):
    """A controllable load. ``class``: ``critical`` (never shed), ``interruptible`` (on/off by
    a coil), ``adjustable`` (a setpoint register, 0-100 % of ``full_scale``), ``deferrable``
    (on/off, shed at most ``max_off_s``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME)
    device: str
    point: str
    rated_kw: float = Field(gt=0)
    priority: int = Field(default=50, ge=1, le=100,
                          description="1 = least important (shed first) … 100 = shed last")
    kind: LoadClass = Field(default="interruptible", alias="class",
                            description="critical, interruptible, adjustable or deferrable")
    critical: bool = Field(default=False, description="never shed: the same as class = "
                                                      "\"critical\"")
    round: int | None = Field(default=None, ge=1, le=8,
                              description="trip round (轮次) 1-8 of the terminal control modes; "
                                          "none = not under mode control")
    min_on_s: float | None = Field(default=None, ge=0, le=86400,
                                   description="stay on at least this long after a restore "
                                               "(default: control.min_on_s; adjustable: 0)")
    min_off_s: float | None = Field(default=None, ge=0, le=86400,
                                    description="stay off at least this long after a shed "
                                                "(default: control.min_off_s; adjustable: 0)")
    max_off_s: float | None = Field(default=None, gt=0, le=7 * 86400,
                                    description="shed at most this long: then restored, and "
                                                "another load shed in its place (rotation); "
                                                "required for a deferrable load")
    full_scale: float | None = Field(default=None, gt=0,
                                     description="adjustable: the setpoint register's value at "
                                                 "100 % (e.g. 32 for a 32 A charger); default "
                                                 "100 (a register in %)")
    min_pct: float = Field(default=0.0, ge=0, lt=100,
                           description="adjustable: never set below this % when shedding")
    rewrite_s: float | None = Field(default=None, gt=0, le=3600,
                                    description="adjustable: while lowered, write the setpoint "
                                                "again this often (devices that fall back to "
                                                "a default without fresh writes)")

    @model_validator(mode="after")
    def _check_class(self) -> Load:
        if self.critical:
            if self.kind not in ("interruptible", "critical"):
                raise ValueError(f"load {self.name!r}: critical = true contradicts class = "
                                 f"{self.kind!r}")
            self.kind = "critical"
        self.critical = self.kind == "critical"
        if self.critical and self.round is not None:
            raise ValueError(f"load {self.name!r} is critical: it cannot be in trip round {self.round}")
        if self.kind == "adjustable" and self.round is not None:
            raise ValueError(f"load {self.name!r} is adjustable: trip rounds open breakers; put "
                             "it under cap and DR control only (no round)")
        if self.kind == "deferrable" and self.max_off_s is None:
            raise ValueError(f"load {self.name!r} is deferrable: give max_off_s, how long it may "
                             "be held off before it must run again")
        if self.kind != "adjustable" and (self.full_scale is not None or self.min_pct
                                          or self.rewrite_s is not None):
            raise ValueError(f"load {self.name!r}: full_scale, min_pct and rewrite_s are for class = "
                             "\"adjustable\" loads")
        if self.kind == "adjustable" and self.max_off_s is not None:
            raise ValueError(f"load {self.name!r}: an adjustable load is never switched off; "
                             "max_off_s is for on/off loads")
        return self


class Control(_Strict):
    main_meter: str = Field(description="device name of the site's main meter")
    power_point: str = "power_w"
    margin_kw: float = Field(default=1.0, ge=0, description="stay this far below a cap")
    restore_hysteresis_kw: float = Field(default=2.0, ge=0,
                                         description="extra headroom needed to restore a load")
    min_off_s: float = Field(default=5.0, ge=0)
    min_on_s: float = Field(default=5.0, ge=0)
    restore_step_kw: float = Field(default=50.0, gt=0,
                                   description="when a command or event ends, switch back on at "
                                               "most this much rated load per cycle (at least one "
                                               "load): a staggered restore, no rebound spike")
    response_fraction: float = Field(default=0.3, gt=0, le=1,
                                     description="a switch whose metered effect on the main "
                                                 "meter stays under this share of the load's "
                                                 "rated kW is unresponsive (load_unresponsive)")
    response_readings: int = Field(default=3, ge=1, le=60,
                                   description="fresh main-meter readings a switch gets to show "
                                               "its effect")
    response_noise_k: float = Field(default=3.0, ge=0,
                                    description="an expected change within this many standard "
                                                "deviations of the main meter's noise gives no "
                                                "verdict")


class Dr(_Strict):
    """Demand-response events (``dr_event`` commands)."""

    level_fractions: dict[int, float] = Field(
        default_factory=lambda: {1: 0.10, 2: 0.20, 3: 0.35},
        description="OpenADR SIMPLE level (1-3) -> fraction of the baseline to shed")
    baseline_window_s: float = Field(default=900.0, gt=0, le=86400,
                                     description="baseline: mean main-meter power over this "
                                                 "long before the event becomes active")

    @field_validator("level_fractions")
    @classmethod
    def _check_levels(cls, v: dict[int, float]) -> dict[int, float]:
        for level, frac in v.items():
            if level not in (1, 2, 3):
                raise ValueError(f"level must be 1, 2 or 3, got {level}")
            if not 0 < frac <= 1:
                raise ValueError(f"level {level}: fraction must be in (0, 1], got {frac:g}")
        return v


class Modes(_Strict):
    """Site settings of the terminal control modes (the mode parameters themselves come from
    signed ``modes``/``remote``/``guarantee`` commands)."""

    utc_offset_s: int = Field(default=8 * 3600, ge=-14 * 3600, le=14 * 3600,
                              description="local time = UTC + this (the modes' periods, days and "
                                          "months are local)")
    energy_point: str = Field(default="import_energy_kwh",
                              description="the main meter's cumulative import energy point (kWh) "
                                          "for monthly and purchased-energy control; ignored when "
                                          "its profile has no such point")


IntervalMinutes = Literal[1, 5, 15, 30, 60]


class Carbon(_Strict):
    """Which grid emission factor the ledger's kgCO2 use (lmt.config.ledger_data's
    emission_factors.toml: MEE/NBS factors by data year, scope and region)."""

    year: int = Field(default=2022, ge=2000, le=2100,
                      description="data year (the latest published year not after it is used)")
    scope: str = Field(default="national", description="national, regional or provincial (or a "
                                                       "national variant of the factor file)")
    region: str = Field(default="CN", description="the region or province of the factor file, "
                                                  "e.g. CN, east, jiangsu")
    factors_file: Path | None = Field(default=None, description="a factor file of your own "
                                                                "instead of the shipped one")
    _path = field_validator("factors_file")(_resolve)


class LossGroup(_Strict):
    """A main meter against its sub-meters (or a transformer's two sides): Q/GDW 1376.1 ERC22."""

    name: str = Field(pattern=NAME)
    main: str = Field(description="device name of the main meter")
    subs: list[str] = Field(min_length=1, description="device names of the sub-meters")
    method: Literal["relative", "absolute"] = Field(
        default="relative", description="relative: the loss in % of the main meter against "
                                        "relative_limit_pct (guarded by min_main_kwh); "
                                        "absolute: the loss in kWh against absolute_limit_kwh")
    relative_limit_pct: float = Field(default=5.0, gt=0, le=100)
    absolute_limit_kwh: float = Field(default=1.0, ge=0)
    min_main_kwh: float = Field(default=1.0, ge=0,
                                description="below this main-meter energy in an interval the "
                                            "relative limit is not applied (low-load guard)")
    raise_after: int = Field(default=2, ge=1, description="intervals over the limit to raise")
    clear_after: int = Field(default=2, ge=1, description="intervals under the limit to clear")


class Theft(_Strict):
    """Theft and tamper indicators (docs/theft.md): site facts and per-detector overrides."""

    enabled: bool = True
    nominal_voltage_v: float = Field(default=230.0, gt=0)
    base_current_a: float = Field(default=5.0, gt=0, description="the meters' base current Ib")
    generation: bool = Field(default=False, description="the site has registered generation "
                                                        "(PV): reverse power is no indicator")
    rated_max_kw: float | None = Field(default=None, gt=0,
                                       description="the most the site can draw: a register "
                                                   "running faster is an indicator")
    detectors: dict[str, dict[str, float | bool]] = Field(
        default_factory=dict, description="per detector, settings that replace its defaults, "
                                          "e.g. {ct_bypass = {delay_s = 120}}")


class Ledger(_Strict):
    """The energy ledger (docs/ledger.md): intervals, bills, balance, carbon, losses, theft."""

    enabled: bool = True
    meters: list[str] | None = Field(default=None,
                                     description="devices whose intervals are kept (and kept "
                                                 "keep_days); default: the main meter")
    interval_minutes: IntervalMinutes = 15
    demand_minutes: IntervalMinutes = 15
    demand_mode: Literal["block", "sliding"] = "block"
    keep_days: int = Field(default=400, ge=1, description="interval records kept on site")
    save_every_s: float = Field(default=300.0, ge=1,
                                description="the ledger's state is saved with every interval "
                                            "written and at least this often: a crash loses "
                                            "at most this much of the open intervals' "
                                            "statistics (never their register energy)")
    register_wait_s: float = Field(default=900.0, gt=0,
                                   description="a boundary with no register reading this long "
                                               "after it is estimated from the power")
    tariff: str | None = Field(default=None,
                               description="a shipped tariff id (lmt.config.tariffs) or a TOML "
                                           "file; none: intervals carry no cost")
    holidays: str = Field(default="holidays-cn",
                          description="a shipped holiday calendar id or a TOML file")
    carbon: Carbon = Carbon()
    loss_groups: list[LossGroup] = []
    theft: Theft = Theft()

    @field_validator("tariff", "holidays")
    @classmethod
    def _data_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A ``.toml`` name is a file (relative to the configuration's folder); else an id."""
        if v is None or not v.endswith(".toml"):
            return v
        p = _resolve(Path(v), info)
        return str(p)


class AgentConfig(_Strict):
    terminal: Terminal
    mqtt: Mqtt = Mqtt()
    security: Security
    buffer: Buffer = Buffer()
    poll: Poll = Poll()
    sync: Sync = Sync()
    lines: list[Line] = []
    devices: list[Device] = Field(min_length=1)
    control: Control
    loads: list[Load] = []
    dr: Dr = Dr()
    modes: Modes = Modes()
    ledger: Ledger = Ledger()

    @model_validator(mode="after")
    def _check_refs(self) -> AgentConfig:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        lines = _check_lines(self.lines)
        profiles = {}
        for i, d in enumerate(self.devices):
            try:
                profiles[d.name] = prof = load_profile(d.profile)
            except KeyError as exc:
                raise ValueError(f"devices[{i}].profile: {exc.args[0]}") from None
            if d.line is not None and d.line not in lines:
                raise ValueError(f"devices[{i}].line: no line named {d.line!r}")
            proto = self.protocol_of(d)
            if (proto == "dlt645") != (prof.protocol == "dlt645"):
                raise ValueError(f"devices[{i}].profile: {prof.id!r} is a {prof.protocol} "
                                 f"profile, the device is on {proto}")
            if proto == "dlt645" and d.address is None:
                raise ValueError(f"devices[{i}].address: a DL/T 645 meter needs its 12-digit "
                                 "address")
        for ln in self.lines:
            on = [d for d in self.devices if d.line == ln.name]
            ids = [d.address if ln.protocol == "dlt645" else d.device_id for d in on]
            if len(set(ids)) != len(ids):
                raise ValueError(f"line {ln.name!r}: two devices share an address")
        if self.control.main_meter not in profiles:
            raise ValueError(f"control.main_meter: no device named {self.control.main_meter!r}")
        meter = profiles[self.control.main_meter]
        if not meter.has_point(self.control.power_point):
            raise ValueError(f"control.power_point: profile {meter.id!r} has no point "
                             f"{self.control.power_point!r}")
        if meter.point(self.control.power_point).unit not in ("W", "kW"):
            raise ValueError("control.power_point: must be a power point in W or kW")
        seen_loads: set[str] = set()
        seen_points: set[tuple[str, str]] = set()
        for i, load in enumerate(self.loads):
            if load.name in seen_loads:
                raise ValueError(f"loads[{i}].name: {load.name!r} is used twice")
            seen_loads.add(load.name)
            if load.device not in profiles:
                raise ValueError(f"loads[{i}].device: no device named {load.device!r}")
            prof = profiles[load.device]
            if not prof.has_point(load.point) or not prof.point(load.point).writable:
                raise ValueError(f"loads[{i}].point: {load.device!r} ({prof.id}) has no "
                                 f"writable point {load.point!r}")
            point = prof.point(load.point)
            if load.kind == "adjustable":
                if point.table is not Table.HOLDING or point.is_bool:
                    raise ValueError(f"loads[{i}].point: {load.device}.{load.point} ({prof.id}) "
                                     "is not a setpoint; an adjustable load is set by a writable "
                                     "numeric holding register")
                if load.full_scale is None and point.unit != "%":
                    raise ValueError(f"loads[{i}].full_scale: {load.device}.{load.point} is in "
                                     f"{point.unit or 'no unit'}, not %; give the value it "
                                     "takes at 100 % (e.g. the charger's maximum current)")
            elif point.table is not Table.COIL:
                kind = f"a {point.table.value} register" if point.table else "a DL/T 645"
                raise ValueError(f"loads[{i}].point: {load.device}.{load.point} ({prof.id}) is "
                                 f"{kind} point; a load is switched by a writable coil "
                                 "(on = load supplied); a setpoint register makes a "
                                 "class = \"adjustable\" load")
            if (load.device, load.point) in seen_points:
                raise ValueError(f"loads[{i}].point: {load.device}.{load.point} already "
                                 "switches another load")
            seen_points.add((load.device, load.point))
        self._check_ledger(profiles)
        return self

    def _check_ledger(self, profiles: dict[str, Profile]) -> None:
        lg = self.ledger
        for i, name in enumerate(lg.meters or []):
            if name not in profiles:
                raise ValueError(f"ledger.meters[{i}]: no device named {name!r}")
            if profiles[name].kind != "meter":
                raise ValueError(f"ledger.meters[{i}]: {name!r} ({profiles[name].id}) is not a "
                                 "meter")
        if lg.meters is not None and len(set(lg.meters)) != len(lg.meters):
            raise ValueError("ledger.meters: a meter is named twice")
        counted = set(self.ledger_meters())
        seen: set[str] = set()
        for i, g in enumerate(lg.loss_groups):
            if g.name in seen:
                raise ValueError(f"ledger.loss_groups[{i}].name: {g.name!r} is used twice")
            seen.add(g.name)
            for key, name in [("main", g.main), *((f"subs[{j}]", s) for j, s in enumerate(g.subs))]:
                if name not in counted:
                    raise ValueError(f"ledger.loss_groups[{i}].{key}: {name!r} is not one of "
                                     f"the ledger's meters ({', '.join(sorted(counted))})")
            if g.main in g.subs or len(set(g.subs)) != len(g.subs):
                raise ValueError(f"ledger.loss_groups[{i}].subs: each meter once, the main "
                                 "meter not among them")

    def ledger_meters(self) -> list[str]:
        """The devices the ledger keeps intervals of."""
        if not self.ledger.enabled:
            return []
        return list(self.ledger.meters) if self.ledger.meters is not None \
            else [self.control.main_meter]

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def line(self, name: str) -> Line:
        return next(ln for ln in self.lines if ln.name == name)

    def protocol_of(self, d: Device) -> str:
        """modbus-tcp, modbus-rtu or dlt645."""
        if d.line is None:
            return "modbus-tcp"
        return self.line(d.line).protocol


def _check_lines(lines: list[Line]) -> dict[str, Line]:
    """Lines by name; each name and each serial port used once (one port is one bus: the
    devices on it go on one line, which runs one transaction at a time)."""
    by_name: dict[str, int] = {}
    by_port: dict[str, int] = {}
    for i, ln in enumerate(lines):
        if ln.name in by_name:
            raise ValueError(f"lines[{i}].name: {ln.name!r} is used twice (also lines"
                             f"[{by_name[ln.name]}]); line names must be unique")
        by_name[ln.name] = i
        port = os.path.realpath(ln.port)  # a /dev/serial/by-id/ link is the port it names
        if port in by_port:
            j = by_port[port]
            same = repr(ln.port) if ln.port == lines[j].port else \
                f"{ln.port!r} (the same port as {lines[j].port!r})"
            raise ValueError(f"lines[{i}].port: line {ln.name!r} uses {same}, already the port "
                             f"of line {lines[j].name!r}; two lines cannot share a serial port "
                             "(put the devices of one bus on one line)")
        by_port[port] = i
    return {ln.name: ln for ln in lines}


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read and validate an agent file; raises ``ConfigError`` naming file, key and expectation."""
    return load_toml(path, AgentConfig, context={"base_dir": Path(path).resolve().parent})
