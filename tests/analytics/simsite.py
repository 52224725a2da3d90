"""The simulated site's physics on a fast synthetic clock, read the way the agent reads it, into
the pure ledger — no sockets, no asyncio, no sleeping.

- ``lmt.firmware_sim.physics.SitePhysics`` is the site: a pure function of ``t`` (and of the
  relay states, signatures and sampling history). Every step integrates every meter's
  registers to ``t`` (the simulator does the same on any device's read).
- Each ledger meter is read as the agent's poller reads it: its fast points (power, voltage,
  current, power factor) every step, its slow points (energy registers, DL/T 645 event
  counters) when they are a ``slow_s`` old, and its energy registers at once after an
  interval boundary (``LedgerRunner.energy_points``). Every value goes over the wire's
  encoding: the simulator's encoder (float32 Modbus registers, scaled integers, DL/T 645 BCD
  with its formats and saturation) and the driver's decoder. A reading carries what was read
  at that moment: a slow point only when it was read (the ``Sample`` contract: the values of
  one read, at its time; the poller's ``latest`` keeps a slow point's last value in every
  reading after it, which the agent must not feed as if it had just been read).
- The reading becomes a ``Sample`` through ``lmt.agent.ledger.meter_points``/``to_sample``
  with the real profiles, and the ledger's configuration is the agent's own
  (``lmt.agent.ledger.ledger_config`` of a validated ``AgentConfig``: its tariff, holiday
  calendar, carbon factor, loss groups and theft settings).

What the ledger returns is kept, with the time of the step that returned it.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from lmt.agent.ledger import Points, ledger_config, to_sample
from lmt.analytics.ledger import LedgerConfig, LedgerState, Record, feed
from lmt.config.agent import AgentConfig
from lmt.config.profiles import Point, Profile, load_profile
from lmt.config.site import SiteConfig
from lmt.drivers.codec import decoder
from lmt.drivers.dlt645 import decode_value
from lmt.firmware_sim.dlt645 import encode_point
from lmt.firmware_sim.encoding import encode
from lmt.firmware_sim.physics import SitePhysics, lookup

CN = 8 * 3600  # the agent's default utc_offset_s
SESSION = "sim"
MONO0 = 1000.0  # the monotonic clock at the first step


def local_midnight(day: date, utc_offset_s: int = CN) -> float:
    """Unix time of local midnight starting ``day``."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() - utc_offset_s


# -- the agent's configuration -----------------------------------------------------------------

