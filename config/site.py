"""Simulated site configuration (``lmt sim <site.toml>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import load_toml
from .profiles import Table, load_profile


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
    unmetered_kw: float = Field(default=0.0, ge=0,
                                description="load between the main meter and the sub-meters: "
                                            "the main meter sees it, no sub-meter does")


class SimServer(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=5020, ge=0, le=65535)


class Faults(_Strict):
    """Field failures a simulated device shows; each rate is a probability per request."""

    offline: bool = Field(default=False, description="vanished: never answers")
    no_answer_rate: float = Field(default=0.0, ge=0, le=1, description="request times out")
    exception_code: int | None = Field(default=None, ge=1, le=255,
                                       description="answer Modbus requests with this exception")
    exception_rate: float = Field(default=1.0, ge=0, le=1,
                                  description="share of requests given exception_code")
    crc_error_rate: float = Field(default=0.0, ge=0, le=1,
                                  description="serial: answer with a bad CRC/checksum")
    garbage_rate: float = Field(default=0.0, ge=0, le=1, description="answer with random bytes")
    delay_s: float = Field(default=0.0, ge=0, le=60, description="slow device: answer this late")
    drop_rate: float = Field(default=0.0, ge=0, le=1,
                             description="TCP: close the connection instead of answering")
    frozen: bool = Field(default=False,
                         description="registers stop changing: every read answers the values "
                                     "of the moment it was switched on (writes still act)")


Phase = Literal["l1", "l2", "l3"]

#: The DL/T 645 event counters a simulated meter keeps (``[devices.events]``), each served as the
#: profile point ``event_<key>_count``.
EVENT_KEYS: tuple[str, ...] = (
    "cover_open", "terminal_cover_open", "magnetic_field", "voltage_loss",
    "current_loss_l1", "current_loss_l2", "current_loss_l3",
    "reverse_flow_l1", "reverse_flow_l2", "reverse_flow_l3",
)
#: A DL/T 645 event count is 3 BCD bytes (XXXXXX).
EVENT_COUNT_MAX = 999_999


def event_point(key: str) -> str:
    """The profile point that serves event counter ``key``: ``event_cover_open_count``."""
    return f"event_{key}_count"


class Metering(_Strict):
    """What a meter measures. Left out: the whole site (a main meter). Given without
    ``whole_site``: a sub-meter that measures only ``loads``, ``base_share`` of the base load and,
    with ``ev``, the EV charging point."""

    whole_site: bool = Field(default=False,
                             description="a main meter: the whole site, unmetered load included")
    loads: list[str] = Field(default=[], description="the [[loads]] behind this sub-meter")
    base_share: float = Field(default=0.0, ge=0, le=1,
                              description="share of the uncontrolled base load it measures")
    ev: bool = Field(default=False, description="the EV charging point hangs behind it")
    import_energy_kwh: float | None = Field(
        default=None, ge=0, description="its import register at start (default: site's)")

    @model_validator(mode="after")
    def _check_scope(self) -> Metering:
        if self.whole_site and (self.loads or self.base_share or self.ev):
            raise ValueError("a whole-site meter measures everything: leave out loads, "
                             "base_share and ev")
        if len(set(self.loads)) != len(self.loads):
            raise ValueError("loads: a load is named twice")
        return self


#: The default scope: the whole site.
WHOLE_SITE = Metering(whole_site=True)


class CtShunt(_Strict):
    """A shunted or bypassed current transformer: the meter sees ``seen`` of the phase's current
    (and power)."""

    phase: Phase
    seen: float = Field(default=0.02, ge=0, lt=1,
                        description="fraction of the phase's true current the meter sees")


class PtLoss(_Strict):
    """A disconnected or reduced voltage input (失压法窃电: the meter's voltage link opened): the
    meter sees ``seen`` of the phase's voltage, and so of its power; the current reads
    normally."""

    phase: Phase
    seen: float = Field(default=0.0, ge=0, lt=1,
                        description="fraction of the phase's true voltage the meter sees")


class Tamper(_Strict):
    """Energy-ledger signatures a meter shows (theft, tamper, a broken register)."""

    ct_shunt: CtShunt | None = Field(default=None, description="one phase's CT shunted")
    ct_reversed: Phase | None = Field(default=None,
                                      description="one phase's CT reversed: its power reads "
                                                  "negative")
    pt_loss: PtLoss | None = Field(default=None,
                                   description="one phase's voltage input lost or reduced")
    phase_break: Phase | None = Field(default=None,
                                      description="one phase lost at the meter (断相): neither "
                                                  "voltage nor current on it")
    registers: Literal["counting", "stopped", "decreasing"] = Field(
        default="counting", description="stopped: the energy registers stand still; decreasing: "
                                        "they count down")


class Events(_Strict):
    """DL/T 645 event counters at start (each 0-999999)."""

    cover_open: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    terminal_cover_open: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    magnetic_field: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    voltage_loss: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    current_loss_l1: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    current_loss_l2: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    current_loss_l3: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    reverse_flow_l1: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    reverse_flow_l2: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)
    reverse_flow_l3: int = Field(default=0, ge=0, le=EVENT_COUNT_MAX)


class SimLine(_Strict):
    """A serial line served on a pseudo-terminal; ``link`` names a symlink to its device."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    protocol: Literal["modbus-rtu", "dlt645"]
    baud: int | None = None
    parity: Literal["N", "E", "O"] | None = None
    stop_bits: Literal[1, 2] = 1
    byte_size: Literal[7, 8] = 8
    link: Path | None = Field(default=None, description="make this path a symlink to the pty")


class SimDevice(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    profile: str
    device_id: int = Field(default=1, ge=1, le=247, description="Modbus device id")
    address: str | None = Field(default=None, pattern=r"^[0-9]{12}$",
                                description="DL/T 645 meter address")
    line: str | None = Field(default=None, description="serial line; default: the TCP server")
    faults: Faults = Faults()
    metering: Metering = WHOLE_SITE
    tamper: Tamper = Tamper()
    events: Events = Events()


class SimLoad(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    relay: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*\.[a-z][a-z0-9_]*$",
                       description="<device>.<point> of the coil that switches it")
    kw: float = Field(gt=0)
    on: bool = True


class SiteConfig(_Strict):
    site: SiteInfo = SiteInfo()
    server: SimServer = SimServer()
    lines: list[SimLine] = []
    devices: list[SimDevice] = Field(min_length=1)
    loads: list[SimLoad] = []

    @model_validator(mode="after")
    def _check_refs(self) -> SiteConfig:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        line_names = {ln.name: ln for ln in self.lines}
        if len(line_names) != len(self.lines):
            raise ValueError("line names must be unique")
        for where in [None, *line_names]:
            on = [d for d in self.devices if d.line == where]
            dlt = where is not None and line_names[where].protocol == "dlt645"
            ids = [d.address if dlt else d.device_id for d in on]
            if len(set(ids)) != len(ids):
                raise ValueError(f"two devices share an address on "
                                 f"{'the TCP server' if where is None else where!r}")
        by_name = {d.name: d for d in self.devices}
        for i, d in enumerate(self.devices):
            try:
                prof = load_profile(d.profile)
            except KeyError as exc:
                raise ValueError(f"devices[{i}].profile: {exc.args[0]}") from None
            if d.line is not None and d.line not in line_names:
                raise ValueError(f"devices[{i}].line: no line named {d.line!r}")
            on_dlt = d.line is not None and line_names[d.line].protocol == "dlt645"
            if on_dlt != (prof.protocol == "dlt645"):
                raise ValueError(f"devices[{i}]: profile {prof.id!r} ({prof.protocol}) does not "
                                 "match where the device is served")
            if on_dlt and d.address is None:
                raise ValueError(f"devices[{i}].address: a DL/T 645 meter needs an address")
        load_names = [load.name for load in self.loads]
        if len(set(load_names)) != len(load_names):
            raise ValueError("load names must be unique")
        for i, d in enumerate(self.devices):
            prof = load_profile(d.profile)
            signs = [k for k, v in (("metering", d.metering != WHOLE_SITE),
                                    ("tamper", d.tamper != Tamper())) if v]
            if signs and prof.kind != "meter":
                raise ValueError(f"devices[{i}].{signs[0]}: {d.name!r} is not a meter "
                                 f"(profile {prof.id!r} is a {prof.kind})")
            for name in d.metering.loads:
                if name not in load_names:
                    raise ValueError(f"devices[{i}].metering.loads: no load named {name!r}")
            for key, count in d.events.model_dump().items():
                if count and not prof.has_point(event_point(key)):
                    raise ValueError(f"devices[{i}].events.{key}: profile {prof.id!r} has no "
                                     f"point {event_point(key)}")
        used: set[str] = set()
        for i, load in enumerate(self.loads):
            dev_name, point = load.relay.split(".", 1)
            if dev_name not in by_name:
                raise ValueError(f"loads[{i}].relay: no device named {dev_name!r}")
            prof = load_profile(by_name[dev_name].profile)
            if not prof.has_point(point) or prof.point(point).table is not Table.COIL:
                raise ValueError(f"loads[{i}].relay: {dev_name!r} has no coil point {point!r}")
            if load.relay in used:
                raise ValueError(f"loads[{i}].relay: {load.relay} already switches another load")
            used.add(load.relay)
        return self


def load_site(path: Path | str) -> SiteConfig:
    """Read and validate a simulated-site file; raises ``ConfigError``."""
    return load_toml(path, SiteConfig)
