"""Agent configuration (``lmt run --config <agent.toml>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .errors import load_toml
from .profiles import load_profile

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


class Mqtt(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = Field(default="lmt/v1", pattern=r"^[^#+]+[^/#+]$")
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    username: str | None = None
    password: str | None = None
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)


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


class Load(_Strict):
    name: str = Field(pattern=NAME)
    device: str
    point: str
    rated_kw: float = Field(gt=0)
    priority: int = Field(default=50, ge=1, le=100,
                          description="1 = least important (shed first) … 100 = shed last")
    critical: bool = Field(default=False, description="never shed")


class Control(_Strict):
    main_meter: str = Field(description="device name of the site's main meter")
    power_point: str = "power_w"
    margin_kw: float = Field(default=1.0, ge=0, description="stay this far below a cap")
    restore_hysteresis_kw: float = Field(default=2.0, ge=0,
                                         description="extra headroom needed to restore a load")
    min_off_s: float = Field(default=5.0, ge=0)
    min_on_s: float = Field(default=5.0, ge=0)


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

    @model_validator(mode="after")
    def _check_refs(self) -> AgentConfig:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        lines = {ln.name: ln for ln in self.lines}
        if len(lines) != len(self.lines):
            raise ValueError("line names must be unique")
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
            if (load.device, load.point) in seen_points:
                raise ValueError(f"loads[{i}].point: {load.device}.{load.point} already "
                                 "switches another load")
            seen_points.add((load.device, load.point))
        return self

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def line(self, name: str) -> Line:
        return next(ln for ln in self.lines if ln.name == name)

    def protocol_of(self, d: Device) -> str:
        """modbus-tcp, modbus-rtu or dlt645."""
        if d.line is None:
            return "modbus-tcp"
        return self.line(d.line).protocol


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read and validate an agent file; raises ``ConfigError`` naming file, key and expectation."""
    return load_toml(path, AgentConfig, context={"base_dir": Path(path).resolve().parent})