@functools.cache
def _key_dir() -> Path:
    """A folder with a platform public key (the agent's configuration must name one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(tempfile.mkdtemp(prefix="lmt-simsite-"))
    pub = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (folder / "platform.pub").write_bytes(pub)
    return folder


def agent_config(site: SiteConfig, *, main: str, meters: Iterable[str], step_s: float,
                 slow_s: float = 60.0, ledger: Mapping[str, Any] | None = None) -> AgentConfig:
    """The agent's configuration for ``site``: every device where the site serves it (TCP or
    its serial line), ``main`` the main meter, ``meters`` the ledger's meters, polled every
    ``step_s`` (slow points every ``slow_s``); ``ledger``: more ``[ledger]`` keys."""
    lines = [{"name": ln.name, "port": f"/dev/sim-{ln.name}", "protocol": ln.protocol}
             for ln in site.lines]
    devices: list[dict[str, Any]] = []
    for d in site.devices:
        dev: dict[str, Any] = {"name": d.name, "profile": d.profile}
        if d.line is None:
            dev.update(host="127.0.0.1", port=5020, device_id=d.device_id)
        else:
            dev.update(line=d.line, device_id=d.device_id)
            if d.address is not None:
                dev["address"] = d.address
        devices.append(dev)
    main_profile = load_profile(next(d.profile for d in site.devices if d.name == main))
    power = "power_w" if main_profile.has_point("power_w") else "power_kw"
    data = {
        "terminal": {"id": "sim-0001"},
        "security": {"platform_public_key": "platform.pub"},
        "poll": {"interval_s": step_s, "slow_interval_s": slow_s},
        "lines": lines, "devices": devices,
        "control": {"main_meter": main, "power_point": power},
        "ledger": {"meters": list(meters), **(ledger or {})},
    }
    return AgentConfig.model_validate(data, context={"base_dir": _key_dir()})


# -- reading a meter as the agent does ----------------------------------------------------------

def _wire(protocol: str, p: Point) -> Callable[[float], float | bool | None]:
    """The value a master decodes for ``value`` of point ``p`` as the simulated device
    encodes it."""
    if protocol == "dlt645":
        return lambda value: decode_value(encode_point(value, p), p)
    decode = decoder(p)
    return lambda value: decode(encode(value, p))


@dataclass
class MeterReader:
    """One ledger meter as the poller reads it: which points, when, through the wire."""

    name: str
    profile: Profile
    points: Points
    fast: tuple[Point, ...] = ()
    slow: tuple[Point, ...] = ()
    last_read: dict[str, float] = field(default_factory=dict)
    _wire: dict[str, Callable[[float], float | bool | None]] = field(default_factory=dict,
                                                                    repr=False)

    def __post_init__(self) -> None:
        p = self.points
        wanted = {name for name, _ in (*p.imports, *p.exports, *p.power)}
        wanted |= {n for n in (*p.voltage, *p.current) if n is not None}
        wanted |= {x[0] for x in p.phase_power if x is not None}
        wanted |= {*p.power_factor, *(name for _, name in p.counters)}
        chosen = [pt for pt in self.profile.points if pt.name in wanted]
        self.fast = tuple(pt for pt in chosen if pt.poll != "slow")
        self.slow = tuple(pt for pt in chosen if pt.poll == "slow")
        self._wire = {pt.name: _wire(self.profile.protocol, pt) for pt in chosen}

    def read(self, quantities: Mapping[str, float], t: float, slow_s: float) -> dict[str, Any]:
        """The points due at ``t`` (every fast one; a slow one ``slow_s`` after its last read,
        or when asked for), as the meter shows them."""
        got: dict[str, Any] = {}
        for pt in self.fast:
            got[pt.name] = self._value(quantities, pt)
        for pt in self.slow:
            last = self.last_read.get(pt.name)
            if last is None or t - last >= slow_s:
                got[pt.name] = self._value(quantities, pt)
                self.last_read[pt.name] = t
        return got

    def read_soon(self, names: Iterable[str]) -> None:
        for n in names:
            self.last_read.pop(n, None)

    def _value(self, quantities: Mapping[str, float], pt: Point) -> float | bool | None:
        got = self._wire[pt.name](lookup(quantities, pt.name))
        return None if isinstance(got, float) and not math.isfinite(got) else got


@dataclass(frozen=True)
class Kept:
    """A record the ledger returned, and the time of the step that returned it."""

    t: float
    meter: str
    record: Record


class SimLedger:
    """A simulated site stepped on a synthetic clock, its ledger meters read and fed to the
    pure ledger every step (see the module docstring).

    ``main``: the main meter (the bills' meter); ``meters``: the ledger's meters (default: the
    main meter); ``t0``: the first step's time; ``ledger``: more ``[ledger]`` keys of the
    agent's configuration (tariff, loss groups, theft). ``resolution_kwh``: per meter, a
    register digit to give its ``MeterSpec`` (which ``ledger_config`` leaves at 0.01 kWh)."""

    def __init__(self, site: SiteConfig, *, main: str, meters: Iterable[str] | None = None,
                 t0: float, step_s: float = 5.0, slow_s: float = 60.0,
                 ledger: Mapping[str, Any] | None = None,
                 resolution_kwh: Mapping[str, float] | None = None) -> None:
        self.site = site
        self.physics = SitePhysics(site)
        names = list(meters) if meters is not None else [main]
        self.agent = agent_config(site, main=main, meters=names, step_s=step_s, slow_s=slow_s,
                                  ledger=ledger)
        profiles = {d.name: load_profile(d.profile) for d in site.devices}
        self.config: LedgerConfig
        self.config, points = ledger_config(self.agent, profiles)
        if resolution_kwh:
            self.config = replace(self.config, meters=tuple(
                replace(m, resolution_kwh=resolution_kwh.get(m.name, m.resolution_kwh))
                for m in self.config.meters))
        self.readers = {name: MeterReader(name, profiles[name], points[name]) for name in names}
        self.state = LedgerState()
        self.step_s, self.slow_s = step_s, slow_s
        self.t0 = t0
        self.t = t0 - step_s  # the first step is at t0
        self.kept: list[Kept] = []
        self._asked: dict[str, float] = {}

    @property
    def mono(self) -> float:
        return MONO0 + (self.t - self.t0)

    def step(self) -> list[Kept]:
        """One poll cycle ``step_s`` later: the registers of meters whose interval ended are
        asked for first (as the agent does before it polls), then every meter is read and fed."""
        self.t = t = round(self.t + self.step_s, 6)
        mono = self.mono
        for name, ml in self.state.meters.items():
            if ml.pending and self._asked.get(name) != ml.pending[-1].start:
                self._asked[name] = ml.pending[-1].start
                self.readers[name].read_soon(self.readers[name].points.slow)
        self.physics.sample(t)  # every meter's registers to t
        out: list[Kept] = []
        for name, reader in self.readers.items():
            values = reader.read(self.physics.quantities(t, name), t, self.slow_s)
            sample = to_sample(reader.points, values, t, mono)
            self.state, records = feed(self.config, self.state, name, sample, SESSION)
            out += [Kept(t, name, r) for r in records]
        self.kept += out
        return out

    def run_until(self, t_end: float) -> list[Kept]:
        """Step until the clock reaches ``t_end`` (the last step at or just after it)."""
        out: list[Kept] = []
        while self.t + 1e-9 < t_end:
            out += self.step()
        return out

    # -- what was kept -------------------------------------------------------------------------

    def events(self, since: float | None = None) -> list[Kept]:
        return [k for k in self.kept if k.record.stream == "events"
                and (since is None or k.t >= since)]

    def intervals(self, meter: str) -> list[dict[str, Any]]:
        return [k.record.body for k in self.kept if k.record.stream == "intervals"
                and k.record.body.get("kind") == "meter" and k.record.body["meter"] == meter]

    def losses(self, group: str) -> list[dict[str, Any]]:
        return [k.record.body for k in self.kept if k.record.stream == "intervals"
                and k.record.body.get("kind") == "loss" and k.record.body["group"] == group]

    def bills(self, kind: str, *, final: bool = True) -> list[dict[str, Any]]:
        return [k.record.body for k in self.kept if k.record.stream == "bills"
                and k.record.body["kind"] == kind and k.record.body["final"] == final]

    def register(self, meter: str) -> float:
        """The meter's import register as the model holds it now."""
        return self.physics.registers(meter)["import_energy_kwh"]


def indicators(kept: Iterable[Kept]) -> list[tuple[str, str | None, str | None]]:
    """(event type, indicator or loss group, phase) of the events among ``kept``."""
    out = []
    for k in kept:
        if k.record.stream != "events":
            continue
        body = k.record.body
        data = body["data"]
        out.append((body["type"], data.get("indicator") or data.get("group"), data.get("phase")))
    return out
