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
    interval_s: float = Field(default=1.0, ge=0.1)
    timeout_s: float = Field(default=1.0, gt=0)


class Sync(_Strict):
    max_batch: int = Field(default=20, ge=1, le=1000, description="readings per message")
    max_inflight: int = Field(default=20, ge=1, le=1000, description="unacknowledged messages")


class Device(_Strict):
    name: str = Field(pattern=NAME)
    profile: str
    protocol: Literal["modbus-tcp"] = "modbus-tcp"
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    device_id: int = Field(default=1, ge=0, le=255)


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
    devices: list[Device] = Field(min_length=1)
    control: Control
    loads: list[Load] = []

    @model_validator(mode="after")
    def _check_refs(self) -> AgentConfig:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        profiles = {}
        for i, d in enumerate(self.devices):
            try:
                profiles[d.name] = load_profile(d.profile)
            except KeyError as exc:
                raise ValueError(f"devices[{i}].profile: {exc.args[0]}") from None
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


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read and validate an agent file; raises ``ConfigError`` naming file, key and expectation."""
    return load_toml(path, AgentConfig, context={"base_dir": Path(path).resolve().parent})
