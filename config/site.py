"""Simulated site configuration (``lmt sim <site.toml>``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import load_toml
from .profiles import load_profile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteInfo(_Strict):
    name: str = "site"
    seed: int = 1
    base_load_kw: float = Field(default=50.0, ge=0, description="mean uncontrolled load")
    daily_swing: float = Field(default=0.15, ge=0, le=1,
                               description="± fraction of the base load over the day")
    peak_hour: float = Field(default=14.0, ge=0, lt=24)
    noise_kw: float = Field(default=0.5, ge=0, description="standard deviation of load noise")
    voltage_v: float = Field(default=230.0, gt=0, description="phase-to-neutral voltage")
    power_factor: float = Field(default=0.95, gt=0, le=1)
    frequency_hz: float = Field(default=50.0, gt=0)
    import_energy_kwh: float = Field(default=12345.6, ge=0, description="meter reading at start")


class SimServer(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=5020, ge=0, le=65535)


class SimDevice(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    profile: str
    device_id: int = Field(ge=1, le=247)


class SimLoad(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    relay: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*\.[a-z][a-z0-9_]*$",
                       description="<device>.<point> of the coil that switches it")
    kw: float = Field(gt=0)
    on: bool = True


class SiteConfig(_Strict):
    site: SiteInfo = SiteInfo()
    server: SimServer = SimServer()
    devices: list[SimDevice] = Field(min_length=1)
    loads: list[SimLoad] = []

    @model_validator(mode="after")
    def _check_refs(self) -> SiteConfig:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device_id values must be unique on one server")
        by_name = {d.name: d for d in self.devices}
        for i, d in enumerate(self.devices):
            try:
                load_profile(d.profile)
            except KeyError as exc:
                raise ValueError(f"devices[{i}].profile: {exc.args[0]}") from None
        used: set[str] = set()
        for i, load in enumerate(self.loads):
            dev_name, point = load.relay.split(".", 1)
            if dev_name not in by_name:
                raise ValueError(f"loads[{i}].relay: no device named {dev_name!r}")
            prof = load_profile(by_name[dev_name].profile)
            if not prof.has_point(point) or prof.point(point).table.value != "coil":
                raise ValueError(f"loads[{i}].relay: {dev_name!r} has no coil point {point!r}")
            if load.relay in used:
                raise ValueError(f"loads[{i}].relay: {load.relay} already switches another load")
            used.add(load.relay)
        return self


def load_site(path: Path | str) -> SiteConfig:
    """Read and validate a simulated-site file; raises ``ConfigError``."""
    return load_toml(path, SiteConfig)
